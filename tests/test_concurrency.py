"""Forwards from many threads on one model: each request gets exactly the adapters it asked for.

A thread pool serves requests as FastAPI's sync endpoints or a gRPC server would: 8 threads × 200
requests, each a batch of 3 samples drawn from a pool of inputs, either mixed (``per_sample``, a
random user or ``None`` per sample) or one user for the whole batch (``use``). Every row is compared
with that user's single-adapter forward of that input, computed beforehand one at a time with
``activate``. The adapters' factors and heads are random, so a row computed with another user's
adapter (or none) is far off. On a timm ViT, a 1×1-conv model and an ``nn.MultiheadAttention`` model;
then again while other threads load and delete adapters.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import TinyNet, perturb_head, randomize_factors
from zoo import FAMILIES, inputs, prototype, run

import factnet
from factnet import FactnetError

USERS = ["a", "b", "c", "d"]
CHURNED = ["e", "f"]  # loaded and deleted while requests run
THREADS, REQUESTS, BATCH, POOL = 8, 200, 3, 6
MODELS = ["timm-vit", "timm-poolformer", "torchvision-vit"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def _adapted(family: str, users: list[str]) -> torch.nn.Module:
    """The family's model in eval mode with one TT adapter per user: random factors and head."""
    model = prototype(family).eval()
    for seed, name in enumerate(users):
        adapter = factnet.Tensorizer(model, FAMILIES[family].targets).decompose("tt", rank=2, scale=1.5, name=name)
        randomize_factors(adapter, seed=seed)
        perturb_head(adapter, 100 + seed)
    return model


