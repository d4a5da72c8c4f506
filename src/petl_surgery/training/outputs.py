"""Where a run writes (its delta and its JSON log), checked before the first epoch, and what a resumed or
evaluated delta must agree with (the base and the classes its run log records)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

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


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces: the identity of a ``--weights`` file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def check_base(
    delta: Path, log: Optional[Dict[str, Any]], *, seed: int, pretrained: bool, weights: Optional[Path], action: str
) -> None:
    """Refuse to ``action`` (resume, evaluate) ``delta`` on another base than the one its run ``log``
    (None: not found, nothing checked) records: with ``--pretrained`` or without it, with the same
    ``--weights`` file (its sha256, where the log records one) or without one, and with neither the seed
    that initialised the base's weights. Each refusal names what the log records and what was given."""
    if log is None:
        return
    if bool(log.get("pretrained")) != pretrained:
        was = "with" if log.get("pretrained") else "without"
        raise SurgeryError(f"{delta} was trained {was} --pretrained; {action} it the same way")
    recorded = log.get("weights")
    if bool(recorded) != bool(weights):
        if recorded:
            raise SurgeryError(f"{delta} was trained on the base weights of --weights {recorded}; {action} it with "
                               "the same file")
        raise SurgeryError(f"{delta} was trained without --weights; --weights {weights} would be another base")
    if weights and log.get("weights_sha256") and file_digest(Path(weights)) != log["weights_sha256"]:
        raise SurgeryError(f"{delta} was trained on --weights {recorded} (sha256 {log['weights_sha256'][:12]}...); "
                           f"--weights {weights} holds other bytes")
    if not pretrained and not weights and log.get("seed") is not None and log["seed"] != seed:
        raise SurgeryError(f"{delta} was trained on a base initialised with --seed {log['seed']} (no --pretrained); "
                           f"--seed {seed} would build another base: give --seed {log['seed']}")


def check_classes(delta: Path, log: Optional[Dict[str, Any]], classes: Sequence[str]) -> None:
    """Refuse evaluation data whose class names (in label order) are not those of the run ``log``
    (None: not found, nothing checked): the head's outputs would be read as other classes."""
    if log is None or log.get("classes") is None:
        return
    trained = [str(name) for name in log["classes"]]
    given = [str(name) for name in classes]
    if trained == given:
        return
    if sorted(trained) == sorted(given):
        problem = "the same names in another order (the labels would be permuted)"
    else:
        problem = f"other names (only in the data: {sorted(set(given) - set(trained))[:5]}, only in training: " \
                  f"{sorted(set(trained) - set(given))[:5]})"
    raise SurgeryError(f"the data's classes {_short(given)} are not the classes {delta} was trained on, "
                       f"{_short(trained)}: {problem}")


def _short(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
    return f"[{shown}]"


def head_classes(delta: Path) -> Optional[int]:
    """The number of classes of the head a delta was saved with (the first dimension of its head
    tensors, from the metadata's ``base_shapes``), or None for a delta without a head."""
    from ..checkpoints.files import read
    from ..checkpoints.format import decode

    _, raw = read(delta)
    meta = decode(raw, str(delta))
    sizes = {meta["base_shapes"][name][0] for name in meta["head"] if meta["base_shapes"].get(name)}
    return sizes.pop() if len(sizes) == 1 else None
