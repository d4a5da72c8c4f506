"""The delta checkpoint's description of itself: metadata, base-architecture fingerprint, checksum.

A delta checkpoint is one safetensors file. Its tensors are the trainable tensors under their
state_dict names; its ``__metadata__`` holds one key, ``petl_surgery``, whose value is this JSON::

    {"format": "petl_surgery.delta", "format_version": 1, "library_version": "...",
     "root": "",                                     # the submodule surgery was applied to ("backbone")
     "methods": [{"method": "bapat", "options": {...}, "blocks": [0, 1, ...]}, ...],   # in apply order
     "statistics": "frozen",                                    # or "adapt": running statistics saved
     "model": {"class": "timm.models...VisionTransformer", "timm_name": "vit_...", "blocks": 12,
               "block_paths": ["blocks.0", ...]},             # the root's blocks, named from the model
     "head": ["head.weight", "head.bias"],                      # the classifier head's tensors
     "base_shapes": {"patch_embed.proj.weight": [768, 3, 16, 16], ...},  # the base state_dict's
     "fingerprint": "<sha256 of the base state_dict's names and shapes>",
     "fingerprint_without_head": "<the same, head left out>",
     "fingerprint_outside_blocks": "<the same, head and every block left out>",
     "block_fingerprints": ["<the same for block 0's tensors, named from the block>", ...],
     "tensors_sha256": "<sha256 of the tensors' names, dtypes, shapes and bytes>",
     "checksum": "<sha256 of all of the above as canonical JSON>"}

``decode`` checks the checksum and every entry's type and range, as strictly as ``apply`` checks its
arguments (the methods' options are checked by the methods themselves when the surgery is planned).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn

from ..errors import CheckpointError
from ..inserted import OUTSIDE_BLOCKS
from ..statistics import MODES as STATISTICS_MODES
from .plain import plain_state

FORMAT_NAME = "petl_surgery.delta"
FORMAT_VERSION = 1
METADATA_KEY = "petl_surgery"


def base_shapes(model: nn.Module, delta: Set[str]) -> Dict[str, list]:
    """Names and shapes of the base model's state_dict, parametrized tensors under their plain names
    (inserted tensors left out)."""
    return {name: list(tensor.shape) for name, tensor in plain_state(model).items() if name not in delta}


def fingerprint(shapes: Mapping[str, list]) -> str:
    text = ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def block_fingerprints(shapes: Mapping[str, list], block_paths: Sequence[str]) -> List[str]:
    """Per block, the fingerprint of its tensors named from the block (``attn.qkv.weight``), so that a
    block can be compared with a block at another path."""
    prints = []
    for path in block_paths:
        prefix = path + "."
        prints.append(fingerprint({n[len(prefix) :]: s for n, s in shapes.items() if n.startswith(prefix)}))
    return prints


def outside_blocks(shapes: Mapping[str, list], block_paths: Sequence[str]) -> Dict[str, list]:
    """The shapes of the tensors outside every block."""
    prefixes = tuple(path + "." for path in block_paths)
    return {n: s for n, s in shapes.items() if not n.startswith(prefixes)}


def metadata_checksum(metadata: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata as canonical JSON, its ``checksum`` entry left out. The metadata holds
    ``tensors_sha256``, so this covers the tensors too."""
    body = {key: value for key, value in metadata.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_description(model: nn.Module, block_paths: List[str], root: Optional[nn.Module] = None) -> Dict[str, Any]:
    """``model``'s class, the timm name of the model surgery sits in (``root``, default ``model``) and
    the block paths."""
    cls = type(model)
    config = getattr(model if root is None else root, "pretrained_cfg", None)
    timm_name: Optional[str] = config.get("architecture") if isinstance(config, Mapping) else None
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "timm_name": timm_name,
        "blocks": len(block_paths),
        "block_paths": block_paths,
    }


