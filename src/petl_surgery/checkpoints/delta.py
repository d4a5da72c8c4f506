"""save and load_delta: the delta of a model, and the surgery that produced it, in one safetensors file.

(``petl_surgery.load``, in :mod:`petl_surgery.loading`, detects the format and comes here for ours.)"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..version import __version__
from ..wrappers import inner
from ..roots import adapted_names_under, join, sole_root, statistics_outside, surgery_roots
from ..errors import CheckpointError, OptionError, SurgeryError, UnsupportedModelError
from ..replay import RecordedCall, commit_calls, plan_calls
from ..freezing import head_parameter_names, set_trainable
from ..inventory import delta_names, inserted_modules, surgery_record
from ..methods import get_method
from ..methods.base import CHILD_PREFIX, OUTSIDE_BLOCKS
from ..methods.planning import SIZES_ONLY
from ..sites import discover
from ..statistics import mode_of, resolve_mode, statistics_names
from .files import PathLike, check_path, read, write_atomic
from .plain import assign, plain_names, plain_state
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    base_shapes,
    block_fingerprints,
    outside_blocks,
    decode,
    encode,
    fingerprint,
    model_description,
    tensors_digest,
)


def save(model: nn.Module, path: PathLike) -> None:
    """Write the delta of ``model`` to ``path`` (a ``.safetensors`` file), atomically.

    The file holds every tensor of the inserted modules, every other trainable parameter (the head,
    base tensors made trainable) and, with ``statistics="adapt"``, the base's running statistics, under
    their state_dict names, and metadata describing the surgery (see
    :mod:`petl_surgery.checkpoints.format`). No pickle is involved.

    ``model`` may be the module surgery was applied to or any module holding it (a LightningModule-like
    wrapper after ``apply(net.backbone, ...)``): names are then ``model``'s, the file records the
    submodule the surgery sits in (``root``), and the wrapper's own trainable parameters (a new head)
    and running statistics outside the submodule are saved with the delta. Separate surgeries applied to several submodules are refused, naming them.
    """
    model = inner(model, changes=False)  # a compile or DDP wrapper's keys would load nowhere
    check_path(path)
    if not inserted_modules(model):
        raise SurgeryError(f"{type(model).__name__} carries no petl_surgery method: there is no delta to save")
    root_path, root = sole_root(model, "save")
    delta = plain_names(delta_names(model))
    trainable = plain_names(name for name, p in model.named_parameters() if p.requires_grad)
    adapted = adapted_names_under(model) | statistics_outside(model, root_path)
    tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in _unique_state(model).items()
        if name in delta or name in trainable or name in adapted
    }
    shapes = base_shapes(model, delta)
    heads = plain_names(head_parameter_names(model))
    block_paths = _block_paths(root_path, root)
    without_head = {n: s for n, s in shapes.items() if n not in heads}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "root": root_path,
        "methods": surgery_record(root),
        "statistics": mode_of(root),
        "model": model_description(model, block_paths, root),
        "head": sorted(heads),
        "base_shapes": shapes,
        "fingerprint": fingerprint(shapes),
        "fingerprint_without_head": fingerprint(without_head),
        "fingerprint_outside_blocks": fingerprint(outside_blocks(without_head, block_paths)),
        "block_fingerprints": block_fingerprints(shapes, block_paths),
        "tensors_sha256": tensors_digest(tensors),
    }
    write_atomic(path, tensors, encode(metadata))


def _block_paths(root_path: str, root: nn.Module) -> List[str]:
    """The paths of the blocks of the surgery's root (the ones its block indices count), named from the
    module holding it."""
    return [join(root_path, block.path) for block in discover(root).blocks]


def _unique_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict with each tensor under its first name only (shared modules appear under several),
    parametrized tensors under their plain names with their computed values (see :mod:`.plain`)."""
    unique: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in plain_state(model).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _architecture_mismatch(
    path: PathLike, model: nn.Module, metadata: Mapping[str, Any], here: Mapping[str, Any], shapes: Mapping[str, list]
) -> CheckpointError:
    """The refusal of a file saved from another architecture; ``here`` is the model's description."""
    saved = metadata["model"]
    recorded = metadata["base_shapes"]  # the saved base's names and shapes, the head included
    differing = [name for name in recorded if name in shapes and recorded[name] != shapes[name]]
    listed = ", ".join(f"{n}: checkpoint {recorded[n]}, model {shapes[n]}" for n in differing[:5])
    model_head = plain_names(head_parameter_names(model))
    head_only = set(differing) | (set(recorded) ^ set(shapes)) <= set(metadata["head"]) | model_head
    if head_only and fingerprint(
        {n: s for n, s in shapes.items() if n not in model_head}
    ) == metadata["fingerprint_without_head"]:
        detail = f" ({listed})" if differing else ""
        return CheckpointError(
            f"the head in {path} does not fit this model{detail}; pass load_head=False to load the rest and keep "
            "the model's own head"
        )
    message = f"{path} does not fit this model: it was saved from another base architecture"
    if (saved.get("class"), saved.get("timm_name")) != (here["class"], here["timm_name"]):
        message += (
            f" (checkpoint: {saved.get('class')}, timm name {saved.get('timm_name')!r}; "
            f"model: {here['class']}, timm name {here['timm_name']!r})"
        )
    if len(saved["block_paths"]) != len(here["block_paths"]):
        message += (
            f"; it was saved from a model with {len(saved['block_paths'])} blocks and this model has "
            f"{len(here['block_paths'])}; pass block_map={{saved_block: model_block, ...}} (and load_head=False) to "
            "move its modules to a model of another depth"
        )
    elif differing:
        message += "; tensors of other shapes: " + listed
    else:
        only_saved = sorted(set(recorded) - set(shapes))
        only_here = sorted(set(shapes) - set(recorded))
        message += "; the names of its base tensors differ from the model's"
        if only_saved:
            message += f" (only in the checkpoint's base: {', '.join(only_saved[:5])})"
        if only_here:
            message += f" (only in this model: {', '.join(only_here[:5])})"
    return CheckpointError(message)


