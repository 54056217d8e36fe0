"""``factnet serve`` from the command line, as a user runs it: the demo in a process of its own, queried with
the request the README shows, stopped with Ctrl-C (SIGINT), which shuts it down cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

START_TIMEOUT_S = 240
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_factnet_serve_starts_answers_and_stops_on_ctrl_c() -> None:
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "factnet.app.cli", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
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
            assert process.poll() is None, "".join(errors)
            assert time.monotonic() < deadline, "factnet serve did not say it is serving in time"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            health = json.loads(response.read())
        assert health["status"] == "ok" and health["adapters"] == 4
        body = json.dumps({"user": "user0", "input": [[[0] * 8] * 8]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/predict", data=body, method="POST"),
                                    timeout=30) as response:
            answer = json.loads(response.read())
        assert answer["user"] == "user0" and len(answer["logits"]) == 10 and answer["label"] in range(10)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        for reader in readers:
            reader.join(timeout=10)
    assert process.returncode == 0, "".join(errors)
    assert any("curl" in line for line in lines) and any("shutting down" in line for line in errors)
