"""Whether a file fits the model (`factnet.file.compat`): the wrong model, head, dtype or format rejected with
what differs, crafted version-2 specs rejected, the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_vit
from io_support import rejected, rewrite_spec, saved, saved_v2  # noqa: F401 (saved, saved_v2: fixtures)
from legacy_files import save_legacy

import factnet
import factnet.file.info
import factnet.file.spec

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the wrong model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved_on, loaded_on, named", [
    (dict(depth=2), dict(depth=3), ("with 8 matrices outside the head (fingerprint {saved}), this model has 12 "
                                    "(fingerprint {model}); the 8 matrices it adapts match; this model also has 4 "
                                    "matrices named like those but not in the file's slice map: blocks.2.attn.qkv: "
                                    "linear 144x48;")),
    (dict(depth=3), dict(depth=2), ("of the 12 matrices it adapts, 4 differ (d_out x d_in): blocks.2.attn.qkv: saved "
                                    "blocks 0-2 of 48x48, model has missing")),
    (dict(), dict(embed_dim=60), "blocks.0.attn.qkv: saved blocks 0-2 of 48x48, model has linear 180x60"),
    (dict(mlp_ratio=4.0), dict(mlp_ratio=2.0), "blocks.0.mlp.fc1: saved blocks 0-3 of 48x48, model has linear 96x48"),
], ids=["deeper", "shallower", "wider", "narrower-mlp"])
@pytest.mark.parametrize("version", [2, 4])
def test_wrong_model_lists_the_first_mismatches(tmp_path, saved_on, loaded_on, named, version):
    """A file keeps the base model's fingerprint and count: the message gives both, and which of the matrices
    the file adapts (its slice map: version 2's, or version 4's when it lists one) the model lacks or has of
    another shape."""
    torch.manual_seed(0)
    tensorizer = factnet.Tensorizer(tiny_vit(**saved_on))
    path = tmp_path / "a.safetensors"
    if version == 2:
        save_legacy(tensorizer.decompose("tt", rank=2), path)
    else:  # (the default targets, in a group of another name than by shape: listed)
        tensorizer.group({"all": "*"}).decompose("tt", rank=2).save(path)
        assert list(factnet.file.info.load_spec(path)["groups"]) == ["all"]
    fingerprints = {"saved": factnet.file.info.load_spec(path)["base"]["sha256"],
                    "model": factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(tiny_vit(**loaded_on), ["head"]))}
    message = rejected(tiny_vit(**loaded_on), path, "does not fit this model")
    assert named.format(**fingerprints) in message and "same depth, width and module names" in message
    if "embed_dim" in loaded_on:
        assert "8 differ" in message and "and 3 more" in message  # 8 matrices differ, 5 listed


@pytest.mark.parametrize("saved_on, loaded_on", [(dict(depth=2), dict(depth=3)), (dict(), dict(embed_dim=60))])
def test_wrong_model_of_a_file_of_the_default_targets(tmp_path, saved_on, loaded_on):
    """A version-4 file of the default targets grouped by shape lists no matrix: the message gives the counts
    and fingerprints, and says which slices the file adapts."""
    torch.manual_seed(0)
    path = tmp_path / "a.safetensors"
    factnet.Tensorizer(tiny_vit(**saved_on)).decompose("tt", rank=2).save(path)
    saved = factnet.file.info.load_spec(path)["base"]
    model = factnet.file.spec.fingerprint(factnet.file.spec.base_matrices(tiny_vit(**loaded_on), ["head"]))
    message = rejected(tiny_vit(**loaded_on), path, "does not fit this model")
    assert (f"it was saved from a base model with 8 matrices outside the head (fingerprint {saved['sha256']}), this "
            f"model has {12 if 'depth' in loaded_on else 8} (fingerprint {model}); it adapts that model's default "
            "targets (grouped by shape); load it onto the architecture it was saved from") in message


def test_wrong_head_size_with_head(tmp_path):
    torch.manual_seed(0)
    factnet.Tensorizer(tiny_vit()).decompose("tt", rank=2).save(tmp_path / "a.safetensors")
    message = rejected(tiny_vit(num_classes=7), tmp_path / "a.safetensors", "does not hold the tensors")
    assert "head.head.weight: expected (7, 48), got (5, 48)" in message


def test_dtype_mismatch(saved):
    base, path, *_ = saved
    rejected(copy.deepcopy(base).double(), path, "torch.float32 tensors but the model would take torch.float64")


def test_not_a_module(saved):
    _, path, *_ = saved
    with pytest.raises(factnet.FactnetError, match="nn.Module"):
        factnet.load({"weight": torch.ones(1)}, path)


# ---- crafted version-2 specs (valid checksum; version 4's: tests/test_file_packs.py) -----------------------
@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(factnet_format_version=5), "factnet_format_version 5.*upgrade factnet"),
    (lambda s: s.update(factnet_format_version="2"), "malformed factnet spec"),
    (lambda s: s.update(factnet_format_version=1), "malformed factnet spec"),
    (lambda s: s.update(format="block-term"), "'block-term' is not registered"),
    (lambda s: s.update(factors={"sigma": "iab", "u": "ja", "w": "kb"}), "registered with factors"),
    (lambda s: s.update(rank=0), "rank must be a positive integer"),
    (lambda s: s.update(rank=5), "does not hold the tensors"),
    (lambda s: s.update(scale=float("nan")), "scale must be a finite number"),
    (lambda s: s.pop("groups"), "malformed factnet spec"),
    (lambda s: s.update(groups={}), "at least one group"),
    (lambda s: s.update(dropout=1.5), "dropout must be in"),
    (lambda s: _slices(s).__setitem__(1, "proj[0]"), "slice map of group .*proj is whole here, cut into blocks in the file"),
    (lambda s: _slices(s).__setitem__(0, "qkv[0-1,7]"), "has blocks"),
    (lambda s: _slices(s).__setitem__(1, "ghost"), "slice map does not match this model.*matches no weight"),
    (lambda s: _slices(s).__setitem__(0, "qkv[0-1]"), "stand for 11 slices.* has 12"),
    (lambda s: s.update(head_parameters=["qkv.weight"]), "malformed factnet spec"),
], ids=["newer-version", "version-type", "version-1-layout", "unknown-format", "factor-letters", "rank-0", "rank-5",
        "nan-scale", "no-groups", "empty-groups", "dropout", "cut", "block", "unlisted-module", "count",
        "extra-key"])
def test_crafted_spec(saved_v2, edit, match):
    base, path = saved_v2
    assert factnet.file.info.load_spec(path)["groups"]["4x4"]["slices"] == ["qkv[0-2]", "proj", "fc1[0-3]", "fc2[0-3]"]
    rewrite_spec(path, edit)
    rejected(copy.deepcopy(base), path, match)


def _slices(spec: dict) -> list:
    return next(iter(spec["groups"].values()))["slices"]


def test_crafted_backbone_as_head(saved_v2):
    """The head parameters are the file's head.* tensors: one named for a backbone parameter is rejected."""
    base, path = saved_v2
    rewrite_spec(path, lambda s: None, rename={"head.head.weight": "head.qkv.weight"})
    message = rejected(copy.deepcopy(base), path, "the model's head")
    assert "['head.bias', 'head.weight'], but" in message and "['head.bias', 'qkv.weight']" in message
