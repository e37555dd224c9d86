"""`glmkit serve`: the HTTP APIs over one model shared by continuous batching."""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from glmkit.cli.common import USER_ERROR_EXIT, add_model_args, load_from_args
from glmkit.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from glmkit.engine.scheduler import DEFAULT_STEP_TOKENS
from glmkit.parallel import tp as tp_lib


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Loopback by default: serving beyond this machine is a choice (--host), best made with --api-key."""
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on the API and /metrics (default: no key)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    parser.add_argument("--prefix-cache-mb", type=megabytes, default=DEFAULT_PREFIX_CACHE_MB,
                        help="MiB of prompt keys and values kept for later prompts that start the same way "
                             "(causal models; 0: off; default: %(default)s)")
    parser.add_argument("--kv-cache-mb", type=megabytes, default=None,
                        help="MiB for the pool of KV-cache blocks the running requests share; a request that cannot "
                             "get blocks waits, and a causal model's may be preempted and recomputed (default: room "
                             "for --max-batch requests of the model's whole context)")
    parser.add_argument("--kv-dtype", choices=["bfloat16", "float16", "float32", "int8"], default=None,
                        help="the KV cache's dtype: bfloat16 halves an fp32 model's cache, int8 (a scale per token "
                             "and head) halves a bf16 one, each at a measured cost in exactness (docs/serving.md; "
                             "default: the model's --dtype)")
    parser.add_argument("--step-tokens", type=positive_int, default=DEFAULT_STEP_TOKENS,
                        help="tokens one engine step may encode: the running requests' next tokens plus chunks of "
                             "new prompts, so a long prompt does not stall the others (default: %(default)s)")
    parser.add_argument("--cors-origin", action="append", default=None,
                        help="allow this browser origin to call the API; repeat for more (default: none)")
    parser.add_argument("--allowed-host", action="append", default=None,
                        help="accept requests whose Host header names this host; repeat for more, '*' for any "
                             "(default: localhost, 127.0.0.1 and ::1 when bound to loopback, any otherwise)")
    parser.add_argument("--metrics-public", action="store_true",
                        help="serve /metrics without the API key (default: /metrics needs the key when one is set)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send")


def megabytes(text: str) -> float:
    """--prefix-cache-mb's and --kv-cache-mb's value: a finite number of MiB, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in MiB: give a number >= 0 (0 turns it off)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Rank 0 serves and schedules; under --tp the other ranks follow its model steps until it stops."""
    import uvicorn

    from glmkit.engine.parallel import follow, stop_followers
    from glmkit.serve.app import create_app, default_allowed_hosts, model_name_for

    model, tokenizer = load_from_args(args)
    if tp_lib.rank() != 0:  # rank 0 serves and schedules; the others run its model steps
        follow(model, args.max_batch, prefix_cache_mb=args.prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
               kv_dtype=args.kv_dtype)
        return 0
    sock = bind(args.host, args.port)
    if sock is None:
        if args.tp > 1:
            stop_followers()
        return USER_ERROR_EXIT
    name = args.served_model_name or model_name_for(args.model)
    try:
        app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                         max_queue=args.max_queue, cors_origins=args.cors_origin, metrics_public=args.metrics_public,
                         allowed_hosts=default_allowed_hosts(args.host, args.allowed_host),
                         prefix_cache_mb=args.prefix_cache_mb, kv_cache_mb=args.kv_cache_mb,
                         step_tokens=args.step_tokens, kv_dtype=args.kv_dtype)
    except ValueError as e:  # a KV-cache size that holds no block
        print(f"glmkit serve: {e}", file=sys.stderr)
        if args.tp > 1:
            stop_followers()
        return USER_ERROR_EXIT
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # The socket is listening already, so a client that connects from now on is answered.
    print(f"glmkit: serving {name!r} on http://{_url_host(args.host)}:{sock.getsockname()[1]} "
          "(OpenAI API under /v1)", flush=True)
    server.run(sockets=[sock])
    if args.tp > 1:
        stop_followers()
    return 0


def bind(host: str, port: int) -> socket.socket | None:
    """A listening socket on host:port, or None after saying in one line why there cannot be one."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not another listener's port, only TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        reason = "the address is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        print(f"glmkit serve: cannot listen on {host}:{port}: {reason} (choose another --port or --host)",
              file=sys.stderr)
        return None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
