"""Export a factnet adapter as a PEFT LoRA adapter directory, and check it.

Builds the base model from a local checkpoint, rebuilds the adapter on it with `factnet.load`,
writes a PEFT LoRA directory with `factnet.export_lora` (exact for TT, Tucker, CP and
batch-matrix: every adapted matrix's increment is low rank), then loads that directory back
with ``peft.PeftModel.from_pretrained`` onto a second copy of the base model and prints the
largest difference between the two models' outputs on a random input. The exit status is 1
when that difference exceeds ``--tolerance``.

Run (any timm model name, or ``package.module:function`` returning an ``nn.Module``)::

    python examples/export_lora.py --model vit_base_patch16_224 --model-kwargs '{"num_classes": 100}' \\
        --base base.pth --adapter task.factnet --out task-lora/

The base checkpoint is a ``.safetensors`` file or a ``torch.save``'d state dict; without
``--base`` the model keeps the weights it is built with, which only makes sense for
``package.module:function`` models that load their own. Images of the model's size are used
for the check (``--input-shape 2,3,224,224`` to choose another). Needs ``pip install peft``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
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


def build_model(name: str, kwargs: Mapping[str, object], checkpoint: str | None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` (or ``module:function(**kwargs)``),
    with ``checkpoint`` loaded, in eval mode."""
    if ":" in name:
        module, function = name.split(":", 1)
        model = getattr(importlib.import_module(module), function)(**kwargs)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint:
        model.load_state_dict(load_checkpoint(checkpoint))
    return model.eval()


def example_input(model: nn.Module, shape: str | None, seed: int) -> Tensor:
    """Random images ``(2, C, H, W)`` of the size the model was built for (or ``shape``)."""
    if shape:
        size = tuple(int(s) for s in shape.split(","))
    else:
        embed = getattr(model, "patch_embed", None)
        image = getattr(embed, "img_size", None)
        channels = getattr(getattr(embed, "proj", None), "in_channels", 3)
        if image is None:
            raise SystemExit("cannot tell the model's input size; pass --input-shape, e.g. 2,3,224,224")
        size = (2, channels, *image)
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="timm model name, or package.module:function")
    parser.add_argument("--model-kwargs", default="{}", help='JSON keyword arguments, e.g. \'{"num_classes": 100}\'')
    parser.add_argument("--base", help="base checkpoint (.safetensors, .pt, .pth)")
    parser.add_argument("--adapter", required=True, help="factnet adapter file (Adapter.save)")
    parser.add_argument("--out", required=True, help="PEFT adapter directory to write (new or empty)")
    parser.add_argument("--max-rank", type=int, help="cap the LoRA rank (larger increments are cut by a truncated SVD)")
    parser.add_argument("--no-head", action="store_true", help="leave the trained head out of the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    parser.add_argument("--input-shape", help="input for the check, comma-separated (default: 2 images)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest output difference accepted "
                        "(default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check input")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script; returns what it printed as data (used by the tests)."""
    args = parse_args(argv)
    from peft import PeftModel  # pip install peft

    kwargs = json.loads(args.model_kwargs)
    model = build_model(args.model, kwargs, args.base)
    adapter = factnet.load(model, args.adapter)
    report = factnet.export_lora(adapter, args.out, max_rank=args.max_rank, include_head=not args.no_head,
                                 overwrite=args.overwrite)
    print(report)

    x = example_input(model, args.input_shape, args.seed)
    expected = model.eval()(x)
    peft_model = PeftModel.from_pretrained(build_model(args.model, kwargs, args.base), args.out).eval()
    got = peft_model(x)
    difference = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"\nPEFT LoRA vs factnet on {tuple(x.shape)}: max |difference| {difference:.3e} (outputs up to {scale:.3e})")
    if report.head:
        print(f"the head {', '.join(report.head)} is saved whole in the export (PEFT modules_to_save)")
    elif args.no_head:
        print("the head was left out (--no-head): load the trained head into the base model yourself")
    else:
        print("the adapter file carries no head: the export adapts the backbone only")
    ok = difference <= args.tolerance
    if not ok:
        print(f"difference above --tolerance {args.tolerance:g}", file=sys.stderr)
    return {"report": report, "max_difference": difference, "max_output": scale, "ok": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
