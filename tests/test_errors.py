"""The exception hierarchy: refusals before any change are SurgeryErrors of a kind users can catch by type;
checks that fail during a forward are SurgeryRuntimeErrors, which promise nothing about the model."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import images, make_vit

import petl_surgery as ps


def test_the_two_families_are_apart() -> None:
    for kind in (ps.OptionError, ps.UnsupportedModelError, ps.UnsupportedBlockError, ps.CheckpointError):
        assert issubclass(kind, ps.SurgeryError) and issubclass(kind, ValueError)  # ValueError: as before
        assert not issubclass(kind, ps.SurgeryRuntimeError)
    assert issubclass(ps.UnsupportedBlockError, ps.UnsupportedModelError)
    for kind in (ps.BranchNeverRanError, ps.StatefulBaseError):
        assert issubclass(kind, ps.SurgeryRuntimeError) and issubclass(kind, RuntimeError)
        assert not issubclass(kind, ps.SurgeryError)


@pytest.mark.parametrize(
    "call",
    [
        lambda model: ps.apply(model, "pat"),
        lambda model: ps.apply(model, "lora", rank=0),
        lambda model: ps.apply(model, "lora", ranks=2),
        lambda model: ps.apply(model, "patt", layers=[4]),
        lambda model: ps.apply(model, "patt", statistics="moving"),
        lambda model: ps.apply(model, "patt", unfreeze=["(unclosed"]),
        lambda model: ps.apply(model, "fact", branch_dtype=torch.float32),
    ],
    ids=["unknown method", "rank 0", "unknown option", "layer out of range", "statistics", "unfreeze", "branch_dtype"],
)
def test_wrong_arguments_are_option_errors(call) -> None:
    with pytest.raises(ps.OptionError):
        call(make_vit())


def test_a_model_without_blocks_is_an_unsupported_model() -> None:
    with pytest.raises(ps.UnsupportedModelError, match="found no transformer block"):
        ps.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), "patt")


def _transformers_vit() -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, patch_size=8))


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(2,),
                             num_heads=(1,), num_classes=3)


@pytest.mark.parametrize(
    "build, method, options, message",
    [
        (_swin, "vpt", {}, "prompt tokens cannot be added to SwinTransformer"),
        (_transformers_vit, "convpass", {}, "does not know where it is"),
        (make_vit, "lora", {"modules": r"blocks\.0\.norm1"}, "which is not an nn.Linear"),
    ],
    ids=["prompts on a hierarchical model", "convpass without a known grid", "LoRA on a LayerNorm"],
)
def test_a_model_a_method_cannot_operate_on_is_an_unsupported_model(build, method, options, message) -> None:
    model = build()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ps.UnsupportedModelError, match=message):
        ps.apply(model, method, **options)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_block_without_the_site_a_method_needs_is_an_unsupported_block() -> None:
    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=3)
    with pytest.raises(ps.UnsupportedBlockError, match=r"method 'patt' needs an attention in block 0"):
        ps.apply(convnext, "patt")


def test_a_file_that_is_not_a_delta_is_a_checkpoint_error(tmp_path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ps.CheckpointError, match="not a safetensors file"):
        ps.load(make_vit(), path)


def test_a_delta_of_another_model_is_a_checkpoint_error(tmp_path) -> None:
    ps.save(ps.apply(make_vit(), "lora"), tmp_path / "lora.safetensors")
    with pytest.raises(ps.CheckpointError, match="lora"):
        ps.load(make_vit(embed_dim=32), tmp_path / "lora.safetensors")


def test_a_check_that_fails_in_a_forward_is_a_runtime_error_not_a_surgery_error() -> None:
    model = ps.apply(make_vit(), "prefix", length=4)
    model.blocks[2].attn.fused_attn = False  # its inline path: no SDPA call to take the prefix
    with pytest.raises(ps.SurgeryRuntimeError) as raised:
        model(images())
    assert not isinstance(raised.value, ps.SurgeryError)


def test_a_branch_that_never_ran_is_a_runtime_error() -> None:
    model = ps.apply(make_vit(), "patt")
    model.blocks[1].attn.forward = lambda x, **kwargs: x  # the attention stops calling its projections
    with pytest.raises(ps.BranchNeverRanError) as raised:
        model(images())
    assert isinstance(raised.value, RuntimeError) and not isinstance(raised.value, ValueError)
