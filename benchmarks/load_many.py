"""Bulk loading: `factnet.load_many` against a loop of `factnet.load`, on ViT-B FacT-TT adapters.

    python benchmarks/load_many.py [--count 1000] [--rank 8] [--include-head] [--loop-count N]

Writes ``--count`` adapters of timm ``vit_base_patch16_224`` (random weights, default targets, FacT-TT,
random factors; with ``--include-head`` also a random head, 769K parameters each) to a temporary
directory, once as float32 and once as bfloat16 (``save(..., dtype=torch.bfloat16)``), then loads them
onto fresh copies of the base model: with `load_many` (float32 and bfloat16 files) and with a loop of
`factnet.load` (float32; ``--loop-count`` files, default all). Reports bytes per file (tensors, header),
wall time, and the growth of the resident memory per adapter (each load runs in a fresh process)
against its factor (+ head) bytes in float32, as a markdown table. CPU only; the files are removed at the end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

import torch

import factnet


def rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no psutil and no /proc/self/status: cannot read the resident memory") from None
    return psutil.Process().memory_info().rss


def write(base: torch.nn.Module, folder: pathlib.Path, count: int, rank: int, include_head: bool) -> tuple[int, int]:
    """``count`` random adapters as ``fp32/task{i}.safetensors`` and ``bf16/task{i}.safetensors``; returns
    (factor, head) parameters of one adapter."""
    model = copy.deepcopy(base)
    adapter = factnet.Tensorizer(model).decompose("tt", rank=rank)
    params = adapter.trainable_parameters() if include_head else list(adapter.parameters())
    (folder / "fp32").mkdir()
    (folder / "bf16").mkdir()
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in params:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        adapter.save(folder / "fp32" / f"task{i}.safetensors", include_head=include_head)
        adapter.save(folder / "bf16" / f"task{i}.safetensors", include_head=include_head, dtype=torch.bfloat16)
    return adapter.num_parameters(), adapter.num_head_parameters() if include_head else 0


def base_model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def _measure(how: str, files: list[pathlib.Path], queue) -> None:
    """In a fresh process: seconds and resident-memory growth of loading ``files`` onto the base model
    (``how``: "load_many" or "loop"), and a digest of the first adapters' states."""
    model = base_model()
    gc.collect()
    before = rss()
    start = time.perf_counter()
    if how == "load_many":
        adapters = factnet.load_many(model, files, progress=False)
    else:
        adapters = {p.stem: factnet.load(model, p, name=p.stem) for p in files}
    seconds = time.perf_counter() - start
    grown = rss() - before
    digests = {}
    for name, adapter in list(adapters.items())[:3]:
        digest = hashlib.sha256()
        for key, value in [*adapter.state_dict().items(), *adapter.head_state().items()]:
            digest.update(key.encode() + value.detach().contiguous().view(torch.uint8).numpy().tobytes())
        digests[name] = digest.hexdigest()
    queue.put((seconds, grown, digests))


def timed(how: str, files: list[pathlib.Path]) -> tuple[float, int, dict[str, str]]:
    """`_measure` in a spawned process, so earlier runs' freed memory does not hide the growth."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(how, files, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="adapter files (default 1000)")
    parser.add_argument("--rank", type=int, default=8, help="FacT-TT rank (default 8)")
    parser.add_argument("--include-head", action="store_true", help="save the head too (3 MB a file in float32)")
    parser.add_argument("--loop-count", type=int, help="files for the factnet.load loop (default: --count)")
    args = parser.parse_args()
    loop_count = args.count if args.loop_count is None else min(args.loop_count, args.count)
    base = base_model()
    with tempfile.TemporaryDirectory() as temp:
        folder = pathlib.Path(temp)
        start = time.perf_counter()
        factors, head = write(base, folder, args.count, args.rank, args.include_head)
        written = time.perf_counter() - start
        fp32 = sorted((folder / "fp32").iterdir(), key=lambda p: int(p.stem[4:]))
        bf16 = sorted((folder / "bf16").iterdir(), key=lambda p: int(p.stem[4:]))
        sizes = {name: os.path.getsize(files[0]) for name, files in (("fp32", fp32), ("bf16", bf16))}
        rows = []

        def measure(label: str, how: str, files: list[pathlib.Path], itemsize: int) -> dict[str, str]:
            seconds, grown, digests = timed(how, files)
            size = sizes["fp32" if itemsize == 4 else "bf16"]
            rows.append((label, len(files), size, size - itemsize * (factors + head), seconds,
                         1000 * seconds / len(files), grown / len(files)))
            return digests

        many = measure("load_many, float32 files", "load_many", fp32, 4)
        loop = measure("loop of factnet.load, float32 files", "loop", fp32[:loop_count], 4)
        measure("load_many, bfloat16 files", "load_many", bf16, 2)
        same = many == loop
    memory = 4 * (factors + head)
    print(f"ViT-B/16 (random weights), FacT-TT r{args.rank}, default targets, head "
          f"{'included' if args.include_head else 'not saved'}: {factors:,} factor + {head:,} head parameters "
          f"= {memory:,} bytes in float32; {args.count} files of each dtype written in {written:.1f} s; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
          f"load_many equals the loop on the first adapters: {same}\n")
    print("| loading | files | bytes per file | header bytes | wall time (s) | ms per file | RSS growth per adapter "
          "(bytes) | RSS growth / factor+head bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for label, n, size, header, seconds, per_file, grown in rows:
        print(f"| {label} | {n} | {size:,} | {header:,} | {seconds:.2f} | {per_file:.2f} | {grown:,.0f} | "
              f"{grown / memory:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
