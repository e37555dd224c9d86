"""A real `glmkit serve` process on loopback, for any test that needs one."""

import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    return wait_healthy(*launch_server(model_dir, *flags))


def start_servers(model_dir, *flag_lists: list[str]) -> list[tuple[subprocess.Popen, str]]:
    """Several servers of one model, started side by side (each loads while the others do)."""
    launched = [launch_server(model_dir, *flags) for flags in flag_lists]
    return [wait_healthy(proc, base) for proc, base in launched]


def launch_server(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", "--model", str(model_dir), "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base: str) -> tuple[subprocess.Popen, str]:
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not start: {proc.stdout.read()}")