def _pool(family: str) -> list[tuple[tuple, dict]]:
    """``POOL`` one-sample inputs."""
    found = []
    for seed in range(POOL // 2):
        args, kwargs = inputs(family, seed=seed)
        for index in range(2):
            found.append((tuple(a[index: index + 1] for a in args), {k: v[index: index + 1] for k, v in kwargs.items()}))
    return found


def _batch(pool: list, picks: list[int]) -> tuple[tuple, dict]:
    args = tuple(torch.cat([pool[p][0][i] for p in picks]) for i in range(len(pool[0][0])))
    return args, {k: torch.cat([pool[p][1][k] for p in picks]) for k in pool[0][1]}


@torch.no_grad()
def _expected(model: torch.nn.Module, pool: list, users: list[str | None]) -> dict[str | None, list[torch.Tensor]]:
    """Each user's (``None``: the base model's) output row for each input of the pool, one at a time."""
    found = {}
    for user in users:
        model.factnet.activate(user)
        found[user] = [run(model, args, kwargs)[0] for args, kwargs in pool]
    return found


def _serve(model: torch.nn.Module, pool: list, expected: dict, users: list[str | None], seed: int,
           failures: list, served: list | None = None, mixed_only: bool = False) -> None:
    """``REQUESTS`` requests of one thread; each wrong row, and each error not naming a churned user, is a
    failure; the names of the requests answered go to ``served``."""
    rng = random.Random(seed)
    for _ in range(REQUESTS):
        picks = [rng.randrange(POOL) for _ in range(BATCH)]
        args, kwargs = _batch(pool, picks)
        mixed = mixed_only or rng.random() < 0.5
        names = [rng.choice(users) for _ in range(BATCH)] if mixed else [rng.choice(users)] * BATCH
        try:
            with torch.no_grad(), (model.factnet.per_sample(names) if mixed else model.factnet.use(names[0])):
                out = run(model, args, kwargs)
        except FactnetError as error:
            if not any(repr(n) in str(error) for n in set(names) & set(CHURNED)):
                failures.append(f"{names}: {error}")
            continue
        except Exception as error:  # noqa: BLE001 (any other exception is a failure to report)
            failures.append(f"{names}: {type(error).__name__}: {error}")
            continue
        for row, (name, pick) in enumerate(zip(names, picks)):
            want = expected[name][pick]
            if not torch.allclose(out[row], want, rtol=1e-6, atol=1e-6 * want.abs().max().item()):
                failures.append(f"{names}: row {row} ({name!r}) differs by {(out[row] - want).abs().max():.2e}")
        if served is not None:
            served.append(names)


def _in_threads(target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_concurrent_requests_get_their_own_adapters(family):
    model = _adapted(family, USERS)
    pool = _pool(family)
    users = [*USERS, None]
    expected = _expected(model, pool, users)
    model.factnet.activate("a")  # what the threads select does not depend on the active adapter
    failures: list[str] = []
    _in_threads(lambda seed: _serve(model, pool, expected, users, seed, failures))
    assert not failures, f"{len(failures)} failures, e.g. {failures[:3]}"
    assert model.factnet.active == "a" and model.factnet.mix is None


@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_requests_are_right_while_users_come_and_go(family, tmp_path):
    model = _adapted(family, [*USERS, *CHURNED])
    pool = _pool(family)
    users = [*USERS, *CHURNED, None]
    expected = _expected(model, pool, users)
    files = {}
    for name in CHURNED:
        files[name] = tmp_path / f"{name}.safetensors"
        model.factnet[name].save(files[name])
        model.factnet.delete(name)
    model.factnet.activate("a")
    failures: list[str] = []
    done = threading.Event()

    def churn() -> None:
        rounds = 0
        while not done.is_set() or rounds < 3:
            try:
                factnet.load_many(model, [files[n] for n in CHURNED], CHURNED)
                for name in CHURNED:
                    model.factnet.delete(name)
                factnet.load(model, files["e"], name="e")
                model.factnet.delete("e")
            except Exception as error:  # noqa: BLE001
                failures.append(f"churn: {type(error).__name__}: {error}")
                return
            rounds += 1

    churner = threading.Thread(target=churn)
    churner.start()
    served: list = []
    _in_threads(lambda seed: _serve(model, pool, expected, users, seed, failures, served))
    done.set()
    churner.join()
    assert not failures, f"{len(failures)} failures, e.g. {failures[:3]}"
    assert set(model.factnet.names) == set(USERS)
    assert any(set(names) & set(CHURNED) for names in served)  # (the churned users were served at times)


# ---- what cannot run beside a forward, and what waits for one ----------------------------------------
class _Gated(TinyNet):
    """TinyNet whose forward, once ``armed``, stops after its first layer until ``go`` is set (a forward
    caught in the middle)."""

    def __init__(self) -> None:
        super().__init__(d=4)
        self.armed, self.inside, self.go = False, threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.armed:
            self.inside.set()
            assert self.go.wait(30)
        h = x + self.proj(torch.tanh(q) * k + v)
        return self.head(h + self.fc2(torch.tanh(self.fc1(h))))


def _gated() -> tuple[_Gated, torch.Tensor, dict[str | None, torch.Tensor]]:
    """The gated model with adapters a, b (random factors and heads), eval, and each one's output (and the
    base model's) for one input."""
    torch.manual_seed(0)
    model = _Gated().double().eval()
    for seed, name in enumerate(["a", "b"]):
        adapter = factnet.Tensorizer(model).decompose("tt", rank=2, scale=1.5, name=name)
        randomize_factors(adapter, seed=seed)
        with torch.no_grad():
            model.head.weight.add_(float(seed + 1))
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outputs = {}
    with torch.no_grad():
        for name in ["a", "b", None]:
            with model.factnet.use(name):
                outputs[name] = model(x)
    return model, x, outputs


def _caught(model: _Gated, run_forward: Callable[[], torch.Tensor]) -> tuple[threading.Thread, list]:
    """``run_forward`` started in a thread and caught in the middle of the model's forward."""
    out: list = []
    model.armed, model.go = True, threading.Event()
    model.inside.clear()
    thread = threading.Thread(target=lambda: out.append(run_forward()))
    thread.start()
    assert model.inside.wait(30)
    model.armed = False
    return thread, out


@torch.no_grad()
def test_changes_under_a_running_forward_are_errors_and_the_forward_is_right():
    model, x, expected = _gated()
    model.factnet.activate("a")
    thread, out = _caught(model, lambda: model(x))  # a forward that uses the active adapter
    for change, what in [(lambda: model.factnet.activate("b"), "activate 'b'"),
                         (lambda: model.factnet.delete("a"), "delete the active adapter 'a'"),
                         (lambda: model.factnet["a"].merge(), "merge"),
                         (lambda: factnet.Tensorizer(model).decompose("tt", rank=2, name="c"), "add adapter 'c'")]:
        with pytest.raises(FactnetError, match=f"cannot {what}.* while 1 forward"):
            change()
    model.go.set()
    thread.join()
    torch.testing.assert_close(out[0], expected["a"], rtol=1e-9, atol=1e-12)
    assert model.factnet.names == ["a", "b"] and model.factnet.active == "a"

    thread, out = _caught(model, lambda: _in_block(model, "b", x))  # a forward that chose its adapter
    model.factnet.activate("b")  # the active adapter is not what it uses: allowed
    model.factnet.activate("a")
    with pytest.raises(FactnetError, match="cannot merge while 1 forward.*and 1 use"):
        model.factnet["a"].merge()
    model.go.set()
    thread.join()
    torch.testing.assert_close(out[0], expected["b"], rtol=1e-9, atol=1e-12)
    model.factnet["a"].merge()  # nothing runs now
    model.factnet["a"].unmerge()


def _in_block(model: torch.nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), model.factnet.use(name):
        return model(x)


@torch.no_grad()
def test_delete_waits_for_the_blocks_using_the_adapter_and_new_ones_cannot_take_it():
    model, x, expected = _gated()
    thread, out = _caught(model, lambda: _in_block(model, "b", x))
    deleting = threading.Thread(target=lambda: model.factnet.delete("b"))
    deleting.start()
    deleting.join(0.5)
    assert deleting.is_alive()  # waiting for the block
    with pytest.raises(FactnetError, match="no adapter named 'b'"), model.factnet.use("b"):
        pass
    torch.testing.assert_close(_in_block(model, "a", x), expected["a"], rtol=1e-9, atol=1e-12)  # others are served
    model.go.set()
    thread.join()
    deleting.join(30)
    assert not deleting.is_alive() and model.factnet.names == ["a"]
    torch.testing.assert_close(out[0], expected["b"], rtol=1e-9, atol=1e-12)  # the block kept "b" whole
    with model.factnet.use("a"), pytest.raises(FactnetError, match="inside a use"):
        model.factnet.delete("a")


@torch.no_grad()
def test_disable_and_use_are_per_thread():
    model, x, expected = _gated()
    model.factnet.activate("a")
    with model.factnet.disable():
        alone = model(x)  # the backbone without increments (and the active adapter's head)
    assert not torch.allclose(alone, expected["a"])
    with model.factnet.disable():
        thread, out = _caught(model, lambda: model(x))  # another thread: the active adapter acts
        torch.testing.assert_close(model(x), alone, rtol=1e-9, atol=1e-12)
        model.go.set()
        thread.join()
    torch.testing.assert_close(out[0], expected["a"], rtol=1e-9, atol=1e-12)
    with model.factnet.use("b"):
        other: list = []
        worker = threading.Thread(target=lambda: other.append(model(x)))
        worker.start()
        worker.join()
        torch.testing.assert_close(model(x), expected["b"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(other[0], expected["a"], rtol=1e-9, atol=1e-12)


@torch.no_grad()
def test_asyncio_tasks_handing_work_to_threads_get_their_own_adapters():
    model, x, expected = _gated()

    async def request(name: str | None) -> torch.Tensor:
        with model.factnet.use(name):  # asyncio.to_thread runs in a copy of this task's context
            await asyncio.sleep(0)
            return await asyncio.to_thread(model, x)

    async def serve() -> list[torch.Tensor]:
        return await asyncio.gather(*(request(name) for name in ["a", "b", None] * 8))

    for name, out in zip(["a", "b", None] * 8, asyncio.run(serve())):
        torch.testing.assert_close(out, expected[name], rtol=1e-9, atol=1e-12)


@torch.no_grad()
def test_base_model_calls_keep_the_initial_head_when_the_adapter_that_trained_it_goes():
    torch.manual_seed(0)
    model = _Gated().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = model(x)
    factnet.Tensorizer(model).decompose("tt", rank=2, name="plain", train_head=False)
    trained = factnet.Tensorizer(model).decompose("tt", rank=2, name="trained")  # active: the model holds its head
    model.head.weight.add_(1.0)
    thread, out = _caught(model, lambda: _in_block(model, None, x))
    model.factnet.delete("trained")  # the model's head keeps its values; the block's None rows must not
    model.go.set()
    thread.join()
    torch.testing.assert_close(out[0], base, rtol=1e-9, atol=1e-12)
    assert trained.model is None
