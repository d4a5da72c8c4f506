"""A run's data in whichever format, for the command line and the study alike: the class names read cheaply
before a model is built (the head needs their number), then images (:mod:`.formats`) or videos
(:mod:`.video`) preprocessed as the built model's :class:`~.zoo.InputConfig` says."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

from torch import nn

from .data import DataError
from .formats import FORMATS, evaluation_data, open_layout, training_data
from .video import ClipSpec, ViewAverage, open_video_layout, video_evaluation_data, video_training_data
from .zoo import InputConfig

ALL_FORMATS = FORMATS + ("video",)
DEFAULT_FRAMES = 8  # V-PETL's and V-PETL Bench's clip length
DEFAULT_STRIDE = 4  # V-PETL Bench's sampling rate (V-PETL's HMDB51 recipe uses 2)


def class_names(data: str, format: str, split: Optional[str], purpose: str) -> List[str]:
    """The classes of ``data`` read as ``format`` (its lists or its ``split``'s folders; no image or video is
    opened), ``purpose`` ``"train"`` or ``"eval"`` choosing the default split."""
    if format not in ALL_FORMATS:
        raise DataError(f"unknown data format {format!r}; choose one of {', '.join(ALL_FORMATS)}")
    if format == "video":
        return list(open_video_layout(data).classes)
    layout = open_layout(data, format)
    layout.samples(layout.resolve(split, purpose))
    return list(layout.classes)


def clip_spec(
    config: InputConfig, frames: Optional[int] = None, stride: Optional[int] = None, aug: str = "multiscale",
    clips: int = 1, crops: int = 1,
) -> ClipSpec:
    """The clip sampling of a video run for a model of input ``config``: ``frames`` (default: the model's
    fixed clip length, else :data:`DEFAULT_FRAMES`) every ``stride`` (default :data:`DEFAULT_STRIDE`). A
    model with a fixed clip length refuses another ``frames``; an image model refuses videos."""
    if not config.video:
        raise DataError("--format video needs a video model (torchvision's swin3d_*, transformers' VideoMAE, or a "
                        "model taking (B, C, T, H, W)); this one takes images")
    if config.frames is not None and frames is not None and frames != config.frames:
        raise DataError(f"the model takes clips of {config.frames} frames (its config's num_frames); --frames {frames} "
                        "would not fit it")
    return ClipSpec(frames or config.frames or DEFAULT_FRAMES, stride or DEFAULT_STRIDE, config.size,
                    tuple(config.mean), tuple(config.std), aug, clips, crops)


def run_training_data(
    data: str, format: str, config: InputConfig, *, clips: Optional[ClipSpec] = None, split: Optional[str] = None,
    val: Optional[str] = None, val_split: float = 0.0, shots: Optional[int] = None, shot_seed: int = 0, seed: int = 0,
    transform: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """A run's training data (``TrainingData`` or ``VideoData``: ``train``, ``val``, ``classes``,
    ``record()``); videos need ``clips`` (:func:`clip_spec`)."""
    if format == "video":
        if clips is None:
            raise DataError("video data needs a clip specification")
        if transform is not None:
            raise DataError("--aug applies to images; videos take --video-aug")
        return video_training_data(data, clips, split=split, val=val, val_split=val_split, shots=shots,
                                   shot_seed=shot_seed, seed=seed)
    return training_data(data, size=config.size, mean=config.mean, std=config.std, format=format, split=split,
                         val=val, val_split=val_split, shots=shots, shot_seed=shot_seed, seed=seed, transform=transform)


def run_evaluation_data(
    data: str, format: str, config: InputConfig, *, clips: Optional[ClipSpec] = None, split: Optional[str] = None,
    classes: Optional[int] = None,
) -> Tuple[Any, Any, Optional[str], Callable[[nn.Module], nn.Module]]:
    """(dataset, layout, split, wrap): the evaluation data and how to wrap the model for it (videos: the
    softmax averaged over the views, :class:`~.video.ViewAverage`; images: unchanged)."""
    if format == "video":
        if clips is None:
            raise DataError("video data needs a clip specification")
        dataset, layout, split = video_evaluation_data(data, clips, split=split, classes=classes)
        return dataset, layout, split, ViewAverage
    dataset, layout, split = evaluation_data(data, size=config.size, mean=config.mean, std=config.std, format=format,
                                             split=split, classes=classes)
    return dataset, layout, split, lambda model: model
