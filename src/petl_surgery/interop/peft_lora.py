"""Hugging Face PEFT LoRA adapter directories, both ways, for timm (and other site-described) models.

The format (PEFT's ``save_pretrained``, checked against peft 0.21; documented in PEFT's
``docs/source/developer_guides/checkpoint.md``): a directory holding

- ``adapter_config.json``: ``peft_type`` ``"LORA"``, ``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module r and alpha; a key matches a module path ``p`` when
  ``re.match(rf"(.*\\.)?({key})$", p)``), ``lora_dropout``, ``target_modules``, ``modules_to_save``, ...
- ``adapter_model.safetensors`` (or the pickled ``adapter_model.bin``): ``base_model.model.<path>.lora_A.weight``
  (r x d_in) and ``.lora_B.weight`` (d_out x r) per wrapped module, with the update
  ``scaling * B A``, ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); a module in
  ``modules_to_save`` as a full copy of its state_dict under ``base_model.model.<path>.<name>`` (the
  adapter name and ``modules_to_save`` are stripped on saving; older files may keep
  ``<path>.modules_to_save.default.<name>``, read too); with ``bias="all"``/``"lora_only"`` the base
  biases as ``base_model.model.<path>.bias`` (``<path>.base_layer.bias`` for a wrapped module).

Import (:func:`import_peft`): PEFT wraps whole modules; timm's attention computes q, k and v with one
fused Linear ``qkv``, so a PEFT LoRA there is one A (r x d) and one B (3d x r). It becomes our LoRA
target "qkv" (one A, one B: the same tensors), so outputs are identical, training trains PEFT's model
and the parameter count is PEFT's. A module that produces some of q, k, v but not exactly
``[q | k | v]`` (a ``kv`` Linear laid out ``[k | v]``, a ``qk`` one) becomes the targets it produces,
each with A = the shared A and B = its rows of B: ``B A`` restricted to each slice is exactly that
(the copies of A then train independently: a superset of the tied parameterisation). Other modules
map to our targets "proj", "fc1", "fc2" through the model's site descriptions; a LoRA on any other
module (a CNN's convolutions, a stem, a patch embedding) becomes LoRA's ``modules`` option on that
layer, PEFT's conv LoRA included (:mod:`.peft_layers`), and one on a module that is not a Linear or a
convolution of one group (a norm, a grouped convolution) is refused by name. Per-module ranks and alphas (``rank_pattern``,
``alpha_pattern``, rsLoRA) are kept exactly: modules of one attention or MLP share one rank (smaller
ones zero-padded, which stays zero in training: both gradients of a zero row/column pair vanish) and
one scaling (a differing one is folded into B).

Export (:func:`export_peft`): the LoRA on each producer is written as one PEFT LoRA on it: target
"qkv" as its own A and B (an import followed by an export gives back PEFT's tensors exactly, when the
modules of each attention and MLP share one rank and scaling); targets q, k, v on a fused ``qkv``
that share A as that A with their B's stacked into the output rows (rank r); otherwise their A's
stacked and their B's block-diagonal (rank: the sum), the rows of untargeted slices zero; LoRA on a
layer chosen by name as PEFT's LoRA on that layer (a convolution's A and B as PEFT's conv LoRA). Trainable
base parameters (the head) are written as ``modules_to_save`` (their whole module).
``peft.PeftModel.from_pretrained(fresh_model, directory)`` then computes what the model computes.

DoRA (``use_dora: true``): each wrapped module also has ``base_model.model.<path>.lora_magnitude_vector``
(one m per output row; ``...lora_magnitude_vector.default.weight`` in memory). It imports as method
"dora" the same way, each target taking its rows of m (DoRA's rows are independent, so splitting a fused
LoRA by rows with A copied computes the same); DoRA exports with m on the targets' rows and ``||W0||``
on rows the exported B leaves zero (PEFT's ``m / n`` is 1 there). LoRA and DoRA in one model cannot be
one PEFT adapter (``use_dora`` is per adapter) and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoints.files import PathLike, read, write_atomic
from ..errors import CheckpointError, SurgeryError, UnsupportedModelError
from ..inventory import delta_names, inserted_modules
from ..methods.layer_lora import LayerLowRank
from ..methods.dora import WeightDecomposedAdapter
from ..methods.lora import LowRankAdapter
from ..methods.targets import FUSED_QKV, TARGETS, foldable_weight, fused_qkv
from ..sites import Block, Projection, discover
from ..wrappers import inner
from .common import Call, group_calls, install
from .files import load_pickle, state_dict_of
from .peft_layers import layer_calls, layer_entry

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# adapter_config.json entries that change what a LoRA computes in ways petl_surgery's LoRA does not.
UNSUPPORTED_OPTIONS = {
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters",
    "alora_invocation_tokens": "activated LoRA",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
}


# ------------------------------------------------------------------------------------------- import


def read_adapter(directory: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The config and the tensors of a PEFT adapter directory; raises SurgeryError for anything missing,
    unreadable or not a LoRA this library can represent."""
    folder = Path(directory)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{folder} holds a PEFT adapter of type {kind!r}; petl_surgery imports LORA adapters only")
    used = [name for option, name in UNSUPPORTED_OPTIONS.items() if config.get(option)]
    if used:
        raise CheckpointError(f"{folder}: its LoRA uses {', '.join(used)}, which petl_surgery's LoRA cannot represent")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if isinstance(config.get(key), bool) or not isinstance(config.get(key), kind):
            raise CheckpointError(f"{folder / CONFIG_NAME} lacks a valid {key!r}")
    if (folder / SAFETENSORS_NAME).is_file():
        tensors = read(folder / SAFETENSORS_NAME)[0]
    elif (folder / BIN_NAME).is_file():
        tensors = state_dict_of(load_pickle(folder / BIN_NAME), str(folder / BIN_NAME))
    else:
        raise CheckpointError(f"{folder} has no {SAFETENSORS_NAME} (nor {BIN_NAME})")
    return config, tensors


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's per-module value: the first pattern ``key`` with ``re.match(rf"(.*\\.)?({key})$", path)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _split_names(
    tensors: Mapping[str, torch.Tensor], source: str, dora: bool = False
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    """LoRA pairs per wrapped module path (with DoRA, their ``lora_magnitude_vector`` as "M"), and the
    base tensors (modules_to_save, biases) by state_dict name."""
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    base: Dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{source}: tensor {key!r} does not start with {PREFIX!r}, as PEFT's LoRA tensors do")
        name = key[len(PREFIX) :]
        match = re.match(r"^(.+)\.lora_(A|B)(?:\.default)?\.weight$", name)
        magnitude = re.match(r"^(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$", name) if dora else None
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif magnitude:
            pairs.setdefault(magnitude.group(1), {})["M"] = tensor
        elif re.search(r"(^|\.)lora_", name):
            raise CheckpointError(f"{source}: tensor {key!r} belongs to a LoRA variant petl_surgery cannot represent")
        else:
            base[re.sub(r"\.(modules_to_save(\.default)?|base_layer)\.", ".", name)] = tensor
    return pairs, base


