"""The demonstration's few-shot targets by name: the generated tasks of :mod:`.tasks` and the real
handwritten digits of :mod:`.digits`.

A target has ``name``, ``description``, ``kind`` (``"real"`` or ``"generated"``), ``classes``,
``num_classes``, ``few_shot(shots, seed)`` and ``test_set(per_class, seed)``.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from .digits import DIGITS
from .tasks import TARGET_TASKS

TARGETS: Dict[str, Any] = {"digits": DIGITS, **TARGET_TASKS}


def targets_by_name(names: Sequence[str]) -> Dict[str, Any]:
    """The targets called ``names``, in that order; raises ValueError naming an unknown one."""
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target task {unknown[0]!r}; known: {', '.join(TARGETS)}")
    return {name: TARGETS[name] for name in names}