def encode(metadata: Mapping[str, Any]) -> Dict[str, str]:
    """The file's ``__metadata__``: the metadata with its checksum, as JSON."""
    sealed = {**metadata, "checksum": metadata_checksum(metadata)}
    return {METADATA_KEY: json.dumps(sealed, sort_keys=True, allow_nan=False)}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number petl_surgery writes")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: Any) -> bool:
    return type(value) is int  # not a bool, not a float such as 1.0


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def decode(raw: Optional[Mapping[str, str]], path: str) -> Dict[str, Any]:
    """Parse and check a file's metadata; raises CheckpointError for anything not ours, too new, edited
    after saving (checksum) or malformed."""
    if not raw or METADATA_KEY not in raw:
        raise CheckpointError(f"{path} is a safetensors file but not a petl_surgery delta checkpoint (no metadata)")
    try:
        metadata = json.loads(raw[METADATA_KEY], parse_constant=_refuse_constant)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: the petl_surgery metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise CheckpointError(f"{path} is not a petl_surgery delta checkpoint (format {found!r})")
    version = metadata.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has delta format version {version!r}; this petl_surgery reads version {FORMAT_VERSION}"
        )
    if not isinstance(metadata.get("checksum"), str) or metadata["checksum"] != metadata_checksum(metadata):
        raise CheckpointError(
            f"{path} is corrupt: its metadata does not match the checksum recorded when it was saved (or it "
            "was written by a petl_surgery that recorded none: save it again)"
        )
    _check_entries(metadata, path)
    return metadata


def _check_entries(metadata: Mapping[str, Any], path: str) -> None:
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: the petl_surgery metadata has an invalid {what}")

    for key in ("fingerprint", "fingerprint_without_head", "fingerprint_outside_blocks", "tensors_sha256"):
        if not isinstance(metadata.get(key), str) or not _HEX64.fullmatch(metadata[key]):
            raise refuse(f"{key!r} entry")
    shapes = metadata.get("base_shapes")
    if not (
        isinstance(shapes, dict)
        and all(isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape) for shape in shapes.values())
    ):
        raise refuse("'base_shapes' entry (tensor name -> list of sizes)")
    if not isinstance(metadata.get("root", ""), str):  # absent in files written before nesting: ""
        raise refuse("'root' entry (a module path)")
    if metadata.get("statistics") not in STATISTICS_MODES:
        expected = " or ".join(map(repr, STATISTICS_MODES))
        raise refuse(f"'statistics' entry {metadata.get('statistics')!r} (expected {expected})")
    if not _is_str_list(metadata.get("head")):
        raise refuse("'head' entry")
    model = metadata.get("model")
    if not (
        isinstance(model, dict)
        and isinstance(model.get("class"), str)
        and (model.get("timm_name") is None or isinstance(model.get("timm_name"), str))
        and _is_str_list(model.get("block_paths"))
        and _is_int(model.get("blocks"))
        and model["blocks"] == len(model["block_paths"])
    ):
        raise refuse("'model' entry (class, timm name, block count and block paths)")
    prints = metadata.get("block_fingerprints")
    if not (_is_str_list(prints) and len(prints) == model["blocks"] and all(_HEX64.fullmatch(p) for p in prints)):
        raise refuse("'block_fingerprints' entry")
    calls = metadata.get("methods")
    if not isinstance(calls, list) or not calls:
        raise refuse("'methods' entry (a non-empty list)")
    for call in calls:
        if not (
            isinstance(call, dict)
            and set(call) == {"method", "options", "blocks"}
            and isinstance(call["method"], str)
            and isinstance(call["options"], dict)
            and isinstance(call["blocks"], list)
            and call["blocks"]
            and (
                call["blocks"] == [OUTSIDE_BLOCKS]  # layers chosen by name pattern
                or all(_is_int(b) and 0 <= b < model["blocks"] for b in call["blocks"])
            )
            and len(set(call["blocks"])) == len(call["blocks"])
        ):
            raise CheckpointError(
                f"{path}: the petl_surgery metadata has a malformed method entry {call!r} (a method name, "
                f"its options, and distinct block indices in 0..{model['blocks'] - 1}, or [{OUTSIDE_BLOCKS}] "
                "for layers chosen by name)"
            )
