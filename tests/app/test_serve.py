"""``factnet serve`` end to end: Ray Serve on the demo (random ViT, random adapters) on loopback, concurrent
requests from several users, each answer checked against that user's single-adapter forward computed here;
adapter files added, deleted and corrupted while it runs. Started once for the module with two replicas (each
answer comes from either; each replica follows the directory on its own), shut down at the end."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import factnet
from factnet.app.cli import main
from factnet.app.serve import ServeSettings, build_backbone, write_demo, write_random_adapters

serve = pytest.importorskip("ray.serve")
from factnet.app import serve_ray  # noqa: E402

USERS = 4
REQUEST_TIMEOUT_S = 30
WAIT_FOR_DIRECTORY_S = 30
REPLICAS = 2
STEADY = 8  # consecutive answers that must agree before a directory change counts as seen by every replica


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: Any) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/predict", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = replace(write_demo(tmp_path_factory.mktemp("serve"), users=USERS), max_batch_size=8,
                       batch_wait_s=0.02, poll_s=0.2)
    url = serve_ray.start(settings, port=_free_port(), replicas=REPLICAS, timeout_s=180)
    try:
        yield url, settings
    finally:
        serve_ray.stop()


def _reference(settings: ServeSettings, names: list[str]) -> torch.nn.Module:
    """The backbone with each named adapter file loaded, in this process."""
    model = build_backbone(settings)
    for name in names:
        factnet.load(model, settings.adapters / f"{name}.safetensors", name=name)
    return model


@torch.no_grad()
def _check(url: str, model: torch.nn.Module, user: str | None, x: torch.Tensor) -> None:
    status, answer = _post(url, {"user": user, "input": x.tolist()})
    assert status == 200, answer
    with model.factnet.use(user):
        expected = model(x[None])[0]
    assert answer["user"] == user
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert answer["label"] == int(expected.argmax())


def test_health(server: Any) -> None:
    url, _ = server
    health = _health(url)
    assert health["status"] == "ok" and health["adapters"] >= USERS and health["input_shape"] == [1, 8, 8]
    deployments = serve.status().applications[serve_ray.APP_NAME].deployments.values()
    assert sum(d.replica_states.get("RUNNING", 0) for d in deployments) == REPLICAS


def test_concurrent_users_each_get_their_adapter(server: Any) -> None:
    url, settings = server
    users: list[str | None] = [f"user{index}" for index in range(USERS)] + [None]
    model = _reference(settings, [user for user in users if user])
    generator = torch.Generator().manual_seed(1)
    requests = [(users[index % len(users)], torch.randn(1, 8, 8, generator=generator)) for index in range(60)]
    random.Random(0).shuffle(requests)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda request: _post(url, {"user": request[0], "input": request[1].tolist()}),
                                requests))
    with model.factnet.per_sample([user for user, _ in requests]):
        expected = model(torch.stack([x for _, x in requests]))
    for (user, _), (status, answer), row in zip(requests, answers, expected):
        assert status == 200, answer
        assert answer["user"] == user
        torch.testing.assert_close(torch.tensor(answer["logits"]), row, rtol=1e-4, atol=1e-5)
        assert answer["label"] == int(row.argmax())


def test_an_image_is_answered_through_the_fastapi_ingress(server: Any) -> None:
    import base64
    import io

    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    url, settings = server
    pixels = torch.randint(0, 256, (12, 10, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(encoded, format="PNG")
    model = _reference(settings, ["user2"])
    config = {**resolve_data_config({}, model=model), "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)}
    x = create_transform(**config, is_training=False)(Image.open(encoded).convert("L"))
    status, answer = _post(url, {"user": "user2", "image": base64.b64encode(encoded.getvalue()).decode(), "top_k": 2})
    assert status == 200, answer
    with model.factnet.use("user2"):
        expected = model(x[None])[0]
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert [entry["label"] for entry in answer["top_k"]] == expected.argsort(descending=True)[:2].tolist()
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=REQUEST_TIMEOUT_S) as response:
        assert {"/predict", "/health"} <= set(json.loads(response.read())["paths"])


def test_bad_requests_are_refused_with_a_reason(server: Any) -> None:
    url, _ = server
    status, answer = _post(url, {"user": "nobody", "input": torch.zeros(1, 8, 8).tolist()})
    assert status == 404 and "nobody" in answer["error"]
    status, answer = _post(url, {"user": "user0", "input": [1, 2]})
    assert status == 400 and "shape" in answer["error"]
    status, answer = _post(url, b"not json")
    assert status == 400 and "JSON" in answer["error"]


def _wait_until(condition: Any) -> None:
    """Until ``condition()`` holds `STEADY` times in a row (requests reach either replica)."""
    deadline, streak = time.monotonic() + WAIT_FOR_DIRECTORY_S, 0
    while streak < STEADY:
        assert time.monotonic() < deadline, "the server did not follow the adapter directory in time"
        streak = streak + 1 if condition() else 0
        if not streak:
            time.sleep(0.2)


def test_adapters_come_and_go_while_serving(server: Any) -> None:
    url, settings = server
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2))
    write_random_adapters(build_backbone(settings), settings.adapters, 1, seed=7, prefix="late")
    _wait_until(lambda: _post(url, {"user": "late0", "input": x.tolist()})[0] == 200)
    model = _reference(settings, ["late0", "user1"])
    _check(url, model, "late0", x)

    (settings.adapters / "broken.safetensors").write_bytes(b"not an adapter")
    _wait_until(lambda: "broken" in _health(url)["refused"])
    status, answer = _post(url, {"user": "broken", "input": x.tolist()})
    assert status == 422 and "broken" in answer["error"] and "refused" in answer["error"]
    _check(url, model, "user1", x)  # the others are not disturbed

    (settings.adapters / "late0.safetensors").unlink()
    _wait_until(lambda: _post(url, {"user": "late0", "input": x.tolist()})[0] == 404)
    _check(url, model, "user1", x)
    _check(url, model, None, x)


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--model", "vit_tiny_patch16_224"]) == 2
    assert main(["serve", "--model", "vit_tiny_patch16_224", "--adapters", str(tmp_path / "missing")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("factnet: error: ")]
    assert len(errors) == 2 and "--adapters" in errors[0] and "does not exist" in errors[1]  # one line each
