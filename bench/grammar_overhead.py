"""Grammar-constrained decoding on this CPU: xgrammar, llguidance and outlines-core side by side.

What each library costs per generated token (compute the allowed-token mask, then advance the state by the
sampled token), what compiling a JSON schema costs, and what building its tokenizer table costs (once per
tokenizer), over two vocabularies:

* `glm4-151k`: a byte-level BPE of GLM-4's size (151,329 tokens plus GLM-4's specials) on GLM-4's pre-tokenizer
  regex, trained here with `tokenizers` on the venv's Python sources and jieba's Chinese dictionary (GLM-4's own
  file cannot be downloaded), read by glmkit's GLMFastTokenizer;
* `demo-sentencepiece`: the shipped demo model's ChatGLM-6B tokenizer (`ice_text.model`, 7,000 pieces).

Every library gets the same token bytes (the tokenizer's own `token_bytes`, what glmkit's constraint layer feeds
the chosen library), the same schema (a nested object with an enum, an array, an integer, a number and strings)
and the same document, written with json.dumps' separators and tokenized by longest match over those bytes, so
every library walks the same token sequence. Timings are single-threaded; medians over every token of the
repeated runs (the first run is a warm-up and not counted). `glmkit_xgrammar` is what glmkit's constraint layer
adds per token on top of the library's own step: the bitmask turned into a 0/-inf bias and added to the logits.

    python bench/grammar_overhead.py > bench/results/grammar_overhead.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmkit.generation import constraints  # noqa: E402
from glmkit.perf.speed import machine  # noqa: E402
from glmkit.text.fast_tokenizer import GLMFastTokenizer  # noqa: E402
from glmkit.text.glm4_tokenizer import GLM4_PATTERN, GLM4_SPECIALS  # noqa: E402
from glmkit.text.tokenizer import ChatGLMTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(np.__file__).resolve().parents[1]  # the venv's site-packages: the BPE's training text
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "kind": {"enum": ["book", "film", "album"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "rating": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "author": {"type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                   "required": ["first", "last"], "additionalProperties": False},
    },
    "required": ["title", "kind", "year", "rating", "tags", "author"],
    "additionalProperties": False,
}
DOCUMENT = {"title": "The Left Hand of Darkness (黑暗的左手)", "kind": "book", "year": 1969, "rating": 4.56,
            "tags": ["science fiction", "classic", "anthropology"], "author": {"first": "Ursula", "last": "Le Guin"}}
RUNS = 6


def corpus() -> Iterator[str]:
    """~60 MB of Python source, then jieba's dictionary words in runs of 200 (Chinese merges)."""
    total = 0
    for path in sorted(SITE.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total > 60_000_000:
            break
    words = [line.split(" ")[0] for line in (SITE / "jieba" / "dict.txt").read_text(encoding="utf-8").splitlines()]
    for i in range(0, len(words), 200):
        yield "".join(words[i:i + 200])


def glm4_sized_tokenizer(directory: Path) -> GLMFastTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=151_329, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS])
    bpe.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8")
    return GLMFastTokenizer.from_pretrained(directory)


def longest_match(text: bytes, table: list[bytes | None]) -> list[int]:
    """Token ids spelling `text` exactly, longest token first at each position."""
    ids = {b: i for i, b in enumerate(table) if b}
    longest = max(len(b) for b in ids)
    out, at = [], 0
    while at < len(text):
        size = next(n for n in range(min(longest, len(text) - at), 0, -1) if text[at:at + n] in ids)
        out.append(ids[text[at:at + size]])
        at += size
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


class XGrammar:
    name = "xgrammar"

    def __init__(self, table: list[bytes | None], stops: list[int]) -> None:
        import xgrammar

        self.xgr = xgrammar
        vocab = [b if b is not None else b"" for b in table]  # empty: a special, never allowed by a grammar
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=len(table), stop_token_ids=stops)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, len(table))

    def compile(self, schema: dict) -> object:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: object) -> object:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.mask)

    def advance(self, matcher, token: int) -> None:
        if not matcher.accept_token(token):
            raise AssertionError(f"xgrammar refused token {token}")


class LLGuidance:
    name = "llguidance"

    def __init__(self, table: list[bytes | None], stops: list[int]) -> None:
        import llguidance

        self.llg = llguidance

        class Wrapped:
            eos_token_id, bos_token_id = stops[0], None
            tokens = [b if b is not None else b"\xff[special_%d]" % i for i, b in enumerate(table)]
            special_token_ids = [i for i, b in enumerate(table) if b is None]

            def __call__(self, text: bytes) -> list[int]:
                return longest_match(text, table)

        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=len(table))
        self.mask = torch.zeros((len(table) + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict) -> object:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        return self.llg.LLMatcher(self.tokenizer, grammar)  # the grammar is parsed and checked here

    def matcher(self, compiled) -> object:
        return compiled.deep_copy()

    def fill(self, matcher) -> None:
        matcher.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)

    def advance(self, matcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise AssertionError(f"llguidance refused token {token}: {matcher.get_error()}")


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, table: list[bytes | None], stops: list[int]) -> None:
        import outlines_core

        self.oc = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(table):
            if b and i not in stops:
                by_bytes.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(stops[0], by_bytes)
        self.mask = torch.zeros((len(table) + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict) -> object:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled) -> object:
        return self.oc.Guide(compiled)

    def fill(self, matcher) -> None:
        matcher.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)

    def advance(self, matcher, token: int) -> None:
        matcher.advance(token)


