"""Continuous batching on a real (tiny, random) model: requests that join and leave the batch at any
step get exactly the tokens they would get alone."""

import pytest
import torch

from glmkit.engine import Engine
from glmkit.generation.generate import process_logits, stream_tokens
from glmkit.generation.sampling import SamplingParams

from tiny import prompt, random_model, tiny_config

PROMPTS = [prompt(*range(5, 5 + n)) for n in (1, 7, 3, 12, 5, 2, 9)]


def alone(model, ids, params):
    return [int(t[0]) for t in stream_tokens(model, [ids], params)]


def run_all(engine, requests, join_at=None):
    """Run to completion; requests listed in join_at (step -> [(ids, params)]) join mid-way."""
    join_at = join_at or {}
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    step = 0
    while engine.has_work() or any(s >= step for s in join_at):
        for ids, params in join_at.pop(step, []):
            r = engine.add_request(ids, params)
            requests.append(r)
            outputs[r.request_id] = []
        for out in engine.step():
            outputs[out.request_id].append(out.token_id)
        step += 1
    return outputs


def test_greedy_batched_requests_equal_their_solo_runs():
    model = random_model(tiny_config(eos_token_id=255))
    params = [SamplingParams(max_new_tokens=n) for n in (4, 9, 6, 12, 3, 8, 10)]
    expected = [alone(model, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    engine = Engine(model, max_batch=3, max_queue=10)
    requests = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:5], params[:5], strict=True)]
    late = {4: [(PROMPTS[5], params[5])], 7: [(PROMPTS[6], params[6])]}  # join while others run
    outputs = run_all(engine, requests, late)
    for request, want in zip(requests, expected, strict=True):
        assert outputs[request.request_id] == want, request.request_id
        assert request.finish_reason == "length"


def test_seeded_sampling_per_request_is_independent_of_the_batch():
    model = random_model(tiny_config(eos_token_id=255))
    params = [SamplingParams(do_sample=True, temperature=1.3, top_p=0.9, seed=s, max_new_tokens=10) for s in range(4)]
    engine = Engine(model, max_batch=4)
    requests = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:4], params, strict=True)]
    outputs = run_all(engine, requests)
    for request, p, sp in zip(requests, PROMPTS[:4], params, strict=True):
        assert outputs[request.request_id] == alone(model, p, sp)


def test_end_token_finishes_a_request_and_frees_its_slot():
    model = random_model(tiny_config())
    first = alone(model, PROMPTS[1], SamplingParams(max_new_tokens=1))[0]
    engine = Engine(model, max_batch=1)
    stopping = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5, eos_token_ids=(first,)))
    waiting = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=2))
    assert [o.token_id for o in engine.step()] == [first]
    assert stopping.finish_reason == "stop"
    engine.step()  # the freed slot goes to the waiting request at once
    assert engine.scheduler.running == [waiting]


def test_abort_frees_the_slot_for_the_next_request():
    model = random_model(tiny_config(eos_token_id=255))
    engine = Engine(model, max_batch=1)
    first = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50))
    second = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=3))
    engine.step()
    assert engine.abort(first.request_id).finish_reason == "abort"
    outputs = run_all(engine, [second])
    assert outputs[second.request_id] == alone(model, PROMPTS[3], SamplingParams(max_new_tokens=3))
    assert engine.abort("no-such-request") is None


def test_prompt_that_cannot_fit_is_refused_at_admission():
    model = random_model(tiny_config())
    engine = Engine(model, max_batch=2)
    try:
        engine.add_request(prompt(*[9] * 100), SamplingParams())
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("a prompt longer than the context was accepted")
    assert not engine.has_work()
    assert engine.scheduler.blocks.in_use == 0  # no block was taken for it


def test_a_request_whose_step_fails_ends_alone_and_the_batch_goes_on(monkeypatch):
    """One request's sampling raises at decode, another's at prefill: each ends with "error" and leaves its
    slot; the requests beside them get exactly the tokens they get alone."""
    from glmkit.engine.runner import ModelRunner

    model = random_model(tiny_config(eos_token_id=255))
    good = [SamplingParams(max_new_tokens=n) for n in (6, 9, 4)]
    at_decode, at_prefill = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8)
    expected = [alone(model, p, sp) for p, sp in zip(PROMPTS, good, strict=False)]
    original, calls = ModelRunner._sample, {}

    def failing(self, slot, logits, params):
        calls[id(params)] = calls.get(id(params), 0) + 1
        if params is at_prefill or (params is at_decode and calls[id(params)] == 2):
            raise RuntimeError("injected")
        return original(self, slot, logits, params)

    monkeypatch.setattr(ModelRunner, "_sample", failing)
    engine = Engine(model, max_batch=4)
    requests = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, good, strict=False)]
    broken = engine.add_request(PROMPTS[3], at_decode)
    outputs = run_all(engine, [*requests, broken], {2: [(PROMPTS[4], at_prefill)]})
    late = next(r for r in outputs if r not in {q.request_id for q in [*requests, broken]})
    assert outputs[broken.request_id][1:] == [None] and broken.finish_reason == "error"
    assert outputs[late] == [None]
    for request, want in zip(requests, expected, strict=True):
        assert outputs[request.request_id] == want and request.finish_reason == "length"
    assert not engine.has_work() and engine.scheduler.running == []


def test_sampled_logprobs_are_the_log_softmax_of_the_scores_that_drew_the_token():
    """Under temperature and top-p, a token's logprob is under the distribution it was drawn from (top-p's cut
    tokens, at -inf, never listed), in a batch with a request that asks for none."""
    model = random_model(tiny_config(eos_token_id=255))
    params = SamplingParams(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.8, seed=3)
    engine = Engine(model, max_batch=2, max_queue=4)
    asked = engine.add_request(PROMPTS[1], params, logprobs=20)
    engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=5))
    outputs = []
    while engine.has_work():
        outputs += [o for o in engine.step() if o.request_id == asked.request_id]
    ids = list(PROMPTS[1])
    for out in outputs:
        assert out.logprob is not None and out.logprob.token_id == out.token_id
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        scores = process_logits(logits[None], torch.zeros(1, logits.shape[-1], dtype=torch.bool), params)[0]
        table = scores.log_softmax(-1)
        assert abs(out.logprob.logprob - float(table[out.token_id])) < 1e-4
        kept = int(torch.isfinite(table).sum())
        assert len(out.logprob.top) == min(20, kept)
        assert all(abs(v - float(table[t])) < 1e-4 for t, v in out.logprob.top)
        ids.append(out.token_id)
    with pytest.raises(ValueError, match="causal"):
        engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=2), logprobs=1, prompt_logprobs=True)
