"""The training engine (`factnet.app.training.fit`) on a tiny ViT and a learnable toy task (class =
colour): resume is bit-exact, metrics are written per epoch, training learns, the saved adapter
reproduces the trained model, frozen batch norms keep their statistics, and the example script runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import factnet
from factnet import FactnetError, Tensorizer
from factnet.app.recipe import Recipe
from factnet.app.training import ADAPTER_FILE, METRICS_FILE, RESUME_FILE, evaluate, fit, read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
COLOURS = torch.tensor([[0.9, -0.8, -0.8], [-0.8, 0.9, -0.8], [-0.8, -0.8, 0.9]])  # normalized RGB per class
RECIPE = Recipe(epochs=3, warmup_epochs=1, lr=1e-2, batch_size=4)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=2, embed_dim=48, num_heads=3, drop_path_rate=0.1)


def colour_images(per_class: int, seed: int) -> TensorDataset:
    """``(per_class·3, 3, 32, 32)`` noisy images of one colour each, labelled by colour."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(per_class)
    images = COLOURS[labels][:, :, None, None] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return TensorDataset(images, labels)


def loaders() -> tuple[DataLoader, DataLoader]:
    return (DataLoader(colour_images(6, seed=1), batch_size=RECIPE.batch_size, shuffle=True),
            DataLoader(colour_images(3, seed=2), batch_size=8))


def adapted(zero_head: bool = False) -> tuple[nn.Module, factnet.Adapter]:
    model = tiny_vit()
    if zero_head:  # every prediction ties: class 0, a third of the data
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    adapter = Tensorizer(model).decompose("tt", rank=4, scale=10.0, dropout=0.1, seed=0)
    return model, adapter


def trainable_state(adapter: factnet.Adapter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in adapter.trainable_parameters()]


def without_seconds(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (path / METRICS_FILE).read_text().splitlines()]


class Interrupt(Exception):
    pass


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    """3 epochs straight vs 1 epoch, a crash, then resume: identical factors, head and metrics
    (shuffling, dropout and drop-path all draw from the RNG the checkpoint restores)."""
    torch.manual_seed(0)
    model, adapter = adapted()
    fit(model, adapter, *loaders(), RECIPE, tmp_path / "straight", progress=False)
    straight = trainable_state(adapter)

    def crash_after_first(metrics) -> None:
        if metrics.epoch == 1:
            raise Interrupt

    torch.manual_seed(0)
    model, adapter = adapted()
    with pytest.raises(Interrupt):
        fit(model, adapter, *loaders(), RECIPE, tmp_path / "resumed", progress=False, on_epoch_end=crash_after_first)
    assert (tmp_path / "resumed" / RESUME_FILE).is_file() and not (tmp_path / "resumed" / ADAPTER_FILE).exists()
    torch.manual_seed(123)  # a new process: another RNG state, fresh factors
    model, adapter = adapted()
    history = fit(model, adapter, *loaders(), RECIPE, tmp_path / "resumed", resume=True, progress=False)
    assert [m.epoch for m in history] == [1, 2, 3]
    resumed = trainable_state(adapter)
    assert len(resumed) == len(straight) == len(list(adapter.parameters())) + 2  # factors, head weight and bias
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    assert not torch.equal(straight[0], trainable_state(adapted()[1])[0])  # training changed the factors
    assert without_seconds(tmp_path / "straight") == without_seconds(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / RESUME_FILE).exists()


def test_resume_checkpoint_is_safetensors_with_json_state(tmp_path: Path) -> None:
    def stop(metrics) -> None:
        raise Interrupt

    torch.manual_seed(0)
    model, adapter = adapted()
    with pytest.raises(Interrupt):
        fit(model, adapter, *loaders(), RECIPE, tmp_path, run_config={"task": "colours"}, progress=False,
            on_epoch_end=stop)
    with safetensors.safe_open(str(tmp_path / RESUME_FILE), framework="pt") as reader:
        keys = set(reader.keys())
        record = json.loads(reader.metadata()["factnet.resume"])
        assert torch.equal(reader.get_tensor("rng.torch"), torch.get_rng_state())
    count = len(adapter.trainable_parameters())
    assert {f"param.{i}" for i in range(count)} <= keys
    assert {f"optimizer.{i}.{name}" for i in range(count) for name in ("step", "exp_avg", "exp_avg_sq")} <= keys
    assert record["schedule"]["last_epoch"] == 5  # 18 images / batch 4 = 5 steps in epoch 1
    assert [m["epoch"] for m in record["history"]] == [1] and record["config"] == {"task": "colours"}

    model, adapter = adapted()
    with pytest.raises(FactnetError, match="other settings"):
        fit(model, adapter, *loaders(), RECIPE, tmp_path, run_config={"task": "other"}, resume=True, progress=False)
    with pytest.raises(FactnetError, match="--resume"):
        fit(model, adapter, *loaders(), RECIPE, tmp_path, progress=False)  # unfinished run: no silent restart
    with pytest.raises(FactnetError, match="nothing to resume"):
        fit(model, adapter, *loaders(), RECIPE, tmp_path / "empty", resume=True, progress=False)


