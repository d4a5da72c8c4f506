"""Training a delta on images, apart from the command line that calls it: the data (``data``), the
loop and evaluation (``loop``), and a progress display (``progress``)."""

from .data import DataError, image_folder_splits
from .loop import DEVICES, PRECISIONS, EpochRecord, accuracy_report, choose_device, evaluate, fit

__all__ = ["DEVICES", "PRECISIONS", "DataError", "EpochRecord", "accuracy_report", "choose_device", "evaluate", "fit", "image_folder_splits"]