def _select_calls(
    path: PathLike, calls: List[Dict[str, Any]], methods: Optional[Sequence[str]], blocks: Optional[Sequence[int]]
) -> List[Dict[str, Any]]:
    """The recorded apply calls restricted to ``methods`` and to the saved block indices ``blocks``."""
    recorded = [call["method"] for call in calls]
    saved_blocks = sorted({b for call in calls for b in call["blocks"]})
    for name in methods or ():
        if name not in recorded:
            raise CheckpointError(f"{path} holds no method {name!r}; it holds {', '.join(recorded)}")
    for index in blocks or ():
        if index not in saved_blocks:
            raise CheckpointError(f"{path} has no surgery on block {index}; it has blocks {saved_blocks}")
    chosen = []
    for call in calls:
        kept = [b for b in call["blocks"] if blocks is None or b in blocks]
        if (methods is None or call["method"] in methods) and kept:
            chosen.append({**call, "blocks": kept})
    if not chosen:
        raise CheckpointError(f"the methods and blocks chosen select nothing from {path}")
    return chosen


def _block_mapping(
    path: PathLike, saved_paths: List[str], model_paths: List[str], block_map: Optional[Mapping[int, int]]
) -> Dict[int, int]:
    """Saved block index -> model block index: the identity on models of the same depth, else the
    user's ``block_map``."""
    if block_map is None:
        if len(saved_paths) != len(model_paths):
            raise CheckpointError(
                f"{path} was saved from a model with {len(saved_paths)} blocks and this model has "
                f"{len(model_paths)}; pass block_map={{saved_block: model_block, ...}} to choose where its "
                "blocks go"
            )
        return {index: index for index in range(len(saved_paths))}
    if not isinstance(block_map, Mapping) or not all(
        type(saved) is int and type(target) is int for saved, target in block_map.items()
    ):
        raise OptionError(f"block_map must map saved block indices (int) to model block indices (int); got {block_map!r}")
    mapping = dict(block_map)
    for saved, target in mapping.items():
        if not 0 <= saved < len(saved_paths):
            raise CheckpointError(f"block_map: saved block {saved} is out of range: {path} has {len(saved_paths)} blocks")
        if not 0 <= target < len(model_paths):
            raise CheckpointError(f"block_map: block {target} is out of range: the model has {len(model_paths)} blocks")
    if len(set(mapping.values())) != len(mapping):
        raise CheckpointError("block_map sends two saved blocks to the same block")
    return mapping


