"""The model holds factnet's machinery (stand-ins, adapted classes, hooks) only while an adapter can act.

On every family of the zoo: merged for serving (eval mode) or with no adapter active, the model's
modules are the base model's own, of the same types and with the same
hooks, and it computes what the merged weights or the base weights give; in training mode, unmerged,
or with an adapter active again, the machinery is back and the adapter acts as before. Parameters
replaced while one side is in the model reach the other. The increments a forward looks up are the
factors' as they are, in the grad mode the matrix runs in.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_close, randomize_factors
from zoo import FAMILIES, inputs, prototype, run

import factnet
from factnet import FactnetError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


def _structure(model: torch.nn.Module) -> dict:
    """Each module's type, its hooks and any forward set on it (what a bare model shares with the base model)."""
    return {name: (type(m), list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()),
                   vars(m).get("forward")) for name, m in model.named_modules() if not name.startswith("factnet")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_in_eval_disabled_or_idle_the_model_is_the_base_model(family):
    model = prototype(family).eval()
    args, kwargs = inputs(family)
    base_structure, base_out = _structure(model), run(model, args, kwargs)
    adapter = factnet.Tensorizer(model, FAMILIES[family].targets).decompose("tt", rank=2, scale=1.5, train_head=False)
    randomize_factors(adapter, seed=3)
    adapted_out = run(model, args, kwargs)
    assert _structure(model) != base_structure  # acting: stand-ins and hooks are in

    adapter.merge()
    assert _structure(model) == base_structure
    assert_close(run(model, args, kwargs), adapted_out, 1e-9, f"{family} merged")
    model.train()  # training a merged adapter must raise in backward: the machinery is back to say so
    assert _structure(model) != base_structure
    with pytest.raises(FactnetError, match="merged"):
        run(model, args, kwargs).sum().backward()
    model.eval()
    assert _structure(model) == base_structure
    with model.factnet.disable():  # unmerged meanwhile: the adapter acts, but not in this thread's forwards
        assert _structure(model) != base_structure
        assert_close(run(model, args, kwargs), base_out, 1e-12, f"{family} disabled")  # (unmerge rounds)
    adapter.unmerge()
    assert _structure(model) != base_structure
    assert_close(run(model, args, kwargs), adapted_out, 1e-9, f"{family} unmerged")

    model.factnet.activate(None)
    assert _structure(model) == base_structure
    assert_close(run(model, args, kwargs), base_out, 1e-12, f"{family} no adapter active")
    adapter.activate()
    assert_close(run(model, args, kwargs), adapted_out, 1e-12, f"{family} active again")
    adapter.detach()
    assert _structure(model) == base_structure


