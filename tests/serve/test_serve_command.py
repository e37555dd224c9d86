"""`glmkit serve` as a command: it says where it serves only once it can, and its help shows the defaults."""

import socket
import subprocess
import sys


def test_a_port_in_use_is_one_line_and_no_serving_message(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "glmkit", "serve", "--model", str(model_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done
    assert "serving" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0], done.stderr


def test_serve_help_shows_the_defaults():
    done = subprocess.run([sys.executable, "-m", "glmkit", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    text = " ".join(done.stdout.split())
    for flag in ("--port PORT TCP port (default: 8000)", "--max-batch", "--allowed-host", "--metrics-public"):
        assert flag in text, flag