def test_metrics_per_epoch_and_a_saved_adapter_that_reproduces_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, adapter = adapted(zero_head=True)
    train_loader, eval_loader = loaders()
    before = evaluate(model, eval_loader)
    recipe = Recipe(epochs=4, warmup_epochs=1, lr=1e-2, batch_size=4)
    history = fit(model, adapter, train_loader, eval_loader, recipe, tmp_path, eval_every=2, eval_split="val200",
                  progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_FILE, METRICS_FILE]
    assert read_metrics(tmp_path) == history
    assert [m.epoch for m in history] == [1, 2, 3, 4]
    assert [m.eval_acc is None for m in history] == [True, False, True, False]
    steps = len(train_loader)
    assert [m.lr for m in history] == pytest.approx([recipe.learning_rate(e) for e in range(4)])
    assert all(m.seconds > 0 and m.eval_split == "val200" and 0 <= m.train_acc <= 1 for m in history)
    assert steps == 5 and history[0].lr == pytest.approx(1e-6)
    # the toy task is learned: from the tied predictions (a third right) to nearly all right
    assert before == pytest.approx(1 / 3)
    assert history[-1].eval_acc >= 0.9 and history[-1].train_loss < history[0].train_loss
    # the saved file (factors + head) rebuilds the trained model on a fresh one
    images = next(iter(eval_loader))[0]
    model.eval()
    fresh = tiny_vit()
    reloaded = factnet.load(fresh, tmp_path / ADAPTER_FILE)
    fresh.eval()  # after load: the attached matrices start in train mode whatever the model's mode
    assert reloaded.num_parameters() == adapter.num_parameters()
    torch.testing.assert_close(fresh(images), model(images), rtol=1e-5, atol=1e-5)
    assert evaluate(fresh, eval_loader) == history[-1].eval_acc


class ConvNet(nn.Module):
    """A 1x1 conv (adapted), a batch norm (frozen with the backbone) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_frozen_batch_norm_keeps_its_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    adapter = Tensorizer(model, targets=["conv"]).decompose("tt", rank=1, scale=1.0)
    before = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
    fit(model, adapter, *loaders(), Recipe(epochs=2, warmup_epochs=0, batch_size=4), tmp_path, progress=False)
    assert torch.equal(model.norm.running_mean, before[0]) and torch.equal(model.norm.num_batches_tracked, before[1])
    assert model.head.weight.requires_grad and not model.norm.weight.requires_grad


def test_example_script_trains_an_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in [("train", 4), ("val", 2)]:
        for label, colour in enumerate([(220, 30, 30), (30, 200, 30), (30, 30, 220)]):
            folder = tmp_path / "data" / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    model = tiny_vit()
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    spec = importlib.util.spec_from_file_location("train_folder", EXAMPLES / "train_folder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    kwargs = json.dumps(dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3))
    accuracy = script.main(["--data", str(tmp_path / "data"), "--model", "vit_tiny_patch16_224", "--model-kwargs",
                            kwargs, "--checkpoint", str(tmp_path / "tiny.safetensors"), "--epochs", "2",
                            "--out", str(tmp_path / "run")])
    assert 0 <= accuracy <= 1
    assert [m.eval_acc for m in read_metrics(tmp_path / "run")][-1] == accuracy
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              depth=2, embed_dim=48, num_heads=3)
    assert factnet.load(fresh, tmp_path / "run" / ADAPTER_FILE).format.name == "tt"
