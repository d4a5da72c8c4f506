"""``apply``, ``save``, ``merge`` and ``remove`` as the package exports them: the single-task functions,
with ``name=`` for named tasks, and refusing by name what a model carrying named tasks cannot take."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import nn

from ..api import apply as apply_surgery, merge as merge_surgery, remove as remove_surgery
from ..checkpoints.delta import save as save_delta
from ..checkpoints.files import PathLike
from .named import apply_task, save_task, task_names
from .routing import TaskError


def _refuse_unnamed(model: nn.Module, what: str) -> None:
    names = task_names(model)
    if names:
        raise TaskError(
            f"the model carries named tasks ({', '.join(names)}); {what} (see petl_surgery.tasks)"
        )


def apply(model: nn.Module, method: str, *, name: Optional[str] = None, **options: Any) -> nn.Module:
    """:func:`petl_surgery.api.apply`; with ``name``, the method is applied as a named task beside the
    ones already there (:func:`petl_surgery.tasks.apply_task`)."""
    if name is not None:
        return apply_task(model, method, name, **options)
    _refuse_unnamed(model, "give the new surgery a task name with name=")
    return apply_surgery(model, method, **options)


apply.__doc__ = (apply.__doc__ or "") + "\n\n" + (apply_surgery.__doc__ or "")


def save(model: nn.Module, path: PathLike, *, name: Optional[str] = None) -> None:
    """:func:`petl_surgery.checkpoints.save`; with ``name``, the file of that task alone
    (:func:`petl_surgery.tasks.save_task`)."""
    if name is not None:
        return save_task(model, path, name)
    _refuse_unnamed(model, "say which task to save with name=")
    return save_delta(model, path)


def merge(model: nn.Module, *, keep_unmergeable: bool = False) -> nn.Module:
    """:func:`petl_surgery.api.merge`, refused on a model carrying named tasks: folding a delta into the
    base weights changes the backbone every task shares, so merged deltas cannot run side by side or mix
    in one batch (merge a model that carries one task alone instead)."""
    _refuse_unnamed(model, "merging folds a delta into the base weights every task shares; merge a model carrying one task alone")
    return merge_surgery(model, keep_unmergeable=keep_unmergeable)


def remove(model: nn.Module, methods: Union[None, str, Sequence[str]] = None, *, method: Optional[str] = None) -> nn.Module:
    """:func:`petl_surgery.api.remove`; a model carrying named tasks takes ``remove_task`` instead."""
    _refuse_unnamed(model, "take a task out with petl_surgery.remove_task(model, name)")
    return remove_surgery(model, methods, method=method)
