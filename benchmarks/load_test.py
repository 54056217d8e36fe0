"""Load test of ``factnet serve`` on loopback: N concurrent clients against one Ray Serve deployment holding
K adapters on a ViT-S-sized backbone (random weights), with dynamic batching, without (max batch 1), and
against the merged single-user model. Every answer is checked against its user's single-adapter forward
computed in this process. Each deployment first answers 2N unmeasured warm-up requests. Bounded: ``--requests``
per run and ``--time-limit-s`` per run.

    python benchmarks/load_test.py                      # 1,000 adapters, 32 clients, users drawn from 1/64/1000
    python benchmarks/load_test.py --adapters 100 --requests 200 --img-size 32   # a smaller run
    python benchmarks/load_test.py --images             # JPEG files (multipart), preprocessed by the server

Prints a markdown table: requests/s, p50/p99 latency (ms), wrong answers (must be 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch

import factnet
from factnet.app import serve_ray
from factnet.app.runs import build_model
from factnet.app.serve import ServeSettings, write_random_adapters

MODEL = "vit_small_patch16_224"
INPUTS = 4  # distinct images: the expected answers are computed once per (user, image)


@dataclass
class Run:
    variant: str
    users: int
    latencies_s: list[float]
    seconds: float
    wrong: int
    failed: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters loaded (default 1000)")
    parser.add_argument("--users", default="1,64,1000", help="users the requests are drawn from, per run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=512, help="requests per run (default 512)")
    parser.add_argument("--time-limit-s", type=float, default=300, help="each run stops after this (default 300)")
    parser.add_argument("--img-size", type=int, default=224, help="image side (default 224; ViT-S/16)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the replica (default 2)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--images", action="store_true",
                        help="send JPEG files (multipart/form-data), not preprocessed float lists (JSON)")
    return parser.parse_args()


def client_load(port: int, bodies: list[tuple[str | None, int, bytes, str]], deadline: float,
                results: list[tuple[str | None, int, float, dict | None]]) -> None:
    """Send ``bodies`` one after another on one keep-alive connection; append (user, image, latency, answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for user, image, body, content_type in bodies:
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            answer = json.loads(response.read()) if response.status == 200 else None
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            answer = None
        results.append((user, image, time.perf_counter() - start, answer))
    connection.close()


def request_plan(users: list[str | None], count: int) -> list[tuple[str | None, int]]:
    """``count`` (user, image) requests, users drawn from ``users`` (the same plan every time)."""
    chooser = random.Random(0)
    return [(user, chooser.randrange(INPUTS)) for user in chooser.choices(users, k=count)]


def request_body(user: str | None, image: str | bytes) -> tuple[bytes, str]:
    """(body, content type): JSON with the float lists ``image`` (a string), or multipart with the JPEG file."""
    if isinstance(image, str):
        return f'{{"user": {json.dumps(user)}, "input": {image}}}'.encode(), "application/json"
    boundary = "factnet-load-test-boundary"
    user_part = b"" if user is None else (f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n'
                                          f"{user}\r\n").encode()
    file_part = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n"
    return user_part + file_part + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_load(args: argparse.Namespace, variant: str, users: list[str | None], images: list[str] | list[bytes],
             expected: dict[tuple[str | None, int], torch.Tensor] | None, count: int | None = None) -> Run:
    """``count`` (default ``args.requests``) requests from ``args.clients`` threads, users drawn from ``users``;
    checked against ``expected`` (None: a warm-up, not checked)."""
    plan = request_plan(users, count or args.requests)
    bodies = [(user, image, *request_body(user, images[image])) for user, image in plan]
    results: list[tuple[str | None, int, float, dict | None]] = []
    deadline = time.monotonic() + args.time_limit_s
    threads = [threading.Thread(target=client_load, args=(args.port, bodies[c::args.clients], deadline, results))
               for c in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    wrong = failed = 0
    for user, image, _, answer in results:
        if answer is None:
            failed += 1
            continue
        if expected is None:
            continue
        row = expected[user, image]
        close = torch.allclose(torch.tensor(answer["logits"]), row, rtol=1e-3, atol=1e-4)
        wrong += not close or answer["label"] != int(row.argmax()) or answer["user"] != user
    return Run(variant, len(set(users)), [latency for _, _, latency, _ in results], seconds, wrong, failed)


def jpeg_images(model: torch.nn.Module, side: int) -> tuple[list[bytes], torch.Tensor]:
    """`INPUTS` random ``side``x``side`` JPEG files and their preprocessed inputs (INPUTS, 3, side, side)."""
    import io

    from PIL import Image

    from factnet.app.serve_http import Limits, Preprocess

    preprocess, files = Preprocess(model, (3, side, side)), []
    generator = torch.Generator().manual_seed(1)
    for _ in range(INPUTS):
        pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels.numpy(), "RGB").save(out, format="JPEG", quality=90)
        files.append(out.getvalue())
    return files, torch.stack([preprocess(data, Limits()) for data in files])


@torch.no_grad()
def expected_answers(model: torch.nn.Module, pairs: set[tuple[str | None, int]], x: torch.Tensor
                     ) -> dict[tuple[str | None, int], torch.Tensor]:
    """Each requested (user, image)'s logits from that user's single-adapter forward (``use``)."""
    images_of: dict[str | None, list[int]] = {}
    for user, image in sorted(pairs, key=str):
        images_of.setdefault(user, []).append(image)
    answers = {}
    for user, images in images_of.items():
        with model.factnet.use(user):
            for image, row in zip(images, model(x[images])):
                answers[user, image] = row
    return answers


def table_row(run: Run) -> str:
    latencies = sorted(run.latencies_s)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return (f"| {run.variant} | {run.users} | {len(latencies)} | {len(latencies) / run.seconds:.1f} | "
            f"{statistics.median(latencies) * 1000:.0f} | {p99 * 1000:.0f} | {run.wrong} | {run.failed} |")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size, "num_classes": 10}
    scratch = Path(tempfile.mkdtemp(prefix="factnet-load-test-"))
    base = build_model(MODEL, kwargs=kwargs).eval()
    base_file, merged_file = scratch / "base.safetensors", scratch / "merged.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    adapters = scratch / "adapters"
    adapters.mkdir()
    names = write_random_adapters(base, adapters, args.adapters)
    print(f"wrote {args.adapters} adapters to {adapters}", flush=True)
    factnet.load_many(base, sorted(adapters.glob("*.safetensors")), progress=True)
    if args.images:  # JPEG files, and the inputs the server makes of them (the model's timm preprocessing)
        images, x = jpeg_images(base, args.img_size)
    else:
        x = torch.randn(INPUTS, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
        images = [json.dumps(image.tolist()) for image in x]
    user_counts = [int(count) for count in args.users.split(",")]
    pools = {count: names[:count] for count in user_counts}
    needed = {pair for pool in [*pools.values(), names[:1]] for pair in request_plan(pool, args.requests)}
    needed |= {(names[0], image) for image in range(INPUTS)}  # the merged model's answers
    expected = expected_answers(base, needed, x)
    print(f"computed {len(expected)} expected answers", flush=True)
    settings = ServeSettings(adapters=adapters, model=MODEL, checkpoint=base_file, model_kwargs=kwargs,
                             max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                             poll_s=60, threads=args.threads)
    print("| variant | users | requests | requests/s | p50 ms | p99 ms | wrong | failed |\n|---|---:|---:|---:|---:|"
          "---:|---:|---:|", flush=True)
    runs = []
    try:
        for variant, batch in [(f"batched (max {args.max_batch_size}, {args.batch_wait_ms:g} ms)",
                                args.max_batch_size), ("unbatched (max 1)", 1)]:
            serve_ray.start(replace(settings, max_batch_size=batch), port=args.port, timeout_s=900)
            run_load(args, "warm-up", pools[max(user_counts)], images, None, count=2 * args.clients)
            for count in user_counts:
                runs.append(run_load(args, variant, pools[count], images, expected))
                print(table_row(runs[-1]), flush=True)
            serve_ray.stop()
        merged_dir = scratch / "merged"  # the merged single-user model: user0 folded into the weights
        merged_dir.mkdir()
        single = build_model(MODEL, kwargs=kwargs).eval()
        single.load_state_dict(safetensors.torch.load_file(str(base_file)))
        factnet.load(single, adapters / f"{names[0]}.safetensors", name=names[0]).merge()
        state = single.factnet.delete(names[0], keep_merged=True).state_dict()
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(merged_file))
        serve_ray.start(replace(settings, adapters=merged_dir, checkpoint=merged_file), port=args.port, timeout_s=900)
        run_load(args, "warm-up", [None], images, None, count=2 * args.clients)
        merged_expected = {(None, image): row for (user, image), row in expected.items() if user == names[0]}
        runs.append(run_load(args, f"merged single-user model (max {args.max_batch_size})", [None], images,
                             merged_expected))
        print(table_row(runs[-1]), flush=True)
    finally:
        serve_ray.stop()
    if any(run.wrong or run.failed for run in runs):
        raise SystemExit("some answers were wrong or failed")


if __name__ == "__main__":
    main()
