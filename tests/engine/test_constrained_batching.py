"""Grammars inside continuous batching, on the shipped demo model: requests with different schemas (and one without
any) decode in one batch, leave it at different steps (so the scheduler moves the last running request into the
freed slot, grammar state and all), and each reply still validates against its own schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

import glmkit
from glmkit.engine import Engine
from glmkit.generation import constraints
from glmkit.generation.sampling import SamplingParams

DEMO = Path(__file__).resolve().parents[2] / "glmkit" / "assets" / "demo-model"
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 6},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4}},
     "required": ["name", "tags"], "additionalProperties": False},
]


def test_requests_with_their_own_grammars_share_the_batch_and_each_validates():
    model, tokenizer = glmkit.load(DEMO, progress=False)
    vocab = constraints.vocabulary(tokenizer)
    engine = Engine(model, max_batch=8, max_queue=8)
    prompt = tokenizer.encode("Answer in JSON:")
    requests, schemas = [], []
    for seed in range(2):
        for schema in SCHEMAS:
            params = SamplingParams(max_new_tokens=100, do_sample=True, temperature=1.0, seed=seed,
                                    eos_token_ids=(tokenizer.eos_token_id,),
                                    grammar=constraints.json_grammar(vocab, schema))
            requests.append(engine.add_request(prompt, params))
            schemas.append(schema)
    free = engine.add_request(prompt, SamplingParams(max_new_tokens=40, do_sample=True, seed=0,
                                                     eos_token_ids=(tokenizer.eos_token_id,)))
    tokens = {r.request_id: [] for r in [*requests, free]}
    moves, batch_sizes = [], []
    engine.runner.move = _recording(engine.runner.move, moves)
    while engine.has_work():
        outputs = engine.step()
        batch_sizes.append(len(outputs))
        for out in outputs:
            tokens[out.request_id].append(out.token_id)
    assert max(batch_sizes) == 8  # the constrained requests (and one free one after a slot opened) ran together
    assert moves, "no request left the batch before another: nothing was moved"
    for request, schema in zip(requests, schemas, strict=True):
        # max_new_tokens exceeds the longest document any schema allows (in bytes, so in tokens): each completes
        assert request.finish_reason == "stop", request
        ids = [t for t in tokens[request.request_id] if t != tokenizer.eos_token_id]
        jsonschema.validate(json.loads(tokenizer.decode(ids)), schema)
    assert free.constraint is None and len(tokens[free.request_id]) > 0


def _recording(move, moves: list):
    def recorded(src: int, dst: int) -> None:
        moves.append((src, dst))
        move(src, dst)
    return recorded
