"""``factnet serve``'s HTTP surface without Ray (`factnet.app.serve_http`): the FastAPI routes on a demo replica
through FastAPI's test client. Answers are checked against the replica's model run here, images against timm's
own preprocessing of the same file; every bad request must get its 4xx and leave the next good one right; a
hypothesis fuzz sends arbitrary bodies, content types and headers, and nothing may answer 5xx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402

from factnet import FactnetError  # noqa: E402
from factnet.app.serve import Replica, write_demo  # noqa: E402
from factnet.app.serve_http import Limits, Preprocess, make_api  # noqa: E402

STATUSES = {200, 400, 404, 413, 415, 422}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Replica]:
    directory = tmp_path_factory.mktemp("serve-http")
    (directory / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    from dataclasses import replace

    settings = replace(write_demo(directory, users=2), labels=directory / "labels.txt", max_body_mb=0.5)
    replica = Replica(settings, follow=False)

    async def answer(user: str | None, x: torch.Tensor) -> torch.Tensor | FactnetError:
        return (await asyncio.to_thread(replica.answer, [user], [x]))[0]

    endpoint = replica.endpoint(answer)
    return TestClient(make_api(endpoint), raise_server_exceptions=False), replica


def _png(size: tuple[int, int] = (11, 9), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy(), mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@torch.no_grad()
def _expected(replica: Replica, user: str | None, x: torch.Tensor) -> torch.Tensor:
    with replica.model.factnet.use(user):
        return replica.model(x[None])[0]


def _timm_input(replica: Replica, data: bytes) -> torch.Tensor:
    """The demo model's input from an image file by timm's own transform (1 channel, mean and std 0.5)."""
    config = {**resolve_data_config({}, model=replica.model), "input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)}
    return create_transform(**config, is_training=False)(Image.open(io.BytesIO(data)).convert("L"))


def _check_answer(replica: Replica, answer: dict, user: str | None, x: torch.Tensor, top_k: int) -> None:
    expected = _expected(replica, user, x)
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-5)
    assert answer["label"] == int(expected.argmax()) and answer["user"] == user
    scores = expected.softmax(-1)
    order = scores.argsort(descending=True)[:top_k]
    assert [entry["label"] for entry in answer["top_k"]] == order.tolist()
    assert [entry["name"] for entry in answer["top_k"]] == [f"class {i}" for i in order.tolist()]
    torch.testing.assert_close(torch.tensor([e["score"] for e in answer["top_k"]]), scores[order])


def test_float_input_answers_as_the_model_does(served: Any) -> None:
    client, replica = served
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    for user in ("user0", "user1", None):
        response = client.post("/predict", json={"user": user, "input": x.tolist(), "top_k": 3})
        assert response.status_code == 200, response.text
        _check_answer(replica, response.json(), user, x, 3)


def test_images_as_base64_json_and_multipart_are_preprocessed_as_timm_does(served: Any) -> None:
    client, replica = served
    for mode, fmt in (("RGB", "PNG"), ("L", "JPEG"), ("RGBA", "PNG")):
        data = _png(mode=mode, fmt=fmt)
        x = _timm_input(replica, data)
        response = client.post("/predict", json={"user": "user1", "image": base64.b64encode(data).decode()})
        assert response.status_code == 200, response.text
        _check_answer(replica, response.json(), "user1", x, 5)  # top_k: 5 by default
        response = client.post("/predict", data={"user": "user0", "top_k": "2"}, files={"file": ("a.img", data)})
        assert response.status_code == 200, response.text
        _check_answer(replica, response.json(), "user0", x, 2)


def test_the_model_s_own_input_size_is_used() -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
    preprocess = Preprocess(model, (3, 32, 32))
    assert preprocess(_png((50, 40)), Limits()).shape == (3, 32, 32)
    with pytest.raises(FactnetError, match="--mean and --std"):
        Preprocess(model, (1, 32, 32))


def _deep(levels: int) -> bytes:
    return b'{"user": null, "input": ' + b"[" * levels + b"]" * levels + b"}"


BAD = [  # (body or (form, files), content type, status, words the error must hold)
    (b'{"user": "user0", "input": NaN}', "application/json", 400, "NaN"),
    (b'{"user": "user0", "input": [[[Infinity]]]}', "application/json", 400, "Infinity"),
    (json.dumps({"user": "user0", "input": [[[1e999] * 8] * 8]}).replace("inf", "1e999").encode(), None, 400,
     "finite"),
    (_deep(100_000), "application/json", 400, "deep"),
    (b'{"user": 5, "input": []}', None, 400, "'user'"),
    (b'{"user": "../user0", "input": []}', None, 400, "plain adapter name"),
    (json.dumps({"user": "user0", "input": [[[True] * 8] * 8]}).encode(), None, 400, "bool"),
    (json.dumps({"user": "user0", "input": [[["1"] * 8] * 8]}).encode(), None, 400, "str"),
    (json.dumps({"user": "user0", "input": [[[0] * 8] * 7]}).encode(), None, 400, "shape"),
    (json.dumps({"user": "user0", "input": [], "extra": 1}).encode(), None, 400, "unknown field"),
    (json.dumps({"user": "user0", "top_k": 0, "input": []}).encode(), None, 400, "top_k"),
    (json.dumps({"user": "user0", "top_k": 11, "input": []}).encode(), None, 400, "top_k"),
    (json.dumps({"user": "user0", "image": "%%%"}).encode(), None, 400, "base64"),
    (json.dumps({"user": "user0", "image": base64.b64encode(b"not an image").decode()}).encode(), None, 400,
     "decoded"),
    (json.dumps({"user": "user0", "image": base64.b64encode(_png(mode="CMYK", fmt="JPEG")).decode()}).encode(),
     None, 415, "mode CMYK"),
    (json.dumps({"user": "user0", "image": base64.b64encode(_png((1, 1))).decode()}).encode(), None, 422, "1x1"),
    (json.dumps({"user": "user0", "image": base64.b64encode(_png(fmt="GIF", mode="L")).decode()}).encode(), None,
     415, "GIF"),
    (json.dumps({"user": "user0", "image": base64.b64encode(_png()[:60]).decode()}).encode(), None, 400, "decoded"),
    (json.dumps({"user": "nobody", "input": [[[0] * 8] * 8]}).encode(), None, 404, "nobody"),
    (b"[1, 2]", None, 400, "JSON object"),
    (b"\xff\xfe not json", None, 400, "not JSON"),
    (b"x" * 600_000, "application/json", 413, "at most"),
    (b'--x\r\nContent-Disposition: form-data; name="user"\r\n\r\nuser0\r\n--x--\r\n',
     "multipart/form-data; boundary=x", 400, "'file' part"),
    (({"user": "user0", "colour": "red"}, {"file": ("a.png", _png())}), None, 400, "unknown form field"),
]


@pytest.mark.parametrize("body, content_type, status, words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_every_bad_request_is_a_clear_4xx_and_disturbs_nothing(served: Any, body: Any, content_type: str | None,
                                                               status: int, words: str) -> None:
    client, replica = served
    if isinstance(body, tuple):  # (form fields, files): a multipart body
        response = client.post("/predict", data=body[0], files=body[1])
    else:
        response = client.post("/predict", content=body, headers={"content-type": content_type or "application/json"})
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower()
    x = torch.ones(1, 8, 8)
    good = client.post("/predict", json={"user": "user0", "input": x.tolist()})
    assert good.status_code == 200
    _check_answer(replica, good.json(), "user0", x, 5)


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Any) -> None:
    client, _ = served

    def chunks():  # no Content-Length: refused once the bytes read pass the limit
        for _ in range(1000):
            yield b" " * 1024

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "more than" in response.json()["error"]


def test_docs_list_the_routes(served: Any) -> None:
    client, _ = served
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/predict", "/health"} and "post" in paths["/predict"] and "get" in paths["/health"]
    assert client.get("/docs").status_code == 200
    health = client.get("/health").json()
    assert health["input_shape"] == [1, 8, 8] and health["classes"] == 10 and health["images"] is True


json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                      st.fixed_dictionaries({}, optional={"user": json_values | st.sampled_from(["user0", "user1"]),
                                                          "input": json_values, "image": json_values,
                                                          "top_k": json_values}).map(lambda v: json.dumps(v).encode())),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=b",
                                     "multipart/form-data", "application/x-www-form-urlencoded", "image/png", "",
                                     "application/json; charset=latin-1"]),
       extra=st.dictionaries(st.sampled_from(["content-length", "x-user", "transfer-encoding", "accept"]),
                             st.text(alphabet="0123456789abcxyz -", max_size=6), max_size=2))
def test_fuzz_no_request_answers_5xx(served: Any, body: bytes, content_type: str, extra: dict[str, str]) -> None:
    client, _ = served
    headers = {"content-type": content_type, **{k: v for k, v in extra.items() if k != "content-length"}}
    if "content-length" in extra and not extra["content-length"].strip().isdigit():
        headers["content-length"] = extra["content-length"]
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code in STATUSES, (response.status_code, response.text)


def test_device_placement(served: Any) -> None:
    """On CPU: where replicas would go (one GPU each on cuda) and that a replica's batches run on its device."""
    from dataclasses import replace

    from factnet.app.serve_ray import actor_options, resolve_device

    assert resolve_device("auto", 0) == "cpu" and resolve_device("auto", 2) == "cuda"
    assert resolve_device("cpu", 4) == "cpu"
    with pytest.raises(FactnetError, match="no GPU"):
        resolve_device("cuda", 0)
    _, replica = served
    assert actor_options(replace(replica.settings, device="cuda", threads=2)) == {"num_cpus": 2, "num_gpus": 1}
    assert actor_options(replica.settings) == {"num_cpus": 1, "num_gpus": 0}
    assert next(replica.model.parameters()).device == replica.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_replica_on_the_gpu_answers_as_on_the_cpu(served: Any) -> None:
    from dataclasses import replace

    _, replica = served
    gpu = Replica(replace(replica.settings, device="cuda"), follow=False)
    x = [torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    users = ["user0", "user1", None, "user0"]
    for got, expected in zip(gpu.answer(users, x), replica.answer(users, x)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
