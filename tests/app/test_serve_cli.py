"""``factnet serve`` from the command line, as a user runs it: the demo in a process of its own, started from a
folder that holds a folder named ``factnet`` (as the parent of a clone does), queried with an image as the docs
show, and stopped with SIGINT (Ctrl-C) or SIGTERM (what systemd and Kubernetes send): exit status 0, and no process
it started left running. The child gets SIGINT's default handling whatever this test's caller ignores."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 120
# the command line without the working directory on the path (`python -P` from 3.11 on), as the `factnet` script runs
COMMAND = [sys.executable, "-c", "import sys; sys.path.pop(0); from factnet.app.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _marked(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (every process the server started inherits it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def _multipart(fields: dict[str, str], file: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the server's processes through /proc")
@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_factnet_serve_answers_an_image_and_stops_cleanly(stop_with: signal.Signals, tmp_path: Path) -> None:
    (tmp_path / "factnet").mkdir()  # what the parent of a clone named factnet holds
    (tmp_path / "factnet" / "README.md").write_text("not the package\n")
    port, marker = _free_port(), f"FACTNET_SERVE_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    process = subprocess.Popen([*COMMAND, "serve", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, key: value},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []  # its stdout, read as it comes (a user waits for the line that gives the URL)
    errors: list[str] = []  # and its stderr (Ray logs there: an unread pipe would fill up and block it)
    readers = [threading.Thread(target=lambda pipe=pipe, into=into: into.extend(iter(pipe.readline, "")), daemon=True)
               for pipe, into in ((process.stdout, lines), (process.stderr, errors))]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(line.startswith(f"factnet serve: {url}") for line in lines):
            assert process.poll() is None, "".join(errors)[-3000:]
            assert time.monotonic() < deadline, "factnet serve did not say it is serving in time"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            health = json.loads(response.read())
        assert health["status"] == "ok" and health["adapters"] == 4 and health["images"] is True
        body, content_type = _multipart({"user": "user0", "top_k": "3"}, _png())
        request = urllib.request.Request(f"{url}/predict", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["user"] == "user0" and len(answer["logits"]) == 10 and len(answer["top_k"]) == 3
        assert answer["top_k"][0]["label"] == answer["label"]
    finally:
        process.send_signal(stop_with)
        process.wait(timeout=STOP_TIMEOUT_S)
        for reader in readers:
            reader.join(timeout=10)
    assert process.returncode == 0, "".join(errors)[-3000:]
    assert any("curl -F" in line for line in lines) and any("shutting down" in line for line in errors)
    deadline = time.monotonic() + 60
    while (left := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"processes the server started are still running: {left}"
