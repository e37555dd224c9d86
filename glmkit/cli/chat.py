"""The commands that talk to a model: `chat` in the terminal, `generate` and `infill` for scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator

from glmkit.cli.common import (
    add_model_args,
    add_sampling_args,
    from_rank0,
    load_from_args,
    sampling_kwargs,
    text_argument,
)
from glmkit.parallel import tp as tp_lib
from glmkit.text.streaming import TextStream

CHAT_HELP = """\
glmkit chat: type a message and press Enter.
  clear          forget the conversation so far
  stop, Ctrl-D   leave
  Ctrl-C         interrupt the answer being written (the conversation goes on)
  a line ending in \\ continues on the next line; \"\"\" on its own line starts and ends a block"""


def read_query(prompt: str) -> str:
    """One message: a line, lines joined by trailing backslashes, or a \"\"\" block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (line := input("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    return "\n".join([*lines, line])


def print_stream(responses: Iterator[str], lead: str = "", stop: threading.Event | None = None) -> str | None:
    """Print a growing, cleaned-up response as it settles (the clean-up may still change its last character),
    after `lead` once the first text arrives. None when `stop` was set: the answer was cut short."""
    stream, response, started = TextStream(hold_last=True), "", False
    for response in responses:
        if not started:
            _write(lead)
            started = True
        _write(stream.update(response))
        if stop is not None and stop.is_set():
            _write(" [interrupted]\n")
            return None
    _write(("" if started else lead) + (stream.finish(response) if response.startswith(stream.shown)
                                         else "\n" + response) + "\n")
    return response


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[threading.Event]:
    """While an answer streams, Ctrl-C sets a flag that the loop reads after every token, instead of raising
    KeyboardInterrupt wherever Python happens to be: one that lands in a destructor is lost, and the answer
    would run on to max_length."""
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def answer_turn(model, tokenizer, query: str, history: list, options: dict) -> list | None:
    """Stream one answer; return the history with this turn, in the family's own shape (ChatGLM3 and GLM-4
    keep role messages, and a tool call comes back as a dict, shown as JSON). Ctrl-C stops the answer: what was
    written stays on the screen, but the turn is not kept (a cut-off answer would derail the next turns): None.
    The model keeps the turn's KV cache either way (options' reuse_cache, on by default): the next turn prefills
    only what its prompt does not share with the cached ids, so a dropped turn costs nothing but its own tokens."""
    new_history = history

    def replies() -> Iterator[str]:
        nonlocal new_history
        for response, new_history in model.stream_chat(tokenizer, query, history, **options):  # noqa: B007
            yield response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)

    with ctrl_c_stops() as pressed:
        stream = replies()
        with contextlib.closing(stream):  # leaving early ends the generation
            shown = print_stream(stream, "GLM: ", pressed)
    return None if shown is None else new_history


def next_message() -> str | None:
    """The user's next message; None when they leave (Ctrl-D), empty after Ctrl-C."""
    try:
        return read_query("You: ")
    except EOFError:
        print()
        return None
    except KeyboardInterrupt:
        print()
        return ""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Chat samples by default: a conversation reads better varied than greedy."""
    add_model_args(parser)
    add_sampling_args(parser, sample_by_default=True)
    parser.add_argument("--no-cache-reuse", dest="cache_reuse", action="store_false",
                        help="prefill every turn's whole prompt instead of continuing the last turn's KV cache "
                             "(ChatGLM2/3, GLM-4; the answers are the same, only slower)")


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal session; under --tp rank 0 reads the messages and every rank answers them."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    model, tokenizer = load_from_args(args)
    print(f"{CHAT_HELP}\nmodel: {getattr(model, 'name_or_path', '?')}\n")
    history: list = []  # the family's shape: (query, response) pairs, or role messages (ChatGLM3, GLM-4)
    while True:
        query = from_rank0(next_message() if tp_lib.rank() == 0 else None, args.tp)
        if query is None or query.strip() == "stop":
            return 0
        if query.strip() == "clear":
            history = []
            model.clear_kv_cache()  # the last turn's retained cache too
            print("(conversation cleared)")
            continue
        if not query.strip():
            continue
        try:
            options = {**sampling_kwargs(args), "reuse_cache": getattr(args, "cache_reuse", True)}
            new_history = answer_turn(model, tokenizer, query, history, options)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"(not answered: {e}; raise --max-length or type 'clear' to start over)")
            continue
        if new_history is not None:
            history = new_history


def add_one_shot_arguments(parser: argparse.ArgumentParser, text: str, what: str, max_new_tokens_help: str) -> None:
    """generate's and infill's shared shape: the TEXT words (or `-` for stdin), a model, greedy unless --sample."""
    parser.add_argument(text, nargs="+", help=f"{what}; '-' reads it from stdin")
    add_model_args(parser)
    add_sampling_args(parser, sample_by_default=False)
    parser.add_argument("--max-new-tokens", type=int, default=None, help=max_new_tokens_help)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """--stop: a script often wants the answer up to a marker, not the model's whole turn."""
    add_one_shot_arguments(parser, "prompt", "the prompt", "stop after this many tokens")
    parser.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one answer to stdout, bare, so that scripts can pipe it."""
    model, tokenizer = load_from_args(args, progress=False)
    prompt = text_argument(args.prompt, args.tp)
    from glmkit.generation.chat import stream_text
    from glmkit.generation.generate import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), **sampling_kwargs(args))
    printed = ""
    for text in stream_text(model, tokenizer, tokenizer.encode(prompt), params):
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def add_infill_arguments(parser: argparse.ArgumentParser) -> None:
    """--json: with several blanks, a script needs each answer apart, not only the filled text."""
    add_one_shot_arguments(parser, "text", "the text with blanks", "longest answer per blank, in tokens")
    parser.add_argument("--json", action="store_true", help='print {"text", "answers"}')


def cmd_infill(args: argparse.Namespace) -> int:
    """The text with its blanks filled (or, with --json, the answers too)."""
    from glmkit.generation.generate import SamplingParams
    from glmkit.generation.infill import fill_text

    model, tokenizer = load_from_args(args, progress=False)
    text = text_argument(args.text, args.tp)
    filled = fill_text(model, tokenizer, text, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                              **sampling_kwargs(args)))
    if args.json:
        print(json.dumps({"text": filled.text, "answers": filled.answers}, ensure_ascii=False))
    else:
        print(filled.text)
    return 0
