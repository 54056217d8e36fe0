"""`frontier._key`: runs keyed before `Method` had ``gain`` and ``bits`` keep their keys (runs.jsonl reuse)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from factnet.app.demo.frontier import SMOKE, WIDE, _key
from factnet.app.demo.methods import Method

METHODS = [
    Method("fact", 1e-2, "tt", 4, 10.0),
    Method("fact", 1e-2, "tucker", 16, gain=1.0),
    Method("peft", 3e-3, "lora", 2, 2.0),
    Method("peft", 1e-2, "vera", 256, options=(("save_projection", False),)),
    Method("linear", 0.3),
    Method("full", 1e-3),
]


def _reference_key(backbone, demo, method: Method, seed: int) -> str:
    """The key as computed before ``bits`` existed: the repr without the field, less an unset gain."""
    old_repr = repr(method).replace(", bits=None", "")  # what repr() gave before the field was added
    described = old_repr.replace(", gain=None)", ")")
    text = json.dumps({"backbone": backbone.config.key(), "recipe": asdict(demo.recipe()), "augment": demo.augment,
                       "method": described, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.settings)
@pytest.mark.parametrize("config", [WIDE, SMOKE.demo.pretrain], ids=["wide", "smoke"])
def test_key_without_bits_unchanged(method, config):
    backbone = SimpleNamespace(config=config)
    for seed in (0, 2):
        assert _key(backbone, SMOKE.demo, method, seed) == _reference_key(backbone, SMOKE.demo, method, seed)
    assert "bits" not in method.settings


def test_bits_changes_the_key_and_is_shown():
    backbone = SimpleNamespace(config=WIDE)
    plain = Method("fact", 1e-2, "tt", 4, gain=1.0)
    keys = {_key(backbone, SMOKE.demo, Method("fact", 1e-2, "tt", 4, gain=1.0, bits=b), 0) for b in (1, 2, 4, 8)}
    assert len(keys) == 4 and _key(backbone, SMOKE.demo, plain, 0) not in keys
    assert "bits 2" in Method("fact", 1e-2, "tt", 4, gain=1.0, bits=2).settings
