"""Train a FacT-TT adapter on an ImageFolder tree with the Python API, then save it.

    python examples/train_folder.py --data my_images --model vit_base_patch16_224 \\
        --checkpoint vit_base_patch16_224.safetensors --out runs/my_images

``my_images`` holds ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``. The result is
``runs/my_images/adapter.safetensors`` (factors and head: kilobytes) and ``metrics.jsonl``;
rebuild it with ``factnet.load(timm.create_model(...), path)``. The paper's recipe is used
throughout (AdamW 1e-3, batch 64, 100 epochs, warmup and cosine, dropout and drop-path 0.1).
Copy this file and change what you need: it is the whole training setup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

from factnet import Tensorizer
from factnet.app.data import image_transform, load_task, make_loader
from factnet.app.recipe import Recipe
from factnet.app.training import fit


def main(argv: list[str] | None = None) -> float:
    """Train, save the adapter, and return the last epoch's val accuracy."""
    parser = argparse.ArgumentParser(description="Train a FacT-TT adapter on an ImageFolder tree.")
    parser.add_argument("--data", type=Path, required=True, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. {"img_size": 384}')
    parser.add_argument("--checkpoint", type=Path, help="local pretrained weights (nothing is downloaded)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/folder"))
    args = parser.parse_args(argv)

    task = load_task(args.data, split="train800")  # train on train/, evaluate on val/
    recipe = Recipe(epochs=args.epochs, lr=args.lr, warmup_epochs=min(10, args.epochs - 1))
    torch.manual_seed(0)
    model = timm.create_model(
        args.model, num_classes=task.num_classes, drop_path_rate=recipe.drop_path, **args.model_kwargs,
        pretrained=args.checkpoint is not None,  # from the local file only
        pretrained_cfg_overlay=dict(file=str(args.checkpoint)) if args.checkpoint else None,
    )
    adapter = Tensorizer(model).decompose("tt", rank=8, scale=10.0, dropout=recipe.dropout, seed=0)
    print(f"training {adapter.num_parameters():,} factor and {adapter.num_head_parameters():,} head parameters")

    transform = image_transform(model)  # resize to the model's input size, normalize as its weights expect
    train_loader = make_loader(task.train, transform, recipe.batch_size, shuffle=True)
    val_loader = make_loader(task.evaluation, transform, recipe.batch_size, shuffle=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    history = fit(model, adapter, train_loader, val_loader, recipe, args.out, device=device)
    print(f"val accuracy {history[-1].eval_acc:.4f}; adapter saved to {args.out / 'adapter.safetensors'}")
    return history[-1].eval_acc


if __name__ == "__main__":
    main()
