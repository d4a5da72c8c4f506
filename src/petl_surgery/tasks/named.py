"""Named tasks side by side on one base: add (from a delta file or by applying a method), list, select,
save and remove them.

Each task is planned and committed by the ordinary machinery (``load_delta`` and ``apply``) with the other
tasks hidden, so every check of a single-task model holds for it, and then taken into the model's
:class:`~petl_surgery.tasks.routing.TaskBank`: its modules move there, its hooks into the dispatches on the
modules they hook, its head into a copy of the model's head. The base's own parameters, head included, are
never changed by a task.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..api import apply as apply_method
from ..checkpoints.delta import load_delta, save as save_delta
from ..checkpoints.files import PathLike, check_path, read
from ..checkpoints.format import decode
from ..errors import CheckpointError
from ..freezing import find_heads, restore_original_flags
from ..hooks import hook_owner, remove_hooks_of
from ..inventory import inserted_modules
from ..methods import PetlModule
from ..patches import recording, undo_patches
from ..sites.torch_layouts import IN_PROJ
from ..checkpointing import guard_checkpointing
from ..statistics import give_back_statistics
from ..wrappers import inner
from .routing import BANK_NAME, HeadDispatch, TaskBank, TaskError, decode_path, encode_path, take_patches


def bank_of(model: nn.Module) -> Optional[TaskBank]:
    """The model's task bank, None when it carries no named task."""
    bank = inner(model, changes=False)._modules.get(BANK_NAME)
    return bank if isinstance(bank, TaskBank) else None


def task_names(model: nn.Module) -> List[str]:
    """The names of the tasks ``model`` carries, in the order they were added."""
    bank = bank_of(model)
    return bank.names() if bank is not None else []


