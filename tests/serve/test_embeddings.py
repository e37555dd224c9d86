"""POST /v1/embeddings on real `glmkit serve` processes, driven by the official openai client: the shipped demo model
(a prefix-LM: mean pooling) and a tiny GLM-4-layout model (causal: last-token pooling) behind an API key."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

import glmkit
from glmkit.pretrained import DEMO_MODEL_DIR

from servers import start_server

KEY = "embed-key"
TEXTS = ["北京是中国的首都。", "The cat sat on the mat.", "今天天气很好", "Paris is the capital of France.", "hi"]


@pytest.fixture(scope="module")
def demo():
    """(client, local model, tokenizer) for a server of the shipped demo model, the default of `glmkit serve`."""
    proc, base = start_server(DEMO_MODEL_DIR)
    model, tokenizer = glmkit.load(progress=False)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), model, tokenizer
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def glm4(glm4_model):
    """(client, base URL, local model, tokenizer, model name) for a keyed server of the tiny GLM-4 model."""
    proc, base = start_server(glm4_model, "--api-key", KEY)
    model, tokenizer = glmkit.load(glm4_model, progress=False)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key=KEY), base, model, tokenizer, glm4_model.name
    proc.terminate()
    proc.wait(timeout=30)


@torch.no_grad()
def pooled(model, ids: list[int]) -> np.ndarray:
    """What the docs say each family's vector is, from the local model's forward pass: the mean of the final hidden
    states (ChatGLM-6B, the demo) or the last token's (causal), unit length."""
    hidden = model(torch.tensor([ids])).hidden_states[0]
    return F.normalize(hidden[-1] if model.config.causal else hidden.mean(0), dim=-1).numpy()


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data) and response.object == "list"
    return np.array([d.embedding for d in response.data])


def test_the_demo_model_mean_pools_each_text(demo):
    client, model, tokenizer = demo
    response = client.embeddings.create(model="demo-model", input=TEXTS)  # the client asks for base64 and decodes
    got = vectors(response)
    assert got.shape == (len(TEXTS), model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    ids = [tokenizer.encode(t) for t in TEXTS]
    np.testing.assert_allclose(got, np.stack([pooled(model, i) for i in ids]), rtol=0, atol=1e-5)
    tokens = sum(len(i) for i in ids)
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)
    assert response.model == "demo-model"


def test_float_and_base64_give_the_same_vectors(demo):
    client = demo[0]
    floats = client.embeddings.create(model="demo-model", input=TEXTS, encoding_format="float")
    encoded = client.embeddings.create(model="demo-model", input=TEXTS, encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in encoded.data)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded.data])
    assert np.array_equal(vectors(floats).astype(np.float32), decoded)
    assert np.array_equal(vectors(client.embeddings.create(model="demo-model", input=TEXTS)), decoded)


def test_a_list_gives_each_text_its_own_vector(demo):
    client = demo[0]
    batched = vectors(client.embeddings.create(model="demo-model", input=TEXTS, encoding_format="float"))
    alone = np.concatenate([vectors(client.embeddings.create(model="demo-model", input=t, encoding_format="float"))
                            for t in TEXTS])
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)


def test_the_demo_model_puts_a_paraphrase_nearest(demo):
    """A property of the shipped weights (a random model would have none): each text's nearest other text is its
    paraphrase."""
    pairs = [("北京是中国的首都。", "中国的首都是北京。"), ("The cat sat on the mat.", "A cat is sitting on the mat."),
             ("今天天气很好", "今天天气不错"), ("Paris is the capital of France.", "The capital of France is Paris.")]
    texts = [t for pair in pairs for t in pair]
    got = vectors(demo[0].embeddings.create(model="demo-model", input=texts))
    similarity = got @ got.T
    np.fill_diagonal(similarity, -np.inf)
    assert list(similarity.argmax(axis=1)) == [i ^ 1 for i in range(len(texts))]


def test_the_glm4_model_takes_its_last_token_and_token_inputs(glm4):
    client, _, model, tokenizer, name = glm4
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert ids[0][:2] == tokenizer.encode("", add_special_tokens=True)  # [gMASK] <sop> in front
    want = np.stack([pooled(model, i) for i in ids])
    from_text = vectors(client.embeddings.create(model=name, input=TEXTS, user="someone"))
    from_ids = vectors(client.embeddings.create(model=name, input=ids))
    np.testing.assert_allclose(from_text, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_ids, want, rtol=0, atol=1e-5)
    one = client.embeddings.create(model=name, input=ids[2], dimensions=model.config.hidden_size)
    np.testing.assert_allclose(vectors(one)[0], want[2], rtol=0, atol=1e-5)
    assert one.usage.prompt_tokens == len(ids[2])


@pytest.mark.parametrize("body, message", [
    ({"input": ""}, "input 0 is empty"),
    ({"input": []}, "input is an empty list"),
    ({"input": [[5, 6], []]}, "input 1 is empty"),
    ({"input": ["a", 5]}, "input: must be a string, a list of strings, a list of token ids"),
    ({"input": [-1]}, "must be a string"),
    ({"input": ["x"] * 2049}, "at most 2048"),
    ({"input": [[5] * 400] * 800}, "320000 tokens together; one request may hold at most 300000"),
    ({"input": ["x", "hello " * 600]}, "input 1 has"),
    ({"input": [[5], [7, 99999]]}, "input 1 holds token id 99999, outside the model's vocabulary"),
    ({"input": "x", "dimensions": 8}, "dimensions 8: this model's embeddings have 64"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_requests_are_400s_in_openais_shape(glm4, body, message):
    client, _, _, _, name = glm4
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=name, **body)
    error = refused.value.body
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] in ("input", "dimensions", "encoding_format")


def test_the_key_host_model_name_metrics_and_schema(glm4):
    client, base, _, _, name = glm4
    body = {"model": name, "input": "hello"}
    anonymous = httpx.post(f"{base}/v1/embeddings", json=body, timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{base}/v1/embeddings", json=body, headers=headers, timeout=30).status_code == 200
    rebound = httpx.post(f"{base}/v1/embeddings", json=body, headers={**headers, "Host": "evil.test"}, timeout=30)
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    metrics = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
    assert 'endpoint="/v1/embeddings",status="200"' in metrics and 'endpoint="/v1/embeddings",status="401"' in metrics
    assert "glmkit_embedding_tokens_total" in metrics
    operation = httpx.get(f"{base}/openapi.json", headers=headers, timeout=30).json()["paths"]["/v1/embeddings"]["post"]
    assert {"200", "400", "401", "404", "429"} <= set(operation["responses"])
