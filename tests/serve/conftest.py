"""A real `glmkit serve` process on loopback over a tiny random chat model, shared by the serving tests."""


import pytest

import glmkit

from servers import start_server
from tiny import write_chat_model

KEY = "test-key"


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("serve-model"), tokenizer, silence_eop=True)


@pytest.fixture(scope="session")
def server(model_dir):
    proc, base = start_server(model_dir, "--api-key", KEY, "--max-batch", "4", "--max-queue", "32")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def local(model_dir):
    return glmkit.load(model_dir, progress=False)




@pytest.fixture(scope="session")
def api_key() -> str:
    return KEY


@pytest.fixture(scope="session")
def launch_server():
    """start_server, for tests that need a server with flags of their own."""
    return start_server
