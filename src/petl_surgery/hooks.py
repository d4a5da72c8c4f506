"""Finding and removing the forward hooks an object registered, without keeping handles.

Hooks are bound methods (or partials of bound methods) of the object that owns them, so a deep copy or a
pickled model carries them along and they can still be found by owner.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Tuple

from torch import nn


def hook_owner(hook: Callable[..., Any]) -> Any:
    func = getattr(hook, "func", hook)  # functools.partial of a bound method
    return getattr(func, "__self__", None)


def owned_hooks(root: nn.Module, owner_type: type) -> Iterator[Tuple[nn.Module, Any]]:
    """(module, owner) for every hook under ``root`` whose owner is an instance of ``owner_type``."""
    for module in root.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in list(hooks.values()):
                owner = hook_owner(hook)
                if isinstance(owner, owner_type):
                    yield module, owner


def remove_hooks_of(root: nn.Module, owner: object) -> None:
    """Remove every forward and forward-pre hook under ``root`` that ``owner`` registered."""
    for module in root.modules():
        for hooks, extras in (
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        ):
            for hook_id in [hook_id for hook_id, hook in hooks.items() if hook_owner(hook) is owner]:
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)