def _check_values(path: PathLike, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, Optional[torch.dtype]]) -> None:
    """Refuse NaN or infinity in the delta, and values that the model's dtype cannot hold (a float32
    delta overflowing a float16 model); warn, naming the tensors, when loading casts to another dtype."""
    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite values in: {', '.join(bad[:5])}")
    cast = {n: (t.dtype, dtypes[n]) for n, t in tensors.items() if dtypes.get(n) is not None and t.dtype != dtypes[n]}
    overflow = sorted(
        n for n, (_, to) in cast.items() if to.is_floating_point and not torch.isfinite(tensors[n].to(to)).all()
    )
    if overflow:
        raise CheckpointError(
            f"{path}: values of {', '.join(overflow[:5])} overflow the model's dtype "
            f"{cast[overflow[0]][1]}; load into a model of the checkpoint's dtype"
        )
    if cast:
        pairs = sorted({f"{str(a).replace('torch.', '')} -> {str(b).replace('torch.', '')}" for a, b in cast.values()})
        warnings.warn(
            f"loading {path} casts {len(cast)} tensor(s) to the model's dtype ({', '.join(pairs)}), e.g. "
            f"{', '.join(sorted(cast)[:3])}",
            stacklevel=3,
        )


def _check_mapped_architecture(
    path: PathLike,
    metadata: Mapping[str, Any],
    shapes: Mapping[str, list],
    model_head: Set[str],
    model_paths: List[str],
    mapping: Mapping[int, int],
) -> None:
    """With a block_map the whole-model fingerprint cannot hold (another depth); what must hold instead:
    the tensors outside the blocks (head left out) are the checkpoint's, and each mapped block has the
    same tensors as the saved block it takes."""
    without_head = {n: s for n, s in shapes.items() if n not in model_head}
    if fingerprint(outside_blocks(without_head, model_paths)) != metadata["fingerprint_outside_blocks"]:
        saved = metadata["model"]
        raise CheckpointError(
            f"{path} does not fit this model: outside its blocks, the model's tensors differ from those of the "
            f"model it was saved from ({saved['class']}, timm name {saved['timm_name']!r}); block_map moves "
            "blocks between models of one architecture, not between architectures"
        )
    here = block_fingerprints(shapes, model_paths)
    wrong = [(saved, target) for saved, target in mapping.items() if metadata["block_fingerprints"][saved] != here[target]]
    if wrong:
        listed = ", ".join(f"saved block {saved} -> block {target}" for saved, target in wrong[:5])
        raise CheckpointError(f"{path}: block_map pairs blocks whose tensors differ in names or shapes: {listed}")


def _renamer(saved_paths: List[str], model_paths: List[str], mapping: Dict[int, int]) -> Callable[[str], Optional[str]]:
    """Tensor name in the file -> name in the model (None: its block is not taken)."""
    by_length = sorted(range(len(saved_paths)), key=lambda i: -len(saved_paths[i]))

    def rename(name: str) -> Optional[str]:
        for index in by_length:
            prefix = saved_paths[index] + "."
            if name.startswith(prefix):
                if index not in mapping:
                    return None
                return model_paths[mapping[index]] + "." + name[len(prefix) :]
        return name

    return rename


def _recorded(calls: List[Dict[str, Any]]) -> List[RecordedCall]:
    """The metadata's method entries (checked by ``decode``) as calls to replay."""
    return [RecordedCall(call["method"], call["blocks"], call["options"]) for call in calls]


def _method_of(name: str) -> Optional[str]:
    """The method whose inserted module holds the tensor ``name`` (``...petl_<method>...``), if any."""
    for part in name.split("."):
        if part.startswith(CHILD_PREFIX):
            return part[len(CHILD_PREFIX) :]
    return None


def _check_arguments(model: Any, path: Any, head: Any, methods: Any, blocks: Any) -> None:
    """load_delta's arguments, before anything is read: wrong types are SurgeryErrors naming them."""
    inner(model)  # a plain module: surgery on a compile/DDP/FSDP wrapper is refused
    check_path(path)
    if not isinstance(head, bool):
        raise OptionError(f"load_head must be True or False; got {head!r}")
    if methods is not None and (isinstance(methods, str) or not all(isinstance(m, str) for m in _iterable(methods, "methods"))):
        raise OptionError(f"methods must be a list of method names; got {methods!r}")
    if blocks is not None and not all(type(b) is int for b in _iterable(blocks, "layers")):
        raise OptionError(f"layers must be a list of saved block indices (int); got {blocks!r}")


