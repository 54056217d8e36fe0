"""``factnet serve`` on Ray Serve: single-user HTTP requests gathered into mixed batches (``@serve.batch``).

HTTP interface (JSON):

- ``POST /predict`` ``{"user": "alice", "input": [[[...]]]}`` (``user`` null or absent: the base model;
  ``input``: one sample, nested lists of the model's input shape) -> ``{"user": ..., "label": 3,
  "logits": [...]}``. Errors: ``{"error": "..."}`` with 400 (malformed request), 404 (user not served),
  422 (the user's adapter file was refused).
- ``GET /health`` -> ``{"status": "ok", "adapters": 1000, "refused": {...}, "input_shape": [...], ...}``.

Ray Serve is an optional dependency: ``pip install "factnet[serve]"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from factnet import FactnetError
from factnet.app.serve import Replica, ServeSettings, build_backbone, sample_shape, write_demo

__all__ = ["APP_NAME", "serve_until_interrupted", "start", "stop"]

APP_NAME = "factnet"


def _ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise FactnetError('factnet serve needs Ray Serve: pip install "factnet[serve]"') from None
    return ray, serve


def _deployment(serve: Any) -> Any:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment
    class FactnetServer:
        """One replica: a `Replica` behind ``POST /predict`` (batched) and ``GET /health``."""

        def __init__(self, settings: ServeSettings) -> None:
            log = logging.getLogger("factnet.serve")
            log.setLevel(logging.INFO)
            log.addHandler(logging.StreamHandler(sys.stderr))
            self.replica = Replica(settings)
            self.predict_batch.set_max_batch_size(settings.max_batch_size)
            self.predict_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def predict_batch(self, requests: list[tuple[str | None, Any]]) -> list[Any]:
            users = [user for user, _ in requests]
            return await asyncio.to_thread(self.replica.answer, users, [x for _, x in requests])

        async def __call__(self, request: Request) -> JSONResponse:
            path = request.url.path.rstrip("/")
            if path == "/health" and request.method == "GET":
                return JSONResponse(self.replica.health())
            if path != "/predict" or request.method != "POST":
                return JSONResponse({"error": "routes: POST /predict, GET /health"}, status_code=404)
            try:
                body = json.loads(await request.body())
            except json.JSONDecodeError as error:
                return JSONResponse({"error": f"the request is not JSON: {error}"}, status_code=400)
            if not isinstance(body, dict) or "input" not in body:
                return JSONResponse({"error": 'the request must be a JSON object {"user": NAME or null, '
                                              '"input": [...]}'}, status_code=400)
            user = body.get("user")
            try:
                x = self.replica.check(user, body["input"])
            except FactnetError as error:
                refused = isinstance(user, str) and user in self.replica.refused
                return JSONResponse({"error": str(error)}, status_code=422 if refused else 400)
            logits = await self.predict_batch((user, x))
            if isinstance(logits, FactnetError):
                return JSONResponse({"error": str(logits)}, status_code=404)
            return JSONResponse({"user": user, "label": int(logits.argmax()), "logits": logits.tolist()})

        def __del__(self) -> None:
            if hasattr(self, "replica"):
                self.replica.close()

    return FactnetServer


def start(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          timeout_s: float = 300.0) -> str:
    """Start Ray (if not running) and the deployment; return its URL once every replica has loaded its
    adapters. A `FactnetError` if that takes more than ``timeout_s`` (Ray is then shut down)."""
    ray, serve = _ray()
    if not settings.adapters.is_dir():
        raise FactnetError(f"adapter directory {settings.adapters} does not exist")
    sample_shape(build_backbone(settings), settings.input_shape)  # a bad model or checkpoint: said here, once
    if not ray.is_initialized():
        cpus = max(os.cpu_count() or 1, replicas * settings.threads)
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=True)
    serve.start(http_options={"host": host, "port": port})
    app = _deployment(serve).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": settings.threads},
        max_ongoing_requests=max(64, 4 * settings.max_batch_size), max_queued_requests=-1,
    ).bind(settings)
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
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


def stop() -> None:
    """Shut the deployment and Ray down."""
    ray, serve = _ray()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_until_interrupted(settings: ServeSettings | None, *, host: str, port: int, replicas: int,
                            demo_users: int = 4, demo_options: dict[str, Any] | None = None) -> None:
    """Serve ``settings`` (None: the demo with ``demo_options`` (`ServeSettings` fields), written to a temporary
    directory) until Ctrl-C, then shut down."""
    with tempfile.TemporaryDirectory(prefix="factnet-serve-demo-") as scratch:
        if settings is None:
            settings = replace(write_demo(Path(scratch), users=demo_users), **(demo_options or {}))
            print(f"demo: a random 8x8-image ViT and {demo_users} random adapters (user0 ...) in {settings.adapters}")
        try:  # (Ctrl-C while starting shuts down as cleanly as once it runs)
            url = start(settings, host=host, port=port, replicas=replicas)
            example = [[[0] * 8] * 8] if settings.model is None else "[...]"
            query = json.dumps({"user": "user0", "input": example}, separators=(",", ":"))
            print(f"factnet serve: {url} ({replicas} replica(s), batches of up to {settings.max_batch_size}, "
                  f"{settings.batch_wait_s * 1000:g} ms wait); adapters follow {settings.adapters}\n"
                  f"  curl {url}/health\n"
                  f"  curl -X POST {url}/predict -d '{query}'\n"
                  "Ctrl-C stops it.", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("factnet serve: shutting down", file=sys.stderr)
        finally:
            stop()
