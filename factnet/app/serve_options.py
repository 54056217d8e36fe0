"""``factnet serve``'s options and the `ServeSettings` they make: for the subcommand (`factnet.app.serve_cli`) and
for Ray's ``serve run factnet.app.serve_ray:app key=value`` (`read_options`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from factnet import FactnetError
from factnet.app.arguments import (
    add_model_options, float_list, int_list, nonnegative_float, positive_float, positive_int,
)
from factnet.app.serve import ServeSettings

__all__ = ["add_serve_options", "read_options", "serving_options", "settings_of"]


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise FactnetError(f"{self.prog}: {message}")


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """``factnet serve``'s own options (the model's: `add_model_options`)."""
    serve.add_argument("--adapters", type=Path, help="directory of adapter files")
    serve.add_argument("--input-shape", type=int_list, metavar="C,H,W",
                       help="one sample's shape (default: read from the model)")
    serve.add_argument("--mean", type=float_list, metavar="M,...", help="image normalization (default: the model's "
                       "timm data config)")
    serve.add_argument("--std", type=float_list, metavar="S,...", help="image normalization (default: as --mean)")
    serve.add_argument("--labels", type=Path, metavar="FILE", help="class names, one a line, for top_k answers")
    serve.add_argument("--max-body-mb", type=positive_float, default=8.0,
                       help="larger requests are refused with 413 before they are read (default 8)")
    serve.add_argument("--max-batch-size", type=positive_int, default=32, help="default 32 (1: no batching)")
    serve.add_argument("--batch-wait-ms", type=nonnegative_float, default=5.0,
                       help="how long a batch waits to fill (default 5 ms)")
    serve.add_argument("--replicas", type=positive_int, default=1, help="copies of the deployment (default 1)")
    serve.add_argument("--threads", type=positive_int, default=1, help="torch threads per replica (default 1)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default): one GPU a replica where the Ray cluster has GPUs, else the CPU")
    serve.add_argument("--address", help="join this running Ray cluster ('auto', 'ray://HOST:10001') instead of "
                       "starting a private one")
    serve.add_argument("--poll", type=nonnegative_float, default=1.0,
                       help="seconds between checks of the adapter directory (default 1)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=positive_int, default=8000, help="default 8000")
    serve.add_argument("--demo-users", type=positive_int, default=4, help="adapters of the demo (default 4)")


def serving_options(args: argparse.Namespace) -> dict:
    return dict(max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, poll_s=args.poll,
                threads=args.threads, device=args.device, max_body_mb=args.max_body_mb)


def settings_of(args: argparse.Namespace) -> ServeSettings | None:
    """The settings the parsed options say; None for the demo (no --model, no --adapters)."""
    images = dict(mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
                  labels=args.labels)
    if (args.mean is None) != (args.std is None):
        raise FactnetError("pass --mean and --std together")
    if args.model is None and args.adapters is None:
        if args.checkpoint or args.model_kwargs or args.input_shape or args.labels:
            raise FactnetError("--checkpoint, --model-kwargs, --input-shape and --labels need --model and --adapters; "
                               "without them factnet serve runs the demo")
        return None
    if args.model is None or args.adapters is None:
        raise FactnetError("factnet serve needs both --model and --adapters (or neither: the demo)")
    if not args.adapters.is_dir():
        raise FactnetError(f"adapter directory {args.adapters} does not exist")
    shape = tuple(args.input_shape) if args.input_shape else None
    return ServeSettings(adapters=args.adapters, model=args.model, checkpoint=args.checkpoint,
                         model_kwargs=args.model_kwargs, input_shape=shape, **images, **serving_options(args))


def read_options(options: dict[str, str]) -> tuple[ServeSettings, int]:
    """(settings, replicas) of ``factnet serve``'s options given as ``{"adapters": DIR, "model": NAME, ...}`` (Ray's
    ``serve run ... key=value`` arguments)."""
    if not {"adapters", "model"} <= set(options):
        raise FactnetError("serve run factnet.app.serve_ray:app needs adapters=DIR and model=NAME (the demo is not "
                           "served this way)")
    parser = _RaisingParser(prog="factnet.app.serve_ray:app", add_help=False)
    add_model_options(parser)
    add_serve_options(parser)
    argv = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    args = parser.parse_args(argv)
    if args.address or args.host != "127.0.0.1" or args.port != 8000:
        raise FactnetError("address, host and port are Ray's to set when it runs the application (serve run "
                           "--address ..., its config file's http_options)")
    return settings_of(args), args.replicas
