"""`factnet.calls`: per-call state. Each thread's block is its own (`Block`), each model forward its own
(`Forward`), a reader's forward is seen only in its own thread (`reading`), and `Traffic` refuses changes
that a running call of another thread would see."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import assert_close, randomize_factors
from oracle_support import oracle_forward

import factnet
from factnet import FactnetError, calls
from factnet.calls import Block, Forward

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(vit) -> tuple[torch.nn.Module, dict[str, factnet.Adapter]]:
    base = copy.deepcopy(vit)
    adapters = {}
    for seed, (name, scale) in enumerate([("a", 2.0), ("b", 0.5)]):
        adapters[name] = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=scale, name=name, train_head=False)
        randomize_factors(adapters[name], seed=seed)
    return base, adapters


def test_two_threads_each_in_its_own_use_block_see_their_own_adapter(vit, images):
    base, adapters = _adapted(vit)
    expected = {name: oracle_forward(base, a, a.settings.scale, images) for name, a in adapters.items()}
    vit.factnet.activate(None)  # what each thread gets is its block's choice only
    both_open = threading.Barrier(2, timeout=30)
    outputs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    failures = []

    def serve(name: str) -> None:
        try:
            with torch.no_grad(), vit.factnet.use(name):
                both_open.wait()  # both blocks open at once
                for _ in range(3):
                    outputs[name].append(vit(images))
                both_open.wait()
        except Exception as error:  # (reported by the main thread)
            failures.append(error)

    threads = [threading.Thread(target=serve, args=(name,)) for name in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for name, found in outputs.items():
        assert len(found) == 3
        for output in found:
            assert_close(output, expected[name], 1e-12, name)
    assert vit.factnet.traffic.blocks == 0 and not +vit.factnet.traffic.using


def test_a_block_and_a_forward_each_hold_their_own_typed_state(vit, images):
    _, adapters = _adapted(vit)
    owner, seen = vit.factnet, []
    handle = vit.blocks[0].register_forward_pre_hook(lambda *_: seen.append(calls.mine(owner)))
    with torch.no_grad(), owner.per_sample(["a", None]):
        block = calls.current(owner)
        vit(images)
    handle.remove()
    assert type(block) is Block and block.counted and block.mix.names == ["a", None] and not block.disabled
    (outer, forward), = seen
    assert outer is block and type(forward) is Forward and not forward.reads_active and forward.now is None
    assert forward.mix is not block.mix and forward.mix.names == block.mix.names  # this forward's own copy
    with owner.disable():
        disabled = calls.current(owner)
        assert type(disabled) is Block and disabled.disabled and not disabled.counted and disabled.mix is None
    assert calls.current(owner) is None and calls.mine(owner) == []


def test_reading_is_seen_only_in_its_own_thread():
    sites, other = object(), []
    token = calls.start_reading(sites)
    try:
        thread = threading.Thread(target=lambda: other.append(calls.reading(sites)))
        thread.start()
        thread.join()
        assert calls.reading(sites) and other == [False]
    finally:
        calls.stop_reading(token)
    assert not calls.reading(sites)


def test_another_threads_open_block_refuses_a_merge_until_it_ends(vit, images):
    _, adapters = _adapted(vit)
    opened, release = threading.Event(), threading.Event()

    def hold() -> None:
        with vit.factnet.use("a"):
            opened.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert opened.wait(30)
        assert vit.factnet.traffic.blocks == 1 and vit.factnet.traffic.using[adapters["a"]] == 1
        with pytest.raises(FactnetError, match=r"cannot merge while 0 forward\(s\) and 1 use\(\)/per_sample\(\) block"):
            adapters["b"].merge()
    finally:
        release.set()
        thread.join()
    adapters["b"].merge()  # the block ended: nothing runs
    assert adapters["b"].merged
    adapters["b"].unmerge()
