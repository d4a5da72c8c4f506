"""What is trainable, where, and how many parameters: ``summary(model)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from torch import nn

from .freezing import head_parameter_names
from .inserted import SHARED_BLOCK
from .inventory import delta_names, inserted_modules
from .sites import discover
from .roots import adapted_names_under, surgery_roots
from .statistics import DEFAULT_MODE, mode_of


@dataclass(frozen=True)
class SummaryRow:
    """One inserted module: its method, block (``SHARED_BLOCK``, -2, for tensors shared by the blocks of
    one apply call), module path and parameter count."""

    method: str
    block: int
    path: str
    parameters: int


@dataclass(frozen=True)
class Summary:
    """Trainable parameters of a model after surgery; ``str()`` gives a readable table.

    Attributes:
        rows: one row per inserted module, in block order.
        per_method: inserted parameters per method.
        per_block: inserted parameters per block index (shared tensors are in ``shared``).
        head: trainable parameters of the classifier head(s).
        other_trainable: trainable base parameters outside the head (made trainable by ``unfreeze``),
            by name.
        trainable: all trainable parameters.
        total: all parameters of the model, inserted ones included.
        unsupported: what site discovery could not operate on, one line each (attention modules it
            does not understand, attention that q/k/v methods must refuse), with the reason.
        statistics: ``"frozen"`` or ``"adapt"`` (see ``apply``'s ``statistics``); for a module holding
            surgeries applied separately to submodules with different settings, both, as
            ``"adapt, frozen"``.
        adapted_statistics: with ``"adapt"``, the elements of the base's running-statistics buffers
            that the delta holds (not parameters: not in ``trainable``), by buffer name.
        shared: inserted parameters that no single block owns (FacT's factors), by method; counted in
            ``per_method`` too.
    """

    rows: List[SummaryRow]
    per_method: Dict[str, int]
    per_block: Dict[int, int]
    head: int
    other_trainable: Dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0
    unsupported: List[str] = field(default_factory=list)
    statistics: str = "frozen"
    adapted_statistics: Dict[str, int] = field(default_factory=dict)
    shared: Dict[str, int] = field(default_factory=dict)

    @property
    def inserted(self) -> int:
        return sum(self.per_method.values())

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = []
        path_width = max([len("module")] + [len(row.path) for row in self.rows])
        header = f"{'method':<10} {'block':>5}  {'module':<{path_width}} {'parameters':>12}"
        lines += [header, "-" * len(header)]
        for row in self.rows:
            block = "shared" if row.block == SHARED_BLOCK else str(row.block)
            lines.append(f"{row.method:<10} {block:>5}  {row.path:<{path_width}} {row.parameters:>12,}")
        lines.append("-" * len(header))
        for method, count in self.per_method.items():
            lines.append(f"{'total ' + method:<{len(header) - 13}} {count:>12,}")
        lines.append(f"{'classifier head (trainable)':<{len(header) - 13}} {self.head:>12,}")
        if self.other_trainable:
            lines.append(
                f"{'other trainable base (' + str(len(self.other_trainable)) + ' tensors)':<{len(header) - 13}} "
                f"{sum(self.other_trainable.values()):>12,}"
            )
        if self.adapted_statistics:
            lines.append(
                f"{'adapted running statistics (' + str(len(self.adapted_statistics)) + ' buffers)':<{len(header) - 13}} "
                f"{sum(self.adapted_statistics.values()):>12,}"
            )
        lines.append(
            f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.share:.3f}% of the model)"
        )
        if self.unsupported:
            lines.append(f"not operated on ({len(self.unsupported)}):")
            lines += [f"  {line}" for line in self.unsupported]
        return "\n".join(lines)


def _row(method: str, block: int, path: str, module: nn.Module) -> SummaryRow:
    return SummaryRow(method, block, path, sum(p.numel() for p in module.parameters()))


def _totals(rows: Sequence[SummaryRow]) -> Tuple[Dict[str, int], Dict[int, int], Dict[str, int]]:
    """(per method, per block, shared per method) of ``rows``: the one place inserted counts add up."""
    per_method: Dict[str, int] = {}
    per_block: Dict[int, int] = {}
    shared: Dict[str, int] = {}
    for row in rows:
        per_method[row.method] = per_method.get(row.method, 0) + row.parameters
        if row.block == SHARED_BLOCK:
            shared[row.method] = shared.get(row.method, 0) + row.parameters
        else:
            per_block[row.block] = per_block.get(row.block, 0) + row.parameters
    return per_method, per_block, shared


def planned_summary(model: nn.Module, insertions: Iterable[Any]) -> Summary:
    """The :class:`Summary` that ``apply`` would leave, from ``plan``'s insertions on an unchanged ``model``
    (what ``petl-surgery plan`` prints): one row per inserted module; ``head`` the classifier head's
    parameters (trainable after surgery), ``trainable`` the inserted ones and the head, ``total`` the model's
    and the inserted ones. Nothing else of the model is read as trainable: surgery freezes the rest."""
    rows = sorted((_row(i.module.method, i.block, i.path, i.module) for i in insertions),
                  key=lambda row: (row.block, row.path))
    per_method, per_block, shared = _totals(rows)
    heads = head_parameter_names(model)
    head = sum(p.numel() for name, p in model.named_parameters() if name in heads)
    inserted = sum(per_method.values())
    return Summary(rows=rows, per_method=per_method, per_block=per_block, head=head, trainable=inserted + head,
                   total=sum(p.numel() for p in model.parameters()) + inserted, shared=shared)


def summarize(model: nn.Module) -> Summary:
    rows = sorted(
        (_row(module.method, module.block, path, module) for path, module in inserted_modules(model)),
        key=lambda row: (row.block, row.path),
    )
    per_method, per_block, shared = _totals(rows)
    found = discover(model)
    unsupported = [f"{site.path} ({site.class_name}): {site.reason}" for site in found.unsupported]
    unsupported += [
        f"{block.attention.path} ({type(block.attention.module).__name__}): {block.attention.unsupported}"
        for block in found.blocks
        if block.attention is not None and block.attention.unsupported is not None
    ]
    delta = delta_names(model)
    heads = head_parameter_names(model)
    adapted = adapted_names_under(model)
    modes = sorted({mode_of(root) or DEFAULT_MODE for _, root in surgery_roots(model)}) or [DEFAULT_MODE]
    parameters = dict(model.named_parameters())
    head = sum(p.numel() for name, p in parameters.items() if name in heads and p.requires_grad)
    other = {
        name: p.numel()
        for name, p in parameters.items()
        if p.requires_grad and name not in heads and name not in delta
    }
    return Summary(
        rows=rows,
        per_method=per_method,
        per_block=per_block,
        head=head,
        other_trainable=other,
        trainable=sum(p.numel() for p in parameters.values() if p.requires_grad),
        total=sum(p.numel() for p in parameters.values()),
        unsupported=unsupported,
        statistics=", ".join(modes),
        adapted_statistics={name: b.numel() for name, b in model.named_buffers() if name in adapted},
        shared=shared,
    )
