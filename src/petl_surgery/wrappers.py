"""The wrappers users put around a model (torch.compile, DistributedDataParallel, DataParallel, FSDP):
surgery refuses them, reading looks through them, and a saved delta never carries their key prefixes."""

from __future__ import annotations

from torch import nn

from .errors import OptionError, UnsupportedModelError


def _kind(model: nn.Module) -> str:
    """"compile", "ddp" (DistributedDataParallel or DataParallel), "fsdp", or "" for a plain module."""
    name = type(model).__name__
    if name == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "compile"
    if name in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), nn.Module):
        return "ddp"
    if name == "FullyShardedDataParallel" or type(model).__name__.startswith("FSDP"):
        return "fsdp"
    return ""


def inner(model: object, changes: bool = True) -> nn.Module:
    """``model`` itself when it is a plain module. A wrapper is refused when surgery would change the
    model (the wrapper was built for the model as it was: compiled code would not see the hooks, DDP's
    reducer would not know the new parameters); for reading, the module inside it."""
    if not isinstance(model, nn.Module):
        raise OptionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    kind = _kind(model)
    if kind == "compile":
        if changes:
            raise UnsupportedModelError(
                f"the model is a torch.compile wrapper (OptimizedModule of {type(model._orig_mod).__name__}): "
                "code it has compiled would not see the surgery. Operate on the original module "
                "(model._orig_mod, or the model before torch.compile), run one forward, then compile it"
            )
        return inner(model._orig_mod, changes)
    if kind == "ddp":
        if changes:
            raise UnsupportedModelError(
                f"the model is wrapped in {type(model).__name__}, which registered its parameters when it was "
                "built: apply surgery to the model before wrapping it (apply, then DistributedDataParallel)"
            )
        return inner(model.module, changes)
    if kind == "fsdp":
        raise UnsupportedModelError(
            f"the model is wrapped in {type(model).__name__}, which shards its parameters: apply surgery before "
            "wrapping it, and save from the unwrapped model on one rank (after gathering a full state dict)"
        )
    return model
