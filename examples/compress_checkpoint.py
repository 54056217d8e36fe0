"""Compress a fine-tuned checkpoint into a factnet adapter.

Reads two local checkpoints of the same architecture, a base and a fully fine-tuned one, takes
the dense increment ``W_ft - W_base`` of the targeted matrices (by default the paper's:
attention and MLP of every block), decomposes it with `factnet.compress` (tensorly: TT-SVD,
HOOI, CP-ALS, ...) and saves the result as a factnet adapter file. It prints the relative error
``‖ΔW - s·ΔŴ‖ / ‖ΔW‖`` of every group and the sizes: dense increment, adapter file. With
``--sweep`` it first prints error vs parameters over several ranks, to choose one.

Only the targeted matrices go into the adapter. Other tensors that changed in fine-tuning (a new
head, biases, norms) are listed; ``--rest`` saves them to a safetensors file of their own.

Run (any timm model name, or ``package.module:function`` returning an ``nn.Module``)::

    python examples/compress_checkpoint.py --model vit_base_patch16_224 --model-kwargs '{"num_classes": 100}' \\
        --base base.pth --finetuned finetuned.safetensors --format tt --rank 16 \\
        --out task.factnet --rest task.rest.safetensors

    # error vs size over ranks only (nothing saved without --out):
    python examples/compress_checkpoint.py --model vit_base_patch16_224 --base base.pth \\
        --finetuned finetuned.pth --format tucker --sweep 4,8,16,32

Checkpoints are ``.safetensors`` files or ``torch.save``'d state dicts (``.pt``/``.pth``; a dict
holding ``"state_dict"`` or ``"model"`` is unwrapped). Nothing is downloaded: the model is built
with ``pretrained=False`` and the base checkpoint loaded into it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

import factnet


def load_checkpoint(path: str) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``'d dict (never unpickles code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise SystemExit(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def build_model(name: str, kwargs: Mapping[str, object]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, or ``module:function(**kwargs)``."""
    if ":" in name:
        module, function = name.split(":", 1)
        return getattr(importlib.import_module(module), function)(**kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def changed_tensors(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                    adapted: Sequence[str]) -> dict[str, Tensor]:
    """Tensors of ``finetuned`` that differ from ``base`` outside the adapted matrices' weights."""
    skip = {f"{name}.{weight}" for name in adapted for weight in ("weight", "in_proj_weight")}
    return {key: value for key, value in finetuned.items()
            if key not in skip and key in base and value.is_floating_point()
            and (value.shape != base[key].shape or not torch.equal(value, base[key].to(value)))}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="timm model name, or package.module:function")
    parser.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the model, e.g. "
                        '\'{"num_classes": 100}\'')
    parser.add_argument("--base", required=True, help="base checkpoint (.safetensors, .pt, .pth)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned checkpoint of the same architecture")
    parser.add_argument("--format", default="tt", help="decomposition format (default: tt); see "
                        "factnet.available_formats()")
    parser.add_argument("--rank", type=int, help="rank of the adapter to save")
    parser.add_argument("--sweep", help="comma-separated ranks: print error vs parameters for each first")
    parser.add_argument("--targets", nargs="+", help="module patterns, e.g. 'blocks.*.attn.qkv[q,v]' "
                        "(default: attention and MLP of every block)")
    parser.add_argument("--group", default="shape", help="'shape' (default), 'stage' or a regex")
    parser.add_argument("--scale", type=float, default=1.0, help="the adapter's scale s (default 1); the factors "
                        "hold ΔW / s, as if trained with this s")
    parser.add_argument("--out", help="where to save the adapter (e.g. task.factnet)")
    parser.add_argument("--rest", help="save the other changed tensors (head, biases, norms) to this .safetensors")
    args = parser.parse_args(argv)
    if args.rank is None and args.sweep is None:
        parser.error("give --rank (compress and save) or --sweep (error vs parameters), or both")
    if args.out and args.rank is None:
        parser.error("--out needs --rank")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script; returns what it printed as data (used by the tests)."""
    args = parse_args(argv)
    kwargs = json.loads(args.model_kwargs)
    base_state, finetuned_state = load_checkpoint(args.base), load_checkpoint(args.finetuned)
    model = build_model(args.model, kwargs)
    model.load_state_dict(base_state)
    options = dict(targets=args.targets, group=args.group, scale=args.scale)
    with warnings.catch_warnings():
        # compress warns about changed tensors outside the adapter; this script lists (and saves) them itself
        warnings.filterwarnings("ignore", message=r".*tensors outside the compressed matrices differ")
        return _run(args, model, base_state, finetuned_state, options)


def _run(args: argparse.Namespace, model: nn.Module, base_state: dict[str, Tensor],
         finetuned_state: dict[str, Tensor], options: dict) -> dict:
    result: dict = {}

    if args.sweep:
        ranks = [int(r) for r in args.sweep.split(",")]
        rows = factnet.rank_sweep(model, finetuned_state, args.format, ranks, **options)
        result["sweep"] = [{"rank": r, "parameters": p, "errors": e} for r, p, e in rows]
        print()
    if args.rank is None:
        return result

    adapter, errors = factnet.compress(model, finetuned_state, args.format, args.rank, **options)
    dense = sum(n * d_in * d_out for n, d_in, d_out in adapter.group_shapes().values())
    print(f"{args.format} rank {args.rank}: {adapter.num_parameters():,} parameters "
          f"(the dense increment has {dense:,}: {dense / adapter.num_parameters():.0f}x more)")
    width = max(len(name) for name in errors)
    for name, error in errors.items():
        n, d_in, d_out = adapter.group_shapes()[name]
        print(f"  group {name:<{width}}  {n}x{d_in}x{d_out}  relative error {error:.3e}")
    result.update(parameters=adapter.num_parameters(), dense_parameters=dense, errors=errors)

    if args.out:
        adapter.save(args.out)
        size = os.path.getsize(args.out)
        factor_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
        dense_bytes = dense * next(adapter.parameters()).element_size()
        print(f"saved {args.out}: {size:,} bytes ({factor_bytes:,} of factors + {size - factor_bytes:,} of header); "
              f"the dense increment would be {dense_bytes:,} bytes")
        result.update(out=args.out, bytes=size)

    rest = changed_tensors(base_state, finetuned_state, list(adapter.matrices))
    result["rest"] = sorted(rest)
    if rest:
        listed = ", ".join(sorted(rest)[:6]) + (", ..." if len(rest) > 6 else "")
        print(f"{len(rest)} other tensors changed in fine-tuning and are not in the adapter: {listed}")
        if args.rest:
            from safetensors.torch import save_file

            save_file({key: value.contiguous() for key, value in rest.items()}, args.rest)
            print(f"saved them to {args.rest}: load with model.load_state_dict(load_file(path), strict=False) "
                  "before factnet.load(model, adapter_file)")
        else:
            print("pass --rest FILE to save them: without them the adapter alone does not reproduce the "
                  "fine-tuned model")
    return result


if __name__ == "__main__":
    main()