def measure(library, tokens: list[int]) -> dict:
    compile_s, compiled = timed(lambda: library.compile(SCHEMA))
    compiles = [compile_s] + [timed(lambda: library.compile(SCHEMA))[0] for _ in range(2)]
    masks, advances, firsts = [], [], []
    for run in range(RUNS):
        matcher = library.matcher(compiled)
        for step, token in enumerate(tokens):
            mask_s, _ = timed(lambda m=matcher: library.fill(m))
            advance_s, _ = timed(lambda m=matcher, t=token: library.advance(m, t))
            if step == 0:
                firsts.append(mask_s)
            if run:
                masks.append(mask_s)
                advances.append(advance_s)
    per_token = [m + a for m, a in zip(masks, advances, strict=True)]
    return {"compile_ms_median": round(statistics.median(compiles) * 1e3, 2),
            "first_mask_us_median": round(statistics.median(firsts) * 1e6, 1),
            "per_token_us_median": round(statistics.median(per_token) * 1e6, 1),
            "mask_us_median": round(statistics.median(masks) * 1e6, 1),
            "advance_us_median": round(statistics.median(advances) * 1e6, 1),
            "per_token_us_p90": round(sorted(per_token)[int(len(per_token) * 0.9)] * 1e6, 1)}


def glmkit_cost(tokenizer, tokens: list[int], stops: list[int]) -> dict:
    """glmkit's constraint layer end to end, per token: Matcher.bias (the library's bitmask as a 0/-inf bias),
    the bias added to the logits, Matcher.advance (xgrammar's step and the next bitmask); and its one-off costs."""
    build_s, vocab = timed(lambda: constraints.vocabulary(tokenizer))
    compile_s, grammar = timed(lambda: constraints.json_grammar(vocab, SCHEMA))
    size = len(tokenizer)  # once: GLMFastTokenizer's len() asks the tokenizers library (~90 ms at 151K)
    logits = torch.randn(size)
    bias_times, step_times = [], []
    for run in range(RUNS):
        matcher = grammar.matcher(stops)
        for token in tokens:
            start = time.perf_counter()
            logits + matcher.bias(size)
            biased = time.perf_counter()
            matcher.advance(token)
            if run:
                bias_times.append(biased - start)
                step_times.append(time.perf_counter() - start)
        assert matcher.finished
    return {"tokenizer_build_s": round(build_s, 2), "compile_ms": round(compile_s * 1e3, 2),
            "per_token_us_median": round(statistics.median(step_times) * 1e6, 1),
            "bias_and_add_us_median": round(statistics.median(bias_times) * 1e6, 1)}


def bench_vocabulary(name: str, tokenizer, stops: list[int]) -> dict:
    table = tokenizer.token_bytes()
    text = json.dumps(DOCUMENT, ensure_ascii=False).encode("utf-8")
    tokens = longest_match(text, table)
    result = {"vocabulary": name, "tokens": len(table), "document_tokens": len(tokens),
              "glmkit_xgrammar": glmkit_cost(tokenizer, tokens, stops), "libraries": {}}
    print(name, "glmkit", result["glmkit_xgrammar"], file=sys.stderr)
    for kind in (XGrammar, LLGuidance, OutlinesCore):
        build_s, library = timed(lambda k=kind: k(table, stops))
        row = {"tokenizer_build_s": round(build_s, 2)}
        try:
            row.update(measure(library, tokens))
        except Exception as error:  # noqa: BLE001 (a library that cannot do it is a result too)
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        result["libraries"][library.name] = row
        print(name, library.name, row, file=sys.stderr)
    return result


def main() -> None:
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as directory:
        train_s, big = timed(lambda: glm4_sized_tokenizer(Path(directory)))
        print(f"trained the 151K BPE in {train_s:.0f} s", file=sys.stderr)
        stops = [big.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        results.append(bench_vocabulary("glm4-151k", big, stops))
    demo = ChatGLMTokenizer.from_pretrained(ROOT / "glmkit" / "assets" / "demo-model")
    results.append(bench_vocabulary("demo-sentencepiece", demo, [demo.eos_token_id]))
    versions = {}
    for package in ("xgrammar", "llguidance", "outlines-core"):
        from importlib.metadata import version

        versions[package] = version(package)
    print(json.dumps({"machine": machine(), "versions": versions, "schema": SCHEMA, "document": DOCUMENT,
                      "runs": RUNS, "results": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
