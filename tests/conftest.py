"""Tiny real timm models (configurations from ../shared/docs/timm-families.md) and shared checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

import pytest
import timm
import torch
from torch import nn

# Under pytest-xdist (pyproject's addopts: a worker per core), each worker takes its share of the cores:
# torch's default of every core per process would oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

VIT_FAMILY: Dict[str, Callable[..., nn.Module]] = {
    "vit": lambda **kw: timm.create_model(
        "vit_small_patch16_224", **{"img_size": 64, "embed_dim": 64, "depth": 4, "num_heads": 2, **kw}
    ),
    "deit_distilled": lambda **kw: timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2, **kw
    ),
    "deit3": lambda **kw: timm.create_model(
        "deit3_small_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2, **kw
    ),
    "clip": lambda **kw: timm.create_model(
        "vit_base_patch16_clip_224", img_size=64, embed_dim=64, depth=2, num_heads=2, **kw
    ),
    "dinov2_registers": lambda **kw: timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=64, depth=2, num_heads=2, **kw
    ),
}

def _maxvit_nchw(**kw) -> nn.Module:
    """MaxViT with attention kept in NCHW (``use_nchw_attn``: PartitionAttention2d, 1x1-conv qkv)."""
    import dataclasses

    from timm.models import maxxvit

    cfg = maxxvit.model_cfgs["maxvit_nano_rw"]
    transformer = dataclasses.replace(cfg.transformer_cfg, use_nchw_attn=True, dim_head=16)
    cfg = dataclasses.replace(cfg, embed_dim=(32, 64, 128, 256), depths=(1, 1, 1, 1), transformer_cfg=transformer)
    return maxxvit.MaxxVit(cfg, img_size=64, **kw)


# Variants that exercise the rarer registered classes: post-norm blocks, the gated MLP, NCHW attention.
VARIANTS: Dict[str, Callable[..., nn.Module]] = {
    "vit_res_post": lambda **kw: timm.create_model(
        "vit_small_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2,
        block_fn=timm.models.vision_transformer.ResPostBlock, **kw
    ),
    "vit_gated_mlp": lambda **kw: timm.create_model(
        "vit_small_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2, mlp_layer=timm.layers.GatedMlp, **kw
    ),
    "eva02_post_norm": lambda **kw: timm.create_model(
        "eva02_tiny_patch14_224", img_size=56, embed_dim=64, depth=2, num_heads=2, use_post_norm=True,
        use_rot_pos_emb=False, **kw
    ),
    "maxvit_nchw": _maxvit_nchw,
}

INPUT_SIZE = {"dinov2_registers": 56, "eva02_post_norm": 56}


def make_vit(**kwargs) -> nn.Module:
    """ViT-S/16 shrunk to width 64, depth 4, two heads, 64 px input, 5 classes."""
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 5)
    return VIT_FAMILY["vit"](**kwargs).eval()


def make_swin(**kwargs) -> nn.Module:
    """Swin-T shrunk: 64 px, window 4, width 32, depths (2, 2, 2, 2): stages 0 and 1 shift windows."""
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 5)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=64,
        window_size=4,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        **kwargs,
    ).eval()


def make_family(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 5)
    if name == "swin":
        return make_swin(**kwargs)
    return {**VIT_FAMILY, **VARIANTS}[name](**kwargs).eval()


def images(name: str = "vit", batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = INPUT_SIZE.get(name, 64)
    return torch.randn(batch, 3, size, size, generator=generator).to(dtype)


def randomize(module: nn.Module, std: float = 0.2) -> None:
    """Give every parameter of ``module`` random values (zero-initialised branches would hide bugs)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)


def perturb_inserted(model: nn.Module, std: float = 0.1, seed: int = 5) -> nn.Module:
    """Add seeded noise to every inserted tensor (names containing ``petl_``), keeping inits' structure
    (DoRA's magnitudes stay near the row norms); returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "petl_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64).to(parameter.dtype) * std)
    return model


def assert_merges_to_plain(model: nn.Module, build: Callable[[], nn.Module], x: torch.Tensor, tol: float = 1e-5) -> None:
    """``merge`` keeps the outputs (up to ``tol``) and leaves exactly the state_dict of the plain model
    ``build()`` makes, which then computes the same."""
    import petl_surgery as ps

    unmerged = model(x)
    ps.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=tol, atol=tol)
    plain = build()
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain(x), model(x))


def snapshot(model: nn.Module) -> dict:
    """Everything surgery could change: module tree, tensors, requires_grad flags and hooks."""
    return {
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
        ],
        "attributes": sorted(vars(model)),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["state"].keys() == after["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][name]), name
    assert before["flags"] == after["flags"]
    assert before["hooks"] == after["hooks"]
    assert before["attributes"] == after["attributes"]


@pytest.fixture
def vit() -> nn.Module:
    return make_vit()


@pytest.fixture
def swin() -> nn.Module:
    return make_swin()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A generated ImageFolder: 3 classes of 6 PNGs (a dominant colour each)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for k, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(6):
            pixels = torch.rand(20, 20, 3, generator=generator) * 80
            pixels[..., k] += 150
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


def _coloured_images(root: Path, counts: Dict[str, int], seed: int = 0) -> Dict[int, list]:
    """8x8 PNGs under root/images, a dominant colour per class: {class index: [relative paths]}."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    paths: Dict[int, list] = {}
    for k in range(3):
        for split, count in counts.items():
            for i in range(count):
                pixels = torch.rand(8, 8, 3, generator=generator) * 80
                pixels[..., k] += 150
                relative = f"images/c{k}_{split}_{i}.png"
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / relative)
                paths.setdefault(k, []).append((split, relative))
    return paths


@pytest.fixture(scope="session")
def vtab_folder(tmp_path_factory) -> Path:
    """A generated VTAB-1k layout: 3 classes, 4 train800, 2 val200 and 3 test images each."""
    root = tmp_path_factory.mktemp("vtab")
    paths = _coloured_images(root, {"train": 4, "val": 2, "test": 3})
    lists = {"train800": ["train"], "val200": ["val"], "train800val200": ["train", "val"], "test": ["test"]}
    for name, splits in lists.items():
        lines = [f"{path} {k}" for k, entries in paths.items() for split, path in entries if split in splits]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def fgvc_folder(tmp_path_factory) -> Path:
    """A generated FGVC layout as VPT's CUB: paths relative to images/, labels 10, 20, 30; 4 train, 2
    val and 3 test images per class."""
    import json

    root = tmp_path_factory.mktemp("fgvc")
    paths = _coloured_images(root, {"train": 4, "val": 2, "test": 3}, seed=1)
    for split in ("train", "val", "test"):
        entries = {path[len("images/"):]: 10 * (k + 1) for k, items in paths.items() for s, path in items if s == split}
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root
