"""The engine over the paged KV cache on tiny fp32 models: what it computes must be what the contiguous cache (and a
plain forward pass) computes, whatever the block boundaries, chunking and preemption do underneath; and every
block must come back."""

from __future__ import annotations

import torch

from glmkit.engine import Engine
from glmkit.families import transformers_glm
from glmkit.generation.generate import stream_tokens
from glmkit.generation.sampling import SamplingParams

from layouts import hf_config
from tiny import prompt, random_model, tiny_config

VOCAB = 256
NEVER = (VOCAB + 1,)  # an end token no model here can produce: replies run to max_new_tokens
FIRST_STEP: dict[str, int] = {}  # request id -> the step of its first token, in the latest run()


def causal_model():
    """GLM-4-0414's layout at toy size (4 query heads over 2 KV heads), fp32."""
    return random_model(transformers_glm.GLM4.config(hf_config("glm4", vocab_size=VOCAB)), seed=3).float().eval()


def ids(seed: int, length: int) -> list[int]:
    return torch.randint(10, VOCAB - 10, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, prompt_ids, params) -> list[int]:
    """The contiguous cache's answer (glmkit.generation.generate), one request on its own."""
    return [int(t[0]) for t in stream_tokens(model, [prompt_ids], params)]


def block_mb(model, blocks: int) -> float:
    c = model.config
    return blocks * 16 * c.num_layers * 2 * c.kv_heads * c.head_dim * 4 / 2**20


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], logprobs: int | None = None,
        join_at: dict[int, list] | None = None) -> dict[str, list]:
    """Every request's outputs (StepOutput) in order; requests in join_at (step -> requests) join at that step."""
    join_at = dict(join_at or {})
    order = [engine.add_request(p, sp, logprobs=logprobs) for p, sp in requests]
    outputs: dict[str, list] = {r.request_id: [] for r in order}
    step = 0
    while engine.has_work() or join_at:
        for p, sp in join_at.pop(step, []):
            r = engine.add_request(p, sp, logprobs=logprobs)
            order.append(r)
            outputs[r.request_id] = []
        for out in engine.step():
            if not outputs[out.request_id]:
                FIRST_STEP[out.request_id] = step
            outputs[out.request_id].append(out)
        step += 1
    return {r.request_id: outputs[r.request_id] for r in order}


def reference_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Each step's log-softmax from a plain forward pass over the prompt and the tokens so far (no cache at all)."""
    with torch.no_grad():
        logits = model(torch.tensor([[*prompt_ids, *tokens]])).logits[0].float()
    start = len(prompt_ids) - 1
    return [logits[start + i].log_softmax(-1) for i in range(len(tokens))]


def check_logprobs(model, prompt_ids, outs, tolerance=1e-5):
    tokens = [o.token_id for o in outs]
    for out, want in zip(outs, reference_logprobs(model, prompt_ids, tokens), strict=True):
        assert abs(out.logprob.logprob - float(want[out.token_id])) < tolerance
        for token, logprob in out.logprob.top:
            assert abs(logprob - float(want[token])) < tolerance


def test_paged_decoding_equals_the_contiguous_cache_across_block_boundaries():
    """Prompts of 5, 16, 17 and 33 tokens decode 40 tokens together: every row crosses block boundaries at its
    own steps, and shorter rows' tables are padded. Greedy tokens equal the contiguous cache's alone; every
    step's log-probabilities (5 alternatives) equal a plain forward pass's within 1e-5."""
    model = causal_model()
    params = SamplingParams(max_new_tokens=40, eos_token_ids=NEVER)
    prompts = [ids(seed, n) for seed, n in enumerate((5, 16, 17, 33))]
    outputs = run(Engine(model, max_batch=4), [(p, params) for p in prompts], logprobs=5)
    for p, outs in zip(prompts, outputs.values(), strict=True):
        assert [o.token_id for o in outs] == alone(model, p, params)
        check_logprobs(model, p, outs)


def test_a_long_prompt_in_chunks_between_running_streams_equals_one_shot_prefill():
    """A 150-token prompt arrives while two requests decode: with a 20-token step budget it is encoded in chunks
    over several steps (the two streams get a token each step meanwhile), and every answer equals the one-shot
    run's and the contiguous cache's."""
    model = causal_model()
    params = SamplingParams(max_new_tokens=30, eos_token_ids=NEVER)
    early = [(ids(1, 9), params), (ids(2, 20), params)]
    late = {3: [(ids(3, 150), SamplingParams(max_new_tokens=12, eos_token_ids=NEVER))]}
    chunked_engine = Engine(model, max_batch=4, step_tokens=20)
    chunked = run(chunked_engine, early, logprobs=3, join_at=late)
    first_steps = dict(FIRST_STEP)
    whole = run(Engine(model, max_batch=4, step_tokens=1024), early, logprobs=3, join_at=late)
    assert [[o.token_id for o in outs] for outs in chunked.values()] == \
           [[o.token_id for o in outs] for outs in whole.values()]
    for (p, sp), outs in zip([*early, *late[3]], chunked.values(), strict=True):
        assert [o.token_id for o in outs] == alone(model, p, sp)
        check_logprobs(model, p, outs)
    # the long prompt's first token came only after its chunks (<= 18 tokens a step beside the two streams),
    # and the early streams produced a token at every one of those steps
    long_id = list(chunked)[2]
    assert first_steps[long_id] >= 3 + 150 // 18
    for request_id in list(chunked)[:2]:
        assert len(chunked[request_id]) == 30 and first_steps[request_id] < 3


