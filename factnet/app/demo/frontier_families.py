"""What the frontier measures: the wide backbone (`WIDE`), the settings (`FrontierConfig`, `SMOKE`),
the families of methods and their budgets (`families`), and a table row (`Point`). The protocol is
in `factnet.app.demo.frontier`, which runs them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from factnet.app.demo.backbone import PretrainConfig
from factnet.app.demo.config import DemoConfig
from factnet.app.demo.methods import PEFT_TUNERS, Method, Result

__all__ = ["SMOKE", "WIDE", "Family", "FrontierConfig", "Point", "families", "left_out"]

# The wide backbone: ViT-Ti's width (192, 3 heads of 64) at the demo's depth and pretraining recipe, on 4x4
# patches (4 tokens and the class token: a third of the compute of 2x2 patches, see the module docstring).
WIDE = PretrainConfig(embed_dim=192, depth=4, num_heads=3, patch_size=4)
RANKS = (1, 2, 4, 8, 16, 32, 64)  # every FacT family's budgets


@dataclass(frozen=True)
class FrontierConfig:
    """The backbone, the recipe (``demo``), every family's budgets and candidate settings.

    Budgets are given as each family's own knobs; every budget compares the family's candidates.
    """

    demo: DemoConfig = field(default_factory=lambda: DemoConfig(pretrain=WIDE))  # backbone and recipe
    seeds: int = 3
    linear_lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    full_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    lora_ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    vera_ranks: tuple[int, ...] = (16, 64, 256, 1024)
    vera_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1, 3e-1)
    vblora: tuple[tuple[int, int], ...] = ((2, 16), (4, 64))  # (rank, num_vectors)
    vblora_vector_length: int = 64  # divides every adapted matrix's sides (192, 576, 768)
    vblora_topk: int = 2
    vblora_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    tinylora: tuple[tuple[int, int], ...] = ((2, 4), (8, 64))  # (SVD rank r, trainable u per module)
    tinylora_lrs: tuple[float, ...] = (3e-3, 1e-2, 1e-1)
    fact_ranks: tuple[tuple[str, tuple[int, ...]], ...] = (
        ("tt", RANKS), ("tucker", RANKS), ("cp", RANKS))
    fact_scales: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # the paper's s grid, at the demo's FacT lr


# A configuration that runs in seconds (tests, and `factnet frontier --smoke` to check the pipeline).
SMOKE = FrontierConfig(
    demo=DemoConfig(pretrain=PretrainConfig(embed_dim=16, depth=1, num_heads=2, epochs=2, lr=1e-2, augment=False),
                    epochs=2, warmup_epochs=1, lr=3e-2, augment=False, drop_path=0.0),
    seeds=2, linear_lrs=(0.3,), full_lrs=(1e-3,), lora_ranks=(1, 2), lora_lrs=(1e-2,),
    vera_ranks=(16,), vera_lrs=(3e-2,), vblora=((2, 4),), vblora_vector_length=16,
    vblora_lrs=(3e-2,), tinylora=((2, 4),), tinylora_lrs=(1e-1,),
    fact_ranks=(("tt", (2, 4)), ("tucker", (2,)), ("cp", (4,))), fact_scales=(10.0,))


@dataclass(frozen=True)
class Family:
    """One line of the plot: methods that differ only in their budget, and the candidate settings
    (keyword arguments of `dataclasses.replace` on a `Method`) compared at every budget."""

    name: str
    points: tuple[tuple[str, Method], ...]  # (budget label, method without its chosen setting)
    candidates: tuple[tuple[tuple[str, float], ...], ...]  # each: (("lr", 1e-2),) or (("scale", 10.0),)


@dataclass
class Point:
    """A row of the table: one budget of a family, with its chosen setting and one result per seed."""

    family: str
    budget: str
    method: Method
    candidates: int  # settings compared on validation at this budget
    results: list[Result]

    def test(self) -> tuple[float, float]:
        values = [r.test_accuracy for r in self.results]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def params(self) -> int:
        return self.results[0].params

    @property
    def bytes(self) -> int:
        return self.results[0].bytes

    @property
    def step_ms(self) -> float:
        return statistics.median(r.step_ms for r in self.results)


def families(config: FrontierConfig) -> list[Family]:
    """The families of `config`, in table order."""
    demo = config.demo
    lrs = lambda values: tuple((("lr", v),) for v in values)
    out = [
        Family("linear probe", (("", Method("linear", config.linear_lrs[0])),), lrs(config.linear_lrs)),
        Family("full fine-tuning", (("", Method("full", config.full_lrs[0])),), lrs(config.full_lrs)),
        Family("PEFT LoRA", tuple((f"r {r}", Method("peft", 0.0, "lora", r, float(r))) for r in config.lora_ranks),
               lrs(config.lora_lrs)),
        Family("PEFT VeRA", tuple((f"r {r}", Method("peft", 0.0, "vera", r, options=(("save_projection", False),)))
                                  for r in config.vera_ranks), lrs(config.vera_lrs)),
        Family("PEFT VB-LoRA", tuple(
            (f"r {r}, {n} vectors", Method("peft", 0.0, "vblora", r, options=(
                ("num_vectors", n), ("vector_length", config.vblora_vector_length), ("topk", config.vblora_topk),
                ("save_only_topk_weights", True))))
            for r, n in config.vblora), lrs(config.vblora_lrs)),
        Family("PEFT TinyLoRA", tuple(
            (f"r {r}, u {u}", Method("peft", 0.0, "tinylora", r, options=(("u", u), ("save_projection", False))))
            for r, u in config.tinylora), lrs(config.tinylora_lrs)),
    ]
    out = [f for f in out if f.points[0][1].kind != "peft" or _in_peft(f.points[0][1].format)]
    names = {"tt": "FacT-TT", "tucker": "FacT-TK", "cp": "CP"}
    for fmt, ranks in config.fact_ranks:
        out.append(Family(names.get(fmt, f"FacT-{fmt}"),
                          tuple((f"r {r}", Method("fact", demo.lr, fmt, r, config.fact_scales[0])) for r in ranks),
                          tuple((("scale", s),) for s in config.fact_scales)))
    return out


def _in_peft(tuner: str) -> bool:
    import peft

    return hasattr(peft, PEFT_TUNERS[tuner][0])


def left_out() -> list[str]:
    """The PEFT tuners of the frontier that the installed PEFT lacks (their families are left out)."""
    import peft

    return [f"{PEFT_TUNERS[t][2]} (PEFT {peft.__version__} has no {PEFT_TUNERS[t][0]})"
            for t in ("vera", "vblora", "tinylora") if not _in_peft(t)]
