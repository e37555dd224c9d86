"""glmkit against chatglm.cpp and llama.cpp at a real shape, random weights, side by side in one run: INT4 decode
speed, prefill of a 512-token prompt, peak RSS, and each engine's decode as a share of the memory-bandwidth bound.

    python bench/peers.py --shape chatglm3-6b --out bench/results/peers_chatglm3-6b.json
    python bench/peers.py --shape glm-4-9b --out bench/results/peers_glm-4-9b.json
    python bench/peers.py --shape tiny-gqa            # seconds: the whole path at test size

The shapes are glmkit bench's (`glmkit/perf/speed.py`): glmkit runs `glmkit bench` on its random model, and
each peer gets a file of the same shape in its own format, written straight in Q4_0 (`bench/peer_files.py`)
under --work and deleted after its run. Every engine runs in a process of its own, with the same thread count,
and reports its peak resident set (VmHWM, memory-mapped weights included). The machine's read bandwidth is
measured just before each engine, since on a shared machine it moves: an engine's decode bound is that
bandwidth over the bytes a token reads (every weight but the embedding table).

A peer that is not installed, or fails to load or run, is reported under "skipped" with the reason; the others
are still measured. The peers are not glmkit dependencies: the `bench` extra pins them, and BUILD_FLAGS below says
how they were compiled (docs/quantization.md has the commands).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("glmkit", "chatglm.cpp", "llama.cpp")
# chatglm.cpp's model type for each shape: the architecture is one, the tokenizer differs
CHATGLM_CPP_TYPES = {"chatglm3-6b": "chatglm3", "glm-4-9b": "glm4", "tiny-gqa": "chatglm3"}
# How the peers were built for these numbers (pip compiles both from source, `pip install` with these in the
# environment). chatglm.cpp's ggml has no GGML_NATIVE and on Linux turns on AVX2 at most, so -march=native goes to
# the compiler directly; its bundled sentencepiece needs the CMake policy floor under CMake 4; Ninja, because its
# setup.py runs `cmake --build -j` with no limit under make.
BUILD_FLAGS = {
    "llama-cpp-python": 'CMAKE_ARGS="-DGGML_NATIVE=ON"',
    "chatglm-cpp": 'CMAKE_GENERATOR=Ninja CMAKE_ARGS="-DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DCMAKE_C_FLAGS=-march=native '
                   '-DCMAKE_CXX_FLAGS=-march=native"',
}
PACKAGES = ("glmkit", "torch", "chatglm-cpp", "llama-cpp-python", "gguf", "numpy")
DECODE_PROMPT = 32  # decode steps follow a prompt this long, as glmkit bench's do


# --- the children: one engine each, JSON on stdout -------------------------------------------------------------

def prompt(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(length)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(prefill, decode_steps, args: argparse.Namespace) -> dict:
    """Prefill tokens/s (median of --repeats) and the median decode step after a short prompt, for an engine
    given as prefill(ids) and decode_steps(ids, n) -> per-step seconds."""
    prefill(prompt(8, args.vocab, 8))  # warm-up: the first pass faults the mapped weights in
    ids = prompt(args.prompt_len, args.vocab, args.prompt_len)
    prefill_s = statistics.median(timed(lambda: prefill(ids)) for _ in range(args.repeats))
    steps = decode_steps(prompt(DECODE_PROMPT, args.vocab, DECODE_PROMPT), args.new_tokens)
    median = statistics.median(steps[1:] if len(steps) > 1 else steps)
    return {"prefill_tokens_per_s": {str(args.prompt_len): round(args.prompt_len / prefill_s, 2)},
            "decode_ms_per_token": round(median * 1000, 2), "decode_tokens_per_s": round(1 / median, 2)}


def run_chatglm_cpp(args: argparse.Namespace) -> dict:
    import chatglm_cpp

    start = time.perf_counter()
    pipeline = chatglm_cpp.Pipeline(str(args.model), max_length=args.max_length)
    load_s = time.perf_counter() - start
    model, config = pipeline.model, chatglm_cpp._C.GenerationConfig(max_length=args.max_length, do_sample=False)

    def step(ids: list[int], n_past: int) -> int:  # one forward pass over ids[n_past:], then greedy
        return model.generate_next_token(ids, None, config, n_past, len(ids))

    def decode_steps(ids: list[int], n: int) -> list[float]:
        ids, steps = list(ids), []
        token = step(ids, 0)
        for _ in range(n):
            ids.append(token)
            start = time.perf_counter()
            token = step(ids, len(ids) - 1)
            steps.append(time.perf_counter() - start)
        return steps

    cores = os.cpu_count() or 4  # chatglm.cpp picks its own threads: all cores up to 4, else half
    return {**measure(lambda ids: step(ids, 0), decode_steps, args), "load_s": round(load_s, 2),
            "threads": cores if cores <= 4 else cores // 2}


def run_llama_cpp(args: argparse.Namespace) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_print_system_info

    start = time.perf_counter()
    llm = Llama(model_path=str(args.model), n_ctx=args.max_length, n_batch=args.prompt_len, n_ubatch=args.prompt_len,
                n_threads=args.threads, n_threads_batch=args.threads, use_mmap=args.llama_mmap, verbose=False)
    load_s = time.perf_counter() - start

    def logits():  # llama_decode returns before the work is done: fetching the logits waits for it
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(args.vocab,))

    def prefill(ids: list[int]) -> None:
        llm.reset()
        llm.eval(ids)
        logits()

    def decode_steps(ids: list[int], n: int) -> list[float]:
        prefill(ids)
        steps, token = [], int(logits().argmax())
        for _ in range(n):
            start = time.perf_counter()
            llm.eval([token])
            token = int(logits().argmax())  # greedy, as chatglm.cpp's step does inside
            steps.append(time.perf_counter() - start)
        return steps

    return {**measure(prefill, decode_steps, args), "load_s": round(load_s, 2), "threads": args.threads,
            "mmap": args.llama_mmap,
            "system_info": llama_print_system_info().decode().strip()}


def run_glmkit(args: argparse.Namespace) -> dict:
    from glmkit.cli import main as glmkit

    with contextlib.redirect_stdout(io.StringIO()) as out:
        glmkit(glmkit_argv(args))
    result = json.loads(out.getvalue())["results"][0]
    return {k: result[k] for k in ("prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s",
                                   "decode_weight_bytes", "kernels", "threads")}


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM: memory-mapped weights included), counted from its exec. Not
    ru_maxrss: that keeps the peak of the forked parent's copy, before the exec."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kib / 2**20, 3)


def child(args: argparse.Namespace) -> None:
    run = {"glmkit": run_glmkit, "chatglm.cpp": run_chatglm_cpp, "llama.cpp": run_llama_cpp}[args.child]
    print(json.dumps({**run(args), "peak_rss_gib": peak_rss_gib()}))


# --- the parent: files, children, bandwidth, the report --------------------------------------------------------

def run_process(cmd: list[str], args: argparse.Namespace) -> tuple[dict | None, str]:
    """Run `cmd`: its JSON, or None and why not (the last line of its stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}  # the same OpenMP pool size for torch and llama.cpp's ggml
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    timeout = args.timeout
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: {lines[-1] if lines else ''}"
    return json.loads(proc.stdout), ""


