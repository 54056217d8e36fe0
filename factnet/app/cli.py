"""The ``factnet`` command line: train, sweep, info, export, merge, bench-table, frontier, serve.

    factnet train --data vtab/cifar --model vit_base_patch16_224 --checkpoint vit_b16_in21k.safetensors \\
                  --preset vtab1k/cifar --split train800val200 --out runs/cifar
    factnet sweep --data vtab/cifar --model ... --ranks 2,4,8 --scales 0.1,1,10 --out sweeps/cifar
    factnet info vit_base_patch16_224 --format tt --rank 4
    factnet export runs/cifar/adapter.safetensors --model ... --checkpoint ... --out lora/cifar
    factnet merge runs/cifar/adapter.safetensors --model ... --checkpoint ... --out cifar_merged.safetensors
    factnet serve --model vit_base_patch16_224 --checkpoint vit_b16_in21k.safetensors --adapters users/

Errors (bad paths, unknown names, bad numbers) print one line on stderr and exit with status 2.
Nothing is ever downloaded: pretrained weights come from ``--checkpoint FILE`` only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import safetensors.torch
import torch

from factnet import (
    Adapter,
    FactnetError,
    Tensorizer,
    __version__,
    available_formats,
    export_lora,
    load,
    read_budget,
    write_atomically,
)
from factnet.app.arguments import (
    add_model_options, finite_float, float_list, int_list, model_kwargs, nonnegative_float, nonnegative_int, positive_int,
)
from factnet.app.runs import RunSettings, adapter_classes, build_model, run_sweep, train_setting
from factnet.app.serve_cli import add_serve_command

__all__ = ["main"]


class UsageError(FactnetError):
    """A malformed command line (reported like every other error: one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we raise instead
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---- the parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="factnet", description="Factor-Tuning (FacT): train, inspect, export and merge adapters.")
    parser.add_argument("--version", action="version", version=f"factnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = _Parser(add_help=False)
    add_model_options(model)
    adapter = _Parser(add_help=False)
    adapter.add_argument("--format", default="tt", help="tt (default), tucker, cp, batch-matrix, tensor-ring")
    adapter.add_argument("--group", default="shape", help="shape (default), stage, or a regex naming the groups")
    adapter.add_argument("--bits", type=int, choices=(1, 2, 4, 8),
                         help="train the factors as a BITS-bit file stores them; the adapter file is then written so")
    adapter.add_argument("--head-bits", type=int, choices=(1, 2, 4, 8),
                         help="the same for the head (HEAD_BITS bits)")
    adapter.add_argument("--targets", action="append", metavar="PATTERN",
                         help="adapt these matrices (glob with block selection, e.g. 'blocks.*.attn.qkv[q,v]'; "
                              "repeatable); default: the paper's attention and MLP matrices")
    training = _Parser(add_help=False)
    training.add_argument("--data", type=Path, help="VTAB-1K task folder (train800.txt, ...) or ImageFolder tree")
    for flag, kind, text in [("--epochs", positive_int, "100"), ("--batch-size", positive_int, "64"),
                             ("--lr", nonnegative_float, "1e-3"), ("--weight-decay", nonnegative_float, "1e-4"),
                             ("--warmup-epochs", nonnegative_int, "10"),
                             ("--warmup-lr", nonnegative_float, "1e-6"), ("--min-lr", nonnegative_float, "1e-5"),
                             ("--dropout", nonnegative_float, "0.1, in factor space"),
                             ("--drop-path", nonnegative_float, "0.1, on the backbone")]:
        training.add_argument(flag, type=kind, help=f"default: the paper's {text}")
    training.add_argument("--seed", type=int, default=0, help="seeds the factors, shuffling and dropout (default 0)")
    training.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    training.add_argument("--workers", type=nonnegative_int, default=4, help="data loader processes (default 4)")
    training.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    train = commands.add_parser("train", parents=[model, adapter, training], help="train an adapter on a data set",
                                description="Train an adapter with the paper's recipe. Without --data, run the "
                                            "built-in demo.")
    train.add_argument("--rank", type=positive_int, help="default 8, or the preset's")
    train.add_argument("--scale", type=finite_float, help="default 10, or the preset's")
    train.add_argument("--preset", help="vtab1k/<task>: the paper's rank and scale for that task and --format")
    train.add_argument("--split", choices=["train800", "train800val200"], default="train800",
                       help="train800: train there, evaluate on val200 (default); train800val200: the final run, "
                            "evaluated on test")
    train.add_argument("--eval-every", type=positive_int,
                       help="evaluate every N epochs (default: every epoch on val200, only after the last on test)")
    train.add_argument("--out", type=Path, default=Path("factnet-run"), help="output directory (default factnet-run)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.set_defaults(handler=command_train)

    sweep = commands.add_parser("sweep", parents=[model, adapter, training], help="rank x scale grid search",
                                description="Train every rank x scale on train800 and evaluate on val200; retrain "
                                            "the best (by val accuracy) on train800val200, evaluate it on test once.")
    sweep.add_argument("--ranks", type=int_list, required=True, metavar="R,...", help="e.g. 2,4,8")
    sweep.add_argument("--scales", type=float_list, required=True, metavar="S,...", help="e.g. 0.1,1,10")
    sweep.add_argument("--out", type=Path, required=True, help="output directory")
    sweep.add_argument("--resume", action="store_true", help="keep finished settings, continue the interrupted one")
    sweep.set_defaults(handler=command_sweep)

    info = commands.add_parser("info", parents=[adapter], help="dry run: what an adapter would train")
    info.add_argument("model_name", metavar="MODEL", help="timm model name")
    info.add_argument("--rank", type=positive_int, default=8, help="default 8")
    info.add_argument("--budget", help="instead: for every format, the largest rank whose exact count fits this many "
                                       "parameters ('10k'), or the rank and bits decompose takes for this many factor "
                                       "bytes ('40KB')")
    info.add_argument("--num-classes", type=positive_int, help="head size (default: the model's)")
    info.add_argument("--model-kwargs", type=model_kwargs, default={}, metavar="K=V,...")
    info.set_defaults(handler=command_info)

    for name, text, out_help in [("export", "write a PEFT LoRA adapter directory", "output directory"),
                                 ("merge", "write the merged model's weights", "output .safetensors file")]:
        command = commands.add_parser(name, parents=[model], help=text, description=text)
        command.add_argument("adapter", type=Path, metavar="ADAPTER", help="adapter.safetensors")
        command.add_argument("--num-classes", type=positive_int,
                             help="head size (default: read from the adapter's saved head)")
        command.add_argument("--out", type=Path, required=True, help=out_help)
        command.add_argument("--overwrite", action="store_true", help="replace an existing output")
        command.set_defaults(handler=command_export if name == "export" else command_merge)
    commands.choices["export"].add_argument("--max-rank", type=positive_int,
                                            help="cap the LoRA rank (truncated SVD above it)")

    bench = commands.add_parser("bench-table", help="the built-in demo's benchmark table (markdown)")
    bench.add_argument("--seeds", type=positive_int, default=3, help="seeds per setting (default 3)")
    bench.add_argument("--no-progress", dest="progress", action="store_false")
    bench.set_defaults(handler=command_bench_table)

    frontier = commands.add_parser(
        "frontier", help="the built-in demo's frontier: accuracy vs trainable parameters (CSV, markdown, PNG)",
        description="Train linear probe, full fine-tuning, PEFT LoRA/VeRA/VB-LoRA/TinyLoRA and FacT-TT/TK/CP at "
                    "several budgets on the built-in demo's wide backbone (width 192); write frontier.csv, "
                    "frontier.md, frontier.png and runs.jsonl to --out. Finished runs are kept in runs.jsonl: "
                    "rerun the same command to continue an interrupted one.")
    frontier.add_argument("--out", type=Path, default=Path("frontier"), help="output directory (default frontier)")
    frontier.add_argument("--seeds", type=positive_int, help="seeds per budget (default 3)")
    frontier.add_argument("--jobs", type=positive_int, default=1,
                          help="training runs side by side, one torch thread each (default 1)")
    frontier.add_argument("--smoke", action="store_true",
                          help="a tiny backbone and recipe (seconds): checks the pipeline, measures nothing")
    frontier.add_argument("--no-progress", dest="progress", action="store_false")
    frontier.set_defaults(handler=command_frontier)

    add_serve_command(commands, model)
    return parser


# ---- commands -------------------------------------------------------------------------------------
_DATA_ONLY = ("model", "checkpoint", "preset", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
              "warmup_lr", "min_lr", "dropout", "drop_path", "eval_every", "targets", "head_bits")


def command_train(args: argparse.Namespace) -> int:
    """Train one adapter (or, without ``--data``, run the built-in demo)."""
    if args.data is None:
        given = [f"--{name.replace('_', '-')}" for name in _DATA_ONLY if getattr(args, name) not in (None, False)]
        if given or args.model_kwargs or args.resume or args.group != "shape":
            raise FactnetError(f"{', '.join(given) or 'these options'} need --data; without --data, factnet train "
                               "runs the built-in demo (options: --format, --rank, --scale, --bits, --seed, --out)")
        from factnet.app import demo

        results = demo.run(args.out, format=args.format, rank=args.rank, scale=args.scale, seed=args.seed,
                           progress=args.progress, bits=args.bits)
        print(demo.summary(results, args.out, args.format))
        return 0
    settings = RunSettings.from_args(args)
    result = train_setting(settings, args.split, args.out, resume=args.resume, eval_every=args.eval_every)
    print(f"{result.eval_split} accuracy {result.accuracy:.4f} after {settings.recipe.epochs} epochs "
          f"({result.seconds:.1f}s); adapter {result.adapter_path} ({result.adapter_bytes:,} bytes, "
          f"{result.adapter_bytes - result.head_bytes:,} without the head: {result.parameters:,} factor parameters + "
          f"{result.head_parameters:,} head parameters)")
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    """Grid over ranks x scales selected on val200; the best retrained and tested once."""
    if args.data is None or args.model is None:
        raise FactnetError("factnet sweep needs --data DIR and --model NAME")
    settings = RunSettings.from_args(args)  # its rank and scale are replaced by each grid point
    table = run_sweep(settings, args.ranks, args.scales, args.out, resume=args.resume)
    print(table)
    return 0


def command_info(args: argparse.Namespace) -> int:
    """Dry run on a weightless (meta-device) model: the slice table and what would train."""
    options = dict(args.model_kwargs)
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    model = build_model(args.model_name, kwargs=options, meta=True)
    tensorizer = Tensorizer(model, targets=args.targets).group(args.group)
    if args.budget is not None:
        return _print_budget(tensorizer, args.budget)
    adapter = tensorizer.decompose(args.format, rank=args.rank)
    factors, head = adapter.num_parameters(), adapter.num_head_parameters()
    print(tensorizer)
    print(f"\nformat {adapter.format.name}, rank {args.rank}, grouped by {args.group}")
    for name, count in adapter.num_parameters_by_group().items():
        n, d_in, d_out = adapter.group_shapes()[name]
        capped = adapter.format.capped_text(n, d_in, d_out)
        note = f" (rank capped: {capped})" if capped else ""
        print(f"  group {name}: {n}x{d_in}x{d_out} -> {count:,} parameters{note}")
    print(f"trainable factor parameters: {factors:,}")
    print(f"head parameters: {head:,}")
    print(f"adapter bytes: {4 * (factors + head):,} (factors {4 * factors:,} + head {4 * head:,}; an estimate of the "
          "tensor bytes at 4 bytes a float32 parameter: the file adds a small header)")
    return 0


def _print_budget(tensorizer: Tensorizer, budget: str) -> int:
    read = read_budget(budget)
    print(tensorizer)
    how = ("of the file saved without the head (factors as stored at the bits decompose picks, header and spec)"
           if read.in_bytes else "of factors")
    print(f"\nbudget {budget}: {read} {how}; grouped as above")
    print(f"{'format':16} {'rank':>5} {'bits':>5} {'parameters':>12} {'factor bytes':>12} {'file bytes':>12}")
    for name in available_formats():
        try:
            choice = tensorizer.budget_choice(name, budget)
        except FactnetError as error:  # (it says what rank 1 needs)
            print(f"{name:16} {'-':>5} {'-':>5} {'none fits':>12} ({error})")
            continue
        bits = "fp" if choice.bits is None else str(choice.bits)
        file = "-" if choice.file is None else f"{choice.file:,}"
        print(f"{name:16} {choice.rank:5d} {bits:>5} {choice.params:12,} {choice.bytes:12,} {file:>12}")
    if read.in_bytes:  # what decompose(budget=...) takes with no format
        try:
            print(f"\nwith no format, decompose(budget={budget!r}) picks {tensorizer.auto_choice(budget)}")
        except FactnetError as error:
            print(f"\nwith no format, decompose(budget={budget!r}) fits nothing: {error}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    """Rebuild the adapter on the base model and write it as a PEFT LoRA directory."""
    adapter = _load_adapter(args)
    print(export_lora(adapter, args.out, max_rank=args.max_rank, overwrite=args.overwrite))
    return 0


def command_merge(args: argparse.Namespace) -> int:
    """Rebuild the adapter, fold it into the weights and write the model's state dict (safetensors)."""
    out = args.out
    if out.exists() and not args.overwrite:
        raise FactnetError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FactnetError(f"directory {out.parent} does not exist; create it first")
    adapter = _load_adapter(args)
    adapter.merge()
    model = adapter.detach(keep_merged=True)
    state = {name: value.detach().cpu().clone().contiguous() for name, value in model.state_dict().items()}
    write_atomically(str(out), lambda temp: safetensors.torch.save_file(state, temp))
    classes = model.num_classes if hasattr(model, "num_classes") else None
    print(f"wrote {out} ({out.stat().st_size:,} bytes). Load it with timm.create_model({args.model!r}, "
          f"pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={classes}), "
          f"num_classes={classes}{''.join(f', {k}={v!r}' for k, v in args.model_kwargs.items())})")
    return 0


def _load_adapter(args: argparse.Namespace) -> Adapter:
    """The adapter file rebuilt on ``--model`` with ``--checkpoint``'s weights (head size from the file)."""
    if args.model is None:
        raise FactnetError(f"factnet {args.command} needs --model: the timm model the adapter was trained on")
    if not args.adapter.is_file():
        raise FactnetError(f"adapter file {args.adapter} does not exist")
    classes = args.num_classes or adapter_classes(args.adapter, args.model)
    options = dict(args.model_kwargs, **({"num_classes": classes} if classes else {}))
    model = build_model(args.model, checkpoint=args.checkpoint, kwargs=options)
    return load(model.eval(), args.adapter)


def command_bench_table(args: argparse.Namespace) -> int:
    """Print the built-in demo's benchmark table (markdown)."""
    from factnet.app import demo

    print(demo.bench_table(seeds=args.seeds, progress=args.progress))
    return 0


def command_frontier(args: argparse.Namespace) -> int:
    """Train the demo's frontier and print its markdown table (the files are in --out)."""
    from dataclasses import replace

    from factnet.app.demo import frontier

    config = frontier.SMOKE if args.smoke else frontier.FrontierConfig()
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    print(frontier.run(args.out, config, jobs=args.jobs, progress=args.progress))
    print(f"\nWrote {args.out / frontier.CSV_FILE}, {args.out / frontier.TABLE_FILE}, {args.out / frontier.FIGURE_FILE} "
          f"and {args.out / frontier.RUNS_FILE}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for any error the user can fix)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except FactnetError as error:
        print(f"factnet: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factnet: interrupted (factnet train and sweep continue with --resume)", file=sys.stderr)
        return 130
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
