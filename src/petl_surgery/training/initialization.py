"""Starting a training run from another task's PETL modules (PVP's second stage) instead of a random init.

PVP ("PVP: Pre-trained Visual Parameter-Efficient Tuning", Song et al., 2023) first trains the modules
on a large source task with the backbone frozen, then tunes them on each few-shot target. In Python that is ``ps.load(model, source_delta, load_head=False)``; :class:`Init` states the same
choice for ``petl-surgery train --init`` and for a study's ``init``/``inits``, and records the file by its
SHA-256 so that a log or a study names exactly the modules a run started from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from ..errors import SurgeryError

RANDOM = "random"  # the init of a method applied afresh (``ps.apply``)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Init:
    """Where a run's modules start: a delta checkpoint and what of it to take.

    Attributes:
        path: the delta checkpoint (``ps.save``'s file).
        head: also take its classifier head (default False: the model keeps its own new head, as PVP's
            targets have other classes).
        methods: take only these of its methods (default all; ``ps.load``'s ``methods``).
        blocks: take only these saved block indices (default all; ``ps.load``'s ``blocks``).
        block_map: ``{saved block: model block}`` for a model of another depth (``ps.load``'s).
    """

    path: Path
    head: bool = False
    methods: Optional[Sequence[str]] = None
    blocks: Optional[Sequence[int]] = None
    block_map: Optional[Mapping[int, int]] = None

    def check_file(self) -> None:
        """Refuse a path that is not a file, before anything is built."""
        if not Path(self.path).is_file():
            raise SurgeryError(f"no delta checkpoint to start from at {self.path}")

    def load_into(self, model: nn.Module, method: Optional[str] = None) -> Dict[str, Any]:
        """Load the modules into ``model`` (without surgery yet) and return the record for a log: the
        file, its SHA-256 and the choices. ``method``: the method the run is meant to train; the init
        must hold it, and it must be all that is loaded. A file that does not fit the model, or holds
        another method, raises SurgeryError before the model is changed (``ps.load`` checks first)."""
        from ..inventory import surgery_record
        from ..loading import load

        self.check_file()
        methods = self.methods
        if method is not None and methods is None:
            methods = [method]
        if method is not None and list(methods) != [method]:
            raise SurgeryError(f"the init's methods {list(methods)} are not the run's method {method!r}")
        load(model, self.path, load_head=self.head, methods=methods, layers=self.blocks, block_map=self.block_map)
        return self.record(surgery_record(model))

    def record(self, surgery: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The init as a log records it: path, sha256, head, methods, blocks, block_map (and the surgery
        it gave, when known)."""
        entry: Dict[str, Any] = {
            "path": str(self.path), "sha256": file_sha256(Path(self.path)), "head": self.head,
            "methods": None if self.methods is None else list(self.methods),
            "blocks": None if self.blocks is None else list(self.blocks),
            "block_map": None if self.block_map is None else {str(k): v for k, v in self.block_map.items()},
        }
        if surgery is not None:
            entry["surgery"] = surgery
        return entry
