"""Where a run writes (its delta and its JSON log), checked before the first epoch, and what a resumed
run must agree with."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import SurgeryError


def is_delta(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by ``petl_surgery.save``."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return "petl_surgery" in (handle.metadata() or {})
    except Exception:  # not safetensors at all, or damaged
        return False


def read_run_log(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON log a training run wrote at ``path`` (an object with ``history`` and the
    ``petl_surgery`` version), or None if ``path`` holds anything else."""
    try:
        log = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(log, dict) and "history" in log and "petl_surgery" in (log.get("versions") or {}):
        return log
    return None


def _check_writable(path: Path, what: str) -> None:
    parent = path.parent
    if path.is_dir():
        raise SurgeryError(f"{what} {path} is a directory")
    if not parent.is_dir():
        raise SurgeryError(f"cannot write {what} {path}: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".petl-check-"):
            pass
    except OSError as error:
        raise SurgeryError(f"cannot write {what} {path}: {parent} is not writable ({error.strerror or error})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise SurgeryError(f"cannot write {what} {path}: the file is not writable")


def check_output_paths(out: Path, log: Path) -> None:
    """Refuse, before anything trains: ``out`` and ``log`` the same file, a directory that does not
    exist or cannot be written, or an existing file that is not ours (``out`` not a petl_surgery
    delta, ``log`` not a run log): such a file is never overwritten."""
    out, log = Path(out), Path(log)
    if out.resolve() == log.resolve():
        raise SurgeryError(f"the delta and the log would both be written to {out}")
    _check_writable(out, "the delta")
    _check_writable(log, "the log")
    if out.exists() and not is_delta(out):
        raise SurgeryError(f"{out} exists and is not a petl_surgery delta: not overwriting it (choose another --out)")
    if log.exists() and read_run_log(log) is None:
        raise SurgeryError(f"{log} exists and is not a petl-surgery training log: not overwriting it (choose another --log-file)")


def check_resume(delta: Path, log: Optional[Dict[str, Any]], *, seed: int, pretrained: bool) -> None:
    """Refuse to resume ``delta`` on another base than the one it was trained on, as its run ``log``
    (None: not found) records: with ``--pretrained`` or without it, and without it the seed that
    initialised the base's weights."""
    if log is None:
        return
    if bool(log.get("pretrained")) != pretrained:
        was = "with" if log.get("pretrained") else "without"
        raise SurgeryError(f"{delta} was trained {was} --pretrained; resume it the same way")
    if not pretrained and log.get("seed") is not None and log["seed"] != seed:
        raise SurgeryError(f"{delta} was trained on a base initialised with --seed {log['seed']} (no --pretrained); "
                           f"--seed {seed} would build another base: give --seed {log['seed']}")


def head_classes(delta: Path) -> Optional[int]:
    """The number of classes of the head a delta was saved with (the first dimension of its head
    tensors, from the metadata's ``base_shapes``), or None for a delta without a head."""
    from ..checkpoints.files import read
    from ..checkpoints.format import decode

    _, raw = read(delta)
    meta = decode(raw, str(delta))
    sizes = {meta["base_shapes"][name][0] for name in meta["head"] if meta["base_shapes"].get(name)}
    return sizes.pop() if len(sizes) == 1 else None