def test_parameters_replaced_on_either_side_reach_the_other(vit, images):
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=2.0, train_head=False)
    randomize_factors(adapter, seed=1)
    other = {k: torch.randn_like(v) for k, v in vit.state_dict().items() if not k.startswith("factnet.")}
    vit.factnet.activate(None)  # the originals are in the model: new parameters go to them
    vit.load_state_dict(other, strict=False, assign=True)
    base_out = vit(images)
    adapter.activate()  # ... and the stand-ins act on them
    with vit.factnet.disable():
        assert torch.equal(vit(images), base_out)
    assert vit.blocks[0].attn.qkv.weight is vit.get_parameter("blocks.0.attn.qkv.weight")
    assert torch.equal(vit.get_parameter("blocks.0.attn.qkv.weight"), other["blocks.0.attn.qkv.weight"])
    again = {k: torch.randn_like(v) for k, v in other.items()}
    vit.load_state_dict(again, strict=False, assign=True)  # now the stand-ins are in
    model = adapter.detach()
    assert torch.equal(model.get_parameter("blocks.0.attn.qkv.weight"), again["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_factors_changed_between_forwards_or_a_block_run_alone_use_the_factors_as_they_are(vit, images):
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=2.0)
    randomize_factors(adapter, seed=1)
    tokens = vit.patch_embed(images)
    vit(images)
    randomize_factors(adapter, seed=2)  # in place, after a forward built its increments
    first_block = vit.blocks[0](tokens)  # outside the model's forward
    out = vit(images)
    adapter.merge()
    assert_close(vit.blocks[0](tokens), first_block, 1e-10, "a block alone")
    assert_close(vit(images), out, 1e-10, "the whole model")


class _GradInside(torch.nn.Module):
    """Runs ``inner`` with grad enabled whatever the caller's mode (as test-time adaptation does)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.enable_grad():
            return self.inner(x)


def test_a_block_that_turns_grad_on_inside_a_no_grad_forward_trains(vit, images):
    adapter = factnet.Tensorizer(vit, ["blocks.0.attn.qkv"]).decompose("tt", rank=2, scale=2.0, train_head=False)
    randomize_factors(adapter, seed=1)
    vit.blocks[0] = _GradInside(vit.blocks[0])
    outputs = []
    vit.blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():  # the increments built as the forward started are the no-grad ones
        vit(images)
    outputs[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())


def test_copies_of_a_bare_model_act_again_on_their_own_weights(vit, images):
    adapter = factnet.Tensorizer(vit).decompose("tt", rank=2, scale=2.0, train_head=False)
    randomize_factors(adapter, seed=1)
    adapted_out = vit(images)
    adapter.merge()  # eval mode: bare
    buffer = io.BytesIO()
    torch.save(vit, buffer)
    for clone in (copy.deepcopy(vit), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert type(clone.blocks[0].attn.qkv) is torch.nn.Linear
        clone.factnet.active_adapter.unmerge()
        assert type(clone.blocks[0].attn.qkv).__name__ == "AdaptedMatrix"
        assert clone.blocks[0].attn.qkv.weight is not vit.blocks[0].attn.qkv.weight
        assert_close(clone(images), adapted_out, 1e-12, "copy unmerged")
    assert type(vit.blocks[0].attn.qkv) is torch.nn.Linear  # the original stays merged and bare
    assert_close(vit(images), adapted_out, 1e-12, "original")


class _ReadsItsChild(torch.nn.Module):
    """Reads its child's weight as an attribute (as BEiT's attention reads ``qkv.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias).tanh()


def _reading_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(_ReadsItsChild(), _ReadsItsChild(), torch.nn.Linear(8, 2)).eval()


def test_a_forward_set_on_a_reader_keeps_running_and_comes_back_when_bare():
    model, x, calls = _reading_model(), torch.randn(3, 8), []
    own = model[0].forward
    model[0].forward = lambda *args: calls.append(1) or own(*args)
    set_before = vars(model[0])["forward"]
    adapter = factnet.Tensorizer(model, ["0.fc", "1.fc"]).decompose("tt", rank=2, scale=2.0, train_head=False)
    randomize_factors(adapter, seed=2)
    adapted = model(x)
    assert len(calls) == 1 and vars(model[0])["forward"] is not set_before  # factnet's, around the one set
    adapter.merge()  # eval: bare, the forward set before is back
    assert vars(model[0])["forward"] is set_before and "forward" not in vars(model[1])
    assert_close(model(x), adapted, 1e-6, "merged")  # (float32)
    assert len(calls) == 2


def test_copies_of_an_acting_model_read_their_own_weights():
    model, x = _reading_model(), torch.randn(3, 8)
    adapter = factnet.Tensorizer(model, ["0.fc", "1.fc"]).decompose("tt", rank=2, scale=2.0, train_head=False)
    randomize_factors(adapter, seed=2)
    adapted = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copies = [copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()  # the original's increments are zero now; the copies keep theirs
    for clone in copies:
        assert vars(clone[0])["forward"].module is clone[0]
        assert_close(clone(x), adapted, 1e-6, "copy")
        clone.factnet.active_adapter.merge()
        assert_close(clone(x), adapted, 1e-6, "copy merged")
    assert not torch.allclose(model(x), adapted)
