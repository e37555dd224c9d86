"""`glmkit serve`: the HTTP APIs over one model shared by continuous batching."""

from __future__ import annotations

import argparse

from glmkit.cli.common import add_model_args, load_from_args
from glmkit.parallel import tp as tp_lib


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Loopback by default: serving beyond this machine is a choice (--host), best made with --api-key."""
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    parser.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send")


def cmd_serve(args: argparse.Namespace) -> int:
    """Rank 0 serves and schedules; under --tp the other ranks follow its model steps until it stops."""
    import uvicorn

    from glmkit.engine.parallel import follow, stop_followers
    from glmkit.serve.app import create_app, model_name_for

    model, tokenizer = load_from_args(args)
    if tp_lib.rank() != 0:  # rank 0 serves and schedules; the others run its model steps
        follow(model, args.max_batch)
        return 0
    name = args.served_model_name or model_name_for(args.model)
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, cors_origins=args.cors_origin)
    print(f"glmkit: serving {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    if args.tp > 1:
        stop_followers()
    return 0
