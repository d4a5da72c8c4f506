"""The delta checkpoint's description of itself: metadata, base-architecture fingerprint, checksum.

A delta checkpoint is one safetensors file. Its tensors are the trainable tensors under their
state_dict names; its ``__metadata__`` holds one key, ``petl_surgery``, whose value is this JSON::

    {"format": "petl_surgery.delta", "format_version": 1, "library_version": "...",
     "methods": [{"method": "bapat", "options": {...}, "blocks": [0, 1, ...]}, ...],   # in apply order
     "statistics": "frozen",                                    # or "adapt": running statistics saved
     "model": {"class": "timm.models...VisionTransformer", "timm_name": "vit_...", "blocks": 12,
               "block_paths": ["blocks.0", ...]},
     "head": ["head.weight", "head.bias"],                      # the classifier head's tensors
     "fingerprint": "<sha256 of the base state_dict's names and shapes>",
     "fingerprint_without_head": "<the same, head left out>",
     "tensors_sha256": "<sha256 of the tensors' names, dtypes, shapes and bytes>"}
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Set

import torch
from torch import nn

from ..errors import SurgeryError

FORMAT_NAME = "petl_surgery.delta"
FORMAT_VERSION = 1
METADATA_KEY = "petl_surgery"


def base_shapes(model: nn.Module, delta: Set[str]) -> Dict[str, list]:
    """Names and shapes of the base model's state_dict (inserted tensors left out)."""
    return {name: list(tensor.shape) for name, tensor in model.state_dict().items() if name not in delta}


def fingerprint(shapes: Mapping[str, list]) -> str:
    text = ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_description(model: nn.Module, block_paths: List[str]) -> Dict[str, Any]:
    cls = type(model)
    config = getattr(model, "pretrained_cfg", None)
    timm_name: Optional[str] = config.get("architecture") if isinstance(config, Mapping) else None
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "timm_name": timm_name,
        "blocks": len(block_paths),
        "block_paths": block_paths,
    }


def encode(metadata: Mapping[str, Any]) -> Dict[str, str]:
    return {METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def decode(raw: Optional[Mapping[str, str]], path: str) -> Dict[str, Any]:
    """Parse and check a file's metadata; raises SurgeryError for anything not ours or too new."""
    if not raw or METADATA_KEY not in raw:
        raise SurgeryError(f"{path} is a safetensors file but not a petl_surgery delta checkpoint (no metadata)")
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise SurgeryError(f"{path}: the petl_surgery metadata is not valid JSON ({error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise SurgeryError(f"{path} is not a petl_surgery delta checkpoint (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise SurgeryError(
            f"{path} has delta format version {version!r}; this petl_surgery reads version {FORMAT_VERSION}"
        )
    for key, kind in (
        ("methods", list),
        ("model", dict),
        ("head", list),
        ("fingerprint", str),
        ("fingerprint_without_head", str),
        ("tensors_sha256", str),
    ):
        if not isinstance(metadata.get(key), kind):
            raise SurgeryError(f"{path}: the petl_surgery metadata lacks a valid {key!r} entry")
    if metadata.get("statistics", "frozen") not in ("frozen", "adapt"):
        raise SurgeryError(
            f"{path}: the petl_surgery metadata has statistics {metadata['statistics']!r}; expected 'frozen' or 'adapt'"
        )
    if not isinstance(metadata["model"].get("block_paths"), list):
        raise SurgeryError(f"{path}: the petl_surgery metadata lacks the model's block paths")
    for call in metadata["methods"]:
        if not (
            isinstance(call, dict)
            and isinstance(call.get("method"), str)
            and isinstance(call.get("options"), dict)
            and isinstance(call.get("blocks"), list)
        ):
            raise SurgeryError(f"{path}: the petl_surgery metadata has a malformed method entry {call!r}")
    return metadata
