"""The PVP demonstration: pre-trained PETL modules versus random-init ones on few-shot tasks, run
through the study a user runs (:func:`petl_surgery.training.run_study`).

``petl-surgery demo`` runs :data:`REDUCED`; ``demo --full`` and ``examples/pvp_fewshot.py`` run
:data:`FULL`. The images are generated from seeds (:mod:`.tasks`, :mod:`.glyphs`) and, with
scikit-learn installed (the ``demo`` extra), the real handwritten digits it ships (:mod:`.digits`);
nothing is downloaded. Gains come with 95% intervals (:mod:`petl_surgery.training.intervals`). The
design and why it was chosen: docs/demo.md.
"""

from .digits import DIGITS, DigitsTask
from .glyphs import glyph_classes, glyph_images
from .pvp import FULL, MICRO, REDUCED, DemoConfig, DemoReport, Result, Target, run
from .tasks import Task, make_images

__all__ = ["DIGITS", "FULL", "MICRO", "REDUCED", "DemoConfig", "DemoReport", "DigitsTask", "Result", "Target", "Task",
           "glyph_classes", "glyph_images", "make_images", "run"]
