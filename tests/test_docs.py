"""The documentation against the code: README.md and every docs/*.md page name only what exists.

For each page:
- commands: every `glmkit ...`, `./run ...`, `torchrun ... -m glmkit ...` and `python -m glmkit ...` line of a
  shell code block (and every such inline code span) names a real subcommand, nested ones included
  (`glmkit data build`, `glmkit train sft`), and only option strings that subcommand's parser has; a whole
  code-block line must also parse. `python bench/X.py --flag` needs the script and the flag in it.
- imports: every `from glmkit... import X` / `import glmkit...` in a python code block (or an inline span)
  imports, and X exists; `glmkit.NAME`, `model.NAME(` and `tokenizer.NAME(` in python blocks exist on
  glmkit, GLMForCausalLM and ChatGLMTokenizer. Nothing is run, so no model download is ever needed.
- paths: every `glmkit/...`, `bench/...`, `docs/...`, `tests/...` or `scripts/...` path in the text exists.
- links: every relative markdown link resolves to a file, and an `#anchor` to a heading of that page.
Each problem names the page, the line and what is wrong.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Files docs/architecture.md describes as the design while other branches write them. Remove an entry once
# it has landed (an entry that exists is harmless, but then it no longer needs to be here).
PLANNED: set[str] = set()  # paths the docs may name before their file lands

# Flags of other programs that a page may name in prose: torchrun's.
FOREIGN_FLAGS = {"--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py", "python3"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
PATH_RE = re.compile(r"(?<![\w./~-])((?:glmkit|bench|docs|tests|scripts)/[\w./*<>{}-]*)")
LINK_RE = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
INLINE_RE = re.compile(r"`([^`]+)`")
FLAG_RE = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
IMPORT_RE = re.compile(r"(?:from\s+glmkit[\w.]*\s+import\s+[\w, ]+|import\s+glmkit[\w.]*)")


# --- reading a page ----------------------------------------------------------------------------------------------

@dataclass
class Block:
    lang: str
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, text)


@dataclass
class Page:
    name: str  # relative to the repository root, for messages
    path: Path
    blocks: list[Block]
    prose: list[tuple[int, str]]  # lines outside code blocks

    def paragraphs(self):
        """Runs of consecutive prose lines, as (first line number, text with newlines), for spans that wrap."""
        run: list[tuple[int, str]] = []
        for number, text in [*self.prose, (-1, "")]:
            if text.strip() and (not run or number == run[-1][0] + 1):
                run.append((number, text))
                continue
            if run:
                yield run[0][0], "\n".join(t for _, t in run)
            run = [(number, text)] if text.strip() else []


def read_page(path: Path, text: str | None = None) -> Page:
    text = path.read_text(encoding="utf-8") if text is None else text
    blocks: list[Block] = []
    prose: list[tuple[int, str]] = []
    block: Block | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence and block is None:
            block = Block(fence.group(2).lower())
        elif fence and block is not None and not fence.group(2):
            blocks.append(block)
            block = None
        elif block is not None:
            block.lines.append((number, line))
        else:
            prose.append((number, line))
    assert block is None, f"{path}: a code block is never closed"
    try:
        name = str(path.relative_to(ROOT))
    except ValueError:
        name = str(path)
    return Page(name, path, blocks, prose)


def line_of(first: int, paragraph: str, offset: int) -> int:
    return first + paragraph.count("\n", 0, offset)


# --- commands ----------------------------------------------------------------------------------------------------

@functools.cache
def parser() -> argparse.ArgumentParser:
    from glmkit.cli import build_parser

    return build_parser()


@functools.cache
def run_script_commands() -> frozenset[str]:
    """The commands ./run handles itself (`test`, `lint`) rather than passing on to glmkit."""
    return frozenset(re.findall(r"^\s*([a-z][\w-]*)\)", (ROOT / "run").read_text(), flags=re.MULTILINE))


def subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def resolve(words: list[str], partial: bool = False) -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    """Walk `words` (glmkit's argv) down the subcommands: (the last parser, the subcommand path, the rest).

    `partial`: words may stop before the last subcommand (prose names `glmkit data` as a group)."""
    p, path = parser(), []
    while (sub := subparsers(p)) is not None:
        where = " ".join(["glmkit", *path])
        if partial and not words and path:
            break
        if not words or words[0] not in sub.choices:
            got = f"{words[0]!r}" if words else "nothing"
            raise LookupError(f"`{where}` has no subcommand {got} (it has: {', '.join(sorted(sub.choices))})")
        path.append(words[0])
        p, words = sub.choices[words[0]], words[1:]
    return p, path, words


def check_flags(p: argparse.ArgumentParser, path: list[str], flags: list[str]) -> list[str]:
    known = p._option_string_actions
    return [f"`glmkit {' '.join(path)}` has no option {flag}" for flag in flags if flag.split("=")[0] not in known]


@functools.cache
def every_option() -> frozenset[str]:
    """Every option string of every glmkit subcommand, and of the bench scripts."""
    found, todo = set(), [parser()]
    while todo:
        p = todo.pop()
        found |= set(p._option_string_actions)
        if (sub := subparsers(p)) is not None:
            todo += list(sub.choices.values())
    for script in (ROOT / "bench").glob("*.py"):
        found |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", script.read_text()))
    return frozenset(found)


def glmkit_argv(tokens: list[str]) -> tuple[str, list[str]] | None:
    """('glmkit', argv) for a glmkit invocation, ('bench', [script, args...]) for a bench script, else None."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value in front
        tokens = tokens[1:]
    if not tokens:
        return None
    head = tokens[0]
    if head == "glmkit":
        return "glmkit", tokens[1:]
    if head == "./run":
        if len(tokens) > 1 and tokens[1] in run_script_commands():
            return None  # ./run test, ./run lint: the script's own commands
        return "glmkit", tokens[1:] or ["chat"]
    if head == "torchrun" or re.fullmatch(r"(\S*/)?python3?", head):
        for i, token in enumerate(tokens[:-1]):
            if token == "-m":
                return ("glmkit", tokens[i + 2:]) if tokens[i + 1] == "glmkit" else ("module", tokens[i + 1:])
        if len(tokens) > 1 and tokens[1].startswith("bench/"):
            return "bench", tokens[1:]
    return None


def check_bench(script: str, flags: list[str]) -> list[str]:
    path = ROOT / script
    if not path.is_file():
        return [f"{script} does not exist"]
    source = path.read_text()
    return [f"{script} has no option {flag}" for flag in flags if f'"{flag.split("=")[0]}"' not in source
            and f"'{flag.split('=')[0]}'" not in source]


def check_invocation(kind: str, argv: list[str], full_parse: bool) -> list[str]:
    if kind == "module":
        module = argv[0]
        ok = module.startswith("glmkit") and importlib.util.find_spec(module) is not None
        return [] if ok or not module.startswith("glmkit") else [f"no module {module}"]
    flags = [t for t in argv if FLAG_RE.fullmatch(t.split("=")[0])]
    if kind == "bench":
        return check_bench(argv[0], flags)
    try:
        p, path, rest = resolve(argv)
    except LookupError as e:
        return [str(e)]
    problems = check_flags(p, path, [t for t in rest if FLAG_RE.fullmatch(t.split("=")[0])])
    placeholder = any(t in {"...", "ARGS"} for t in argv)
    if full_parse and not problems and not placeholder:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            parser().parse_args(argv)
        if err.getvalue():
            problems.append(f"does not parse: {err.getvalue().strip().splitlines()[-1]}")
    return problems


def split_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    commands, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def shell_lines(block: Block):
    """(line number, logical line): continuation lines ending in a backslash joined, `$ ` prompts dropped."""
    pending, start = "", 0
    for number, text in block.lines:
        if not pending:
            start = number
        text = re.sub(r"^\s*\$ ", "", text) if not pending else text
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        yield start, pending + text
        pending = ""
    if pending:
        yield start, pending


INVOKES = re.compile(r"^\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(glmkit\s|\./run(\s|$)|torchrun\s|python3?\s+(-m\s+glmkit|bench/))")


def command_problems(page: Page) -> tuple[list[str], int]:
    problems, seen = [], 0
    for block in page.blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in shell_lines(block):
            if not any(INVOKES.match(part) for part in re.split(r"\|\||&&|[|;&]", line)):
                continue
            try:
                commands = split_commands(line)
            except ValueError as e:
                problems.append(f"{page.name}:{number}: cannot split `{line.strip()}`: {e}")
                continue
            for tokens in commands:
                found = glmkit_argv(tokens)
                if found is None:
                    continue
                seen += 1
                for problem in check_invocation(*found, full_parse=True):
                    problems.append(f"{page.name}:{number}: `{line.strip()}`: {problem}")
    for first, paragraph in page.paragraphs():
        for match in INLINE_RE.finditer(paragraph):
            span = " ".join(match.group(1).split())
            number = line_of(first, paragraph, match.start())
            if span.startswith("--"):  # a flag named in prose: it must be some command's
                seen += 1
                for flag in FLAG_RE.findall(span.replace("\\|", " ")):
                    if flag.startswith("--") and flag not in every_option() and flag not in FOREIGN_FLAGS:
                        problems.append(f"{page.name}:{number}: `{span}`: no glmkit command has the option {flag}")
                continue
            if not INVOKES.match(span):
                continue
            words = span.replace("\\|", " ").split()
            found = glmkit_argv(words)
            if found is None:
                continue
            kind, argv = found
            seen += 1
            if kind == "glmkit":
                # Inline: the subcommand words, then any flags; the rest may be prose-like placeholders.
                lead = []
                for word in argv:
                    if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                        break
                    lead.append(word)
                try:
                    p, path, _ = resolve(lead, partial=True)
                except LookupError as e:
                    problems.append(f"{page.name}:{number}: `{span}`: {e}")
                    continue
                flags = FLAG_RE.findall(" ".join(argv))
                for problem in check_flags(p, path, flags):
                    problems.append(f"{page.name}:{number}: `{span}`: {problem}")
            else:
                for problem in check_invocation(kind, argv, full_parse=False):
                    problems.append(f"{page.name}:{number}: `{span}`: {problem}")
    return problems, seen


# --- imports -----------------------------------------------------------------------------------------------------

def check_import(statement: str) -> list[str]:
    try:
        tree = ast.parse(statement)
    except SyntaxError as e:
        return [f"`{statement}` is not Python: {e.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                try:
                    importlib.import_module(alias.name)
                except ImportError as e:
                    problems.append(f"`import {alias.name}` fails: {e}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                problems.append(f"`from {node.module} import ...` fails: {e}")
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                if importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    problems.append(f"{node.module} has no {alias.name}")
    return problems


def python_statements(block: Block):
    """(line number, import statement) for the glmkit imports of a block; parenthesised ones joined."""
    lines = block.lines
    i = 0
    while i < len(lines):
        number, text = lines[i]
        code = text.split("#")[0].strip()
        if re.match(r"(from\s+glmkit[\w.]*\s+import|import\s+glmkit)\b", code):
            while code.count("(") > code.count(")") and i + 1 < len(lines):
                i += 1
                code += " " + lines[i][1].split("#")[0].strip()
            yield number, code
        i += 1


def attribute_problems(number: int, text: str, page: Page) -> list[str]:
    import glmkit
    from glmkit import ChatGLMTokenizer, GLMForCausalLM

    code = text.split("#")[0]
    if re.match(r"\s*(from|import)\s", code):
        return []
    problems = []
    for owner, obj in (("glmkit", glmkit), ("model", GLMForCausalLM), ("tokenizer", ChatGLMTokenizer)):
        pattern = rf"(?<![\w.]){owner}\.([A-Za-z_]\w*)" + ("" if owner == "glmkit" else r"\s*\(")
        for name in re.findall(pattern, code):
            if hasattr(obj, name):
                continue
            if owner == "glmkit" and importlib.util.find_spec(f"glmkit.{name}") is not None:
                continue
            what = owner if owner == "glmkit" else f"{owner} ({obj.__name__})"
            problems.append(f"{page.name}:{number}: {what} has no attribute {name}")
    return problems


def import_problems(page: Page) -> tuple[list[str], int]:
    problems, seen = [], 0
    for block in page.blocks:
        if block.lang not in PYTHON_LANGS:
            continue
        for number, statement in python_statements(block):
            seen += 1
            problems += [f"{page.name}:{number}: {p}" for p in check_import(statement)]
        for number, text in block.lines:
            problems += attribute_problems(number, text, page)
    for first, paragraph in page.paragraphs():
        for match in INLINE_RE.finditer(paragraph):
            span = " ".join(match.group(1).split())
            for statement in IMPORT_RE.findall(span):
                seen += 1
                number = line_of(first, paragraph, match.start())
                problems += [f"{page.name}:{number}: {p}" for p in check_import(statement.strip().rstrip(","))]
    return problems, seen


# --- paths -------------------------------------------------------------------------------------------------------

def all_lines(page: Page) -> list[tuple[int, str]]:
    return sorted([*page.prose, *(line for block in page.blocks for line in block.lines)])


def path_problems(page: Page) -> tuple[list[str], int]:
    problems, seen = [], 0
    for number, text in all_lines(page):
        text = re.sub(r"https?://\S+", "", text)
        for raw in PATH_RE.findall(text):
            path = raw.rstrip(".,;:")
            if any(c in path for c in "*<>{}"):
                continue  # a glob or a template such as glmkit/cli/<group>.py
            seen += 1
            if path in PLANNED or path.rstrip("/") in PLANNED:
                continue
            if not (ROOT / path).exists():
                problems.append(f"{page.name}:{number}: {path} does not exist")
    return problems, seen


# --- links -------------------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    found: dict[str, int] = {}
    result = set()
    for _, text in page.prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", text)
        if heading:
            base = slug(heading.group(1))
            n = found.get(base, 0)
            found[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_problems(page: Page) -> tuple[list[str], int]:
    problems, seen = [], 0
    for first, paragraph in page.paragraphs():
        without_code = INLINE_RE.sub(lambda m: " " * len(m.group(0)), paragraph)
        for match in LINK_RE.finditer(without_code):
            target = match.group(2)
            if re.match(r"[a-z][\w+.-]*:", target):
                continue  # https:, mailto:
            seen += 1
            number = line_of(first, paragraph, match.start())
            file_part, _, anchor = target.partition("#")
            destination = (page.path.parent / file_part).resolve() if file_part else page.path
            if not destination.exists():
                problems.append(f"{page.name}:{number}: link [{match.group(1)}]({target}): {file_part} does not exist")
                continue
            if anchor and destination.suffix == ".md" and anchor not in anchors(read_page(destination)):
                problems.append(f"{page.name}:{number}: link [{match.group(1)}]({target}): "
                                f"{destination.name} has no heading #{anchor}")
    return problems, seen


# --- the tests ---------------------------------------------------------------------------------------------------

CHECKS = {"commands": command_problems, "imports": import_problems, "paths": path_problems, "links": link_problems}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page(path, check):
    problems, _ = CHECKS[check](read_page(path))
    assert not problems, f"{len(problems)} stale {check} in {path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checks_see_the_pages():
    """Guard against checks that pass because they find nothing: the pages hold plenty of each."""
    totals = {name: sum(check(read_page(p))[1] for p in PAGES) for name, check in CHECKS.items()}
    assert totals["commands"] >= 80, totals
    assert totals["imports"] >= 8, totals
    assert totals["paths"] >= 40, totals
    assert totals["links"] >= 20, totals


def test_readme_links_every_page():
    readme = read_page(ROOT / "README.md")
    linked = {(ROOT / m.group(2).partition("#")[0]).resolve() for _, para in readme.paragraphs()
              for m in LINK_RE.finditer(para)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page named {missing}"


BAD = """# A page

```bash
./run chat --no-such-flag
glmkit data frobnicate --out x
torchrun --nproc-per-node 2 -m glmkit generate --model m --tp 2 --bits 4 "hi"
./run bench --shape huge
```

```python
from glmkit import NoSuchName
from glmkit.nowhere import x
model.no_such_method(tokenizer)
```

See `glmkit chat --also-missing`, glmkit/no_such_file.py, and [a page](no-such-page.md), [here](#nowhere).
`--no-such-option` is in no parser.
"""


def test_the_checks_catch_stale_text(tmp_path):
    page = read_page(tmp_path / "bad.md", BAD)
    (tmp_path / "bad.md").write_text(BAD)
    commands, _ = command_problems(page)
    assert any("bad.md:4:" in p and "no option --no-such-flag" in p for p in commands), commands
    assert any("bad.md:5:" in p and "`glmkit data` has no subcommand 'frobnicate'" in p for p in commands), commands
    assert any("bad.md:6:" in p and "`glmkit generate` has no option --bits" in p for p in commands), commands
    assert any("bad.md:7:" in p and "does not parse" in p and "huge" in p for p in commands), commands
    assert any("bad.md:16:" in p and "--also-missing" in p for p in commands), commands
    assert any("bad.md:17:" in p and "no glmkit command has the option --no-such-option" in p for p in commands)
    imports, _ = import_problems(page)
    assert any("bad.md:11:" in p and "no NoSuchName" in p for p in imports), imports
    assert any("bad.md:12:" in p and "glmkit.nowhere" in p for p in imports), imports
    assert any("bad.md:13:" in p and "no_such_method" in p for p in imports), imports
    paths, _ = path_problems(page)
    assert any("bad.md:16: glmkit/no_such_file.py does not exist" in p for p in paths), paths
    links, _ = link_problems(page)
    assert any("no-such-page.md does not exist" in p for p in links), links
    assert any("has no heading #nowhere" in p for p in links), links


def test_slugs_follow_github():
    assert slug("Evaluation harness: `glmkit eval`") == "evaluation-harness-glmkit-eval"
    assert slug("INT8 / INT4 quantization") == "int8--int4-quantization"
    assert slug("What it can do (measured)") == "what-it-can-do-measured"


def test_the_front_page_python_tour_runs_on_the_demo_model_and_says_what_it_prints():
    """The README's Python example needs no download: run it as written, and hold its comments to the truth."""
    page = read_page(ROOT / "README.md")
    [tour] = [b for b in page.blocks if b.lang == "python"]
    source = "\n".join(line for _, line in tour.lines)
    printed = io.StringIO()
    namespace: dict = {}
    import torch

    torch.manual_seed(0)  # chat samples (top_p 0.7): the demo model's answers are peaked, but keep it repeatable
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["response"] == "Paris in Chinese is 巴黎."  # the comment on that line
    assert "法国的首都是巴黎。" in printed.getvalue()
