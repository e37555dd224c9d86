"""Automatic prefix caching: the block table on its own (no torch), then the engine on tiny causal models in fp32,
where every greedy answer with the cache must be the answer without it, token for token."""

from __future__ import annotations

import pytest
import torch

from glmkit import GLMForCausalLM
from glmkit.engine import Engine
from glmkit.engine.prefix_cache import PrefixCache, block_keys
from glmkit.families import transformers_glm
from glmkit.generation.sampling import SamplingParams

from layouts import hf_config
from tiny import prompt, random_model, tiny_config

# ----- the table


def test_a_block_key_names_the_whole_prefix_and_the_tail_has_none():
    a = block_keys(list(range(40)), 16)
    assert len(a) == 2  # tokens 32..39 fill no block
    assert block_keys(list(range(33)), 16) == a and block_keys(list(range(32)), 16) == a
    assert block_keys(list(range(15)), 16) == []
    other_start = block_keys([99, *range(1, 40)], 16)
    assert other_start[0] != a[0] and other_start[1] != a[1]  # block 1's tokens are equal, its prefix is not
    assert block_keys(list(range(40)), 8)[:2] != a[:2]


def keys_of(name: str, blocks: int) -> list[bytes]:
    """The keys of a prompt whose block i is named name + i (one token per block)."""
    return block_keys([hash((name, i)) % 10**9 for i in range(blocks)], 1)


def table(capacity: int, *chains: list[bytes]) -> PrefixCache:
    cache = PrefixCache(capacity, block_size=1)
    for chain in chains:
        cache.insert(chain, lambda i, chain=chain: ("block", chain[i]))
    return cache


def test_lookup_returns_the_longest_run_of_held_blocks_and_insert_reads_only_missing_ones():
    a = keys_of("a", 3)
    cache = table(8, a)
    shared = [*a[:2], *keys_of("b", 3)[2:]]  # another prompt: a's first two blocks, then its own
    assert cache.lookup(shared) == [("block", a[0]), ("block", a[1])]
    assert cache.lookup(keys_of("c", 2)) == []
    read = []
    assert cache.insert(shared, lambda i: read.append(i) or ("block", shared[i])) == 1
    assert read == [2] and len(cache) == 4


def test_eviction_takes_the_least_recently_used_chain_tips_first():
    x, y, z = keys_of("x", 2), keys_of("y", 2), keys_of("z", 2)
    cache = table(4, x, y)
    assert len(cache.lookup(x)) == 2  # x is now more recent than y
    cache.insert(z, lambda i: ("block", z[i]))
    assert len(cache.lookup(x)) == 2 and len(cache.lookup(z)) == 2 and cache.lookup(y) == []
    # A branch off x's first block evicts z's tip before x's first block, which the branch needs.
    branch = [x[0], *keys_of("w", 2)[1:]]
    cache = table(2, x)
    cache.insert(branch, lambda i: ("block", branch[i]))
    assert cache.lookup(branch) == [("block", x[0]), ("block", branch[1])]
    assert len(cache.lookup(x)) == 1  # x's tip went, its first block (shared) stayed


def test_a_prompt_longer_than_the_capacity_keeps_its_first_blocks():
    long = keys_of("long", 5)
    cache = table(3, long)
    assert len(cache) == 3 and len(cache.lookup(long)) == 3
    with pytest.raises(ValueError, match="at least one block"):
        PrefixCache(0)


# ----- the engine

VOCAB = 256
NEVER = (VOCAB + 1,)  # an end token no model here can produce: replies run to max_new_tokens


def glm4_model() -> GLMForCausalLM:
    """GLM-4-0414's layout at toy size: 4 query heads over 2 KV heads, sandwich norms, partial rotary."""
    model = random_model(transformers_glm.GLM4.config(hf_config("glm4", vocab_size=VOCAB)), seed=8)
    return model.float().eval()


@pytest.fixture(scope="module", params=["glm4-0414", "chatglm3"])
def causal_model(request, chatglm3_model) -> GLMForCausalLM:
    if request.param == "glm4-0414":
        return glm4_model()
    return GLMForCausalLM.from_pretrained(chatglm3_model, progress=False).float().eval()


def ids(seed: int, length: int, vocab: int = VOCAB) -> list[int]:
    return torch.randint(10, vocab - 10, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, batches: list[list[tuple[list[int], SamplingParams]]]) -> list[tuple[list[int], int | None]]:
    """Each batch's requests added together, run to the end before the next batch: (tokens, cached_tokens) each."""
    results = []
    for batch in batches:
        requests = [engine.add_request(p, sp) for p, sp in batch]
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        cached: dict[str, int | None] = {}
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id].append(out.token_id)
                if len(tokens[out.request_id]) == 1:
                    cached[out.request_id] = out.cached_tokens
        results += [(tokens[r.request_id], cached[r.request_id]) for r in requests]
    return results


