"""One run's settings, held once: what ``petl-surgery train`` builds from its arguments, what :func:`fit`
takes (:meth:`RunConfig.fit_arguments`) and what the run log records (:meth:`RunConfig.settings`).

The field names are the run log's keys (old logs keep reading: resume and evaluate check ``pretrained``,
``weights`` and ``seed``, evaluate checks ``classes``; :mod:`.outputs`). A field whose value only the run can
settle (the method a loaded delta brings, the image size of the model as built, the device under torchrun)
is set with :meth:`RunConfig.resolved` before the log is written, never written beside it under the same key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Mapping, Optional

from ..errors import SurgeryError

# a field the data's own record (``TrainingData.record``) writes, resolved (the format auto found, the split
# a layout's default): the config passes it to the data and leaves it out of its settings
_BY_DATA = {"by_data": True}


@dataclass(frozen=True)
class RunConfig:
    """The settings of one training run; the defaults are ``petl-surgery train``'s (and :func:`fit`'s).

    ``model`` is a model spec (:func:`petl_surgery.training.zoo.parse_model_spec`); ``method``, ``layers`` (the
    CLI's text, ``"all"`` for every block; a study grid's value as written), ``options`` and ``statistics`` the surgery (None after ``resume``
    or ``init``, which bring their own); ``precision`` the autocast of ``--amp``; ``compile`` the
    ``torch.compile`` backend (None: eager); ``cache_features`` whether the frozen prefix is cached (once
    resolved, ``{"start_block": N}``, the log's form); ``init`` the ``--init`` delta's path (once resolved,
    :meth:`petl_surgery.training.initialization.Init.record` of what was taken)."""

    model: str
    data: str = field(default="", metadata=_BY_DATA)
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    weights: Optional[str] = None
    method: Optional[str] = None
    layers: Any = None
    options: Dict[str, Any] = field(default_factory=dict)
    statistics: Optional[str] = None
    resumed_from: Optional[str] = None
    init: Any = None
    format: str = field(default="auto", metadata=_BY_DATA)
    split: Optional[str] = field(default=None, metadata=_BY_DATA)
    val: Optional[str] = field(default=None, metadata=_BY_DATA)
    val_split: float = 0.0
    shots: Optional[int] = field(default=None, metadata=_BY_DATA)
    shot_seed: Optional[int] = field(default=None, metadata=_BY_DATA)
    frames: Optional[int] = field(default=None, metadata=_BY_DATA)
    frame_stride: Optional[int] = field(default=None, metadata=_BY_DATA)
    video_aug: Optional[str] = field(default=None, metadata=_BY_DATA)
    image_size: Optional[int] = None
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    workers: int = 0
    grad_accum: int = 1
    device: str = "auto"
    precision: str = "none"
    seed: int = 0
    aug: str = "none"
    opt: str = "adamw"
    sched: str = "cosine"
    warmup_epochs: int = 0
    compile: Optional[str] = None
    cache_features: Any = False
    argv: Optional[List[str]] = None

    @property
    def draw_seed(self) -> int:
        """The seed of the ``shots`` draw: ``shot_seed``, else ``seed``."""
        return self.seed if self.shot_seed is None else self.shot_seed

    def resolved(self, **settled: Any) -> "RunConfig":
        """This config with the fields the run settled (e.g. ``method`` of a loaded delta, ``image_size`` of
        the model as built, ``device`` under torchrun); a name that is not a field is refused."""
        unknown = sorted(set(settled) - {f.name for f in fields(self)})
        if unknown:
            raise SurgeryError(f"RunConfig has no setting {unknown[0]!r}")
        return replace(self, **settled)

    def settings(self) -> Dict[str, Any]:
        """The run log's settings part: every field by its name, less those the data's record writes."""
        by_data = {f.name for f in fields(self) if f.metadata.get("by_data")}
        return {key: value for key, value in asdict(self).items() if key not in by_data}

    def fit_arguments(self) -> Dict[str, Any]:
        """:func:`petl_surgery.training.fit`'s keyword arguments of this run (``device`` and ``after_epoch``
        are the caller's: a torch device, a callback)."""
        return {
            "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
            "workers": self.workers, "seed": self.seed, "precision": self.precision, "grad_accum": self.grad_accum,
            "opt": self.opt, "sched": self.sched, "warmup_epochs": self.warmup_epochs,
            "compile_backend": self.compile, "cache_features": bool(self.cache_features),
        }


def run_log(config: RunConfig, data_record: Mapping[str, Any], facts: Mapping[str, Any]) -> Dict[str, Any]:
    """A run log: the config's settings, the data's record (``TrainingData.record``) and what the run
    measured (``facts``: classes, versions, history, ...). Each key comes from one of the three: a key two
    of them would write is refused (a SurgeryError naming it), so none is written twice."""
    log: Dict[str, Any] = {}
    for part in (config.settings(), data_record, facts):
        twice = sorted(set(part) & set(log))
        if twice:
            raise SurgeryError(f"run log key {twice[0]!r} would be written twice")
        log.update(part)
    return log
