"""Checks every family must pass, for the parametrised sweeps over model families.

For a method on a model, the outcome is either "works", shown by: output unchanged at zero init;
changed with random branch weights; a gradient in every inserted tensor; an exact checkpoint round trip;
and, after optimizer steps in train mode, a frozen base (every buffer as before training) and a delta
that reproduces the trained model in a fresh one (with adapted statistics too, on models that keep
running statistics). Or "refused": a SurgeryError with a message. Never "silently unchanged", never
another exception.

The base is revived first (:func:`revive`): zero-initialised norms and heads would hide branches behind
them, and default running statistics (mean 0, variance 1) would hide which statistics normalise.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

import petl_surgery as ps
from petl_surgery.freezing import head_parameter_names
from petl_surgery.methods import PetlModule
from petl_surgery.patches import temporarily
from petl_surgery.statistics import statistics_modules


def randomize_inserted(model: nn.Module, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PetlModule):
                for parameter in module.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std)


def revive(model: nn.Module) -> nn.Module:
    """Give ``model`` weights as trained ones would be, deterministically (seeded, in parameter order):
    every (near-)zero parameter gets values (norm weights and layer scales around 1, others small), so
    that a zero-init norm (LeViT's ``bn_weight_init=0``, SwinV2's post-norms), a 1e-5 layer scale or a
    zero head (torchvision's) cannot hide a branch; and
    running statistics get a mean and variance other than 0 and 1. Returns ``model``."""
    generator = torch.Generator().manual_seed(4)
    norms = {id(m) for m in model.modules() if "norm" in type(m).__name__.lower() or "bn" in type(m).__name__.lower()}
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                # (near-)zero at init: zero-init norms and heads, and layer scales of 1e-5 or 1e-6
                if parameter.is_floating_point() and parameter.numel() and parameter.abs().max() < 1e-4:
                    noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                    scale_like = (id(module) in norms and name == "weight") or name.split("_")[-1] in ("gamma", "scale")
                    parameter.copy_(1 + 0.1 * noise if scale_like else 0.02 * noise)
        for _, module in statistics_modules(model):
            for name in ("running_mean", "running_var"):
                buffer = module._buffers.get(name)
                if buffer is None:
                    continue
                noise = torch.rand(buffer.shape, generator=generator, dtype=torch.float64)
                buffer.copy_(0.2 * (noise - 0.5) if name == "running_mean" else 0.5 + noise)
    return model


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 2, lr: float = 0.05) -> None:
    """A few optimizer steps in train mode, as users train: SGD on every trainable parameter."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        first_output(model(x)).float().square().mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # steps of at most lr: tiny models must not diverge
        optimizer.step()
    model.eval()


def buffers_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def check_trained_delta(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    method: str,
    tmp_path,
    statistics: str = "frozen",
    **options,
) -> None:
    """The complete-delta contract: apply, randomise the branches, train a few steps in train mode, then
    save, load into a fresh model and compare eval outputs bit for bit. With ``statistics="frozen"`` the
    trained model's base buffers equal the untrained base's; with ``"adapt"`` the statistics moved and
    the delta carries them; either way, removing the surgery gives back the untrained base's buffers."""
    base = revive(build()).eval()
    with torch.no_grad():
        base(x)  # buffers a forward fills in any mode (ConViT's rel_indices cache) are not training state
    untrained = buffers_of(base)
    model = ps.apply(revive(build()).eval(), method, statistics=statistics, **options)
    randomize_inserted(model)
    with torch.no_grad():
        before_training = first_output(model(x)).clone()
    train_steps(model, x)
    with torch.no_grad():
        trained = first_output(model(x)).clone()
    assert torch.isfinite(trained).all(), f"{method}: the harness's training diverged"
    assert not torch.equal(trained, before_training), f"{method}: training in train mode changed nothing"
    now = buffers_of(model)
    moved = [name for name in untrained if not torch.equal(now[name], untrained[name])]
    if statistics == "frozen":
        assert not moved, f"training changed the frozen base's buffers: {moved[:5]}"
    else:
        assert moved, "with statistics='adapt', training in train mode moved no running statistic"
    path = tmp_path / f"{method}-{statistics}-trained.safetensors"
    ps.save(model, path)
    fresh = ps.load(revive(build()).eval(), path)
    with torch.no_grad():
        assert torch.equal(first_output(fresh(x)), trained), "the saved delta does not reproduce the trained model"
    fresh_buffers = buffers_of(fresh)
    assert all(torch.equal(fresh_buffers[name], now[name]) for name in untrained), "load did not restore the buffers"
    ps.remove(model)
    assert all(torch.equal(buffer, untrained[name]) for name, buffer in buffers_of(model).items())


def first_output(output) -> torch.Tensor:
    """The tensor to compare: the output itself, or the first tensor of a tuple/list/dict output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    return first_output(output[0])


WORKS = "works"


def assert_outcome(outcome: str, expected: str) -> None:
    """``outcome`` of :func:`check_method` is ``expected``: "works", or a refusal matching that regex."""
    if expected == WORKS:
        assert outcome == WORKS, outcome
    else:
        assert outcome.startswith("refused: "), outcome
        assert re.search(expected, outcome), f"refusal {outcome!r} does not match {expected!r}"


def check_method(
    build: Callable[[], nn.Module],
    make_input: Callable[[], torch.Tensor],
    method: str,
    tmp_path,
    **options,
) -> str:
    """Run the whole contract for ``method`` on the model ``build()`` makes; returns "works" or the
    refusal's message. ``build`` must return the same base weights each call (seed inside it).

    Methods that declare ``adds_tokens`` (prefix tuning, VPT) add tokens that take part in attention from
    the start, so for them "unchanged at init" is not part of the contract. Methods whose default init is
    near-identity by their paper's design (Houlsby's truncated normal) run it with their declared
    ``identity_options`` unless ``options`` say otherwise; their defaults are specified in their own test
    files."""
    declared = ps.METHODS.get(method)  # None for a name apply is to refuse
    options = {**(declared.identity_options if declared is not None else {}), **options}
    model = revive(build()).eval()
    x = make_input()
    heads = head_parameter_names(model)
    for name, parameter in model.named_parameters():
        # freeze as apply will before the reference run: on some torch versions (2.6) a Linear's float32
        # result moves by ~1e-7 when its weight stops requiring grad (a kernel choice, not surgery)
        parameter.requires_grad_(name in heads)
    with torch.no_grad():
        before = first_output(model(x)).clone()
    try:
        ps.apply(model, method, **options)
    except ps.SurgeryError as refusal:
        assert str(refusal), "a refusal must say why"
        return f"refused: {refusal}"
    with torch.no_grad():
        at_init = first_output(model(x))  # also the first forward: every branch must run
    if declared is not None and not declared.adds_tokens:
        if any(block.attention is not None and block.attention.patches for block in ps.blocks(model)):
            # the site's patches route a fused bias add through the hookable projection (timm's
            # qkv_bias_separate): the same sums in another order, equal up to rounding
            torch.testing.assert_close(at_init, before, rtol=1e-5, atol=1e-6, msg=f"{method} at zero init changed the output")
        else:
            assert torch.equal(at_init, before), f"{method} at zero init changed the output"

    randomize_inserted(model)
    with torch.no_grad():
        changed = first_output(model(x))
    assert not torch.allclose(changed, before), f"{method} with random weights left the output unchanged"

    # Gradients in eval mode: drop-path and dropout would make them random (a whole residual branch can
    # be dropped for the batch), and BatchNorm in train mode cancels shifts shared by the batch.
    # Every inserted tensor is in the graph and every inserted module gets a non-zero gradient; a single
    # tensor's gradient may be exactly zero on a tiny configuration (q of a stage whose tokens are alike).
    first_output(model(x)).float().square().mean().backward()
    for name, parameter in model.named_parameters():
        if ".petl_" in name:
            assert parameter.grad is not None, f"no gradient reached {name}"
        elif not parameter.requires_grad:
            assert parameter.grad is None, f"frozen {name} got a gradient"
    for path, module in model.named_modules():
        if isinstance(module, PetlModule):
            assert any(p.grad.abs().sum() > 0 for p in module.parameters()), f"{path} got only zero gradients"

    path = tmp_path / f"{method}.safetensors"
    ps.save(model, path)
    fresh = ps.load(revive(build()).eval(), path)
    with torch.no_grad():
        assert torch.equal(first_output(fresh(x)), changed), "checkpoint round trip is not exact"

    check_trained_delta(build, x, method, tmp_path, **options)
    if statistics_modules(model):
        check_trained_delta(build, x, method, tmp_path, statistics="adapt", **options)
    return "works"


def attention_inputs(model: nn.Module, x: torch.Tensor) -> Dict[str, tuple]:
    """The (args, kwargs) of the first call of every block's attention during one forward."""
    calls: Dict[str, tuple] = {}
    handles = []
    for block in ps.blocks(model):
        site = block.attention
        if site is None:
            continue

        def hook(module, args, kwargs, path=site.path):
            calls.setdefault(path, (args, kwargs))

        handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return calls