def test_shared_system_prompt_same_batch_and_a_continued_conversation_answer_as_without_the_cache(causal_model):
    """A 40-token system prompt with 12-token questions (52-token prompts: 3 full blocks of 16, the third the
    question's). q0 and q1 join in the same step, q2 waits for a slot; then q0's conversation goes on: its prompt,
    its 20-token reply and 6 more tokens."""
    vocab = causal_model.config.vocab_size
    system = ids(0, 40, vocab)
    questions = [[*system, *ids(10 + i, 12, vocab)] for i in range(3)]
    params = SamplingParams(max_new_tokens=20, eos_token_ids=NEVER)
    first = [[(q, params) for q in questions]]
    without = run(Engine(causal_model, max_batch=2, prefix_cache_mb=0), first)
    follow_up = [*questions[0], *without[0][0], *ids(20, 6, vocab)]
    without += run(Engine(causal_model, max_batch=2, prefix_cache_mb=0), [[(follow_up, params)]])
    engine = Engine(causal_model, max_batch=2)
    cached = run(engine, [*first, [(follow_up, params)]])
    assert [t for t, _ in cached] == [t for t, _ in without]
    assert [c for _, c in without] == [None] * 4  # no cache: no lookup
    # q0 finds nothing; q1 (prefilled right after q0, in the same step) and q2 find the system prompt's 2 blocks;
    # the follow-up finds q0's prompt and reply as q0's slot held them when it ended: 52 + 19 fed ids, 4 blocks.
    assert [c for _, c in cached] == [0, 32, 32, 64]
    assert engine.prefix_cache.hit_tokens == 128
    assert engine.prefix_cache.queried_tokens == 3 * 52 + len(follow_up)


def test_a_repeated_prompt_prefills_only_its_last_token(causal_model):
    vocab = causal_model.config.vocab_size
    again = ids(1, 48, vocab)  # exactly 3 blocks: the last token is fed again for its logits
    params = SamplingParams(max_new_tokens=6, eos_token_ids=NEVER)
    without = run(Engine(causal_model, prefix_cache_mb=0), [[(again, params)]])
    engine = Engine(causal_model)
    cached = run(engine, [[(again, params)], [(again, params)]])
    assert [t for t, _ in cached] == [without[0][0]] * 2
    assert [c for _, c in cached] == [0, 47]


def block_mb(model: GLMForCausalLM, blocks: int) -> float:
    """The budget of `blocks` blocks of 16 tokens: every layer's keys and values of its KV heads, fp32."""
    c = model.config
    return blocks * 16 * c.num_layers * 2 * c.kv_heads * c.head_dim * 4 / 2**20


def test_eviction_under_a_tiny_budget_keeps_answers_exact(causal_model):
    """Room for 3 blocks: prompts of 2 blocks from two system prompts take turns, each evicting the other's."""
    vocab = causal_model.config.vocab_size
    a, b = ids(2, 36, vocab), ids(3, 36, vocab)
    params = SamplingParams(max_new_tokens=5, eos_token_ids=NEVER)
    batches = [[(p, params)] for p in (a, b, a, a, b)]
    without = run(Engine(causal_model, prefix_cache_mb=0), batches)
    engine = Engine(causal_model, prefix_cache_mb=block_mb(causal_model, 3))
    assert engine.prefix_cache.capacity == 3
    cached = run(engine, batches)
    assert [t for t, _ in cached] == [t for t, _ in without]
    # a leaves 2 blocks; b's 2 evict a's tip, so a finds 1 (and its tip evicts b's); a again finds 2, b its first.
    assert [c for _, c in cached] == [0, 0, 16, 32, 16]
    assert len(engine.prefix_cache) == 3


def test_prompt_logprobs_are_computed_whole_and_equal_those_without_the_cache(causal_model):
    vocab = causal_model.config.vocab_size
    system = ids(4, 40, vocab)
    warm, echo = [*system, *ids(5, 8, vocab)], [*system, *ids(6, 8, vocab)]
    params = SamplingParams(max_new_tokens=3, eos_token_ids=NEVER)

    def echo_run(engine: Engine):
        run(engine, [[(warm, params)]])
        request = engine.add_request(echo, params, logprobs=2, prompt_logprobs=True)
        first = next(o for o in engine.step() if o.request_id == request.request_id)
        while engine.has_work():
            engine.step()
        return first

    plain, cached = echo_run(Engine(causal_model, prefix_cache_mb=0)), echo_run(Engine(causal_model))
    assert cached.cached_tokens is None and cached.token_id == plain.token_id  # no lookup: every position's logits
    assert len(cached.prompt_logprobs) == len(echo) and cached.prompt_logprobs[0] is None
    for got, want in zip(cached.prompt_logprobs[1:], plain.prompt_logprobs[1:], strict=True):
        assert got.token_id == want.token_id and abs(got.logprob - want.logprob) < 1e-5
        assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_a_prefix_lm_model_has_no_prefix_cache():
    """ChatGLM-6B reads its prompt bidirectionally up to <sop>: a prefix's keys and values depend on what follows."""
    engine = Engine(random_model(tiny_config(eos_token_id=255)))
    assert engine.prefix_cache is None
    [(tokens, cached)] = run(engine, [[(prompt(*range(5, 40)), SamplingParams(max_new_tokens=3))]])
    assert cached is None and len(tokens) == 3
