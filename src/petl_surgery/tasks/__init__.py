"""Many tasks on one base: named deltas side by side, selected one at a time or mixed per sample in one
batch (see docs/serving.md)."""

from .mixed import forward_tasks, resolve_tasks, task_logits
from .named import (
    active_task,
    apply_task,
    load_task,
    remove_task,
    save_task,
    select_task,
    swap_task,
    task_classes,
    task_modules,
    task_names,
    using_task,
)
from .routing import TaskBank, TaskError

__all__ = [
    "TaskBank",
    "TaskError",
    "active_task",
    "apply_task",
    "forward_tasks",
    "load_task",
    "remove_task",
    "resolve_tasks",
    "save_task",
    "select_task",
    "swap_task",
    "task_classes",
    "task_logits",
    "task_modules",
    "task_names",
    "using_task",
]
