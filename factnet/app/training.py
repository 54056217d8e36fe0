"""The training engine: the paper's recipe over an adapted model, resumable bit for bit.

    history = fit(model, adapter, train_loader, eval_loader, Recipe(), "runs/cifar")

Each epoch trains on every batch of ``train_loader`` (cross-entropy, AdamW, the recipe's
schedule stepped per batch), evaluates top-1 accuracy on ``eval_loader`` and appends one JSON
line to ``out_dir/metrics.jsonl``. After every epoch a resume checkpoint
(``out_dir/resume.safetensors``) is written atomically: the trainable tensors, the optimizer
state, the schedule, the epoch, the metrics so far and torch's RNG states, as safetensors
tensors plus JSON metadata (nothing is pickled). ``fit(..., resume=True)`` continues from it
exactly where the interrupted run stopped. When training ends the adapter is saved to
``out_dir/adapter.safetensors`` (factors and head) and the checkpoint is removed.

The adapter saved is the last epoch's: no epoch is picked by its evaluation accuracy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from factnet import Adapter, FactnetError, write_atomically
from factnet.app.recipe import Recipe

__all__ = ["ADAPTER_FILE", "METRICS_FILE", "RESUME_FILE", "EpochMetrics", "evaluate", "fit",
           "read_metrics"]

ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.jsonl"
RESUME_FILE = "resume.safetensors"
_RESUME_KEY = "factnet.resume"
_RESUME_VERSION = 1


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``. ``lr`` is the rate of the epoch's first step;
    ``eval_acc`` is None for epochs not evaluated; ``seconds`` covers training and evaluation."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    eval_acc: float | None
    eval_split: str
    seconds: float


def read_metrics(out_dir: str | Path) -> list[EpochMetrics]:
    """The epochs recorded in ``out_dir/metrics.jsonl``."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise FactnetError(f"{path} does not exist; train a run into {out_dir} first")
    return [EpochMetrics(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over ``loader``'s ``(images, labels)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)


def fit(
    model: nn.Module,
    adapter: Adapter,
    train_loader: DataLoader,
    eval_loader: DataLoader,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    eval_every: int = 1,
    eval_split: str = "val200",
    run_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochMetrics], None] | None = None,
) -> list[EpochMetrics]:
    """Train ``adapter.trainable_parameters()`` for ``recipe.epochs`` epochs; return every epoch's metrics.

    ``train_loader`` yields ``(images: (B, 3, H, W), labels: (B,))``; evaluation runs every
    ``eval_every`` epochs and after the last. ``run_config`` (JSON-able) is stored in the
    resume checkpoint, and ``resume=True`` refuses a checkpoint written with another one.
    ``on_epoch_end`` is called after each epoch's checkpoint and metrics line are written.
    Seed torch (``torch.manual_seed``) before building the model for a reproducible run.
    """
    out_dir = Path(out_dir)
    if eval_every < 1:
        raise FactnetError(f"eval_every must be >= 1, got {eval_every}")
    if len(train_loader) == 0:
        raise FactnetError("train_loader yields no batches; check the training split")
    config = json.loads(json.dumps(dict(run_config or {})))
    _check_out_dir(out_dir, resume)
    model.to(device)
    adapter.to(device)
    parameters = adapter.trainable_parameters()
    optimizer, schedule = recipe.optimizer(parameters, steps_per_epoch=len(train_loader))
    history: list[EpochMetrics] = []
    if resume:
        history = _load_checkpoint(out_dir / RESUME_FILE, parameters, optimizer, schedule, train_loader, config)
        _write_metrics(out_dir, history)
    for epoch in range(len(history) + 1, recipe.epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss, accuracy = _train_epoch(model, train_loader, optimizer, schedule, device,
                                      f"epoch {epoch}/{recipe.epochs}", progress)
        evaluated = epoch % eval_every == 0 or epoch == recipe.epochs
        eval_acc = evaluate(model, eval_loader, device) if evaluated else None
        metrics = EpochMetrics(epoch, lr, loss, accuracy, eval_acc, eval_split, time.perf_counter() - started)
        history.append(metrics)
        if epoch < recipe.epochs:
            _save_checkpoint(out_dir / RESUME_FILE, parameters, optimizer, schedule, train_loader, history, config)
        with (out_dir / METRICS_FILE).open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(asdict(metrics)) + "\n")
        if progress:
            shown = "-" if eval_acc is None else f"{eval_acc:.4f}"
            tqdm.write(f"epoch {epoch}: loss {loss:.4f}, train acc {accuracy:.4f}, {eval_split} acc {shown}, "
                       f"{metrics.seconds:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    adapter.save(out_dir / ADAPTER_FILE)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    return history


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if resume:
        if not (out_dir / RESUME_FILE).is_file():
            finished = " (the run there finished)" if (out_dir / ADAPTER_FILE).is_file() else ""
            raise FactnetError(f"nothing to resume: {out_dir / RESUME_FILE} does not exist{finished}; "
                               "run without --resume to start a new run")
        return
    if (out_dir / RESUME_FILE).exists():
        raise FactnetError(f"{out_dir} holds an unfinished run; pass --resume to continue it, or choose another "
                           "output directory")
    if (out_dir / METRICS_FILE).exists() or (out_dir / ADAPTER_FILE).exists():
        raise FactnetError(f"{out_dir} already holds a run; choose another output directory or remove it")
    out_dir.mkdir(parents=True, exist_ok=True)


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, device: torch.device | str, description: str,
                 progress: bool) -> tuple[float, float]:
    """One pass over ``loader``: ``(mean loss, accuracy)`` over its samples."""
    _train_mode(model)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=description, leave=False, disable=not progress)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        if not math.isfinite(loss.item()):
            raise FactnetError(f"training diverged ({description}: loss {loss.item()}); lower the learning rate "
                               "or the scale")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        seen += labels.numel()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss_sum / seen, correct / seen


