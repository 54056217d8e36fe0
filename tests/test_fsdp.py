"""FSDP2 (``fully_shard`` on the blocks and the root), 2 gloo processes on CPU: training equals one
process on the global batch, save gathers the factors into one file, merge refuses clearly."""

from __future__ import annotations

import gc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

import factnet
from conftest import tiny_vit
from io_support import split_packs

fsdp = pytest.importorskip("torch.distributed.fsdp")
STEPS, LR = 3, 0.05


def _adapted():
    torch.manual_seed(0)
    model = tiny_vit().double()
    return model, factnet.Tensorizer(model).decompose("tucker", rank=2, scale=2.0, seed=0)


def _train(model, adapter, images, labels):
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=LR)
    for _ in range(STEPS):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()


def _worker(rank: int, world: int, init: str, images, labels, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    _check_sharded(rank, world, images, labels, folder)
    # the sharded model holds the process group: free it on every rank before the group goes, or a
    # rank may tear it down at interpreter exit with gloo's threads still running (SIGABRT, rarely)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _check_sharded(rank: int, world: int, images, labels, folder: str) -> None:
    model, adapter = _adapted()
    for block in model.blocks:
        fsdp.fully_shard(block)
    fsdp.fully_shard(model)
    half = len(images) // world
    _train(model, adapter, images[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
    assert any(callable(getattr(p, "full_tensor", None)) for p in adapter.parameters())  # really sharded
    adapter.save(f"{folder}/sharded.safetensors")  # every rank calls it; rank 0 writes
    with pytest.raises(factnet.FactnetError, match="sharded"):
        adapter.merge()
    # the same values saved from an unsharded copy: the file must be the same, byte for byte
    values = {n: p.full_tensor() for n, p in adapter.named_parameters()}
    head = {n: p.full_tensor() for n, p in model.named_parameters() if n.startswith("head.")}
    if rank == 0:
        plain, plain_adapter = _adapted()
        with torch.no_grad():
            for name, param in plain_adapter.named_parameters():
                param.copy_(values[name])
            for name, param in plain.named_parameters():
                if name in head:
                    param.copy_(head[name])
        plain_adapter.save(f"{folder}/plain.safetensors")


@pytest.mark.slow
def test_fsdp2_trains_like_one_process_saves_one_file_and_refuses_merge(tmp_path):
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 5
    model, adapter = _adapted()
    _train(model, adapter, images, labels)
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", images, labels, str(tmp_path)), nprocs=2,
             join=True)
    sharded, plain = tmp_path / "sharded.safetensors", tmp_path / "plain.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == [plain.name, sharded.name]
    # the same file: spec, checksum and every tensor bit for bit (safetensors orders its metadata keys
    # differently from process to process, so the raw bytes are compared field by field)
    with safe_open(str(sharded), "pt") as a, safe_open(str(plain), "pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    trained = {f"factors.{g}.{f}": v for g in adapter.group_names for f, v in adapter.group(g).factors.items()}
    stored = split_packs(sharded, adapter)
    assert set(trained) <= set(stored)
    for key, value in trained.items():  # and what one process trains on the global batch
        torch.testing.assert_close(stored[key], value.detach(), rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)
    fresh = tiny_vit().double()
    factnet.load(fresh, sharded)  # loads into an unsharded model, where merge works
    x = images[:2]
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-10, atol=1e-12)
        fresh.factnet.active_adapter.merge()
        torch.testing.assert_close(fresh(x), expected, rtol=1e-10, atol=1e-12)