def task_classes(model: nn.Module) -> Dict[str, Optional[int]]:
    """Each task's number of outputs (its head's width), None for a task that uses the base's head."""
    bank = bank_of(model)
    return dict(bank.classes) if bank is not None else {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name in ("__base__",):
        raise TaskError(f"a task name must be a non-empty string without dots (not '__base__'); got {name!r}")
    return name


def _known(model: nn.Module, name: object) -> TaskBank:
    bank = bank_of(model)
    if bank is None or name not in bank.deltas:
        raise TaskError(f"the model carries no task {name!r}; it carries: {', '.join(task_names(model)) or 'none'}")
    return bank


def _new_task_refusal(model: nn.Module, name: str) -> None:
    """Refuse a taken name, and a model carrying unnamed surgery, before anything changes."""
    if name in task_names(model):
        raise TaskError(f"the model already carries a task named {name!r}; remove it first or choose another name")
    plain = [path for path, _ in inserted_modules(model) if not path.startswith(BANK_NAME + ".")]
    if plain:
        raise TaskError(
            f"the model carries surgery that belongs to no task ({plain[0]!r}); named tasks need a base without "
            "surgery (remove it, or load it as a task with name=)"
        )


@contextlib.contextmanager
def _hidden(root: nn.Module) -> Iterator[Optional[TaskBank]]:
    """The bank taken off the model (no task selected) for the duration: the model then carries no surgery,
    and a task is planned, committed or saved as on a model of its own."""
    bank = root._modules.get(BANK_NAME)
    if bank is None:
        yield None
        return
    active = bank.active
    bank.select(None)
    del root._modules[BANK_NAME]
    try:
        yield bank
    finally:
        root._modules[BANK_NAME] = bank
        bank.select(active)


def _head_of(root: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    heads = find_heads(root)
    if not heads:
        return None
    if len(heads) > 1:
        raise TaskError(
            f"{type(root).__name__} has {len(heads)} classifier heads (a distilled model's); named tasks need one"
        )
    paths = {id(module): path for path, module in root.named_modules()}
    return paths[id(heads[0])], heads[0]


@contextlib.contextmanager
def _head_slot(root: nn.Module, values: Optional[Dict[str, torch.Tensor]]) -> Iterator[None]:
    """The base head's parameters replaced for the duration by ``values`` (relative name -> tensor, used as
    they are when they are parameters, else copied into new trainable parameters) and put back afterwards."""
    found = _head_of(root)
    if found is None or values is None:
        yield
        return
    _, head = found
    originals: Dict[str, Tuple[nn.Module, str, nn.Parameter]] = {}
    for relative, _ in list(head.named_parameters()):
        if relative not in values:
            continue
        owner_path, _, attribute = relative.rpartition(".")
        owner = head.get_submodule(owner_path) if owner_path else head
        originals[relative] = (owner, attribute, owner._parameters[attribute])
        value = values[relative]
        owner._parameters[attribute] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    try:
        yield
    finally:
        for owner, attribute, parameter in originals.values():
            owner._parameters[attribute] = parameter
            parameter.requires_grad_(False)  # the base head belongs to every task: frozen


def _copy_head(root: nn.Module, bank: Optional[TaskBank]) -> nn.Module:
    """A copy of the base head as it is now (its slot holding the task's tensors), without its hooks."""
    _, head = _head_of(root)  # type: ignore[misc]
    memo: Dict[int, Any] = {}
    if bank is not None:
        memo[id(bank)] = bank
        memo[id(bank.head_dispatch)] = bank.head_dispatch
    copied = copy.deepcopy(head, memo)
    for module in copied.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            hooks.clear()
    for module in copied.modules():
        if isinstance(module, nn.Linear):
            module.out_features = module.weight.shape[0]
    return copied


def _ensure_bank(root: nn.Module, bank: Optional[TaskBank]) -> TaskBank:
    if bank is not None:
        return bank
    bank = TaskBank()
    bank.head_dispatch = HeadDispatch(bank)
    found = _head_of(root)
    if found is not None:
        found[1].register_forward_hook(bank.head_dispatch.forward)
    return bank


def _take_in(
    root: nn.Module, bank: TaskBank, name: str, head: Optional[nn.Module], applied: Sequence[Tuple[Any, str]]
) -> None:
    """Move the surgery the (hidden-bank) model now carries into ``bank`` as task ``name`` (``applied``:
    the patches its commit applied, with their owners)."""
    present = inserted_modules(root)
    owners = {id(module) for _, module in present}
    sequence_first = {
        id(getattr(m, IN_PROJ)) for m in root.modules() if isinstance(m, nn.MultiheadAttention) and hasattr(m, IN_PROJ)
    }
    found: List[Tuple[nn.Module, str, Any]] = []
    for target in root.modules():
        for hook in target._forward_hooks.values():
            if id(hook_owner(hook)) in owners:
                found.append((target, "forward", hook))
        for hook_id, hook in target._forward_pre_hooks.items():
            if id(hook_owner(hook)) in owners:
                kind = "forward_pre_kwargs" if hook_id in target._forward_pre_hooks_with_kwargs else "forward_pre"
                found.append((target, kind, hook))
    for _, module in present:
        remove_hooks_of(root, module)
    bank.token_patches[name] = take_patches(applied)
    for target, kind, hook in found:
        dispatch = bank.dispatch_for(target, kind, 1 if id(target) in sequence_first else 0)
        dispatch.hooks.setdefault(name, []).append(hook)
    deltas = nn.ModuleDict()
    for path, module in present:
        host_path, _, child = path.rpartition(".")
        host = root.get_submodule(host_path) if host_path else root
        del host._modules[child]
        deltas[encode_path(path)] = module
    bank.deltas[name] = deltas
    if head is not None:
        bank.heads[name] = head
    bank.classes[name] = _width(head)


def _width(head: Optional[nn.Module]) -> Optional[int]:
    if head is None:
        return None
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    return weights[-1].shape[0] if weights else None


def load_task(model: nn.Module, path: PathLike, name: str, *, head: bool = True, **choices: Any) -> nn.Module:
    """Load a delta file as task ``name`` beside the tasks already loaded; return the model.

    The file's head (any number of classes) becomes the task's own head, used when the task runs;
    ``head=False`` leaves it out and the task uses the base head. ``choices`` are ``load``'s
    ``methods``/``blocks``/``block_map``. Refused, before anything changes: a taken name, a file of another
    base (the same checks as ``load`` on a model of its own), a file with trainable base tensors besides
    the head or adapted statistics (they belong to the base every task shares).
    """
    root = inner(model)
    name = _check_name(name)
    _new_task_refusal(root, name)
    check_path(path)
    tensors, raw = read(path)
    metadata = decode(raw, str(path))
    _refuse_shared_state(path, metadata, tensors)
    saved_head = set(metadata["head"]) if head else set()
    found = _head_of(root)
    slot: Optional[Dict[str, torch.Tensor]] = None
    if found is not None and saved_head:
        prefix = found[0] + "."
        slot = {n[len(prefix):]: torch.zeros_like(t, device=_device(root)) for n, t in tensors.items() if n in saved_head and n.startswith(prefix)}
    with _hidden(root) as bank:
        with _head_slot(root, slot), recording() as applied:
            load_delta(root, path, head=head, **choices)
            task_head = _copy_head(root, bank) if slot else None
        bank = _ensure_bank(root, bank)
        _take_in(root, bank, name, task_head, applied)
    if BANK_NAME not in root._modules:
        root.add_module(BANK_NAME, bank)
    return model


def _device(root: nn.Module) -> torch.device:
    param = next(root.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _refuse_shared_state(path: PathLike, metadata: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    if metadata["statistics"] == "adapt":
        raise TaskError(
            f"{path} adapts the base's running statistics (statistics='adapt'): they are base state every task "
            "shares, so it cannot be a task beside others"
        )
    base = sorted(n for n in tensors if n not in metadata["head"] and ".petl_" not in f".{n}")
    if base:
        raise TaskError(
            f"{path} trains base tensors besides the head ({', '.join(base[:3])}): they belong to the base every "
            "task shares, so it cannot be a task beside others"
        )


def apply_task(model: nn.Module, method: str, name: str, **options: Any) -> nn.Module:
    """Apply ``method`` as task ``name`` beside the tasks already there; return the model.

    ``options`` are ``apply``'s (``layers``, ``skip_unsupported``, ``branch_dtype`` and the method's own).
    The task's head starts as a copy of the base head's current values and is trainable; the base head
    stays as it is. Refused, before anything changes: a taken name, ``unfreeze``, ``statistics="adapt"``,
    ``train_head=False`` with another head.
    """
    root = inner(model)
    name = _check_name(name)
    _new_task_refusal(root, name)
    if options.get("unfreeze"):
        raise TaskError("unfreeze= trains base tensors every task shares; not with name=")
    if options.get("head") is not None:
        raise TaskError("head= is not taken with name=: a task's head is a copy of the model's classifier head")
    if options.get("statistics") == "adapt":
        raise TaskError("statistics='adapt' trains base state every task shares; not with name=")
    train_head = options.pop("train_head", True)
    found = _head_of(root)
    slot = None
    if found is not None and train_head:
        slot = {n: p.detach().clone() for n, p in found[1].named_parameters()}
    with _hidden(root) as bank:
        with _head_slot(root, slot), recording() as applied:
            apply_method(root, method, train_head=train_head, **options)
            task_head = _copy_head(root, bank) if slot else None
        if task_head is not None:
            task_head.requires_grad_(True)
        bank = _ensure_bank(root, bank)
        _take_in(root, bank, name, task_head, applied)
    if BANK_NAME not in root._modules:
        root.add_module(BANK_NAME, bank)
    return model


def remove_task(model: nn.Module, name: str) -> nn.Module:
    """Take task ``name`` out (its modules, hooks, patches and head); once none is left, the model is the
    base it was (modules, hooks, flags)."""
    root = inner(model)
    bank = _known(root, name)
    for dispatch in bank.dispatches:
        dispatch.hooks.pop(name, None)
    if bank.engaged == name:
        bank.engage(None)
    bank.token_patches.pop(name, None)
    for module in bank.deltas[name].values():
        undo_patches(root, module.uid)
    del bank.deltas[name]
    if name in bank.heads:
        del bank.heads[name]
    bank.classes.pop(name, None)
    if bank.active == name:
        bank.select(None)
    if not bank.deltas:
        for dispatch in bank.dispatches:
            remove_hooks_of(root, dispatch)
        remove_hooks_of(root, bank.head_dispatch)
        del root._modules[BANK_NAME]
        restore_original_flags(root)
        give_back_statistics(root)
        guard_checkpointing(root)  # no surgery left: the activation-checkpointing guard goes too
    return model


def select_task(model: nn.Module, name: Optional[str]) -> None:
    """Run task ``name`` from now on (None: the base alone, every task off)."""
    root = inner(model, changes=False)
    if name is None:
        bank = bank_of(root)
        if bank is not None:
            bank.select(None)
        return
    _known(root, name).select(name)


def active_task(model: nn.Module) -> Optional[str]:
    bank = bank_of(model)
    return bank.active if bank is not None else None


@contextlib.contextmanager
def using_task(model: nn.Module, name: Optional[str]) -> Iterator[nn.Module]:
    """``with using_task(model, "pets"): model(x)``: task ``name`` runs inside the block, the previous
    selection comes back after it."""
    previous = active_task(model)
    select_task(model, name)
    try:
        yield model
    finally:
        select_task(model, previous)


@contextlib.contextmanager
def _placed(root: nn.Module, bank: TaskBank, name: str) -> Iterator[None]:
    """The model as it would be carrying task ``name`` alone, for the duration: the bank hidden, the
    task's modules back at their paths (without hooks: those stay in the dispatches) and its head's
    tensors in the base head's slot."""
    head = bank.heads[name] if name in bank.heads else None
    values = dict(head.named_parameters()) if head is not None else None
    placed: List[Tuple[nn.Module, str]] = []
    with _hidden(root):
        try:
            for key, module in bank.deltas[name].items():
                host_path, _, child = decode_path(key).rpartition(".")
                host = root.get_submodule(host_path) if host_path else root
                host._modules[child] = module
                placed.append((host, child))
            with _head_slot(root, values):
                yield
        finally:
            for host, child in placed:
                del host._modules[child]
            if head is not None:
                head.requires_grad_(True)


def save_task(model: nn.Module, path: PathLike, name: str) -> None:
    """Write task ``name`` to ``path``: exactly the file ``save`` writes for the base carrying that task
    alone (its delta under the same tensor names, its head as the model's head, the same metadata)."""
    root = inner(model, changes=False)
    bank = _known(root, name)
    check_path(path)
    with _placed(root, bank, name):
        save_delta(root, path)


def swap_task(model: nn.Module, path: PathLike, name: str, *, load_head: bool = True) -> nn.Module:
    """Hot-swap: write the tensors of the delta file ``path`` into task ``name``'s modules and head, in
    place; return the model.

    The file must hold the same surgery as the task (methods, options, blocks) with tensors of the same
    shapes, and a head of the same width; ``load_head=False`` keeps the task's head. Nothing is planned,
    created or re-registered: the task's parameters keep their identity and only their values change, so a
    ``torch.compile``-d model runs the swapped task without recompiling (PEFT's ``hotswap_adapter`` for
    every method here), and no other task is touched. Refused, before anything changes: an unknown task,
    a file of another surgery, shapes or head, a file with trainable base tensors besides the head, and a
    file's head for a task that uses the base head (``load_head=False`` then).
    """
    root = inner(model, changes=False)
    bank = _known(root, name)
    check_path(path)
    tensors, raw = read(path)
    metadata = decode(raw, str(path))
    _refuse_shared_state(path, metadata, tensors)
    if load_head and metadata["head"] and name not in bank.heads:
        raise TaskError(
            f"task {name!r} uses the base head, which every task shares, and {path} holds a head; pass "
            "load_head=False to swap the delta alone"
        )
    with _placed(root, bank, name):
        try:
            load_delta(root, path, head=load_head)
        except CheckpointError as error:
            raise CheckpointError(
                f"task {name!r} cannot take {path} in place (a hot-swap needs the same surgery, tensor shapes and "
                f"head width): {error}. Load it as a task of its own instead, ps.load(model, path, name=...)"
            ) from error
    return model


def task_modules(model: nn.Module, name: str) -> Sequence[PetlModule]:
    """The inserted modules of task ``name``."""
    return list(_known(model, name).deltas[name].values())
