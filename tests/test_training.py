"""Training-time compatibility: bf16 autocast, gradient checkpointing, torch.compile, DDP, safe merge."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import factnet
from conftest import assert_refused
from factnet import Tensorizer


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                             depth=2, embed_dim=48, num_heads=3)


def adapted(fmt: str = "tucker", dropout: float = 0.0) -> tuple[torch.nn.Module, factnet.Adapter]:
    model = tiny_vit().train()
    adapter = Tensorizer(model).decompose(fmt, rank=4, scale=2.0, dropout=dropout, seed=0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return model, adapter


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_autocast_trains_with_float32_factors(dropout: float) -> None:
    model, adapter = adapted(dropout=dropout)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IMAGES)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    torch.manual_seed(0)
    reference.eval()  # dropout off: compare the dropout-free paths only
    if dropout == 0:  # bf16 rounding: compare whole gradients by relative norm, not element by element
        reference(IMAGES).square().mean().backward()
        for mine, exact in zip(adapter.parameters(), reference.factnet.parameters()):
            assert mine.dtype == mine.grad.dtype == torch.float32
            assert (mine.grad - exact.grad).norm() <= 0.1 * exact.grad.norm()
            assert torch.nn.functional.cosine_similarity(mine.grad.flatten(), exact.grad.flatten(), dim=0) > 0.99
    else:
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.parameters())
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    optimizer.step()  # float32 factors update from bf16 activations
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in adapter.parameters())


@pytest.mark.parametrize("fmt", ["tt", "tucker", "batch-matrix"])
def test_gradient_checkpointing_is_exact(fmt: str) -> None:
    model, adapter = adapted(fmt)
    plain = copy.deepcopy(model)
    plain(IMAGES).square().mean().backward()
    model.set_grad_checkpointing(True)
    out = model(IMAGES)
    out.square().mean().backward()
    torch.testing.assert_close(out, plain(IMAGES), rtol=0, atol=0)
    for mine, exact in zip(adapter.parameters(), plain.factnet.parameters()):
        torch.testing.assert_close(mine.grad, exact.grad, rtol=1e-6, atol=1e-7)


def test_torch_compile_matches_eager() -> None:
    model, adapter = adapted("tt")
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_changes_nothing() -> None:
    model, adapter = adapted("tt")
    with torch.no_grad():
        adapter.group(adapter.group_names[0]).factors["u"][0, 0] = float("nan")
    assert_refused(model, "non-finite", adapter.merge)
    assert not adapter.merged
    adapter.merge(safe=False)  # the caller asked for it
    assert adapter.merged


STEPS, LR = 3, 0.01


def _train(model: torch.nn.Module, adapter: factnet.Adapter, images: torch.Tensor, labels: torch.Tensor,
           wrapped: torch.nn.Module) -> None:
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=LR)
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(wrapped(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _ddp_worker(rank: int, world: int, init: str, images: torch.Tensor, labels: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, adapter = adapted("tucker")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = len(images) // world
    _train(model, adapter, images[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half], ddp)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in adapter.named_parameters()}, out)
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path) -> None:
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 5
    model, adapter = adapted("tucker")
    _train(model, adapter, images, labels, model)
    out = str(tmp_path / "ddp.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, images, labels, out), nprocs=2, join=True)
    distributed = torch.load(out)
    for name, param in adapter.named_parameters():
        torch.testing.assert_close(distributed[name], param.detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(adapted("tucker")[1].parameters(), adapter.parameters()))

