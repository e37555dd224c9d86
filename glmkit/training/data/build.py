"""Build the demo model's data from scratch: `python -m glmkit.training.data.build --out DIR [--tiny] [--seed N]`.

Fetches the pinned sources (cached), then writes

    DIR/pretrain/{train,heldout}.jsonl   {"text", "lang", "source"}: Chinese and English documents
    DIR/sft/{train,heldout}.jsonl        {"skill", "lang", "history", "prompt", "response", "template"}
    DIR/sources.json                     every source used, with version, registry, licence and URL
    DIR/summary.json                     counts per split, skill and language; corpus sizes

The same seed gives the same files. The tiny build reads the same sources and keeps a slice of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from glmkit.training.data import corpus, instructions
from glmkit.training.data.sources import SOURCES, SourceError, fetch


def fetch_sources(cache_dir: str | os.PathLike | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Archives by source name, and the sources skipped with the reason.

    Only the Debian sources are optional, and only where apt-get does not exist (a non-Debian machine):
    the build then goes on without English prose and says so. Any other failure is an error.
    """
    archives, skipped = {}, {}
    for name, source in SOURCES.items():
        try:
            archives[name] = fetch(source, cache_dir)
        except SourceError as e:
            if source.registry != "debian" or shutil.which("apt-get") is not None:
                raise
            skipped[name] = f"skipped: apt-get is not available ({e})"
            print(f"glmkit data: {name} {skipped[name]}", file=sys.stderr)
    return archives, skipped


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _corpus_stats(docs: list[dict]) -> dict:
    stats: dict = {"documents": Counter(), "characters": Counter(), "utf8_bytes": Counter()}
    for d in docs:
        stats["documents"][d["lang"]] += 1
        stats["characters"][d["lang"]] += len(d["text"])
        stats["utf8_bytes"][d["lang"]] += len(d["text"].encode("utf-8"))
    return {k: dict(sorted(v.items())) for k, v in stats.items()}


def _sft_stats(examples: list[dict]) -> dict:
    by_skill: dict[str, Counter] = defaultdict(Counter)
    for e in examples:
        by_skill[e["skill"]][e["lang"]] += 1
    return {
        "examples": len(examples),
        "by_lang": dict(sorted(Counter(e["lang"] for e in examples).items())),
        "by_skill": {s: dict(sorted(c.items())) for s, c in sorted(by_skill.items())},
    }


def build_dataset(
    out_dir: str | os.PathLike, *, tiny: bool = False, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> dict:
    """Fetch the sources, write the corpus and the chat data under `out_dir`, and return the summary."""
    start = time.perf_counter()
    out = Path(out_dir)
    archives, skipped = fetch_sources(cache_dir)
    fetched = time.perf_counter()

    idioms = corpus.load_idioms(archives["chengyu-cli"])
    poems = corpus.load_poems(archives["chinese-poetry"])
    docs = corpus.pretrain_documents(archives, idioms, poems, tiny=tiny)
    pre_train, pre_held = corpus.split_heldout(docs, instructions.seeded_rng(seed, "pretrain"))

    facts = instructions.load_facts(archives, idioms, poems, tiny=tiny)
    sft_train, sft_held, held_templates = instructions.build_examples(facts, tiny=tiny, seed=seed)

    _write_jsonl(out / "pretrain" / "train.jsonl", pre_train)
    _write_jsonl(out / "pretrain" / "heldout.jsonl", pre_held)
    _write_jsonl(out / "sft" / "train.jsonl", sft_train)
    _write_jsonl(out / "sft" / "heldout.jsonl", sft_held)
    used = [SOURCES[name].record() for name in archives]
    (out / "sources.json").write_text(json.dumps(used, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    summary = {
        "tiny": tiny,
        "seed": seed,
        "pretrain": {"train": _corpus_stats(pre_train), "heldout": _corpus_stats(pre_held),
                     "by_source": dict(Counter(d["source"] for d in docs))},
        "sft": {"train": _sft_stats(sft_train), "heldout": _sft_stats(sft_held),
                "heldout_templates": held_templates},
        "facts": {"countries": len(facts.capitals), "words": len(facts.words), "idioms": len(facts.idioms),
                  "poem_lines": len(facts.poem_lines)},
        "notes": instructions.SKILL_NOTES,
        "skipped_sources": skipped,
        "seconds": {"fetch": round(fetched - start, 1), "total": round(time.perf_counter() - start, 1)},
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmkit.training.data.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tiny", action="store_true", help="a small slice (a few hundred examples), for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="source cache (default $GLMKIT_CACHE or ~/.cache/glmkit/sources)")
    args = parser.parse_args(argv)
    try:
        summary = build_dataset(args.out, tiny=args.tiny, seed=args.seed, cache_dir=args.cache)
    except SourceError as e:
        print(f"glmkit data: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
