"""Surgery is never silent: branches that never run are caught; unsupported attention is refused or
skipped on request, and listed."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import assert_same_snapshot, images, make_vit, snapshot
from timm.models.beit import Attention as BeitAttention
from torch import nn

import petl_surgery as ps
from petl_surgery.checkpointing import InputGradients
from petl_surgery.hooks import hook_owner
from petl_surgery.sites import registry
from petl_surgery.statistics import FirstTrainingForwardGuard
from petl_surgery.verification import RunCheck
from petl_surgery.sites.timm_layouts import fused_qkv_in_thirds


def tiny_beit():
    torch.manual_seed(0)
    return timm.create_model("beit_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2).eval()


def test_a_branch_on_a_bypassed_projection_is_caught_on_the_first_forward(monkeypatch):
    # BEiT's attention calls F.linear(x, self.qkv.weight, ...): a layout that ignores this is wrong,
    # and the first forward must say so rather than train nothing.
    monkeypatch.setitem(registry.ATTENTION_LAYOUTS, BeitAttention, fused_qkv_in_thirds)
    model = ps.apply(tiny_beit(), "patt")
    with pytest.raises(ps.BranchNeverRanError, match=r"blocks.0.attn.petl_patt \(its hook on 'blocks.0.attn.qkv'"):
        model(images())


def count_hooks(model):
    """Hooks under ``model``, the first-training-forward guard of the statistics (tests/test_statistics.py) and
    the checkpointing guard (tests/test_checkpointing_modes.py) left out."""
    return sum(
        not isinstance(hook_owner(hook), (FirstTrainingForwardGuard, InputGradients))
        for m in model.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


def test_the_run_check_leaves_only_the_branch_hooks_after_the_first_forward():
    model = ps.apply(make_vit(), "bapat", input="residual")
    branch_hooks = 3 * 4  # per block: PATT on qkv, the adapter's pre-hook on norm2 and hook on drop_path2
    assert count_hooks(model) == 2 * branch_hooks + 1  # a sentinel beside each, one check on the model
    model(images())
    assert count_hooks(model) == branch_hooks
    ps.remove(model)
    assert count_hooks(model) == 0


def test_removing_before_the_first_forward_removes_the_sentinels_too():
    model = ps.apply(make_vit(), "patt")
    ps.apply(model, "adapter")
    ps.remove(model, "patt")
    assert count_hooks(model) == 2 * 4 + 1
    ps.remove(model)
    assert count_hooks(model) == 0


def test_the_run_check_survives_a_deep_copy():
    model = ps.apply(make_vit(), "patt", init="reference")
    clone = copy.deepcopy(model)
    assert torch.equal(clone(images()), model(images()))
    assert not [hook for hook in clone._forward_hooks.values() if isinstance(hook_owner(hook), RunCheck)]


class UnknownAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.mix = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)


class Mixed(nn.Module):
    """A ViT block followed by an attention petl_surgery does not know."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = timm.models.vision_transformer.Block(64, num_heads=2, qkv_bias=True)
        self.other = UnknownAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.block(x))


def test_a_model_with_unknown_attention_is_refused_by_default():
    model = Mixed()
    before = snapshot(model)
    with pytest.raises(ps.SurgeryError, match=r"'other' \(UnknownAttention\).*skip_unsupported=True"):
        ps.apply(model, "patt")
    assert_same_snapshot(before, snapshot(model))


def test_skip_unsupported_operates_on_the_rest_and_summary_lists_what_was_skipped():
    model = ps.apply(Mixed(), "patt", skip_unsupported=True)
    report = ps.summary(model)
    assert [row.path for row in report.rows] == ["block.attn.petl_patt"]
    assert report.unsupported == [
        "other (UnknownAttention): its class is not in the attention registry, so the layout of its "
        "projections is unknown"
    ]
    assert "not operated on (1):" in str(report)


def test_a_block_without_the_needed_projection_is_refused_or_skipped(monkeypatch):
    # An attention whose layout has only k and v (GCViT's global blocks have this shape).
    def kv_only(path, attention):
        site = fused_qkv_in_thirds(path, attention)
        return type(site)(**{**site.__dict__, "projections": {r: site.projections[r] for r in "kv"}})

    from timm.layers import Attention

    monkeypatch.setitem(registry.ATTENTION_LAYOUTS, Attention, kv_only)
    model = make_vit()
    with pytest.raises(ps.SurgeryError, match="mode 'qv' .* needs q from block 0"):
        ps.apply(model, "patt", mode="qv")
    with pytest.raises(ps.SurgeryError, match="can operate on none of the chosen blocks"):
        ps.apply(model, "patt", mode="qv", skip_unsupported=True)
    ps.apply(model, "patt", mode="kv")
    assert len(ps.summary(model).rows) == 4