def site_patched(site):
    """The site's attribute patches in place (a forward that calls the hookable producer), as during surgery."""
    return temporarily(site.module, dict(site.patches))


def shifted_output(
    site, args, kwargs, role: Optional[str], constant: float = 0.7, readout: Optional[str] = None
) -> torch.Tensor:
    """The attention's output with ``constant`` added to the channels the layout says hold ``role``; with
    ``readout``, the input of that submodule of the attention instead (its output projection, say)."""
    handles = []
    seen = []
    if readout is not None:
        handles.append(site.module.get_submodule(readout).register_forward_pre_hook(lambda m, i: seen.append(i[0])))
    if role is not None:
        projection = site.projections[role]
        producer = site.producer(projection.module)

        def add(module, inputs, output):
            output = output.clone()
            if projection.index is None:
                output.narrow(site.channel_dim, projection.start, projection.width).add_(constant)
            else:
                index = torch.tensor(projection.index, device=output.device)
                output.index_add_(
                    site.channel_dim, index, torch.full_like(output.index_select(site.channel_dim, index), constant)
                )
            return output

        handles.append(producer.register_forward_hook(add))
    try:
        with torch.no_grad(), site_patched(site):
            output = first_output(site.module(*args, **kwargs))
        return seen[0] if readout is not None else output
    finally:
        for handle in handles:
            handle.remove()