def test_preempted_requests_are_recomputed_and_answer_exactly_as_alone():
    """A pool of 8 blocks (128 tokens) for three requests that grow to 40 + 50 tokens each (6 blocks): the
    last slot is preempted when a block runs out and recomputed later. Greedy answers and seeded samples equal
    each request's own run, and every block is back at the end."""
    model = causal_model()
    greedy = SamplingParams(max_new_tokens=50, eos_token_ids=NEVER)
    sampled = SamplingParams(max_new_tokens=50, eos_token_ids=NEVER, do_sample=True, temperature=0.9, seed=5)
    requests = [(ids(10, 40), greedy), (ids(11, 40), sampled), (ids(12, 40), greedy)]
    engine = Engine(model, max_batch=3, kv_cache_mb=block_mb(model, 8), prefix_cache_mb=0)
    outputs = run(engine, requests)
    assert engine.scheduler.preemptions > 0
    for (p, sp), outs in zip(requests, outputs.values(), strict=True):
        assert [o.token_id for o in outs] == alone(model, p, sp)
    assert engine.scheduler.blocks.in_use == 0 and engine.runner.suspended == {}


def test_a_prefix_lm_model_waits_for_blocks_and_answers_as_alone():
    """ChatGLM-6B's layout: requests take their whole budget's blocks at admission, so with room for one at a
    time the others wait (nothing is preempted); each answer equals the contiguous cache's."""
    model = random_model(tiny_config(eos_token_id=255))
    params = SamplingParams(max_new_tokens=20)
    prompts = [prompt(*range(5, 5 + n)) for n in (3, 12, 7)]
    engine = Engine(model, max_batch=3, kv_cache_mb=block_mb(model, 3))
    outputs = run(engine, [(p, params) for p in prompts])
    assert engine.scheduler.preemptions == 0
    for p, outs in zip(prompts, outputs.values(), strict=True):
        assert [o.token_id for o in outs] == alone(model, p, params)
    assert engine.scheduler.blocks.in_use == 0


def test_no_block_leaks_after_a_thousand_requests_that_finish_or_are_aborted():
    """1,000 short requests through a small pool, every fifth aborted while it waits or runs (as a client that
    disconnects): no block stays taken but those the prefix cache holds, and no preempted state is left."""
    model = causal_model()
    engine = Engine(model, max_batch=4, max_queue=8, kv_cache_mb=block_mb(model, 6), prefix_cache_mb=block_mb(model, 2))
    params = SamplingParams(max_new_tokens=3, eos_token_ids=NEVER)
    live: list[str] = []
    for n in range(1000):
        request = engine.add_request(ids(n % 50, 10 + n % 25), params)
        live.append(request.request_id)
        if n % 5 == 4:
            engine.abort(live[-2])
        while len(engine.scheduler.waiting) >= 4:
            engine.step()
    while engine.has_work():
        engine.step()
    blocks = engine.scheduler.blocks
    assert blocks.in_use == len(engine.prefix_cache) and blocks.in_use <= 2
    assert all(held == 1 for held in blocks.holders[1:] if held) and engine.runner.suspended == {}


def test_bf16_and_int8_kv_caches_stay_close_to_the_fp32_cache_in_a_quarter_of_the_memory():
    """Same requests with each cache dtype: the chosen tokens' log-probabilities stay within a small gap of the fp32
    cache's while the replies agree (int8: one scale per token and head), and the pool holds int8 values."""
    model = causal_model()
    params = SamplingParams(max_new_tokens=24, eos_token_ids=NEVER)
    prompts = [ids(seed, n) for seed, n in enumerate((7, 19, 30))]

    def replies(kv_dtype):
        engine = Engine(model, max_batch=3, kv_dtype=kv_dtype)
        return engine, list(run(engine, [(p, params) for p in prompts], logprobs=1).values())

    _, reference = replies(None)
    for kv_dtype, tolerance in (("bfloat16", 0.05), ("int8", 0.1)):
        engine, got = replies(kv_dtype)
        cache = model.transformer.layers[0].attention.kv_cache
        assert cache.k.dtype == getattr(torch, kv_dtype)
        compared = 0
        for want, have in zip(reference, got, strict=True):
            for w, h in zip(want, have, strict=True):
                assert abs(w.logprob.logprob - h.logprob.logprob) < tolerance
                compared += 1
                if w.token_id != h.token_id:
                    break
        assert compared >= 30
    pool_bytes = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert pool_bytes == cache.k.shape[0] * 2 * cache.k.shape[1] * (cache.k.shape[2] + 4)  # int8 + fp32 scales