def glmkit_argv(args: argparse.Namespace) -> list[str]:
    """INT4 blocks, INT4 table and output layer (as the peers' Q4_0 files), bf16 activations (glmkit's fastest,
    docs/quantization.md)."""
    return ["bench", "--shape", args.shape, "--bits", "4", "--embedding-bits", "4", "--dtype", "bfloat16",
            "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
            "--threads", str(args.threads), "--json"]


def child_command(engine: str, model: Path | None, args: argparse.Namespace, vocab: int) -> list[str]:
    return [sys.executable, __file__, "--child", engine, "--model", str(model), "--vocab", str(vocab),
            "--shape", args.shape, "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--max-length", str(max_length(args)),
            *(["--llama-mmap"] if args.llama_mmap else [])]


def max_length(args: argparse.Namespace) -> int:
    """The context each peer allocates: enough for the runs (the shape's own, up to 128K, would be a huge cache)."""
    return max(args.prompt_len, DECODE_PROMPT + args.new_tokens) + 16


def chatglm_cpp_tokenizer(model_type: str, work: Path) -> bytes:
    """What chatglm.cpp's loader needs to build its tokenizer; ids are fed directly, so a small one does."""
    import peer_files

    if model_type == "glm4":
        return peer_files.glm4_vocab()
    from glmkit.text.tokenizer import VOCAB_FILE, train_sentencepiece

    texts = [" ".join(f"w{i * j % 97}" for j in range(30)) for i in range(200)]
    out = train_sentencepiece(texts, work / "spm", vocab_size=400, num_threads=1, hard_vocab_limit=False)
    return (out / VOCAB_FILE).read_bytes()


