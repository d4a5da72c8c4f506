"""The PVP demonstration: pre-trained PETL modules versus random-init ones on few-shot tasks.

``petl-surgery demo`` runs :data:`REDUCED` (a few minutes on 2 CPU cores); ``examples/pvp_fewshot.py``
runs :data:`FULL`. Everything is generated from seeds (:mod:`.tasks`); nothing is downloaded.
"""

from .pvp import FULL, MICRO, REDUCED, DemoConfig, DemoReport, Result, run
from .tasks import BACKBONE_TASK, SOURCE_TASK, TARGET_TASKS, Task, few_shot_split, make_images

__all__ = [
    "BACKBONE_TASK",
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
