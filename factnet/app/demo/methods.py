"""The adaptation methods the demo compares, each trained by the same loop and recipe.

- ``linear``: linear probe, only the new head trains.
- ``full``: full fine-tuning, every parameter trains.
- ``lora``: PEFT LoRA on timm's fused ``qkv`` (PEFT adapts the whole ``3d × d`` matrix, i.e.
  q, k and v: ``A: r × d``, ``B: 3d × r``, ``4·d·r`` parameters per block — the same count
  as the paper's LoRA on q and v as two separate matrices, ``2 · 2·d·r``).
- ``fact``: factnet, any format, on the default targets (q, k, v, o and the d×d blocks of
  fc1/fc2 of every block, stacked into one ``12L × d × d`` group).
- ``peft``: any of PEFT's tuners named in `PEFT_TUNERS` (LoRA, VeRA, VB-LoRA, TinyLoRA) with its
  config's options, on ``targets`` (a PEFT ``target_modules`` regex; the frontier adapts the
  same matrices as FacT: ``qkv``, ``proj``, ``fc1`` and ``fc2`` of every block). Its count is
  PEFT's own ``get_nb_trainable_parameters()``; its file is PEFT's adapter state dict
  (``get_peft_model_state_dict``) as safetensors.

Every method trains a fresh head (``d·classes + classes`` parameters); counts and file sizes
below exclude it, since every method ships the same head.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from factnet.app.demo.backbone import Backbone, build_vit
from factnet.app.demo.data import Splits
from factnet.app.demo.train import evaluate, fit
from factnet.app.recipe import Recipe

__all__ = ["BLOCK_MATRICES", "PEFT_TUNERS", "Method", "Result", "adapt", "downstream_model"]

_FORMAT_NAMES = {"tt": "FacT-TT", "tucker": "FacT-TK"}

# PEFT tuner -> (config class, its dropout option, display name)
PEFT_TUNERS: dict[str, tuple[str, str, str]] = {
    "lora": ("LoraConfig", "lora_dropout", "LoRA"),
    "vera": ("VeraConfig", "vera_dropout", "VeRA"),
    "vblora": ("VBLoRAConfig", "vblora_dropout", "VB-LoRA"),
    "tinylora": ("TinyLoraConfig", "tinylora_dropout", "TinyLoRA"),
}
# The matrices FacT adapts by default, as a PEFT target_modules regex (not the patch embedding's proj)
BLOCK_MATRICES = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


@dataclass(frozen=True)
class Method:
    """One method with its hyper-parameters (``rank``/``scale``: LoRA's r and alpha, or FacT's)."""

    kind: str  # linear, full, lora, fact, peft
    lr: float
    format: str | None = None  # fact: the factnet format; peft: the tuner (a key of PEFT_TUNERS)
    rank: int | None = None
    scale: float | None = None
    targets: tuple[str, ...] | None = None  # FacT: Tensorizer targets (None: the paper's); peft: one regex
    options: tuple[tuple[str, object], ...] = ()  # peft: more config options, e.g. (("num_vectors", 64),)
    gain: float | None = None  # fact without a scale: decompose's rank-stable default with this gain
    bits: int | None = None  # fact: factors trained quantized to this many bits (decompose's bits=), a bits-bit file

    @property
    def name(self) -> str:
        if self.kind == "fact":
            return _FORMAT_NAMES.get(self.format or "", f"FacT-{self.format}")
        if self.kind == "peft":
            return "PEFT " + PEFT_TUNERS[self.format or ""][2]
        return {"linear": "linear probe", "full": "full fine-tuning", "lora": "PEFT LoRA"}[self.kind]

    @property
    def settings(self) -> str:
        text = f"lr {self.lr:g}"
        if self.kind == "lora":
            text = f"r {self.rank}, alpha {self.scale:g}, " + text
        elif self.kind == "fact":
            text = f"r {self.rank}, " + (f"s {self.scale:g}, " if self.gain is None else f"gain {self.gain:g}, ") + text
            if self.bits is not None:
                text = f"bits {self.bits}, " + text
        elif self.kind == "peft":
            text = ", ".join([f"r {self.rank}"] + [f"{k} {v}" for k, v in self.options if k in _SHOWN] + [text])
        return text


_SHOWN = ("num_vectors", "u", "weight_tying")  # the peft options that Method.settings names


@dataclass(frozen=True)
class Result:
    method: Method
    seed: int
    val_accuracy: float
    test_accuracy: float
    params: int  # trainable, without the head
    head_params: int
    bytes: int  # size of the saved file, without the head (0: the linear probe saves no backbone file)
    step_ms: float  # median training step
    seconds: float  # setup, training and evaluation
    epoch_losses: tuple[float, ...] = ()  # mean training loss of each epoch


def downstream_model(backbone: Backbone, num_classes: int, drop_path: float) -> nn.Module:
    """The pretrained ViT with a new ``num_classes`` head (initialized from the global RNG)."""
    model = build_vit(backbone.config, num_classes, drop_path)
    missing, unexpected = model.load_state_dict(backbone.state, strict=False)
    if sorted(missing) != ["head.bias", "head.weight"] or unexpected:
        raise RuntimeError(f"backbone does not fit the demo ViT: missing {missing}, unexpected {unexpected}")
    return model


def adapt(backbone: Backbone, method: Method, splits: Splits, recipe: Recipe, *, seed: int, augment: bool = True,
          progress: bool = True, leave: bool = False, save_to: Path | None = None) -> tuple[Result, nn.Module, object]:
    """Adapt a fresh copy of ``backbone`` to the downstream task with ``method``.

    Returns the result, the trained model and the adapter (factnet `Adapter`, PEFT model or
    None). ``save_to``: also write the FacT adapter there with its head.
    """
    start = time.perf_counter()
    recipe = replace(recipe, lr=method.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = downstream_model(backbone, len(splits.downstream_classes), recipe.drop_path)
        head_params = sum(p.numel() for p in model.get_classifier().parameters())
        model, adapter, parameters, count, measure = _prepare(model, method, recipe, seed)
        fitted = fit(model, parameters, splits.train, recipe, seed=seed, augment=augment, progress=progress,
                      desc=f"{method.name} ({method.settings}), seed {seed}", leave=leave)
    val, test = evaluate(model, splits.val), evaluate(model, splits.test)
    size = measure()
    if save_to is not None and method.kind == "fact":
        adapter.save(str(save_to))
    result = Result(method, seed, val, test, count, head_params, size, fitted.step_ms, time.perf_counter() - start,
                    fitted.epoch_losses)
    return result, model, adapter


def _prepare(model: nn.Module, method: Method, recipe: Recipe, seed: int):
    """``(model, adapter, parameters to train, their count without the head, () -> file bytes)``."""
    head = model.get_classifier()
    if method.kind == "linear":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head.parameters():
            parameter.requires_grad_(True)
        return model, None, list(head.parameters()), 0, lambda: 0
    if method.kind == "full":
        backbone = {name: p for name, p in model.named_parameters() if not name.startswith("head.")}
        count = sum(p.numel() for p in backbone.values())
        return model, None, list(model.parameters()), count, lambda: _file_size(backbone)
    if method.kind == "lora":
        import peft

        config = peft.LoraConfig(r=method.rank, lora_alpha=method.scale, target_modules=["qkv"],
                                 lora_dropout=recipe.dropout)
        wrapped = peft.get_peft_model(model, config)
        count, _ = wrapped.get_nb_trainable_parameters()  # PEFT's own count: the LoRA matrices only
        for parameter in head.parameters():
            parameter.requires_grad_(True)
        parameters = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped, wrapped, parameters, count, lambda: _file_size(peft.get_peft_model_state_dict(wrapped))
    if method.kind == "fact":
        from factnet import Tensorizer

        targets = list(method.targets) if method.targets else None
        adapter = Tensorizer(model, targets).decompose(method.format, rank=method.rank, scale=method.scale,
                                                       gain=method.gain, dropout=recipe.dropout, seed=seed,
                                                       bits=method.bits)

        def measure() -> int:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "adapter.safetensors"
                adapter.save(str(path), include_head=False)
                return path.stat().st_size

        return model, adapter, adapter.trainable_parameters(), adapter.num_parameters(), measure
    if method.kind == "peft":
        import peft

        class_name, dropout, _ = PEFT_TUNERS[method.format or ""]
        options = dict(method.options)
        if method.format == "lora":
            options.setdefault("lora_alpha", method.scale if method.scale is not None else method.rank)
        targets = method.targets[0] if method.targets else BLOCK_MATRICES
        config = getattr(peft, class_name)(r=method.rank, target_modules=targets, **{dropout: recipe.dropout},
                                           **options)
        wrapped = peft.get_peft_model(model, config)
        count, _ = wrapped.get_nb_trainable_parameters()  # PEFT's own count, before the head is unfrozen
        for parameter in head.parameters():
            parameter.requires_grad_(True)
        parameters = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped, wrapped, parameters, count, lambda: _file_size(peft.get_peft_model_state_dict(wrapped))
    raise ValueError(f"unknown method {method.kind!r}; known: linear, full, lora, fact, peft")


def _file_size(tensors: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(path))
        return path.stat().st_size
