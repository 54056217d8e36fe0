"""``factnet serve`` on Ray Serve: single-user HTTP requests gathered into mixed batches (``@serve.batch``), with
FastAPI as the ingress (`factnet.app.serve_http`: the routes, the request forms, every error's status; ``/docs``
lists the routes).

Three ways to run it:

- ``factnet serve ...`` (`serve_until_signal`): starts a private local Ray, or joins a running cluster with
  ``--address auto`` / ``--address ray://HOST:10001``, and stops on SIGINT or SIGTERM;
- Ray's own tools: ``serve run factnet.app.serve_ray:app adapters=DIR model=NAME ...`` (`app`: an application
  builder taking the command's options as ``key=value``), or a Serve config file naming ``factnet.app.serve_ray:app``
  with those ``args``;
- from Python: `start` / `stop`.

Ray Serve is an optional dependency: ``pip install "factnet[serve]"``.
"""

import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import factnet
from factnet import FactnetError
from factnet.app.serve import Replica, ServeSettings, build_backbone, sample_shape, write_demo
from factnet.app.serve_http import HEALTH_SUMMARY, PREDICT_DOC, PREDICT_SUMMARY, health_response, new_api, \
    predict_response
from factnet.app.serve_options import read_options

__all__ = ["APP_NAME", "actor_options", "app", "bind", "resolve_device", "serve_until_signal", "start", "stop"]

APP_NAME = "factnet"
_joined: list[bool] = []  # [True] while `start` uses a cluster it did not start (so `stop` leaves it running)


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise FactnetError('factnet serve needs Ray Serve: pip install "factnet[serve]"') from None
    return ray, serve


def _deployment(serve: Any) -> Any:
    from fastapi import Request  # (this module has no `from __future__ import annotations`: FastAPI reads the type)

    api = new_api()

    @serve.deployment
    @serve.ingress(api)
    class FactnetServer:
        """One replica: a `Replica` behind the FastAPI routes, its requests answered in mixed batches."""

        def __init__(self, settings: ServeSettings) -> None:
            log = logging.getLogger("factnet.serve")
            log.setLevel(logging.INFO)
            log.addHandler(logging.StreamHandler(sys.stderr))
            self.replica = Replica(settings)
            self.predict_batch.set_max_batch_size(settings.max_batch_size)
            self.predict_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
            self.endpoint = self.replica.endpoint(self.answer)

        @api.post("/predict", openapi_extra=PREDICT_DOC, summary=PREDICT_SUMMARY)
        async def predict(self, request: Request) -> Any:
            return await predict_response(self.endpoint, request)

        @api.get("/health", summary=HEALTH_SUMMARY)
        async def health(self) -> Any:
            return health_response(self.endpoint)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def predict_batch(self, requests: list[tuple[str | None, Any]]) -> list[Any]:
            users = [user for user, _ in requests]
            return await asyncio.to_thread(self.replica.answer, users, [x for _, x in requests])

        async def answer(self, user: str | None, x: Any) -> Any:
            return await self.predict_batch((user, x))

        def __del__(self) -> None:
            if hasattr(self, "replica"):
                self.replica.close()

    return FactnetServer


def resolve_device(device: str, gpus: float) -> str:
    """``"auto"``: ``"cuda"`` where the cluster has a GPU (``gpus``), else ``"cpu"``; ``"cuda"`` on a cluster
    without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise FactnetError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise FactnetError("--device cuda, but the Ray cluster has no GPU")
    return device


def actor_options(settings: ServeSettings) -> dict[str, float]:
    """What one replica reserves: ``settings.threads`` CPUs and, on ``cuda``, one GPU (Ray then sets its
    ``CUDA_VISIBLE_DEVICES`` to that one)."""
    return {"num_cpus": settings.threads, "num_gpus": 1 if settings.device.startswith("cuda") else 0}


def bind(settings: ServeSettings, replicas: int = 1) -> Any:
    """The Ray Serve application: ``replicas`` copies, each reserving `actor_options`."""
    _, serve = _ray()
    return _deployment(serve).options(
        num_replicas=replicas, ray_actor_options=actor_options(settings),
        max_ongoing_requests=max(64, 4 * settings.max_batch_size), max_queued_requests=-1,
    ).bind(settings)


def app(args: dict[str, str]) -> Any:
    """The application builder Ray's tools call: ``serve run factnet.app.serve_ray:app adapters=DIR model=NAME``;
    the keys are ``factnet serve``'s options (``input_shape=3,224,224``, ``replicas=2``, ``device=cpu`` ...)."""
    settings, replicas = read_options(args)
    ray, _ = _ray()
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return bind(replace(settings, device=resolve_device(settings.device, gpus)), replicas)


