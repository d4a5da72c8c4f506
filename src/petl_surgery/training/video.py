"""Video data (``--format video``): annotation lists, clip sampling, decoding and multi-view evaluation.

Layout
    ``DIR/train.csv``, ``DIR/val.csv``, ``DIR/test.csv`` (or ``.txt``), no header, one entry a line in one of
    two kinds: VideoMAE's and V-PETL's ``path label`` (space or comma separated) naming a video file, or
    mmaction2's frame folders ``frame_dir num_frames label`` (a directory of images, read in sorted name
    order). Relative paths are relative to ``DIR``. The classes are ``0 .. max label`` over every list.
    Training reads ``train``, validation ``val`` (never ``test``, unlike V-PETL's loaders), evaluation ``test``.

Sampling (:func:`clip_indices`, :func:`test_starts`)
    A clip is ``frames`` (T) frames taken every ``stride`` (S) frames: it spans ``(T - 1) * S + 1`` frames.
    Training draws the start uniformly over the starts that fit; evaluation takes ``clips`` (K) starts
    evenly spaced from the first to the last that fits (one clip: the middle one). Short videos (fewer frames
    than the span): the clip starts at frame 0 with the stride kept and every index past the end is the last
    frame (as VideoMAE pads with the last frame; V-PETL falls back to the start frame), so all K views of a
    short video are the same clip.

Spatial
    Training with ``aug="multiscale"``: V-PETL's (TSN's) multi-scale crop, one crop for the whole clip: the
    crop's height and width each ``base x`` one of ``(1, .875, .75, .66)`` with the two scales at most one
    step apart, ``base`` the shorter side, at one of five fixed places (the corners and the centre), then
    resized to ``size`` x ``size``. ``aug="none"`` and evaluation: the shorter side resized to ``size``, then
    ``crops`` square crops of ``size`` along the longer side (one: the centre; three: both ends and the
    centre, as VideoMAE's test views). Then ImageNet-style normalisation with the model's mean and std.

Evaluation over views (:class:`ViewAverage`)
    A test sample is ``K x crops`` views; the model's softmax is averaged over them, and the log of that mean
    stands for the logits (so top-k is that of the averaged probabilities and cross entropy its negative log).

Decoding
    PyAV (``pip install petl_surgery[video]``), opened in ``__getitem__`` and closed there (DataLoader
    workers share no handles), ``thread_type="SLICE"`` (frame threading with an early stop has hung data
    loaders: PyAV#1849, pytorch/vision#9010), decoded from the first frame up to the last index a clip needs.
    A decoder that yields fewer frames than the header promised repeats its last frame (the short-video rule).

Checks (:func:`check_videos`), before the first epoch and without decoding whole files: a missing or
unreadable video, one without a video stream or frames (the header's count, or its packets counted when the
header has none), a frame folder with fewer images than listed, a label outside the model's classes: each one
:class:`DataError` naming the file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, seeded_split
from .formats import TrainingData, draw_shots

SPLITS = ("train", "val", "test")
AUGMENTATIONS = ("multiscale", "none")
MULTISCALE = (1.0, 0.875, 0.75, 0.66)  # V-PETL's GroupMultiScaleCrop(224, [1, .875, .75, .66])
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

Sample = Tuple[str, int]


@dataclass(frozen=True)
class ClipSpec:
    """How clips are taken: ``frames`` per clip every ``stride`` frames, ``size`` px square, normalised
    with ``mean``/``std``; training with ``aug``; evaluation with ``clips`` x ``crops`` views."""

    frames: int = 8
    stride: int = 4
    size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    aug: str = "multiscale"
    clips: int = 1
    crops: int = 1

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "size", "clips"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise DataError(f"{name} must be a positive int; got {value!r}")
        if self.crops not in (1, 3):
            raise DataError(f"test crops must be 1 or 3; got {self.crops!r}")
        if self.aug not in AUGMENTATIONS:
            raise DataError(f"unknown video augmentation {self.aug!r}; choose one of {', '.join(AUGMENTATIONS)}")

    @property
    def span(self) -> int:
        return (self.frames - 1) * self.stride + 1


# -- sampling -----------------------------------------------------------------------------------------------


def clip_indices(length: int, frames: int, stride: int, start: int = 0) -> List[int]:
    """The frame indices of a clip of ``frames`` frames every ``stride`` from ``start`` in a video of
    ``length`` frames; indices past the end are the last frame (the short-video rule)."""
    if length < 1:
        raise DataError("a video with no frames has no clip")
    return [min(start + i * stride, length - 1) for i in range(frames)]


def test_starts(length: int, span: int, clips: int) -> List[int]:
    """``clips`` starts evenly spaced over those that fit a clip of ``span`` frames (rounded down); one clip:
    the middle start; a video shorter than ``span``: 0 for every clip."""
    last = max(length - span, 0)
    if clips == 1:
        return [last // 2]
    return [(k * last) // (clips - 1) for k in range(clips)]


def random_start(length: int, span: int, rng: random.Random) -> int:
    """A start drawn uniformly over those that fit (0 for a short video)."""
    return rng.randint(0, max(length - span, 0))


# -- layout -------------------------------------------------------------------------------------------------


@dataclass
class VideoLayout:
    """A video data directory: the list file per split, the classes, and the frame count listed for each
    frame folder."""

    root: Path
    lists: Dict[str, Path]
    classes: List[str]
    listed_frames: Dict[str, int] = field(default_factory=dict)
    _samples: Dict[str, List[Sample]] = field(default_factory=dict, repr=False)
    format: str = "video"

    @property
    def image_root(self) -> Path:
        return self.root

    def samples(self, split: str) -> List[Sample]:
        if split not in SPLITS:
            raise DataError(f"unknown video split {split!r}; the splits are {', '.join(SPLITS)}")
        if split not in self.lists:
            raise DataError(f"{self.root / (split + '.csv')} is missing (video layout, split {split!r})")
        return self._samples[split]


def _read_list(path: Path) -> List[Tuple[str, str, int, Optional[int]]]:
    """``(where, path, label, listed frames or None)`` per line of a video list."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        parts = [p.strip() for p in line.strip().split(",")] if "," in line else line.rsplit(None, 2)
        if len(parts) == 3 and not (parts[1].isdigit() and parts[2].isdigit()):
            parts = line.rsplit(None, 1)  # a path with a space and a label
        if len(parts) not in (2, 3):
            raise DataError(f"{where}: expected 'path label' or 'frame_dir num_frames label', got {line.strip()!r}")
        if not parts[-1].isdigit():
            raise DataError(f"{where}: label {parts[-1]!r} is not a non-negative integer")
        listed = int(parts[1]) if len(parts) == 3 else None
        entries.append((where, parts[0], int(parts[-1]), listed))
    return entries


