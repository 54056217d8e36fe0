"""Runs behind the command line: build a timm model from local weights, train one setting, sweep a grid.

    settings = RunSettings(model="vit_base_patch16_224", checkpoint=Path("vit_b16.safetensors"),
                           data=Path("vtab/cifar"), adapter=AdapterConfig("tt", rank=8, scale=1.0))
    result = train_setting(settings, "train800", Path("runs/cifar"))      # val200 accuracy
    table = run_sweep(settings, [2, 4, 8], [0.1, 1, 10], Path("sweeps/cifar"))

A sweep trains every rank x scale on train800 and evaluates it on val200 (the last epoch's
accuracy; no epoch is picked), retrains the setting with the best val accuracy on
train800val200 and evaluates it on test once. Test accuracy never decides anything.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import factnet
from factnet import AdapterConfig, FactnetError, Tensorizer
from factnet.app.data import image_transform, load_task, make_loader
from factnet.app.presets import get_preset
from factnet.app.recipe import Recipe
from factnet.app.training import ADAPTER_FILE, RESUME_FILE, fit, read_metrics

__all__ = ["RunSettings", "SettingResult", "adapter_classes", "build_model", "run_sweep", "train_setting"]

DEFAULT_RANK, DEFAULT_SCALE = 8, 10.0
_RECIPE_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "dropout",
                 "drop_path")


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides a training run: model and weights, data, adapter, recipe, seed
    (plus where and how it runs: ``device``, ``workers``, ``progress``, which do not). ``adapter`` is the
    adapter's settings but its dropout and seed, which are the recipe's and the run's (`decompose_config`)."""

    model: str
    data: Path
    checkpoint: Path | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterConfig = AdapterConfig("tt", rank=DEFAULT_RANK, scale=DEFAULT_SCALE)
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    classes: int | None = None  # the preset's class count, when a preset was given
    device: str = "cpu"
    workers: int = 0
    progress: bool = True

    @classmethod
    def from_args(cls, args: Any) -> RunSettings:
        """Settings from parsed ``factnet train``/``sweep`` arguments: the recipe's defaults for
        what is not given; rank and scale from ``--rank``/``--scale``, else ``--preset``, else 8 and 10."""
        if args.model is None:
            raise FactnetError("--data needs --model: the timm model to adapt, e.g. vit_base_patch16_224")
        rank, scale, classes = getattr(args, "rank", None), getattr(args, "scale", None), None
        if getattr(args, "preset", None):
            if rank is not None or scale is not None:
                raise FactnetError("--preset sets the rank and scale; pass either --preset or --rank/--scale")
            preset = get_preset(args.preset)
            rank, scale = preset.rank_and_scale(args.format)
            classes = preset.classes
        adapter = AdapterConfig(  # (an unknown format fails here, before any work)
            args.format, rank=DEFAULT_RANK if rank is None else rank, scale=DEFAULT_SCALE if scale is None else scale,
            bits=getattr(args, "bits", None), head_bits=getattr(args, "head_bits", None),
            targets=tuple(args.targets) if args.targets else None, by=args.group)
        recipe = Recipe.from_dict({k: getattr(args, k) for k in _RECIPE_FLAGS if getattr(args, k) is not None})
        return cls(model=args.model, data=args.data, checkpoint=args.checkpoint, model_kwargs=args.model_kwargs,
                   adapter=adapter, recipe=recipe, seed=args.seed, classes=classes, device=args.device,
                   workers=args.workers, progress=args.progress)

    @property
    def decompose_config(self) -> AdapterConfig:
        """What the run decomposes: ``adapter`` with the recipe's dropout and the run's seed."""
        return dataclasses.replace(self.adapter, dropout=self.recipe.dropout, seed=self.seed)

    def run_config(self, split: str) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (JSON-able)."""
        adapter = self.adapter
        return {"model": self.model, "checkpoint": str(self.checkpoint.resolve()) if self.checkpoint else None,
                "model_kwargs": {k: repr(v) for k, v in self.model_kwargs.items()},
                "data": str(self.data.resolve()), "split": split, "format": adapter.format, "rank": adapter.rank,
                "scale": adapter.scale, "group": adapter.by, "targets": list(adapter.targets or []),
                "recipe": self.recipe.to_dict(), "seed": self.seed, "classes": self.classes} \
            | {k: v for k, v in (("bits", adapter.bits), ("head_bits", adapter.head_bits)) if v is not None}


@dataclass(frozen=True)
class SettingResult:
    """One trained setting: the last epoch's accuracy on ``eval_split`` and the run's cost."""

    rank: int
    scale: float
    parameters: int  # trainable factor parameters
    head_parameters: int
    adapter_bytes: int  # size of adapter.safetensors (factors + head)
    accuracy: float
    eval_split: str
    seconds: float  # training and evaluation, summed over epochs
    adapter_path: Path
    head_bytes: int = 0  # the head's tensors in adapter.safetensors (without the head: adapter_bytes - head_bytes)


# ---- models ---------------------------------------------------------------------------------------
def build_model(name: str, *, checkpoint: Path | None = None, num_classes: int | None = None,
                drop_path: float = 0.0, kwargs: dict[str, Any] | None = None, meta: bool = False) -> nn.Module:
    """``timm.create_model(name)`` with weights from ``checkpoint`` only, never downloaded.

    With ``checkpoint``, timm loads it (``pretrained_cfg_overlay=dict(file=...)``) and keeps its
    classifier only if it has ``num_classes`` outputs. Without, the weights are random and a
    warning says so. ``meta`` builds it on the meta device (no memory, no weights: dry runs).
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FactnetError(f"unknown timm model {name!r}; {hint}list them with timm.list_models('*vit*')")
    options = dict(kwargs or {})
    if num_classes is not None:
        options["num_classes"] = num_classes
    if drop_path > 0:
        options["drop_path_rate"] = drop_path
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FactnetError(f"checkpoint file {checkpoint} does not exist")
        overlay: dict[str, Any] = {"file": str(checkpoint)}
        classes = _checkpoint_classes(name, Path(checkpoint))
        if classes is not None:
            overlay["num_classes"] = classes
        options.update(pretrained=True, pretrained_cfg_overlay=overlay)
    elif not meta:
        print(f"factnet: warning: no --checkpoint, so {name} starts from random weights (factnet never downloads "
              "weights); pass --checkpoint FILE to adapt pretrained ones", file=sys.stderr)
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, **options)
        return timm.create_model(name, **options)
    except TypeError as error:
        raise FactnetError(f"timm model {name} does not accept these arguments ({error}); check --model-kwargs") \
            from error
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        raise FactnetError(f"cannot load {checkpoint} into {name}: {' '.join(lines[:2])}; check that the checkpoint "
                           "belongs to this model (and --model-kwargs)") from error