def _train_mode(model: nn.Module) -> None:
    """Train mode (dropout, drop-path), except frozen batch norms: their statistics stay as loaded,
    so the saved adapter (factors and head) reproduces the trained model."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.eval()


# ---- the resume checkpoint ------------------------------------------------------------------------
def _save_checkpoint(path: Path, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader,
                     history: list[EpochMetrics], config: dict[str, Any]) -> None:
    tensors = {f"param.{i}": p.detach() for i, p in enumerate(parameters)}
    state = optimizer.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = rng
    if loader.generator is not None:
        tensors["rng.loader"] = loader.generator.get_state()
    record = {
        "version": _RESUME_VERSION,
        "shapes": [list(p.shape) for p in parameters],
        "optimizer_groups": state["param_groups"],
        "optimizer_plain": plain,
        "schedule": schedule.state_dict(),
        "history": [asdict(m) for m in history],
        "config": config,
    }
    payload = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                     {_RESUME_KEY: json.dumps(record)})
    write_atomically(str(path), lambda temp: Path(temp).write_bytes(payload))


def _load_checkpoint(path: Path, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader,
                     config: dict[str, Any]) -> list[EpochMetrics]:
    """Restore everything `_save_checkpoint` wrote; return the metrics of the epochs done."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            record = json.loads((reader.metadata() or {})[_RESUME_KEY])
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as error:
        raise FactnetError(f"{path} is not a factnet resume checkpoint ({error}); remove it to start over") from error
    if record.get("version") != _RESUME_VERSION:
        raise FactnetError(f"{path} was written by another factnet version; remove it to start over")
    if record["config"] != config:
        changed = sorted(k for k in set(record["config"]) | set(config) if record["config"].get(k) != config.get(k))
        raise FactnetError(f"cannot resume {path}: the run was started with other settings ({', '.join(changed)}); "
                           "resume with the same arguments, or start a new run in another directory")
    if record["shapes"] != [list(p.shape) for p in parameters]:
        raise FactnetError(f"cannot resume {path}: its trainable tensors do not match this adapter's; resume with "
                           "the same model and adapter settings")
    with torch.no_grad():
        for i, param in enumerate(parameters):
            param.copy_(tensors[f"param.{i}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in record["optimizer_plain"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer_groups"]})
    schedule.load_state_dict(record["schedule"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{d}"] for d in range(torch.cuda.device_count()) if f"rng.cuda.{d}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    if loader.generator is not None and "rng.loader" in tensors:
        loader.generator.set_state(tensors["rng.loader"])
    return [EpochMetrics(**values) for values in record["history"]]


def _write_metrics(out_dir: Path, history: list[EpochMetrics]) -> None:
    """Rewrite ``metrics.jsonl`` to the epochs a resumed checkpoint holds (drops lines of an epoch
    that finished after the last checkpoint)."""
    text = "".join(json.dumps(asdict(m)) + "\n" for m in history)
    write_atomically(str(out_dir / METRICS_FILE), lambda temp: Path(temp).write_text(text, encoding="utf-8"))
