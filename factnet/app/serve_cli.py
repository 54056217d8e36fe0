"""The ``factnet serve`` subcommand: its options and handler (the server itself: `factnet.app.serve_ray`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from factnet import FactnetError
from factnet.app.arguments import int_list, nonnegative_float, positive_int
from factnet.app.serve import ServeSettings
from factnet.app.serve_ray import serve_until_interrupted

__all__ = ["add_serve_command", "command_serve"]


def add_serve_command(commands: argparse._SubParsersAction, model: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the ``factnet`` subcommands (``model``: the shared --model/--checkpoint options)."""
    serve = commands.add_parser(
        "serve", parents=[model], help="an HTTP server: one backbone, every adapter of a directory, mixed batches",
        description="Serve every adapter file (*.safetensors, name: the file's stem) of --adapters on one backbone "
                    "with Ray Serve: POST /predict {\"user\": NAME or null, \"input\": [...]} -> label and logits, "
                    "GET /health. Single-user requests are gathered into mixed batches. Files added, changed or "
                    "deleted while it runs are followed. Without --model and --adapters: the demo (random ViT and "
                    "adapters, nothing downloaded). Needs pip install \"factnet[serve]\".")
    serve.add_argument("--adapters", type=Path, help="directory of adapter files")
    serve.add_argument("--input-shape", type=int_list, metavar="C,H,W",
                       help="one sample's shape (default: read from the model)")
    serve.add_argument("--max-batch-size", type=positive_int, default=32, help="default 32 (1: no batching)")
    serve.add_argument("--batch-wait-ms", type=nonnegative_float, default=5.0,
                       help="how long a batch waits to fill (default 5 ms)")
    serve.add_argument("--replicas", type=positive_int, default=1, help="copies of the deployment (default 1)")
    serve.add_argument("--threads", type=positive_int, default=1, help="torch threads per replica (default 1)")
    serve.add_argument("--poll", type=nonnegative_float, default=1.0,
                       help="seconds between checks of the adapter directory (default 1)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=positive_int, default=8000, help="default 8000")
    serve.add_argument("--demo-users", type=positive_int, default=4, help="adapters of the demo (default 4)")
    serve.set_defaults(handler=command_serve)


def command_serve(args: argparse.Namespace) -> int:
    """Serve the adapters of a directory (or the demo's) until Ctrl-C."""
    batching = dict(max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, poll_s=args.poll,
                    threads=args.threads)
    if args.model is None and args.adapters is None:
        if args.checkpoint or args.model_kwargs or args.input_shape:
            raise FactnetError("--checkpoint, --model-kwargs and --input-shape need --model and --adapters; without "
                               "them factnet serve runs the demo")
        settings = None
    elif args.model is None or args.adapters is None:
        raise FactnetError("factnet serve needs both --model and --adapters (or neither: the demo)")
    elif not args.adapters.is_dir():
        raise FactnetError(f"adapter directory {args.adapters} does not exist")
    else:
        shape = tuple(args.input_shape) if args.input_shape else None
        settings = ServeSettings(adapters=args.adapters, model=args.model, checkpoint=args.checkpoint,
                                 model_kwargs=args.model_kwargs, input_shape=shape, **batching)
    serve_until_interrupted(settings, host=args.host, port=args.port, replicas=args.replicas,
                            demo_users=args.demo_users, demo_options=batching)
    return 0
