"""What the engine sustains with many requests at once: `glmkit bench --concurrency` (engine alone, no HTTP).

Two measurements on any model (random weights of a real shape in `glmkit bench`):
- `concurrency`: N requests of the same prompt length start together; aggregate decode tokens per second (every
  token after each request's first, over the time from the last first token to the end), the inter-token
  latencies of all streams (p50, p95), time to first token, and the KV-cache blocks in use at the peak.
- `long_prompt`: N streams decode while one long prompt arrives; the streams' inter-token latency while it is
  encoded (median and worst) and its time to first token, with the engine's step budget as given.
"""

from __future__ import annotations

import statistics
import time

from glmkit.engine.engine import Engine
from glmkit.generation.generate import random_prompt
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM


def random_ids(model: GLM, length: int, seed: int) -> list[int]:
    return random_prompt(model.config, length, seed)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_streams(engine: Engine, prompts: list[list[int]], new_tokens: int, join: dict[int, list[int]] | None = None
                ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run `prompts` (and `join`: step -> a prompt added then) to the end; each request's token times (seconds
    since the start) and arrival times."""
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=(-1,))  # no end token: every reply is full
    start = time.perf_counter()
    times: dict[str, list[float]] = {}
    arrived: dict[str, float] = {}
    for ids in prompts:
        times[engine.add_request(ids, params).request_id] = []
    for request_id in times:
        arrived[request_id] = 0.0
    join = dict(join or {})
    step = 0
    while engine.has_work() or join:
        if step in join:
            request = engine.add_request(join.pop(step), SamplingParams(max_new_tokens=8, eos_token_ids=(-1,)))
            times[request.request_id], arrived[request.request_id] = [], time.perf_counter() - start
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            if out.token_id is not None:
                times[out.request_id].append(now)
        step += 1
    return times, arrived


def concurrency(model: GLM, streams: int, prompt_len: int, new_tokens: int, **engine_options) -> dict:
    engine = Engine(model, max_batch=streams, max_queue=streams, prefix_cache_mb=0, **engine_options)
    peak_blocks = 0
    step = engine.step

    def counting_step():
        nonlocal peak_blocks
        outputs = step()
        peak_blocks = max(peak_blocks, engine.scheduler.blocks.in_use)
        return outputs

    engine.step = counting_step
    prompts = [random_ids(model, prompt_len, seed) for seed in range(streams)]
    times, _ = run_streams(engine, prompts, new_tokens)
    firsts = [t[0] for t in times.values()]
    gaps = [b - a for t in times.values() for a, b in zip(t, t[1:], strict=False)]
    decode_start, end = max(firsts), max(t[-1] for t in times.values())
    after = sum(sum(1 for x in t if x > decode_start) for t in times.values())
    return {"streams": streams, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "aggregate_decode_tokens_per_s": round(after / (end - decode_start), 2) if end > decode_start else None,
            "inter_token_ms_p50": round(percentile(gaps, 0.5) * 1000, 1),
            "inter_token_ms_p95": round(percentile(gaps, 0.95) * 1000, 1),
            "time_to_first_token_s_max": round(max(firsts), 3),
            "peak_kv_blocks": peak_blocks, "kv_block_tokens": engine.scheduler.block_size}


def long_prompt(model: GLM, streams: int, long_len: int, new_tokens: int, join_step: int = 4,
                **engine_options) -> dict:
    engine = Engine(model, max_batch=streams + 1, max_queue=streams + 1, prefix_cache_mb=0, **engine_options)
    prompts = [random_ids(model, 16, seed) for seed in range(streams)]
    times, arrived = run_streams(engine, prompts, new_tokens, {join_step: random_ids(model, long_len, 99)})
    long_id = next(r for r, t in arrived.items() if t > 0)
    arrival, first = arrived[long_id], times[long_id][0]
    during = [b - a for r, t in times.items() if r != long_id for a, b in zip(t, t[1:], strict=False)
              if b > arrival and a < first]
    return {"streams": streams, "long_prompt_len": long_len, "step_tokens": engine.scheduler.step_tokens,
            "long_prompt_time_to_first_token_s": round(first - arrival, 3),
            "streams_inter_token_ms_during_median": round(statistics.median(during) * 1000, 1) if during else None,
            "streams_inter_token_ms_during_max": round(max(during) * 1000, 1) if during else None}