def check_layout(
    model: nn.Module, x: torch.Tensor, roles: Tuple[str, ...] = ("k", "v"), readout: Optional[str] = None
) -> int:
    """The layout self-check of timm-families.md, in float64, on every attention whose layout says it
    is a softmax over tokens: a constant added to the k slice leaves the output unchanged; one added to
    the v slice moves every token's output by the same vector. Returns the number of sites checked.

    ``roles`` limits the check where one half cannot hold (cosine attention normalises k away from a
    constant shift); ``readout`` reads at the input of that submodule (the output projection) where
    what follows the attention product is not linear per token."""
    model = copy.deepcopy(model).double().eval()
    calls = attention_inputs(model, x.double())
    checked = 0
    for block in ps.blocks(model):
        site = block.attention
        if site is None or site.unsupported is not None or site.path not in calls:
            continue
        args, kwargs = calls[site.path]
        base = shifted_output(site, args, kwargs, None, readout=readout)
        if "k" in roles and "k" in site.projections:
            shifted = shifted_output(site, args, kwargs, "k", readout=readout)
            torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-9)
        if "v" in roles and "v" in site.projections:
            moved = (shifted_output(site, args, kwargs, "v", readout=readout) - base).movedim(site.channel_dim, -1)
            moved = moved.reshape(-1, moved.shape[-1])
            assert moved.abs().max() > 1e-6, f"{site.path}: a shift of v did not move the output"
            torch.testing.assert_close(moved, moved[:1].expand_as(moved), rtol=1e-7, atol=1e-7)
        checked += 1
    return checked


def check_patt_parity(build: Callable[[], nn.Module], make_input: Callable[[], torch.Tensor], mode: str = "kv",
                      dtype: torch.dtype = torch.float64) -> int:
    """PATT on ``build()`` equals an untouched copy of the model whose q/k/v producers get the V-PETL
    equations added by plain hooks, ``h = tanh(x A + a)``, ``[D1|D2] = h B + b``, at the channels the
    layout names (which :func:`check_layout` verifies independently). In ``dtype`` (float64, or float32
    for a model that cannot run in float64); returns sites compared."""
    tolerance = 1e-9 if dtype == torch.float64 else 1e-5
    model = build().to(dtype).eval()
    base = copy.deepcopy(model)
    ps.apply(model, "patt", mode=mode, scale=0.6)
    randomize_inserted(model, std=0.1)
    handles = []
    patched = contextlib.ExitStack()
    compared = 0
    for block, base_block in zip(ps.blocks(model), ps.blocks(base)):
        site, base_site = block.attention, base_block.attention
        branch = getattr(site.module, "petl_patt", None) if site is not None else None
        if branch is None:
            continue
        roles = {"kv": "kv", "qv": "qv", "qk": "qk", "qkv": "qkv"}[mode]
        patched.enter_context(site_patched(base_site))  # the base copy calls its producers as surgery does
        offset = 0
        for role in roles:
            projection = base_site.projections[role]
            A, B = branch.down.weight, branch.up.weight[offset : offset + projection.width]
            a = branch.down.bias
            b = branch.up.bias[offset : offset + projection.width] if branch.up.bias is not None else None
            offset += projection.width

            def add(module, inputs, output, projection=projection, A=A, a=a, B=B, b=b):
                x = inputs[0].movedim(base_site.channel_dim, -1)
                h = torch.tanh(x @ A.T + (a if a is not None else 0))
                delta = (h @ B.T + (b if b is not None else 0)).movedim(-1, base_site.channel_dim)
                output = output.clone()
                if projection.index is None:
                    output.narrow(base_site.channel_dim, projection.start, projection.width).add_(0.6 * delta)
                else:
                    index = torch.tensor(projection.index, device=output.device)
                    output.index_add_(base_site.channel_dim, index, 0.6 * delta)
                return output

            handles.append(base_site.producer(projection.module).register_forward_hook(add))
        compared += 1
    x = make_input().to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(x)), first_output(base(x)), rtol=tolerance, atol=tolerance)
    return compared
