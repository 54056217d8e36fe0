"""``factnet serve`` on a Ray cluster it did not start: a local two-node cluster (`ray.cluster_utils.Cluster`, both
nodes on this machine, one CPU each), joined with ``address=``; the two replicas must land on both nodes and each
answer right (checked against the forward here); stopping leaves the cluster running. Then the same cluster runs
the application builder Ray's ``serve run factnet.app.serve_ray:app key=value`` calls, on a timm model."""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import factnet

pytest.importorskip("ray.serve")
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from factnet.app import serve_ray  # noqa: E402
from factnet.app.serve import build_backbone, write_demo, write_random_adapters  # noqa: E402

TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/predict", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def cluster() -> tuple[Cluster, int]:
    """The cluster and the port its Serve listens on (set by the first deployment; Serve keeps it after)."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    try:
        yield nodes, _free_port()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


def test_replicas_on_both_nodes_answer_right_and_stop_leaves_the_cluster(cluster: tuple[Cluster, int],
                                                                           tmp_path: Path) -> None:
    nodes, port = cluster
    settings = replace(write_demo(tmp_path, users=3), poll_s=0.5)
    url = serve_ray.start(settings, port=port, replicas=2, address=nodes.address, timeout_s=TIMEOUT_S)
    try:
        from ray.util.state import list_actors

        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "FactnetServer" in a.class_name]
        assert len(replicas) == 2 and len({a.node_id for a in replicas}) == 2  # one on each node
        model = build_backbone(settings)
        for name in ("user0", "user1", "user2"):
            factnet.load(model, settings.adapters / f"{name}.safetensors", name=name)
        generator = torch.Generator().manual_seed(0)
        for index in range(12):  # requests reach either replica
            user, x = f"user{index % 3}", torch.randn(1, 8, 8, generator=generator)
            answer = _post(url, {"user": user, "input": x.tolist()})
            with torch.no_grad(), model.factnet.use(user):
                expected = model(x[None])[0]
            torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-5)
    finally:
        serve_ray.stop()
    ray.init(address=nodes.address)  # the cluster still runs; the application is gone
    assert serve_ray.APP_NAME not in serve.status().applications


def test_the_application_builder_serve_run_calls(cluster: tuple[Cluster, int], tmp_path: Path) -> None:
    import timm

    kwargs = {"img_size": 32, "depth": 1, "num_classes": 4}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "base.pth")
    (tmp_path / "adapters").mkdir()
    write_random_adapters(model, tmp_path / "adapters", 2, seed=3)
    nodes, port = cluster
    if not ray.is_initialized():
        ray.init(address=nodes.address)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    application = serve_ray.app({"adapters": str(tmp_path / "adapters"), "model": "vit_tiny_patch16_224",
                                 "checkpoint": str(tmp_path / "base.pth"), "model_kwargs": json.dumps(kwargs),
                                 "device": "auto"})
    serve.run(application, name="builder", route_prefix="/")
    try:
        x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
        answer = _post(f"http://127.0.0.1:{port}", {"user": "user1", "input": x.tolist(), "top_k": 2})
        factnet.load(model, tmp_path / "adapters" / "user1.safetensors", name="user1")
        with torch.no_grad(), model.factnet.use("user1"):
            expected = model(x[None])[0]
        torch.testing.assert_close(torch.tensor(answer["logits"]), expected, rtol=1e-4, atol=1e-4)
        assert len(answer["top_k"]) == 2
    finally:
        serve.delete("builder")
    with pytest.raises(factnet.FactnetError, match="adapters=DIR and model=NAME"):
        serve_ray.app({"model": "vit_tiny_patch16_224"})
