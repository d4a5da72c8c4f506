"""The PVP demonstration: pre-trained PETL modules versus random-init ones on few-shot tasks.

``petl-surgery demo`` runs :data:`REDUCED` (a few minutes on 2 CPU cores); ``examples/pvp_fewshot.py``
runs :data:`FULL`. The target tasks are generated from seeds (:mod:`.tasks`) and, with scikit-learn
installed (the ``demo`` extra), the real handwritten digits it ships (:mod:`.digits`); nothing is
downloaded. Gains come with 95% intervals (:mod:`.stats`).
"""

from .pvp import FULL, MICRO, REDUCED, DemoConfig, DemoReport, Result, run
from .digits import DIGITS, DigitsTask
from .targets import TARGETS, targets_by_name
from .tasks import BACKBONE_TASK, SOURCE_TASK, TARGET_TASKS, Task, few_shot_split, make_images

__all__ = [
    "BACKBONE_TASK",
    "DIGITS",
    "DigitsTask",
    "TARGETS",
    "targets_by_name",
    "FULL",
    "MICRO",
    "REDUCED",
    "SOURCE_TASK",
    "TARGET_TASKS",
    "DemoConfig",
    "DemoReport",
    "Result",
    "Task",
    "few_shot_split",
    "make_images",
    "run",
]
