"""The ``factnet serve`` subcommand: its help and handler (its options: `factnet.app.serve_options`; the server
itself: `factnet.app.serve_ray`)."""

from __future__ import annotations

import argparse

from factnet.app.serve_options import add_serve_options, serving_options, settings_of
from factnet.app.serve_ray import serve_until_signal

__all__ = ["add_serve_command", "command_serve"]


def add_serve_command(commands: argparse._SubParsersAction, model: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the ``factnet`` subcommands (``model``: the shared --model/--checkpoint options)."""
    serve = commands.add_parser(
        "serve", parents=[model], help="an HTTP server: one backbone, every adapter of a directory, mixed batches",
        description="Serve every adapter file (*.safetensors, name: the file's stem) of --adapters on one backbone "
                    "with Ray Serve: POST /predict with an image (multipart 'file' and 'user', or JSON {\"user\": "
                    "NAME, \"image\": BASE64}) or one preprocessed sample (JSON {\"user\": NAME, \"input\": [...]}) "
                    "-> label, logits and top_k; GET /health; GET /docs. Single-user requests are gathered into "
                    "mixed batches. Files added, changed or deleted while it runs are followed. Without --model and "
                    "--adapters: the demo (random ViT and adapters, nothing downloaded). Needs pip install "
                    "\"factnet[serve]\".")
    add_serve_options(serve)
    serve.set_defaults(handler=command_serve)


def command_serve(args: argparse.Namespace) -> int:
    """Serve the adapters of a directory (or the demo's) until SIGINT or SIGTERM."""
    settings = settings_of(args)
    demo = {**serving_options(args), **({"mean": tuple(args.mean), "std": tuple(args.std)} if args.mean else {})}
    serve_until_signal(settings, host=args.host, port=args.port, replicas=args.replicas, address=args.address,
                       demo_users=args.demo_users, demo_options=demo)
    return 0
