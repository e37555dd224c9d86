"""Sixteen concurrent streaming clients on the shipped demo model: every reply complete and, under
greedy decoding, equal to the reply the same prompt gets alone."""

import asyncio

import openai
import pytest

import glmkit
from glmkit.pretrained import DEMO_MODEL_DIR

QUESTIONS = ["What is the capital of France?", "法国的首都是哪里？", "What is 12 + 34?", "23加45等于多少？",
             "How do you say 'water' in Chinese?", "“朋友”用英语怎么说？", "Who are you?", "你是谁？"] * 2


@pytest.fixture(scope="module")
def demo_server(launch_server):
    proc, base = launch_server(DEMO_MODEL_DIR, "--max-batch", "8")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_sixteen_streams_on_the_demo_model_equal_their_solo_replies(demo_server):
    model, tokenizer = glmkit.load(progress=False)
    client = openai.AsyncOpenAI(base_url=f"{demo_server}/v1", api_key="none")

    async def one(question):
        stream = await client.chat.completions.create(model=DEMO_MODEL_DIR.name, temperature=0, max_tokens=48,
                                                      messages=[{"role": "user", "content": question}], stream=True)
        chunks = [c async for c in stream]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    async def all_of_them():
        return await asyncio.gather(*(one(q) for q in QUESTIONS))

    for question, (reply, finish) in zip(QUESTIONS, asyncio.run(all_of_them()), strict=True):
        assert finish in ("stop", "length")
        assert reply == model.chat(tokenizer, question, do_sample=False, max_new_tokens=48)[0], question