def open_video_layout(data: str) -> VideoLayout:
    """The video layout of directory ``data``: every list read and its lines checked (not the videos)."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"no data directory at {root}")
    lists: Dict[str, Path] = {}
    for split in SPLITS:
        for suffix in (".csv", ".txt"):
            if (root / f"{split}{suffix}").is_file():
                lists.setdefault(split, root / f"{split}{suffix}")
    if not lists:
        raise DataError(f"{root} has none of the video lists train.csv, val.csv, test.csv (or .txt)")
    layout = VideoLayout(root, lists, [])
    labels = set()
    for split, path in lists.items():
        samples = []
        for _, relative, label, listed in _read_list(path):
            samples.append((relative, label))
            labels.add(label)
            if listed is not None:
                layout.listed_frames[relative] = listed
        if not samples:
            raise DataError(f"{path} lists no videos")
        layout._samples[split] = samples
    layout.classes.extend(str(i) for i in range(max(labels) + 1))
    return layout


# -- reading frames -----------------------------------------------------------------------------------------


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise DataError("reading video files needs PyAV: pip install 'petl_surgery[video]'") from None
    return av


def count_frames(path: Path, listed: Optional[int] = None) -> int:
    """The frames of a video file (its header's count, or its packets counted) or of a frame folder (its
    images, of which the list names ``listed``), without decoding; a missing or unreadable one, or one with
    no frames, is a DataError naming it."""
    if path.is_dir():
        images = frame_files(path)
        if not images:
            raise DataError(f"the frame folder {path} holds no images")
        if listed is not None and listed > len(images):
            raise DataError(f"the frame folder {path} holds {len(images)} images, its list line says {listed}")
        return listed if listed is not None else len(images)
    if listed is not None:
        raise DataError(f"no frame folder at {path} (its list line names a frame count)")
    if not path.is_file():
        raise DataError(f"video {path} does not exist")
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path} has no video stream")
            stream = container.streams.video[0]
            count = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except DataError:
        raise
    except Exception as error:  # PyAV's FFmpeg errors (InvalidDataError, ...)
        raise DataError(f"cannot read the video {path}: {type(error).__name__}: {error}") from None
    if count < 1:
        raise DataError(f"the video {path} has no frames")
    return count


def frame_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_frames(path: Path, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` as uint8 ``(T, H, W, 3)``: from a frame folder's sorted images, or decoded
    from a video file up to the largest index (a decoder that stops early repeats its last frame)."""
    import numpy as np

    if path.is_dir():
        from PIL import Image

        files = frame_files(path)
        frames = []
        for i in indices:
            with Image.open(files[min(i, len(files) - 1)]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        return torch.from_numpy(np.stack(frames))
    av = _import_av()
    wanted = set(indices)
    last = max(indices)
    decoded: Dict[int, Any] = {}
    previous = None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            for i, frame in enumerate(container.decode(stream)):
                previous = i
                if i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as error:
        raise DataError(f"cannot decode the video {path}: {type(error).__name__}: {error}") from None
    if previous is None:
        raise DataError(f"the video {path} decodes to no frames")
    if previous < last:  # fewer frames than the header said: the last one decoded stands for the rest
        if previous not in decoded:
            raise DataError(f"the video {path} decodes to {previous + 1} frames, fewer than its header says")
        for i in wanted:
            if i > previous:
                decoded[i] = decoded[previous]
    return torch.from_numpy(np.stack([decoded[i] for i in indices]))


# -- spatial transforms -------------------------------------------------------------------------------------


def _resize(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, T, H, W)`` float clip resized bilinearly (antialiased) frame by frame."""
    frames = clip.permute(1, 0, 2, 3)
    frames = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return frames.permute(1, 0, 2, 3)


def short_side_resize(clip: torch.Tensor, size: int) -> torch.Tensor:
    h, w = clip.shape[-2:]
    if h <= w:
        return _resize(clip, size, max(size, round(w * size / h)))
    return _resize(clip, max(size, round(h * size / w)), size)


def test_crops(clip: torch.Tensor, size: int, crops: int) -> List[torch.Tensor]:
    """The shorter side resized to ``size``, then ``crops`` (1 or 3) square crops along the longer side:
    the centre, or the start, centre and end."""
    clip = short_side_resize(clip, size)
    h, w = clip.shape[-2:]
    long_side = max(h, w)
    offsets = [(long_side - size) // 2] if crops == 1 else [0, (long_side - size) // 2, long_side - size]
    if w >= h:
        return [clip[..., :, o:o + size] for o in offsets]
    return [clip[..., o:o + size, :] for o in offsets]


def multiscale_crop(clip: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """V-PETL's multi-scale crop (see the module): one crop of the whole clip, resized to ``size``."""
    h, w = clip.shape[-2:]
    base = min(h, w)
    sides = [int(base * s) for s in MULTISCALE]
    pairs = [(ch, cw) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= 1]
    ch, cw = rng.choice(pairs)
    places = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
    top, left = rng.choice(places)
    return _resize(clip[..., top:top + ch, left:left + cw], size, size)


def _normalise(frames: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` to float ``(C, T, H, W)`` in [0, 1], normalised per channel."""
    clip = frames.permute(3, 0, 1, 2).float().div_(255)
    mean = torch.tensor(spec.mean).view(3, 1, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1, 1)
    return (clip - mean) / std


# -- datasets -----------------------------------------------------------------------------------------------


class VideoClips(torch.utils.data.Dataset):
    """``(clip (C, T, H, W), label)`` per sample. ``train`` with ``spec.aug`` ``"multiscale"``: a random clip
    and a random multi-scale crop (drawn from torch's generator, which DataLoader seeds per worker and
    epoch); otherwise (validation, or ``aug="none"``) the middle clip and the centre crop, deterministic."""

    def __init__(self, root: Path, samples: Sequence[Sample], lengths: Sequence[int], spec: ClipSpec,
                 train: bool) -> None:
        self.root, self.samples, self.lengths, self.spec, self.train = Path(root), list(samples), list(lengths), spec, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        length, spec = self.lengths[index], self.spec
        if self.train and spec.aug == "multiscale":
            rng = random.Random(int(torch.randint(0, 2**62, ())))
            start = random_start(length, spec.span, rng)
            clip = _normalise(read_frames(self.root / path, clip_indices(length, spec.frames, spec.stride, start)), spec)
            return multiscale_crop(clip, spec.size, rng), label
        start = test_starts(length, spec.span, 1)[0]
        clip = _normalise(read_frames(self.root / path, clip_indices(length, spec.frames, spec.stride, start)), spec)
        return test_crops(clip, spec.size, 1)[0], label


class VideoViews(torch.utils.data.Dataset):
    """``(views (clips x crops, C, T, H, W), label)`` per sample: ``spec.clips`` evenly spaced clips
    (:func:`test_starts`), each in ``spec.crops`` crops (:func:`test_crops`), clip after clip."""

    def __init__(self, root: Path, samples: Sequence[Sample], lengths: Sequence[int], spec: ClipSpec) -> None:
        self.root, self.samples, self.lengths, self.spec = Path(root), list(samples), list(lengths), spec

    def __len__(self) -> int:
        return len(self.samples)

    def views(self, index: int) -> List[torch.Tensor]:
        path, _ = self.samples[index]
        length, spec = self.lengths[index], self.spec
        starts = test_starts(length, spec.span, spec.clips)
        indices = [clip_indices(length, spec.frames, spec.stride, s) for s in starts]
        every = sorted({i for clip in indices for i in clip})
        frames = read_frames(self.root / path, every)  # one decode for all the clips
        at = {i: k for k, i in enumerate(every)}
        out = []
        for clip in indices:
            chosen = _normalise(frames[[at[i] for i in clip]], spec)
            out.extend(test_crops(chosen, spec.size, spec.crops))
        return out

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return torch.stack(self.views(index)), self.samples[index][1]


class ViewAverage(nn.Module):
    """``model`` over a batch of views ``(B, V, C, T, H, W)``: the log of the softmax averaged over the V
    views, standing for logits (a batch of single clips ``(B, C, T, H, W)`` passes through unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 6:
            return self.model(x)
        b, v = x.shape[:2]
        logits = self.model(x.flatten(0, 1)).float()
        return logits.softmax(-1).view(b, v, -1).mean(1).log()


# -- a run's data -------------------------------------------------------------------------------------------


def check_videos(layout: VideoLayout, samples: Sequence[Sample], classes: Optional[int] = None) -> List[int]:
    """Check each sample (see the module) and return its frame count; ``classes``: the model head's."""
    lengths = []
    for path, label in samples:
        if classes is not None and label >= classes:
            raise DataError(f"{layout.root / path}: label {label} is out of range for the model's {classes} classes")
        lengths.append(count_frames(layout.root / path, layout.listed_frames.get(path)))
    return lengths


@dataclass
class VideoData(TrainingData):
    """A run's videos (``train``: :class:`VideoClips`; ``val``: the middle clip and centre crop of each
    validation video, or None; ``layout``: a :class:`VideoLayout`); its record adds the clip sampling."""

    def record(self) -> Dict[str, Any]:
        spec = self.train.spec
        return {**super().record(), "frames": spec.frames, "frame_stride": spec.stride, "video_aug": spec.aug}


def video_training_data(
    data: str, spec: ClipSpec, *, split: Optional[str] = None, val: Optional[str] = None, val_split: float = 0.0,
    shots: Optional[int] = None, shot_seed: int = 0, seed: int = 0, classes: Optional[int] = None,
) -> VideoData:
    """The training (and validation) videos of ``data``: ``split`` (default ``train``), ``val`` a split of
    the same directory or ``val_split`` a fraction of the training split drawn with ``seed``, ``shots``
    videos per class drawn with ``shot_seed`` (:func:`petl_surgery.training.formats.draw_shots`); every
    video checked (:func:`check_videos`) before it returns."""
    if val is not None and val_split:
        raise DataError("a validation split and a validation fraction exclude each other: give one")
    if shots is not None and val_split:
        raise DataError("--shots with --val-split would validate on part of the K-shot set: give --val instead")
    layout = open_video_layout(data)
    split = split or "train"
    samples = layout.samples(split)
    if shots is not None:
        samples = draw_shots(samples, shots, shot_seed, layout.classes)
    val_samples: Optional[List[Sample]] = None
    val_name = None
    if val is not None:
        if val == split:
            raise DataError(f"the validation split {val!r} is the training split")
        val_samples, val_name = layout.samples(val), val
    elif val_split > 0:
        train_index, val_index = seeded_split(len(samples), val_split, seed)
        val_samples = [samples[i] for i in val_index]
        samples, val_name = [samples[i] for i in train_index], f"{val_split:.0%} of the training split"
    count = classes if classes is not None else len(layout.classes)
    train = VideoClips(layout.root, samples, check_videos(layout, samples, count), spec, train=True)
    validation = None
    if val_samples is not None:
        validation = VideoClips(layout.root, val_samples, check_videos(layout, val_samples, count), spec, train=False)
    if classes is not None:
        layout.classes.extend(str(i) for i in range(len(layout.classes), classes))
    return VideoData(layout, train, validation, split, val_name, shots, shot_seed if shots is not None else None)


def video_evaluation_data(
    data: str, spec: ClipSpec, *, split: Optional[str] = None, classes: Optional[int] = None,
) -> Tuple[VideoViews, VideoLayout, str]:
    """The evaluation videos of ``data`` (``split`` default ``test``) as ``spec.clips`` x ``spec.crops``
    views each, every video checked first; with ``classes`` (the model head's) a label outside is refused
    and the layout's classes are that many."""
    layout = open_video_layout(data)
    split = split or "test"
    samples = layout.samples(split)
    lengths = check_videos(layout, samples, classes)
    if classes is not None:
        layout.classes.extend(str(i) for i in range(len(layout.classes), classes))
    return VideoViews(layout.root, samples, lengths, spec), layout, split
