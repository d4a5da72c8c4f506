"""One forward over a batch whose samples belong to different tasks.

The batch is sorted by task (stable), so each task owns one contiguous segment; the dispatches run each
task's hooks on its segment inside one backbone forward (see :mod:`petl_surgery.tasks.routing`), and the
output comes back in the caller's order.

Logits of tasks with different class counts: row ``i`` holds task ``tasks[i]``'s logits in its first
``C`` columns (``C`` that task's class count) and ``-inf`` in the rest, up to the widest task in the batch;
``softmax`` and ``argmax`` of a row are then those of the task's own logits. :func:`task_logits` cuts them
back into one tensor per sample.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..wrappers import inner
from .named import bank_of, task_classes, task_names, using_task
from .routing import TaskBank, TaskError

TaskIds = Union[Sequence[Union[str, int]], torch.Tensor]


def resolve_tasks(model: nn.Module, tasks: TaskIds, batch: int) -> List[str]:
    """Per-sample task names from names or ids (positions in ``task_names(model)``), checked."""
    names = task_names(model)
    if isinstance(tasks, torch.Tensor):
        tasks = tasks.tolist()
    tasks = list(tasks)
    if len(tasks) != batch:
        raise TaskError(f"{len(tasks)} task(s) given for a batch of {batch} samples; give one task per sample")
    resolved = []
    for task in tasks:
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise TaskError(f"a task is a name or an id (int); got {task!r}")
        if isinstance(task, int):
            if not 0 <= task < len(names):
                raise TaskError(f"task id {task} is out of range: the model carries {len(names)} task(s)")
            task = names[task]
        elif task not in names:
            raise TaskError(f"the model carries no task {task!r}; it carries: {', '.join(names) or 'none'}")
        resolved.append(task)
    return resolved


def token_signature(bank: TaskBank, name: str) -> Optional[tuple]:
    """What task ``name`` does to the token sequence: None (nothing), ``("vpt", tokens, first block, deep,
    blocks)``, or ``("prefix", ...)``; tasks of one batch must agree on it. Deep prompts on every block
    from the first to the last are inserted before and dropped after each block, shallow ones travel from
    block to block: the same count and first block is not the same token sequence then."""
    modules = list(bank.deltas[name].values())
    prompts = [m for m in modules if m.method == "vpt"]
    if prompts:
        blocks = tuple(sorted(m.block for m in prompts))
        return ("vpt", prompts[0].options["num_tokens"], blocks[0], bool(prompts[0].options["deep"]), blocks)
    prefixes = [m for m in modules if m.method == "prefix"]
    if prefixes:
        return ("prefix", prefixes[0].options["length"], tuple(sorted(m.block for m in prefixes)))
    return None


def _describe(signature: Optional[tuple]) -> str:
    if signature is None:
        return "no prompt or prefix tokens"
    if signature[0] == "vpt":
        return f"{signature[1]} prompt tokens from block {signature[2]}, {'deep' if signature[3] else 'shallow'}"
    blocks = signature[2]
    return f"{signature[1]} prefix keys and values in blocks {', '.join(map(str, blocks))}"


def _token_refusal(bank: TaskBank, present: Sequence[str]) -> Optional[str]:
    signatures = {name: token_signature(bank, name) for name in present}
    first = present[0]
    for name in present[1:]:
        if signatures[name] != signatures[first]:
            return (
                f"tasks {first!r} ({_describe(signatures[first])}) and {name!r} ({_describe(signatures[name])}) put "
                "different token sequences through the blocks; only tasks with the same prompt or prefix count, "
                "blocks and (for prompts) depth share a batch"
            )
    return None


def _mix_prefixes(bank: TaskBank, segments: Sequence[Tuple[str, int, int]]) -> List[nn.Module]:
    """Give the engaged (first) task's prefix modules the prefix module of every segment's task at the same
    block, so that each sample's keys and values get its own task's prefix; returns the modules to clear."""
    first = segments[0][0]
    # prefixes that enter through the engaged task's patches of the attention (its forward, or the function
    # it dispatches to) serve the whole batch; those that enter through a hook (nn.MultiheadAttention's
    # attention call) are routed per segment by the dispatch like any hook
    patched = {owner for owner, _ in bank.token_patches.get(first, ())}
    mixed = []
    for key, module in bank.deltas[first].items():
        if getattr(module, "method", None) == "prefix" and module.uid in patched:
            module.mixed = [(bank.deltas[name][key], stop - start) for name, start, stop in segments]
            mixed.append(module)
    return mixed


def _mix_refusal(root: nn.Module) -> Optional[str]:
    for path, module in root.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            return f"{path!r} (nn.MultiheadAttention) runs tokens first (batch_first=False): its rows are not samples"
        if isinstance(module, nn.TransformerEncoderLayer) and not getattr(module.self_attn, "batch_first", True):
            return f"{path!r} runs tokens first (batch_first=False): its rows are not samples"
    return None


def _reorder(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return type(value)(_reorder(v, index, batch) for v in value) if not hasattr(value, "_fields") else type(value)(*(_reorder(v, index, batch) for v in value))
    if isinstance(value, list):
        return [_reorder(v, index, batch) for v in value]
    if isinstance(value, dict):
        items = {k: _reorder(v, index, batch) for k, v in value.items()}
        try:
            return type(value)(**items)
        except TypeError:
            return items
    return value


def forward_tasks(model: nn.Module, x: torch.Tensor, tasks: TaskIds, **kwargs: Any) -> Any:
    """``model(x, **kwargs)`` with sample ``i`` computed by task ``tasks[i]`` (a name, or an id: its position
    in :func:`task_names`), each with its own delta and head, in one backbone forward.

    Every sample's output equals that of a model carrying its task alone (float tolerance). Logits of
    tasks with different class counts are padded with ``-inf`` to the widest (see this module's doc).
    Refused by name: an unknown task, a count of tasks other than the batch's, a model whose layers run
    tokens first."""
    root = inner(model, changes=False)
    bank = bank_of(root)
    if bank is None:
        raise TaskError(f"{type(root).__name__} carries no named task (load deltas with name=)")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TaskError(f"a mixed-task batch is a tensor with the samples along dimension 0; got {type(x).__name__}")
    batch = x.shape[0]
    names = resolve_tasks(root, tasks, batch)
    order = {name: position for position, name in enumerate(task_names(root))}
    present = sorted(set(names), key=order.__getitem__)
    if len(present) == 1:
        with using_task(root, present[0]):
            return model(x, **kwargs)
    refusal = _token_refusal(bank, present) or _mix_refusal(root)
    if refusal is not None:
        raise TaskError(f"tasks cannot be mixed in one batch of this model: {refusal}")
    keys = torch.tensor([order[name] for name in names])
    permutation = torch.sort(keys, stable=True).indices
    is_sorted = bool((permutation == torch.arange(batch)).all())
    counts = [names.count(name) for name in present]
    segments, start = [], 0
    for name, count in zip(present, counts):
        segments.append((name, start, start + count))
        start += count
    inputs = x if is_sorted else x.index_select(0, permutation.to(x.device))
    engaged = bank.engaged
    bank.engage(present[0])  # every task present sets the same token patches (checked above)
    bank.segments, bank.batch = segments, batch
    mixed = _mix_prefixes(bank, segments)
    try:
        output = model(inputs, **kwargs)
    finally:
        for module in mixed:
            module.mixed = None
        bank.segments, bank.batch = None, 0
        bank.engage(engaged)
    if is_sorted:
        return output
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(batch)
    return _reorder(output, inverse.to(x.device), batch)


def task_logits(model: nn.Module, logits: torch.Tensor, tasks: TaskIds) -> List[torch.Tensor]:
    """The rows of a mixed batch's padded ``logits`` cut to each sample's own task's class count."""
    names = resolve_tasks(model, tasks, logits.shape[0])
    widths = task_classes(model)
    return [row if widths[name] is None else row[: widths[name]] for row, name in zip(logits, names)]
