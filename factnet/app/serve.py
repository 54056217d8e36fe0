"""What a ``factnet serve`` replica holds: one backbone, every adapter of a directory, kept in step with it.

Nothing here needs Ray: `factnet.app.serve_ray` wraps `Replica` in a Ray Serve deployment that gathers
single-user requests into mixed batches. The demo (`write_demo`) is a small random ViT (8×8 one-channel
images, 10 classes) and a few random FacT-TT adapters, written to a directory: nothing is downloaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

import factnet
from factnet import AdapterSet, FactnetError
from factnet.app.serve_http import Endpoint, Limits, Preprocess

__all__ = ["DEMO_CLASSES", "Replica", "ServeSettings", "build_backbone", "class_names", "sample_shape", "write_demo"]

log = logging.getLogger("factnet.serve")

DEMO_CLASSES = 10
DEMO_BASE_FILE = "base.safetensors"


@dataclass(frozen=True)
class ServeSettings:
    """Everything a replica needs to rebuild the model and follow the adapter directory (picklable)."""

    adapters: Path
    model: str | None = None  # timm model name; None: the demo ViT with weights from ``checkpoint``
    checkpoint: Path | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # one sample's shape; default: read from the model
    max_batch_size: int = 32
    batch_wait_s: float = 0.005
    poll_s: float = 1.0  # how often the adapter directory is checked for new, changed or deleted files
    threads: int = 1  # torch threads (and Ray CPUs) per replica
    device: str = "cpu"  # where a replica runs the model ("cuda": one GPU each)
    mean: tuple[float, ...] | None = None  # image preprocessing: the model's data config unless given
    std: tuple[float, ...] | None = None
    labels: Path | None = None  # class names, one a line
    max_body_mb: float = 8.0


def _demo_backbone() -> nn.Module:
    from factnet.app.demo.backbone import PretrainConfig, build_vit

    return build_vit(PretrainConfig(), num_classes=DEMO_CLASSES)


def build_backbone(settings: ServeSettings) -> nn.Module:
    """The frozen base model in eval mode: the demo ViT, or timm ``settings.model`` (head size from the
    first adapter file's head unless ``model_kwargs`` gives ``num_classes``)."""
    if settings.model is None:
        if settings.checkpoint is None:
            raise FactnetError("the demo backbone needs its checkpoint (write it with write_demo)")
        model = _demo_backbone()
        model.load_state_dict(safetensors.torch.load_file(str(settings.checkpoint)))
        return model.eval()
    from factnet.app.runs import adapter_classes, build_model

    options = dict(settings.model_kwargs)
    files = sorted(settings.adapters.glob("*.safetensors"))
    if "num_classes" not in options and files:
        classes = adapter_classes(files[0], settings.model)
        if classes:
            options["num_classes"] = classes
    return build_model(settings.model, checkpoint=settings.checkpoint, kwargs=options).eval()


def sample_shape(model: nn.Module, given: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One input sample's shape: ``given``, else (channels, height, width) of a timm-style ``patch_embed``."""
    if given is not None:
        return tuple(given)
    embed = getattr(model, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    size = getattr(embed, "img_size", None)
    if isinstance(proj, nn.Conv2d) and size is not None:
        return (proj.in_channels, *size)
    raise FactnetError(f"cannot tell one input's shape for {type(model).__name__}; pass --input-shape C,H,W")


def class_names(path: Path | None, classes: int) -> list[str] | None:
    """The class names of ``path`` (one a line), which must name each of the model's ``classes``."""
    if path is None:
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise FactnetError(f"cannot read the labels file {path}: {error}") from None
    if len(names) != classes:
        raise FactnetError(f"the labels file {path} names {len(names)} classes; the model has {classes}")
    return names


def image_preprocess(model: nn.Module, settings: ServeSettings, shape: tuple[int, ...]) -> Preprocess | None:
    """How the replica reads images: None (float inputs only) for a model whose inputs are not images, unless
    the settings ask for image preprocessing (then its error)."""
    try:
        return Preprocess(model, shape, settings.mean, settings.std)
    except FactnetError:
        if settings.mean or settings.std:
            raise
        return None


def write_demo(directory: Path, users: int = 4, seed: int = 0) -> ServeSettings:
    """Write the demo backbone (random weights) and ``users`` random FacT-TT r4 adapters with their own heads
    (``user0`` ...) to ``directory``; return the settings that serve them."""
    adapters = directory / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _demo_backbone().eval()
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(directory / DEMO_BASE_FILE))
    write_random_adapters(model, adapters, users, seed=seed)
    return ServeSettings(adapters=adapters, checkpoint=directory / DEMO_BASE_FILE, mean=(0.5,), std=(0.5,))


def write_random_adapters(model: nn.Module, directory: Path, count: int, *, seed: int = 0, rank: int = 4,
                          prefix: str = "user") -> list[str]:
    """``count`` FacT-TT adapters with random factors and heads, as users' training would leave them; their names."""
    generator = torch.Generator().manual_seed(seed)
    names = [f"{prefix}{index}" for index in range(count)]
    for name in names:
        adapter = factnet.Tensorizer(model).decompose("tt", rank=rank, scale=10, name="writing")
        with torch.no_grad():
            for param in [*adapter.parameters(), *adapter.head_state().values()]:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        adapter.save(str(directory / f"{name}.safetensors"))
        adapter.detach()
    return names


class Replica:
    """One backbone with every adapter file of ``settings.adapters`` (name: the file's stem), answering
    batches that mix users. A background thread follows the directory: new or changed files are loaded,
    deleted ones stop being served, files that do not load are refused (logged; requests for them get the
    reason) and retried only once they change."""

    def __init__(self, settings: ServeSettings, *, follow: bool = True) -> None:
        torch.set_num_threads(settings.threads)
        self.settings = settings
        if not settings.adapters.is_dir():
            raise FactnetError(f"adapter directory {settings.adapters} does not exist")
        self.device = torch.device(settings.device)
        self.model = build_backbone(settings).to(self.device)
        AdapterSet.of(self.model)  # model.factnet, even while the directory holds no adapter
        self.shape = sample_shape(self.model, settings.input_shape)
        with torch.no_grad():
            self.classes = int(self.model(torch.zeros(1, *self.shape, device=self.device)).shape[-1])
        self.names = class_names(settings.labels, self.classes)
        self.preprocess = image_preprocess(self.model, settings, self.shape)
        self.loaded: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) of the file it was loaded from
        self.refused: dict[str, tuple[tuple[int, int], str]] = {}  # name -> (file version, reason)
        self.largest_batch = 0
        self._stop = threading.Event()
        self.sync(progress=True)
        if follow:
            threading.Thread(target=self._follow, name="factnet-adapter-directory", daemon=True).start()

    # ---- the adapter directory ------------------------------------------------------------------
    def sync(self, progress: bool = False) -> None:
        """Bring the served adapters in step with the directory's ``*.safetensors`` files."""
        files = {}
        for path in self.settings.adapters.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            files[path.stem] = (path, (stat.st_mtime_ns, stat.st_size))
        for name, version in list(self.loaded.items()):
            if name not in files or files[name][1] != version:
                self.model.factnet.delete(name)  # waits for the batches using it
                del self.loaded[name]
                log.info("adapter %s: stopped serving (file %s)", name, "changed" if name in files else "deleted")
        for name in [name for name in self.refused if name not in files]:
            del self.refused[name]
        new = sorted(name for name, (_, version) in files.items()
                     if name not in self.loaded and self.refused.get(name, (None,))[0] != version)
        if len(new) > 1:
            try:
                factnet.load_many(self.model, [files[name][0] for name in new], new, progress=progress)
                self.loaded.update({name: files[name][1] for name in new})
                log.info("loaded %d adapters from %s", len(new), self.settings.adapters)
                return
            except FactnetError:  # all or nothing: find the bad files one by one
                pass
        for name in new:
            path, version = files[name]
            try:
                factnet.load(self.model, path, name=name)
            except FactnetError as error:
                self.refused[name] = (version, f"the adapter file of user {name} was refused: {error}")
                log.warning("adapter %s: refused %s: %s", name, path, error)
                continue
            self.loaded[name] = version
            if len(new) == 1 or not progress:
                log.info("adapter %s: serving %s", name, path)

    def _follow(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a failed pass is logged and retried; serving goes on
                log.exception("following %s failed; retrying", self.settings.adapters)

    def close(self) -> None:
        self._stop.set()

    # ---- requests ---------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, users: list[str | None], inputs: list[Tensor]) -> list[Tensor | FactnetError]:
        """Logits for each request (one mixed batch); a request whose user is not served gets its
        `FactnetError` and the others are answered as if it had not come."""
        self.largest_batch = max(self.largest_batch, len(users))
        try:
            with self.model.factnet.per_sample(users):
                return list(self.model(torch.stack(inputs).to(self.device)).cpu())
        except FactnetError:
            pass
        answers: list[Tensor | FactnetError] = []
        for user, x in zip(users, inputs):
            try:
                with self.model.factnet.use(user):
                    answers.append(self.model(x[None].to(self.device))[0].cpu())
            except FactnetError as error:
                answers.append(error)
        return answers

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "adapters": len(self.loaded), "refused": {k: v[1] for k, v in self.refused.items()},
                "input_shape": list(self.shape), "classes": self.classes, "images": self.preprocess is not None,
                "device": str(self.device), "max_batch_size": self.settings.max_batch_size,
                "batch_wait_s": self.settings.batch_wait_s, "largest_batch": self.largest_batch}

    def endpoint(self, answer: Any) -> Endpoint:
        """The HTTP routes' view of this replica; ``answer(user, x)``: the (batched) logits of one input."""
        return Endpoint(self.shape, self.classes, self.names, self.preprocess,
                        Limits(max_body_bytes=int(self.settings.max_body_mb * 2**20)),
                        lambda: {name: why for name, (_, why) in dict(self.refused).items()}, self.health, answer)
