"""What factnet's default targets find in each family of the test zoo (tests/zoo.py).

    python benchmarks/zoo_table.py [--rank 8] [--format tt] [FAMILY ...]

Prints a markdown table: family, model class, slices, groups (name: n×d_in×d_out) and the factor
parameters ``Tensorizer(model).num_parameters(format, rank)`` (at the largest rank ≤ ``--rank`` that
the format allows on every group, marked when lower). Models are the zoo's tiny random configs:
nothing is downloaded, nothing is trained.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))

import factnet  # noqa: E402
from zoo import FAMILIES  # noqa: E402


def row(name: str, fmt: str, rank: int) -> list[str]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build()
    tensorizer = factnet.Tensorizer(model, family.targets)
    shapes = tensorizer.group_shapes()
    spec = factnet.get_format(fmt, rank)
    usable = min([rank, *(spec.max_rank(*shape) for shape in shapes.values())])
    groups = ", ".join(f"{g}: {n}×{i}×{o}" for g, (n, i, o) in shapes.items())
    count = f"{tensorizer.num_parameters(fmt, usable):,}" + ("" if usable == rank else f" (r{usable})")
    return [name, type(model).__name__, str(len(tensorizer.slices)), groups, count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"default: all {len(FAMILIES)}")
    parser.add_argument("--format", default="tt", choices=factnet.available_formats())
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    header = ["family", "model class", "slices", "groups (name: n×d_in×d_out)",
              f"{args.format.upper()} r{args.rank} parameters"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 3 + ["---", "---:"]) + "|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.families or FAMILIES:
            print("| " + " | ".join(row(name, args.format, args.rank)) + " |")


if __name__ == "__main__":
    main()
