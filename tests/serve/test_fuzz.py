"""schemathesis against the running server's own OpenAPI schema: a few hundred generated requests, none may
get a 5xx, and every answer must match what the schema documents (status, content type, body)."""

import json
import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Four POST operations take bodies (the four GETs have one case each): about 330 requests, under a minute on
# the 64-token model.
CASES_PER_OPERATION = 80


@pytest.fixture(scope="module")
def fuzz_server(model_dir, launch_server, api_key, tmp_path_factory):
    """The tiny model with a 64-token context, so that a request without max_tokens still ends quickly."""
    short = tmp_path_factory.mktemp("fuzz") / "fuzz-model"
    shutil.copytree(model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_sequence_length": 64}))
    proc, base = launch_server(short, "--api-key", api_key, "--max-batch", "8", "--max-queue", "64")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server, api_key):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json",
                                         headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


def test_the_api_against_its_own_schema(fuzz_schema, fuzz_server, api_key):
    headers = {"Authorization": f"Bearer {api_key}"}
    model_name = "fuzz-model"
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions", "POST /",
                                               "POST /v1/embeddings"}
    seen: dict[str, set[int]] = {}
    calls: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            label = case.operation.label
            body = case.body
            if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) % 2 == 0:
                # Half the requests name the served model (and chats end with a user's turn), to reach the engine.
                body["model"] = model_name
                if isinstance(body.get("messages"), list):
                    body["messages"] = [{"role": "user", "content": "hi"}]
            response = case.call(base_url=fuzz_server, headers=headers, timeout=60)
            seen.setdefault(label, set()).add(response.status_code)
            calls.append(label)
            case.validate_response(response, checks=CHECKS, headers=headers)

        fuzz()
    assert len(calls) >= 200, len(calls)
    # The generated requests reached the model as well as the refusals.
    assert 200 in seen["POST /v1/chat/completions"] and 400 in seen["POST /v1/chat/completions"]
    assert 200 in seen["POST /v1/embeddings"] and 400 in seen["POST /v1/embeddings"]