def _iterable(value: Any, name: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise OptionError(f"{name} must be a list; got {value!r}")
    return list(value)


def load_delta(
    model: nn.Module,
    path: PathLike,
    *,
    head: bool = True,
    methods: Optional[Sequence[str]] = None,
    blocks: Optional[Sequence[int]] = None,
    block_map: Optional[Mapping[int, int]] = None,
) -> nn.Module:
    """Load a petl_surgery delta checkpoint into ``model`` in place and return it.

    On a model without surgery, the recorded surgery is re-applied (same methods, options and blocks)
    and the tensors loaded; exactly the saved tensors are then trainable. On a model that already
    carries the same surgery, the tensors are only loaded.

    Starting a new task from pre-trained modules (PVP):
        head: False leaves the checkpoint's classifier head out; the model keeps its own head (another
            number of classes, say), trainable. A head that does not fit raises unless head=False (load_head=False in load).
        methods: take only these of the recorded methods.
        blocks: take only these (saved) block indices.
        block_map: ``{saved block: model block}`` for a model of another depth (or to move modules):
            only the blocks named are taken. Without it, a depth mismatch raises.

    Anything that does not fit (another architecture, other shapes, missing or unexpected tensors,
    another surgery, a damaged file or an unknown format version) raises CheckpointError before the model
    is changed. The stages: read and check the file, select and map its blocks, plan the surgery (sizes
    only), verify every tensor against the plan, and only then commit.
    """
    _check_arguments(model, path, head, methods, blocks)
    tensors, metadata = _read_checked(model, path)
    target = _Target.of(model, metadata, path)
    if block_map is None:
        _check_architecture(path, model, metadata, tensors, target, head)
    selection = _select(path, model, metadata, tensors, target, head, methods, blocks, block_map)
    expected, dtypes, current = _plan(path, model, selection.calls, target)
    base_names = _verify(path, model, selection, expected, dtypes, target, whole=blocks is None and block_map is None)
    _commit(path, model, selection, current, base_names, target, head)
    return model


@dataclass
class _Target:
    """What load_delta reads from the model before changing it: its surgery's statistics setting (as the
    file records it), its current delta, its base shapes and its head's parameters."""

    statistics: str
    delta_now: Set[str]
    shapes: Dict[str, Any]
    head: Set[str]
    root_path: str  # the submodule the file's surgery sits in ("" for the model itself)
    root: nn.Module
    model_paths: List[str]  # the root's blocks, named from the model
    here: Dict[str, Any]  # the model's description, as save writes it

    @classmethod
    def of(cls, model: nn.Module, metadata: Dict[str, Any], path: PathLike) -> "_Target":
        root_path, root = _recorded_root(model, path, metadata.get("root", ""))
        statistics = resolve_mode(root, metadata["statistics"])  # decode checked it
        delta_now = plain_names(delta_names(model))
        model_paths = _block_paths(root_path, root)
        return cls(statistics, delta_now, base_shapes(model, delta_now), plain_names(head_parameter_names(model)),
                   root_path, root, model_paths, model_description(model, model_paths, root))


@dataclass
class _Selection:
    """The calls to replay (blocks mapped onto the model's), the file's tensors taken under the model's
    names, and the saved and the model's block paths."""

    calls: List[Dict[str, Any]]
    chosen: Dict[str, torch.Tensor]
    saved_paths: List[str]
    model_paths: List[str]


def _read_checked(model: nn.Module, path: PathLike) -> tuple:
    """Stage 1, read and check: the file's tensors and decoded metadata, its checksum verified, on a model
    whose tensors have values."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UnsupportedModelError(
            f"{type(model).__name__} is on the meta device (tensors without values): loaded values would be "
            "dropped. Materialise it first (model.to_empty(device=...) and its weights), then load"
        )
    tensors, raw_metadata = read(path)
    metadata = decode(raw_metadata, str(path))
    if tensors_digest(tensors) != metadata["tensors_sha256"]:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum recorded when it was saved")
    return tensors, metadata


def _check_architecture(path: PathLike, model: nn.Module, metadata: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                        target: _Target, head: bool) -> None:
    """Without a block map, the model's base shapes (with or without the head) are the saved model's."""
    if head and fingerprint(target.shapes) != metadata["fingerprint"]:
        raise _architecture_mismatch(path, model, metadata, target.here, target.shapes)
    without_head = {n: s for n, s in target.shapes.items() if n not in target.head}
    if not head and fingerprint(without_head) != metadata["fingerprint_without_head"]:
        raise _architecture_mismatch(path, model, metadata, target.here, without_head)


def _select(
    path: PathLike,
    model: nn.Module,
    metadata: Dict[str, Any],
    tensors: Dict[str, torch.Tensor],
    target: _Target,
    head: bool,
    methods: Optional[Sequence[str]],
    blocks: Optional[Sequence[int]],
    block_map: Optional[Mapping[int, int]],
) -> _Selection:
    """Stage 2, select and map blocks: the recorded calls the arguments choose, their blocks mapped onto
    the model's, and the file's tensors they take, under the model's names."""
    calls = _select_calls(path, metadata["methods"], methods, blocks)
    saved_paths = metadata["model"]["block_paths"]
    beyond = sorted(
        {b for call in metadata["methods"] for b in call["blocks"] if not 0 <= b < len(saved_paths) and b != OUTSIDE_BLOCKS}
    )
    if beyond:
        raise CheckpointError(f"{path} records surgery on block {beyond[0]}, but its model had {len(saved_paths)} blocks")
    model_paths = target.model_paths
    shared = sorted({p for p in saved_paths + model_paths if saved_paths.count(p) > 1 or model_paths.count(p) > 1})
    if shared and (blocks is not None or block_map is not None):
        # tensors are matched to blocks by path: blocks that share one (TNT's inner and outer
        # transformer, a parallel block's branches) can be loaded together, not chosen or moved apart
        raise CheckpointError(
            f"layers= and block_map= cannot choose among blocks that share a module path ({shared[0]!r} holds "
            "several blocks: TNT's inner and outer transformer, or a parallel block's branches); load the "
            "whole checkpoint instead"
        )
    mapping = _block_mapping(path, saved_paths, model_paths, block_map)
    if block_map is not None:
        _check_mapped_architecture(path, metadata, target.shapes, target.head, model_paths, mapping)
    if blocks is not None:
        mapping = {saved: placed for saved, placed in mapping.items() if saved in blocks}
    calls = [
        {**call, "blocks": sorted(mapping[b] if b in mapping else b for b in call["blocks"] if b in mapping or b == OUTSIDE_BLOCKS)}
        for call in calls
    ]
    calls = [call for call in calls if call["blocks"]]
    if not calls:
        raise CheckpointError(f"block_map takes none of the blocks {path} has surgery on")
    rename = _renamer(saved_paths, model_paths, mapping)

    taken_methods = {call["method"] for call in calls}
    recorded_methods = {call["method"] for call in metadata["methods"]}
    for name in sorted(recorded_methods):
        try:
            get_method(name)
        except SurgeryError as error:
            raise CheckpointError(f"{path} records surgery this model cannot take: {error}") from None
    stray = sorted(name for name in tensors if _method_of(name) not in (None, *recorded_methods))
    if stray:
        raise CheckpointError(
            f"{path} holds tensors of a method its metadata does not record: {', '.join(stray[:5])}"
        )
    saved_head: Set[str] = set(metadata["head"])
    chosen: Dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in saved_head:
            if head:
                chosen[name] = tensor
            continue
        method = _method_of(name)
        renamed = rename(name)
        if renamed is not None and (method is None or method in taken_methods):
            chosen[renamed] = tensor
    return _Selection(calls, chosen, saved_paths, model_paths)


def _plan(path: PathLike, model: nn.Module, calls: List[Dict[str, Any]], target: _Target) -> tuple:
    """Stage 3, plan: the delta's tensor shapes and dtypes the surgery needs, from a sizes-only plan of the
    recorded calls on a model without surgery, or from the model's own modules when it already carries
    exactly that surgery; and the surgery the model carries (empty: none)."""
    current = json.loads(json.dumps(surgery_record(target.root)))
    if current:
        if current != calls:
            raise CheckpointError(
                f"the model already carries surgery {current}, which differs from what {path} gives here, "
                f"{calls}; remove it first or load into a fresh model"
            )
        expected = {name: list(t.shape) for name, t in _unique_state(model).items() if name in target.delta_now}
        return expected, {}, current
    # the recorded options' sizes, checked against the file before any allocation
    sized = plan_calls(target.root, _recorded(calls), str(path), device=SIZES_ONLY)
    planned_tensors = {
        join(target.root_path, f"{insertion.path}.{key}"): tensor
        for insertions in sized
        for insertion in insertions
        for key, tensor in insertion.module.state_dict().items()
    }
    expected = {name: list(tensor.shape) for name, tensor in planned_tensors.items()}
    dtypes = {name: tensor.dtype for name, tensor in planned_tensors.items()}
    return expected, dtypes, current


def _verify(path: PathLike, model: nn.Module, selection: _Selection, expected: Dict[str, List[int]],
            dtypes: Dict[str, torch.dtype], target: _Target, whole: bool) -> List[str]:
    """Stage 4, verify: every tensor the surgery needs is in the file, every other one is a trainable base
    parameter of the model, all shapes fit and all values are finite; returns the base parameters' names.
    ``whole``: the whole delta is taken (no choice of blocks, no block map)."""
    chosen, shapes, statistics = selection.chosen, target.shapes, target.statistics
    if not whole:
        # tensors shared by the blocks of a call (FacT's factors, outside every block) are planned for
        # the blocks taken: those for widths no taken block has are left out
        inside = tuple(f"{block}." for block in (*selection.saved_paths, *selection.model_paths))
        for name in [n for n in chosen if n not in expected and _method_of(n) is not None and not n.startswith(inside)]:
            del chosen[name]
    if statistics == "adapt" and whole:
        # the whole delta: every running statistic of the base was trained and saved (a choice of blocks
        # takes those it finds and leaves the model's own elsewhere)
        base_state = model.state_dict()
        expected.update({join(target.root_path, name): list(base_state[join(target.root_path, name)].shape)
                         for name in statistics_names(target.root)})
    missing = sorted(name for name in expected if name not in chosen)
    if missing:
        raise CheckpointError(f"{path} lacks tensors the surgery needs: {', '.join(missing[:5])}")
    base_names = [name for name in chosen if name not in expected]  # trainable base parameters
    unexpected = sorted(name for name in base_names if name not in shapes)
    if unexpected:
        raise CheckpointError(f"{path} has tensors this model does not have: {', '.join(unexpected[:5])}")
    parameters = plain_names(name for name, _ in model.named_parameters())
    outside = statistics_outside(model, target.root_path)  # a wrapper's own running statistics, saved with its parameters
    buffers = sorted(name for name in base_names if name not in parameters and name not in outside)
    if buffers:
        raise CheckpointError(
            f"{path} holds base buffers outside its surgery (statistics={statistics!r}): {', '.join(buffers[:5])}"
        )
    wrong = [
        f"{name}: file {list(tensor.shape)}, model {expected.get(name, shapes.get(name))}"
        for name, tensor in chosen.items()
        if list(tensor.shape) != expected.get(name, shapes.get(name))
    ]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape: {', '.join(wrong[:5])}")

    state = plain_state(model)
    _check_values(path, chosen, {name: dtypes.get(name, state[name].dtype if name in state else None) for name in chosen})
    return base_names


def _commit(path: PathLike, model: nn.Module, selection: _Selection, current: list, base_names: List[str],
            target: _Target, head: bool) -> None:
    """Stage 5, commit: replay the recorded calls on a model without surgery, then copy the tensors; the
    saved base parameters (and, with ``head=False``, the model's own head) are trainable afterwards."""
    planned = [] if current else commit_calls(target.root, _recorded(selection.calls), target.statistics, str(path))
    with torch.no_grad():
        for name, tensor in selection.chosen.items():
            assign(model, name, tensor)
    if planned:  # flags are the root's: parameters outside it (a wrapper's own head) keep theirs
        trainable = set(base_names) | (set() if head else target.head)
        parameters = plain_names(name for name, _ in model.named_parameters())
        prefix = f"{target.root_path}." if target.root_path else ""
        set_trainable(target.root, {name[len(prefix):] for name in trainable if name.startswith(prefix) and name in parameters})


def _recorded_root(model: nn.Module, path: PathLike, root_path: str) -> Tuple[str, nn.Module]:
    """The submodule of ``model`` the file's surgery sits in, refused when ``model`` has none of that
    path, or carries surgery somewhere else."""
    try:
        root = model.get_submodule(root_path)
    except AttributeError:
        raise CheckpointError(
            f"{path} records surgery applied to the submodule {root_path!r}, which {type(model).__name__} does not "
            "have: load it into the module it was saved from"
        ) from None
    elsewhere = [p for p, _ in surgery_roots(model) if p != root_path]
    if elsewhere or (inserted_modules(model) and not surgery_roots(model)):
        def named(place: str) -> str:
            return repr(place) if place else "the model itself"

        where = named(elsewhere[0]) if elsewhere else "a module enclosing it"
        raise CheckpointError(
            f"{type(model).__name__} carries surgery applied to {where}, and {path} holds surgery applied to "
            f"{named(root_path)}; remove it first or load into a fresh model"
        )
    return root_path, root