def _classifier_weights(name: str) -> list[str]:
    """State-dict keys of the classifier weight of timm model ``name`` (from its pretrained config)."""
    import timm.models

    config = timm.models.get_pretrained_cfg(name)
    classifier = config.classifier if config is not None else None
    if classifier is None:
        return []
    return [f"{c}.weight" for c in ((classifier,) if isinstance(classifier, str) else classifier)]


def _checkpoint_classes(name: str, checkpoint: Path) -> int | None:
    """Output count of the classifier stored in ``checkpoint`` (None if it has none)."""
    keys = _classifier_weights(name)
    if not keys:
        return None
    if checkpoint.suffix == ".safetensors":
        shapes = _safetensors_shapes(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            state = state.get(wrapper, state) if isinstance(state, dict) else state
        shapes = {k: list(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    return shapes[keys[-1]][0] if keys[-1] in shapes else None


def adapter_classes(path: Path, model: str) -> int | None:
    """Output count of the head saved in adapter file ``path`` (`factnet.file_info`'s head shapes) for
    timm model ``model``; None when the file has no head or it cannot be told apart."""
    shapes = factnet.file_info(path).head_shapes
    named = [key for key in _classifier_weights(model) if key in shapes]
    weights = [shapes[named[-1]]] if named else [shape for shape in shapes.values() if len(shape) >= 2]
    return weights[0][0] if len(weights) == 1 else None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as reader:
            return {key: reader.get_slice(key).get_shape() for key in reader.keys()}
    except (OSError, SafetensorError) as error:
        raise FactnetError(f"{path} is not a readable safetensors file ({error})") from error


# ---- one setting ----------------------------------------------------------------------------------
def train_setting(settings: RunSettings, split: str, out_dir: Path, *, resume: bool = False,
                  eval_every: int | None = None, base: nn.Module | None = None) -> SettingResult:
    """Train ``settings`` on ``split`` ("train800": evaluated on val200; "train800val200": on test)
    into ``out_dir``. ``base`` (copied, not changed) saves rebuilding the model for every setting;
    ``eval_every`` defaults to every epoch on val200 and to the last epoch only on test."""
    task = load_task(settings.data, split, settings.classes)
    recipe = settings.recipe
    torch.manual_seed(settings.seed)
    if base is None:
        model = build_model(settings.model, checkpoint=settings.checkpoint, num_classes=task.num_classes,
                            drop_path=recipe.drop_path, kwargs=settings.model_kwargs)
    else:
        model = copy.deepcopy(base)
    config = settings.decompose_config
    adapter = Tensorizer(model, config.targets, by=config.by).decompose(config)
    transform = image_transform(model)
    train_loader = make_loader(task.train, transform, recipe.batch_size, shuffle=True, workers=settings.workers)
    eval_loader = make_loader(task.evaluation, transform, recipe.batch_size, shuffle=False, workers=settings.workers)
    if eval_every is None:
        eval_every = 1 if task.evaluation_split == "val200" else recipe.epochs
    history = fit(model, adapter, train_loader, eval_loader, recipe, out_dir, resume=resume, device=settings.device,
                  eval_every=eval_every, eval_split=task.evaluation_split, run_config=settings.run_config(split),
                  progress=settings.progress)
    path = out_dir / ADAPTER_FILE
    return SettingResult(settings.adapter.rank, settings.adapter.scale, adapter.num_parameters(),
                         adapter.num_head_parameters(),
                         path.stat().st_size, history[-1].eval_acc, task.evaluation_split,
                         sum(m.seconds for m in history), path, factnet.file_info(path).head_bytes)


def _finished_setting(settings: RunSettings, out_dir: Path, base: nn.Module) -> SettingResult:
    """The result of a setting trained to the end by an earlier (interrupted) sweep: its parameters counted on
    ``base`` (as `train_setting`'s adapter has them), its head and bytes read from its file."""
    path = out_dir / ADAPTER_FILE
    info = factnet.file_info(path)
    config = settings.adapter
    parameters = Tensorizer(base, config.targets, by=config.by).num_parameters(config.format, config.rank)
    head = sum(math.prod(shape) for shape in info.head_shapes.values())
    history = read_metrics(out_dir)
    return SettingResult(config.rank, config.scale, parameters, head, info.bytes, history[-1].eval_acc,
                         history[-1].eval_split, sum(m.seconds for m in history), path, info.head_bytes)


# ---- the sweep ------------------------------------------------------------------------------------
def run_sweep(settings: RunSettings, ranks: Sequence[int], scales: Sequence[float], out_dir: Path, *,
              resume: bool = False) -> str:
    """Select rank x scale on train800 → val200, retrain the best on train800val200 and test it once.

    Writes ``results.csv`` and ``results.md`` to ``out_dir`` (one folder per setting beside them)
    and returns the markdown. Ties in val accuracy go to fewer parameters, then grid order.
    """
    for split in ("train800", "train800val200"):  # every split present and every rank valid before hours of training
        task = load_task(settings.data, split, settings.classes)
    _check_ranks(settings, ranks, task.num_classes)
    torch.manual_seed(settings.seed)
    base = build_model(settings.model, checkpoint=settings.checkpoint, num_classes=task.num_classes,
                       drop_path=settings.recipe.drop_path, kwargs=settings.model_kwargs)
    selection = []
    for rank in ranks:
        for scale in scales:
            adapter = dataclasses.replace(settings.adapter, rank=rank, scale=scale)
            setting = dataclasses.replace(settings, adapter=adapter)
            selection.append(_sweep_run(setting, "train800", out_dir / f"rank{rank}_scale{scale:g}", resume, base))
    best = max(selection, key=lambda result: (result.accuracy, -result.parameters))
    final_settings = dataclasses.replace(settings, adapter=dataclasses.replace(settings.adapter, rank=best.rank,
                                                                               scale=best.scale))
    final = _sweep_run(final_settings, "train800val200", out_dir / "final", resume, base)
    return _write_results(settings, selection, best, final, out_dir)


def _check_ranks(settings: RunSettings, ranks: Sequence[int], num_classes: int) -> None:
    """Decompose a weightless copy of the model at every rank: a rank too large for a group, or
    targets and groups that do not fit the model, fail now rather than after earlier settings trained."""
    model = build_model(settings.model, num_classes=num_classes, kwargs=settings.model_kwargs, meta=True)
    config = settings.adapter
    tensorizer = Tensorizer(model, config.targets, by=config.by)
    for rank in ranks:
        tensorizer.decompose(dataclasses.replace(config, rank=rank)).detach()


def _sweep_run(settings: RunSettings, split: str, out_dir: Path, resume: bool, base: nn.Module) -> SettingResult:
    if resume and (out_dir / ADAPTER_FILE).is_file() and not (out_dir / RESUME_FILE).exists():
        return _finished_setting(settings, out_dir, base)
    return train_setting(settings, split, out_dir, resume=resume and (out_dir / RESUME_FILE).exists(), base=base)


def _write_results(settings: RunSettings, selection: list[SettingResult], best: SettingResult,
                   final: SettingResult, out_dir: Path) -> str:
    columns = ["run", "rank", "scale", "parameters", "adapter_bytes", "val_acc", "test_acc", "seconds"]
    rows = [["select", r.rank, r.scale, r.parameters, r.adapter_bytes, r.accuracy, "", round(r.seconds, 2)]
            for r in selection]
    rows.append(["final", final.rank, final.scale, final.parameters, final.adapter_bytes, "", final.accuracy,
                 round(final.seconds, 2)])
    with (out_dir / "results.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(rows)
    lines = [
        f"# factnet sweep: {settings.adapter.format} on {settings.data.name} ({settings.model}, "
        f"{settings.recipe.epochs} epochs, seed {settings.seed})",
        "",
        "Each setting trained on train800 and evaluated on val200 (last epoch). Adapter bytes: the size of "
        "adapter.safetensors (factors + head).",
        "",
        "| rank | scale | parameters | adapter bytes | val acc | seconds | selected |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
        *(f"| {r.rank} | {r.scale:g} | {r.parameters:,} | {r.adapter_bytes:,} | {r.accuracy:.4f} | {r.seconds:.1f} "
          f"| {'yes' if r is best else ''} |" for r in selection),
        "",
        f"Selected by val accuracy: rank {best.rank}, scale {best.scale:g}. Retrained on train800val200 and "
        f"evaluated once on test: **test accuracy {final.accuracy:.4f}** ({final.parameters:,} parameters, "
        f"{final.adapter_bytes:,} bytes, {final.seconds:.1f} s).",
    ]
    markdown = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    return markdown