def start(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          timeout_s: float = 300.0, address: str | None = None) -> str:
    """Start Ray (or join the cluster at ``address``) and the deployment; return its URL once every replica has
    loaded its adapters. A `FactnetError` if that takes more than ``timeout_s`` (then `stop`)."""
    ray, serve = _ray()
    if not settings.adapters.is_dir():
        raise FactnetError(f"adapter directory {settings.adapters} does not exist")
    settings = replace(settings, **{field: Path(value).resolve() for field in ("adapters", "checkpoint", "labels")
                                    if (value := getattr(settings, field)) is not None})  # replicas run elsewhere
    sample_shape(build_backbone(settings), settings.input_shape)  # a bad model or checkpoint: said here, once
    runtime_env = {"env_vars": {"PYTHONPATH": _import_path()}}
    if not ray.is_initialized():
        if address:
            ray.init(address=address, configure_logging=False, log_to_driver=True, runtime_env=runtime_env)
            _joined[:] = [True]
        else:
            cpus = max(os.cpu_count() or 1, replicas * settings.threads)
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=True,
                     runtime_env=runtime_env)
            _joined[:] = []
    settings = replace(settings, device=resolve_device(settings.device, ray.cluster_resources().get("GPU", 0)))
    serve.start(http_options={"host": host, "port": port})
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(bind(settings, replicas), name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            failure.append(error)

    runner = threading.Thread(target=deploy, daemon=True)
    runner.start()
    runner.join(timeout_s)
    if runner.is_alive() or failure:
        stop()
        reason = f"{failure[0]}".splitlines()[0] if failure else f"not ready after {timeout_s:g} s"
        raise FactnetError(f"factnet serve did not start: {reason}")
    return f"http://{host}:{port}"


def _import_path() -> str:
    """The workers' PYTHONPATH: the folder holding this factnet first. Ray puts the driver's working directory on
    its workers' path, and a folder named ``factnet`` there (a clone's, say) would otherwise shadow an install
    whose import hook (an editable install) comes after the path: with the package's own folder on the path, the
    package is found there."""
    here = str(Path(factnet.__file__).resolve().parents[1])
    return os.pathsep.join([here, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


def stop() -> None:
    """Take the deployment down; shut down the Ray that `start` started (a joined cluster keeps running)."""
    ray, serve = _ray()
    if ray.is_initialized():
        if _joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    _joined[:] = []


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(signum: int, _: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve_until_signal(settings: ServeSettings | None, *, host: str, port: int, replicas: int,
                       address: str | None = None, demo_users: int = 4,
                       demo_options: dict[str, Any] | None = None) -> None:
    """Serve ``settings`` (None: the demo with ``demo_options`` (`ServeSettings` fields), written to a temporary
    directory) until SIGINT (Ctrl-C) or SIGTERM, then shut down cleanly."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="factnet-serve-demo-") as scratch:
            if settings is None:
                settings = replace(write_demo(Path(scratch), users=demo_users), **(demo_options or {}))
                print(f"demo: a random 8x8-image ViT and {demo_users} random adapters (user0 ...) in "
                      f"{settings.adapters}")
            try:  # (a signal while starting shuts down as cleanly as once it runs)
                url = start(settings, host=host, port=port, replicas=replicas, address=address)
                for sig in previous:  # again: ray.init sets a SIGTERM handler of its own (sys.exit, no shutdown)
                    signal.signal(sig, _raise_stop)
                print(f"factnet serve: {url} ({replicas} replica(s), batches of up to {settings.max_batch_size}, "
                      f"{settings.batch_wait_s * 1000:g} ms wait); adapters follow {settings.adapters}\n"
                      f"  curl {url}/health\n"
                      f"  curl -F user=user0 -F file=@image.png {url}/predict\n"
                      f"  routes and request forms: {url}/docs\n"
                      "Ctrl-C (or SIGTERM) stops it.", flush=True)
                while True:
                    time.sleep(3600)
            except (_Stop, KeyboardInterrupt):
                print("factnet serve: shutting down", file=sys.stderr, flush=True)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the shutdown short
                stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
