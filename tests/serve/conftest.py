"""A real `glmkit serve` process on loopback over a tiny random chat model, shared by the serving tests."""

import socket
import subprocess
import sys
import time

import httpx
import pytest

import glmkit

from tiny import write_chat_model

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("serve-model"), tokenizer, silence_eop=True)


def start_server(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", "--model", str(model_dir), "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not start: {proc.stdout.read()}")


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
