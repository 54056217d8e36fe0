"""The tables of docs/real_model/lowbit/README.md: low-bit FacT against full-precision FacT, PEFT LoRA and the probe.

    python benchmarks/real_model_lowbit.py   # prints the two markdown tables (measures file bytes, trains nothing)

File bytes do not depend on the trained values, so the files without the head (full-precision FacT, PEFT LoRA) and
with a low-bit head are measured here on an untrained model built the way the runs built it. Accuracy per byte:
at each budget (bytes without the head), each family's point with the best seed-0 validation accuracy among those
that fit; its test accuracy is the mean ± std over the seeds that ran.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model_methods as rm  # noqa: E402

ROOT = Path("docs/real_model")
NAMES = {"tt": "FacT-TT", "tucker": "FacT-Tucker", "lora": "PEFT LoRA", "probe": "linear probe"}
CHOSEN = {"tt": 3e-3, "tucker": 1e-2, "lora": 3e-3, "probe": 1e-2}  # the lrs validation chose (multipliers, main)
BUDGETS = (1024, 4096, 16384, 65536, 262144)
HEAD = (12800, 10)  # the 10-class head's weight and bias


def runs(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l]


def _size(directory: Path, names: tuple[str, ...] | None = None) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and (names is None or p.name in names))


def fact_bytes(method: str, rank: int, bits: int | None, include_head: bool, head_bits: int | None = None) -> int:
    """The size of ``adapter.save`` for FacT ``method`` at ``rank``, trained at ``bits`` (untrained: same size)."""
    from factnet import Tensorizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = Tensorizer(rm.build_model(False)).decompose(method, rank=rank, train_head=True, seed=0, bits=bits,
                                                               head_bits=head_bits)
    with tempfile.TemporaryDirectory() as tmp:
        return adapter.save(str(Path(tmp) / "a.safetensors"), include_head=include_head).bytes


def lora_bytes(rank: int) -> int:
    """PEFT LoRA without the head: ``save_pretrained``'s adapter_model.safetensors + adapter_config.json (the model
    card README.md it also writes is left out)."""
    import peft

    model = rm.build_model(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=rm.adapted_modules(model)))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return _size(Path(tmp), ("adapter_model.safetensors", "adapter_config.json"))


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{sd} [{len(values)}]"


def points() -> list[dict]:
    """Every (family, setting) with its seed-0 val, test over seeds and bytes without the head."""
    from factnet.quant import stored_bytes

    out = []
    low = [r for r in runs(ROOT / "lowbit" / "runs.jsonl") if "val" in r and r.get("head_bits") is None]
    for method in ("tt", "tucker"):
        for rank in (2, 8, 32):
            for bits in (1, 2, 4):
                rows = [r for r in low if (r["method"], r["rank"], r["bits"]) == (method, rank, bits)]
                if rows:
                    head_b = sum(stored_bytes(n, bits) for n in HEAD)
                    out.append(dict(family="low-bit FacT", name=f"{NAMES[method]} r{rank}, {bits}-bit", rows=rows,
                                    method=method, rank=rank, bits=bits, bytes=rows[0]["bytes"],
                                    with_head=rows[0]["bytes_with_head"], head_bits_bytes=head_b,
                                    with_lowbit_head=fact_bytes(method, rank, bits, True, bits)))
            rows = [r for r in runs(ROOT / "multipliers" / "runs.jsonl")
                    if (r["method"], r["rank"], r["lr"]) == (method, rank, CHOSEN[method]) and "val" in r]
            if rows:
                out.append(dict(family="full-precision FacT", name=f"{NAMES[method]} r{rank}, fp32", rows=rows,
                                method=method, rank=rank, bits=32, bytes=fact_bytes(method, rank, None, False),
                                with_head=rows[0]["bytes"]))
    main = [r for r in runs(ROOT / "runs.jsonl") if "val" in r]
    for rank in (1, 2, 8):
        rows = [r for r in main if (r["method"], r["rank"], r["lr"]) == ("lora", rank, CHOSEN["lora"])]
        out.append(dict(family="PEFT LoRA", name=f"PEFT LoRA r{rank}", rows=rows, method="lora", rank=rank,
                        bytes=lora_bytes(rank), with_head=rows[0]["bytes"]))
    rows = [r for r in main if (r["method"], r["lr"]) == ("probe", CHOSEN["probe"])]
    out.append(dict(family="linear probe", name="linear probe", rows=rows, method="probe", bytes=0,
                    with_head=rows[0]["bytes"]))
    for p in out:
        p["val0"] = next((r["val"] for r in p["rows"] if r["seed"] == 0), None)
        p["test"] = [r["test"] for r in p["rows"]]
    return out


def tables(pts: list[dict]) -> str:
    lines = ["| method | rank | bits | file bytes, no head | with fp32 head | with head at the same bits "
             "(file; head share by `stored_bytes`) | val | test |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pts:
        if p["family"] not in ("low-bit FacT", "full-precision FacT"):
            continue
        lowhead = (f"{p['with_lowbit_head']:,} ({p['head_bits_bytes']:,})" if "with_lowbit_head" in p else "-")
        lines.append(f"| {NAMES[p['method']]} | {p['rank']} | {p['bits'] if p['bits'] != 32 else 'fp32'} | "
                     f"{p['bytes']:,} | {p['with_head']:,} | {lowhead} | {ms([r['val'] for r in p['rows']])} | "
                     f"{ms(p['test'])} |")
    lines += ["", "| budget (no head) | low-bit FacT | full-precision FacT | PEFT LoRA | linear probe | "
              "factnet's best vs PEFT LoRA's best (test) |", "|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        best, cells = {}, []
        for family in ("low-bit FacT", "full-precision FacT", "PEFT LoRA", "linear probe"):
            fit = [p for p in pts if p["family"] == family and p["bytes"] <= budget and p["val0"] is not None]
            best[family] = max(fit, key=lambda p: (p["val0"], -p["bytes"])) if fit else None  # tie: fewer bytes
            b = best[family]
            cells.append("none fits" if b is None else
                         f"{b['name']} ({b['bytes']:,} B, val0 {b['val0']:.1f}): test {ms(b['test'])}")
        ours = [best[f] for f in ("low-bit FacT", "full-precision FacT") if best[f]]
        ours = max(ours, key=lambda p: (p["val0"], -p["bytes"])) if ours else None
        lora, probe = best["PEFT LoRA"], best["linear probe"]
        if ours is None:
            verdict = "no factnet point fits"
        elif lora is None:
            gap = statistics.mean(ours["test"]) - statistics.mean(probe["test"])
            verdict = f"no LoRA fits; {ours['name']} is {gap:+.1f} points vs the probe"
        else:
            gap = statistics.mean(ours["test"]) - statistics.mean(lora["test"])
            verdict = f"{ours['name']} {'at or above' if gap >= 0 else 'below'} {lora['name']} by {gap:+.1f} points"
        lines.append(f"| {budget // 1024} KiB ({budget:,} B) | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def head_bits_table() -> str:
    """The runs that trained the head low-bit too (``--head-bits``): bytes with that head, val and test."""
    rows = [r for r in runs(ROOT / "lowbit" / "runs.jsonl") if "val" in r and r.get("head_bits") is not None]
    lines = ["| method | rank | bits / head bits | file bytes, no head | with the low-bit head | val | test |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for setting in sorted({(r["method"], r["rank"], r["bits"], r["head_bits"]) for r in rows}):
        found = [r for r in rows if (r["method"], r["rank"], r["bits"], r["head_bits"]) == setting]
        lines.append(f"| {NAMES[setting[0]]} | {setting[1]} | {setting[2]} / {setting[3]} | {found[0]['bytes']:,} | "
                     f"{found[0]['bytes_with_head']:,} | {ms([r['val'] for r in found])} | "
                     f"{ms([r['test'] for r in found])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(points()) + "\n\n" + head_bits_table())
