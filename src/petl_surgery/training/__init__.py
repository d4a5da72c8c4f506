"""Training a delta on images or videos, apart from the command line that calls it: the models of every zoo
by one spec (``zoo``), the data (``data``, the VTAB-1k, FGVC and ImageFolder layouts in ``formats``, videos in
``video``, either for a run in ``inputs``), one run's settings (``config``), the loop and evaluation (``loop``), a
progress display (``progress``), the checks of a run's outputs (``outputs``) and the V-PETL study (``study``,
``tradeoff``)."""

from .config import RunConfig, run_log
from .data import DataError, image_folder_splits
from .formats import FORMATS, TrainingData, draw_shots, evaluation_data, open_layout, training_data
from .loop import DEVICES, PRECISIONS, EpochRecord, accuracy_report, choose_device, evaluate, fit
from .study import StudyError, StudyResult, load_grid, run_study

__all__ = ["DEVICES", "FORMATS", "PRECISIONS", "DataError", "EpochRecord", "RunConfig", "StudyError", "StudyResult",
           "TrainingData", "accuracy_report", "choose_device", "draw_shots", "evaluate", "evaluation_data", "fit",
           "image_folder_splits", "load_grid", "open_layout", "run_log", "run_study", "training_data"]