def write_peer_file(engine: str, config, args: argparse.Namespace) -> tuple[Path, dict]:
    import peer_files  # here, not at the top: the children need neither numpy nor glmkit

    start = time.perf_counter()
    if engine == "llama.cpp":
        path = args.work / f"{args.shape}-q4_0.gguf"
        info = peer_files.write_gguf(path, config, f"random {args.shape}")
    else:
        path = args.work / f"{args.shape}-q4_0.chatglm.bin"
        model_type = CHATGLM_CPP_TYPES[args.shape]
        info = peer_files.write_chatglm_cpp(path, config, model_type, chatglm_cpp_tokenizer(model_type, args.work))
    return path, {**info, "write_s": round(time.perf_counter() - start, 1)}


def engine_missing(engine: str) -> str | None:
    package = {"chatglm.cpp": "chatglm_cpp", "llama.cpp": "llama_cpp", "glmkit": "glmkit"}[engine]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (the bench extra; build flags in bench/peers.py BUILD_FLAGS)"
    return None


def run_engine(engine: str, config, args: argparse.Namespace) -> dict:
    """One engine's measurements beside the bandwidth measured just before it, or {"skipped": why}."""
    from glmkit.perf.speed import read_bandwidth_gb_per_s

    if (missing := engine_missing(engine)) is not None:
        return {"skipped": missing}
    path, info = (None, {}) if engine == "glmkit" else write_peer_file(engine, config, args)
    try:
        bandwidth, load = read_bandwidth_gb_per_s(), os.getloadavg()[0]
        print(f"running {engine}", file=sys.stderr, flush=True)
        out, why = run_process(child_command(engine, path, args, config.vocab_size), args)
    finally:
        if path is not None and not args.keep:
            path.unlink(missing_ok=True)
    if out is None:
        return {"skipped": why}
    result = {**out, **info, "read_bandwidth_gb_per_s": bandwidth, "load_average_1min": round(load, 2)}
    bound = bandwidth * 1e9 / result["decode_weight_bytes"]
    result["decode_bound_tokens_per_s"] = round(bound, 2)
    result["decode_share_of_bound"] = round(result["decode_tokens_per_s"] / bound, 3)
    return result


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def compare(results: dict) -> dict:
    """glmkit's speed over each measured peer's (above 1: glmkit is faster)."""
    ours, table = results.get("glmkit", {}), {}
    for peer in ENGINES[1:]:
        theirs = results.get(peer, {})
        if "decode_tokens_per_s" in ours and "decode_tokens_per_s" in theirs:
            (length, prefill), = ours["prefill_tokens_per_s"].items()
            table[peer] = {"decode": round(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], 2),
                           "prefill": round(prefill / theirs["prefill_tokens_per_s"][length], 2)}
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny-gqa", choices=list(CHATGLM_CPP_TYPES))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--threads", type=int, default=2, help="for every engine")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill length to time")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps to time (median reported)")
    parser.add_argument("--repeats", type=int, default=1, help="prefill repeats (median reported)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine before it is skipped")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "peers", help="where the peers' files go")
    parser.add_argument("--keep", action="store_true", help="keep the peers' model files")
    parser.add_argument("--llama-mmap", action="store_true",
                        help="llama.cpp's default mmap loading: it repacks Q4_0 for the CPU at load, and with mmap the "
                             "file's pages stay mapped beside the repacked copy, about twice the RSS")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"],
                        help="OMP_WAIT_POLICY for every engine (default: as the environment has it). On a machine "
                             "other jobs load, threads that spin at each parallel region's end wait for a descheduled "
                             "partner: passive lets them sleep")
    parser.add_argument("--note", default="", help="free text kept in the JSON (how loaded the machine was, ...)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    # one engine's measurements, in a child process of the run above
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    import torch

    from glmkit.perf.speed import SHAPES, machine

    torch.set_num_threads(args.threads)  # the bandwidth is read with the engines' thread count
    args.work.mkdir(parents=True, exist_ok=True)
    config = SHAPES[args.shape]()
    results = {engine: run_engine(engine, config, args) for engine in args.engines}
    report = {"machine": machine(), "command": " ".join(sys.argv), "note": args.note, "shape": args.shape, "threads": args.threads,
              "omp_wait_policy": args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"), "versions": versions(), "build_flags": BUILD_FLAGS, "glmkit_command": "glmkit " + " ".join(glmkit_argv(args)),
              "results": {k: v for k, v in results.items() if "skipped" not in v},
              "skipped": {k: v["skipped"] for k, v in results.items() if "skipped" in v},
              "glmkit_speedup": compare(results)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