def _site_index(blocks: List[Block]) -> Dict[str, Tuple[Block, str, List[Tuple[str, Projection]]]]:
    """Full module path of every producer our LoRA can target -> (block, host kind, its roles); the
    producer of exactly ``[q | k | v]`` has the one role "qkv" (PEFT's LoRA on it, tied)."""
    index: Dict[str, Tuple[Block, str, List[Tuple[str, Projection]]]] = {}
    for block in blocks:
        site = block.attention
        if site is not None:
            fused = fused_qkv(site)
            named = {FUSED_QKV: fused} if fused is not None else dict(site.projections)
            if site.output is not None:
                named["proj"] = site.output
            for role, projection in named.items():
                index.setdefault(f"{site.path}.{projection.module}", (block, "attention", []))[2].append((role, projection))
        if block.mlp is not None:
            for role, projection in block.mlp.projections.items():
                index.setdefault(f"{block.mlp.path}.{projection.module}", (block, "mlp", []))[2].append((role, projection))
    return index


def _rows(projection: Projection) -> List[int]:
    if projection.index is not None:
        return list(projection.index)
    return list(range(projection.start, projection.start + projection.width))


def _matrix(tensor: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """A LoRA weight as a matrix: a 1x1-conv LoRA's (out, in, 1, 1) weight flattened."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    raise CheckpointError(f"{source}: {name} has shape {list(tensor.shape)}; only Linear and 1x1-conv LoRA is supported")


@dataclass(frozen=True)
class _Wrapped:
    """One PEFT LoRA: the roles its module produces, ``scaling * B A``, and its rank."""

    roles: Tuple[Tuple[str, Projection], ...]
    a: torch.Tensor
    b: torch.Tensor
    rank: int
    scaling: float
    magnitude: Optional[torch.Tensor] = None  # DoRA's m, one per output row


def _wrapped(
    path: str, pair: Mapping[str, torch.Tensor], config: Mapping[str, Any], roles: List[Tuple[str, Projection]], source: str
) -> _Wrapped:
    """Check one module's LoRA against its config entry and the roles it must split into."""
    dora = bool(config.get("use_dora"))
    if set(pair) != ({"A", "B", "M"} if dora else {"A", "B"}):
        lacking = next(name for name in ("A", "B", "M") if name not in pair)
        raise CheckpointError(f"{source}: module {path!r} has {'lora_magnitude_vector' if lacking == 'M' else 'lora_' + lacking} missing")
    a, b = _matrix(pair["A"], f"{path}.lora_A", source), _matrix(pair["B"], f"{path}.lora_B", source)
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise CheckpointError(f"{source}: {path}: lora_A has rank {rank}, lora_B {b.shape[1]}")
    expected = _pattern_value(config.get("rank_pattern"), path, config["r"])
    if rank != expected:
        raise CheckpointError(f"{source}: {path}: its tensors have rank {rank}, its config says r = {expected}")
    rows = sorted(row for _, projection in roles for row in _rows(projection))
    if rows != list(range(b.shape[0])):
        raise CheckpointError(
            f"{source}: the LoRA on {path!r} changes {b.shape[0]} output channels, but "
            f"{', '.join(r for r, _ in roles)} cover {len(rows)} of them; it cannot be split into our targets"
        )
    magnitude = pair.get("M")
    if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
        raise CheckpointError(f"{source}: {path}: lora_magnitude_vector has shape {list(magnitude.shape)}, not [{b.shape[0]}]")
    alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return _Wrapped(tuple(roles), a, b, rank, float(scaling), magnitude)


def _host_entry(wrapped: Sequence[_Wrapped], dropout: float) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Options and tensors of one host's LoRA: one rank (the largest; smaller ones zero-padded) and one
    scaling (the first; the others' ratio folded into their B)."""
    rank, scaling = max(w.rank for w in wrapped), wrapped[0].scaling
    local: Dict[str, torch.Tensor] = {}
    for w in wrapped:
        for role, projection in w.roles:
            part = w.b[_rows(projection)]
            part = part * (w.scaling / scaling) if w.scaling != scaling else part
            local[f"{role}.lora_A"] = torch.cat([w.a, w.a.new_zeros(rank - w.rank, w.a.shape[1])])
            local[f"{role}.lora_B"] = torch.cat([part, part.new_zeros(part.shape[0], rank - w.rank)], dim=1)
            if w.magnitude is not None:  # DoRA's rows are independent: each target takes its rows of m
                local[f"{role}.magnitude"] = w.magnitude[_rows(projection)]
    targets = tuple(t for t in TARGETS if f"{t}.lora_A" in local)
    return {"rank": rank, "alpha": scaling * rank, "dropout": dropout, "targets": targets}, local


def plan_import(
    model: nn.Module, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> Tuple[List[Call], Dict[str, torch.Tensor]]:
    """The LoRA calls (with their tensors) and the base tensors that reproduce a PEFT adapter."""
    pairs, base = _split_names(tensors, source, dora=bool(config.get("use_dora")))
    index = _site_index(discover(model).blocks)
    hosts: Dict[Tuple[int, str], List[_Wrapped]] = {}
    outside = {path: pair for path, pair in pairs.items() if path not in index}  # LoRA's ``modules`` option
    for path, pair in sorted(pairs.items()):
        if path in outside:
            continue
        block, kind, roles = index[path]
        hosts.setdefault((block.index, kind), []).append(_wrapped(path, pair, config, roles, source))

    dropout = float(config.get("lora_dropout") or 0.0)
    per_block: Dict[int, List[Tuple[Dict[str, Any], Dict[str, torch.Tensor]]]] = {}
    for (block, _), wrapped in sorted(hosts.items()):
        options, local = _host_entry(wrapped, dropout)
        entries = per_block.setdefault(block, [])
        if entries and (entries[0][0]["rank"], entries[0][0]["alpha"]) == (options["rank"], options["alpha"]):
            # attention and MLP with one rank and alpha: one apply with all targets, as a user would write
            targets = tuple(t for t in TARGETS if t in entries[0][0]["targets"] or t in options["targets"])
            entries[0] = ({**options, "targets": targets}, {**entries[0][1], **local})
        else:
            entries.append((options, local))
    items = [(block, options, local) for block, entries in per_block.items() for options, local in entries]

    def scaling_of(path: str, rank: int) -> Tuple[int, float]:
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return _pattern_value(config.get("rank_pattern"), path, config["r"]), float(scaling)

    if config.get("use_dora"):
        if outside:
            raise CheckpointError(
                f"{source}: a DoRA adapter (use_dora) on {sorted(outside)[0]!r}, a layer outside the blocks' "
                "q/k/v/proj/fc1/fc2 targets; DoRA loads on those targets only"
            )
        return group_calls("dora", items), base
    return group_calls("lora", items) + layer_calls(model, outside, scaling_of, dropout, source), base


def import_peft(model: nn.Module, directory: PathLike) -> nn.Module:
    """Apply to ``model`` the LoRA of a PEFT adapter directory, with its weights, in place; return it.

    The base tensors it carries (``modules_to_save`` heads, biases) are loaded too. Afterwards the LoRA
    modules and exactly those base tensors are trainable. Anything that does not fit (another peft
    type, a LoRA variant, a module our LoRA cannot target, shapes) raises SurgeryError before the model
    changes. See the module docstring for the mapping.
    """
    config, tensors = read_adapter(directory)
    calls, base = plan_import(model, config, tensors, str(directory))
    return install(model, calls, base, str(directory))


# ------------------------------------------------------------------------------------------- export


def _fused(adapter: LowRankAdapter, producer: str, out_rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) equal to the sum of the adapter's updates on ``producer``'s output rows: a target
    spanning all of them in order ("qkv", "proj", ...) as its own A and B; targets sharing one A (as
    after an import of a ``[k | v]`` LoRA) as that A and their B's in their rows; others as their A's
    stacked and their B's block-diagonal."""
    targets = [t for t in adapter.targets if t.producer == producer]
    pairs = [adapter.pair(t.name) for t in targets]
    a0 = pairs[0].lora_A.detach()
    shared = all(torch.equal(p.lora_A.detach(), a0) for p in pairs[1:])
    rank = a0.shape[0]
    a = a0 if shared else torch.cat([p.lora_A.detach() for p in pairs])
    b = a0.new_zeros(out_rows, a.shape[0])
    for number, (target, pair) in enumerate(zip(targets, pairs)):
        write = target.write
        start, width = write.output_start, write.width
        rows = list(write.index) if write.index is not None else list(range(start, start + width))
        columns = slice(0, rank) if shared else slice(number * rank, (number + 1) * rank)
        b[rows, columns] = pair.lora_B.detach().to(b.dtype)
    return a, b


def _peft_matches(name: str, targets: List[str]) -> bool:
    """PEFT's ``target_modules`` rule for a list: the name itself, or a suffix after a dot."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def _lora_modules(model: nn.Module) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor, float]], float]:
    """Module path -> (A, B, scaling) of one PEFT LoRA per producer, and the dropout they share."""
    present = inserted_modules(model)
    if not present:
        raise UnsupportedModelError(f"{type(model).__name__} carries no LoRA to export")
    others = sorted({module.method for _, module in present if not isinstance(module, (LowRankAdapter, LayerLowRank))})
    if others:
        raise UnsupportedModelError(f"PEFT's LoRA format cannot hold method(s) {', '.join(others)}; remove them before exporting")
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    dropouts = set()
    for path, adapter in present:
        host_path = path.rpartition(".")[0]
        host = model.get_submodule(host_path)
        dropouts.add(float(adapter.dropout.p))
        if isinstance(adapter, LayerLowRank):  # a layer chosen by name: PEFT's LoRA on that layer
            _refuse_second(modules, host_path)
            modules[host_path] = layer_entry(host_path, adapter, host)
            continue
        assert isinstance(adapter, LowRankAdapter)
        for producer in adapter.producers():
            try:
                weight = foldable_weight(host.get_submodule(producer), pointwise=True)
            except AttributeError:  # a stand-in added by the site's patches, not a module of the model
                weight = None
            if weight is None:
                raise UnsupportedModelError(
                    f"the LoRA of {path!r} acts on {producer!r}, which is not a plain Linear or 1x1 Conv2d module "
                    "of the model; PEFT cannot wrap it"
                )
            a, b = _fused(adapter, producer, weight.shape[0])
            if weight.dim() == 4:
                a, b = a[:, :, None, None], b[:, :, None, None]
            key = f"{host_path}.{producer}" if host_path else producer
            _refuse_second(modules, key)
            modules[key] = (a, b, adapter.scaling)
    if len(dropouts) > 1:
        raise UnsupportedModelError(f"PEFT has one lora_dropout per adapter; this model's LoRA uses {sorted(dropouts)}")
    return modules, dropouts.pop()


def _refuse_second(modules: Mapping[str, Any], path: str) -> None:
    if path in modules:
        raise UnsupportedModelError(
            f"two LoRA updates act on {path!r} (by targets and by modules); PEFT holds one LoRA per module"
        )


def _dora_magnitudes(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Module path -> PEFT's ``lora_magnitude_vector`` over all its output rows, when the model's
    low-rank adapters are DoRA (empty for LoRA): the targets' m on their rows, ``||W0||`` elsewhere (so
    that PEFT's ``m / n`` is 1 on rows the exported B leaves zero)."""
    present = inserted_modules(model)
    kinds = {isinstance(module, WeightDecomposedAdapter) for _, module in present}
    if kinds == {False}:
        return {}
    if len(kinds) > 1:
        raise UnsupportedModelError("a PEFT adapter is LoRA or DoRA in all its modules (use_dora); this model carries both")
    magnitudes: Dict[str, torch.Tensor] = {}
    for path, adapter in present:
        assert isinstance(adapter, WeightDecomposedAdapter)
        host_path = path.rpartition(".")[0]
        host = model.get_submodule(host_path)
        for producer in adapter.producers():
            layer = host.get_submodule(producer)
            if type(layer) is not nn.Linear:
                raise UnsupportedModelError(f"the DoRA of {path!r} acts on {producer!r}, a {type(layer).__name__}; DoRA exports on Linear modules only")
            magnitude = torch.linalg.norm(layer.weight.detach(), dim=1)
            for target in adapter.targets:
                if target.producer == producer:
                    write = target.write
                    rows = list(write.index) if write.index is not None else list(range(write.output_start, write.output_start + write.width))
                    magnitude[rows] = adapter.pair(target.name).magnitude.detach().to(magnitude.dtype)
            magnitudes[f"{host_path}.{producer}" if host_path else producer] = magnitude
    return magnitudes


def _modules_to_save(model: nn.Module, targets: List[str]) -> List[str]:
    """The modules owning the model's trainable base parameters, checked against PEFT's matching rules
    (``modules_to_save``: any module name ending with the entry; ``target_modules``: see _peft_matches)."""
    delta = delta_names(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and name not in delta]
    owners = sorted({name.rpartition(".")[0] for name in trainable})
    if "" in owners:
        loose = [name for name in trainable if "." not in name]
        raise UnsupportedModelError(
            f"trainable parameters {', '.join(loose)} belong to no submodule; PEFT's modules_to_save cannot hold them"
        )
    names = [name for name, _ in model.named_modules()]
    for owner in owners:
        clashes = [n for n in names if n.endswith(owner) and n != owner]
        inside = [m for m in targets if m == owner or m.startswith(owner + ".")]
        if clashes or inside:
            raise UnsupportedModelError(
                f"trainable module {owner!r} cannot be a PEFT modules_to_save entry: "
                + (f"PEFT would also match {clashes[0]!r}" if clashes else f"it holds the LoRA target {inside[0]!r}")
            )
    extra = sorted(n for n in names if _peft_matches(n, targets) and n not in targets)
    if extra:
        raise UnsupportedModelError(f"PEFT would also put LoRA on {', '.join(extra[:3])}; cannot export this model's LoRA")
    return owners


def _ranks_and_alphas(modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor, float]]) -> Dict[str, Any]:
    """``r``, ``lora_alpha`` (of the commonest rank) and the per-module ``rank_pattern``/``alpha_pattern``
    giving each module PEFT scaling ``alpha / r`` equal to ours."""
    r0 = Counter(a.shape[0] for a, _, _ in modules.values()).most_common(1)[0][0]
    alpha0 = next(s for a, _, s in modules.values() if a.shape[0] == r0) * r0
    rank_pattern: Dict[str, int] = {}
    alpha_pattern: Dict[str, float] = {}
    for path, (a, _, scaling) in modules.items():
        if a.shape[0] != r0:
            rank_pattern[re.escape(path)] = int(a.shape[0])
        if not math.isclose(scaling * a.shape[0], alpha0, rel_tol=1e-12):
            alpha_pattern[re.escape(path)] = scaling * a.shape[0]
    return {"r": r0, "lora_alpha": alpha0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def export_peft(model: nn.Module, directory: PathLike) -> Path:
    """Write the LoRA of ``model`` (and its trainable heads) as a PEFT LoRA adapter directory; return it.

    ``peft.PeftModel.from_pretrained(fresh_model, directory)`` on the same base model then gives the
    same outputs. Refused, naming why and before anything is written: other methods present (PEFT's
    LoRA format cannot hold them), a LoRA on a projection that is not a plain Linear or 1x1 Conv2d
    module, trainable base parameters that belong to no submodule or that PEFT's name matching would
    confuse with others, different dropouts.
    """
    model = inner(model, changes=False)  # PEFT would find no module under a wrapper's key prefixes
    magnitudes = _dora_magnitudes(model)  # first: a LoRA and DoRA mix is refused as such
    modules, dropout = _lora_modules(model)
    targets = sorted(modules)
    owners = _modules_to_save(model, targets)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise UnsupportedModelError(f"cannot export to {folder}: it is a file")
    if not folder.parent.is_dir():
        raise UnsupportedModelError(f"cannot export to {folder}: directory {folder.parent} does not exist")

    tensors: Dict[str, torch.Tensor] = {}
    for path, (a, b, _) in modules.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
        if path in magnitudes:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = magnitudes[path].to("cpu", copy=True).contiguous()
    for owner in owners:
        for key, tensor in model.get_submodule(owner).state_dict().items():
            tensors[f"{PREFIX}{owner}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        **_ranks_and_alphas(modules),
        "lora_dropout": dropout,
        "use_rslora": False,
        "use_dora": bool(magnitudes),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": targets,
        "modules_to_save": owners or None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    }
    folder.mkdir(exist_ok=True)
    write_atomic(folder / SAFETENSORS_NAME, tensors, {"format": "pt"})
    _write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return folder


def _write_text_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def is_adapter_directory(path: PathLike) -> Optional[Path]:
    """The PEFT adapter directory ``path`` is or lies in (its config or weights file), or None."""
    folder = Path(path)
    if folder.is_file() and folder.name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        folder = folder.parent
    return folder if folder.is_dir() and (folder / CONFIG_NAME).is_file() else None
