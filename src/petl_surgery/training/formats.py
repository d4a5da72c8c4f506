"""Image data on disk in the layouts PETL papers use, read into ``(path, label)`` samples and checked
before anything trains.

``imagefolder``
    torchvision's ImageFolder: one sub-directory per class (classes in sorted order). A split names a
    sub-directory that is itself an ImageFolder (``DIR/test``); without one, ``DIR`` itself.
``vtab``
    VTAB-1k as VPT, NOAH and V-PETL Bench prepare it: ``train800.txt``, ``val200.txt``,
    ``train800val200.txt`` and ``test.txt`` in ``DIR``, each line ``relative/path label`` with the path
    relative to ``DIR`` and the label the class index (NOAH's ``lib/datasets.py`` reads the lists this
    way). The classes are ``0 .. max label`` over all the lists present. Training uses
    ``train800val200`` unless told otherwise, evaluation ``test``.
``fgvc``
    VPT's FGVC layout: ``train.json``, ``val.json``, ``test.json`` in ``DIR``, each one object
    ``{"relative/path": label}``. Paths are relative to ``DIR``, or to ``DIR/images`` or ``DIR/Images``
    where VPT's CUB, NABirds and Stanford Dogs keep them (the first of the three that holds the first
    listed image). As in VPT's ``JSONDataset``, the distinct labels, sorted, become class indices 0, 1,
    ...; unlike VPT, over all three files at once so that every split agrees. Training uses ``train``,
    evaluation ``test``.

``auto`` tells them apart by the files present. Every problem (a missing list file or image, a line that
is not ``path label``, a label that is not a non-negative integer or falls outside the model's classes,
an image PIL cannot read) is one :class:`DataError` naming the file and, for lists, the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .data import DataError, seeded_split

FORMATS = ("auto", "imagefolder", "vtab", "fgvc")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "test")
TRAIN_SPLIT: Dict[str, Optional[str]] = {"imagefolder": None, "vtab": "train800val200", "fgvc": "train"}
EVAL_SPLIT: Dict[str, Optional[str]] = {"imagefolder": None, "vtab": "test", "fgvc": "test"}

Sample = Tuple[str, int]  # path relative to the layout's image root, class index


def detect_format(root: Path) -> str:
    """``vtab`` if ``root`` holds a VTAB-1k list file, ``fgvc`` if it holds a VPT FGVC JSON file,
    ``imagefolder`` if it has sub-directories; both list kinds at once, or none of the three, is a
    DataError."""
    if not root.is_dir():
        raise DataError(f"no data directory at {root}")
    vtab = [name for name in VTAB_SPLITS if (root / f"{name}.txt").is_file()]
    fgvc = [name for name in FGVC_SPLITS if (root / f"{name}.json").is_file()]
    if vtab and fgvc:
        raise DataError(f"{root} holds both VTAB-1k lists ({', '.join(vtab)}) and FGVC files ({', '.join(fgvc)}): "
                        "give --format")
    if vtab:
        return "vtab"
    if fgvc:
        return "fgvc"
    if any(entry.is_dir() for entry in root.iterdir()):
        return "imagefolder"
    raise DataError(f"cannot tell the format of {root}: no VTAB-1k list (train800val200.txt, test.txt, ...), "
                    "no FGVC file (train.json, val.json, test.json) and no class sub-directories")


@dataclass
class Layout:
    """A data directory read as one format: its class names and, per split, the samples of that split
    (read and checked once, on first use)."""

    format: str
    root: Path
    image_root: Path
    classes: List[str]
    lists: Dict[str, Path] = field(default_factory=dict)  # split -> list file (vtab, fgvc)
    _read: Dict[str, List[Sample]] = field(default_factory=dict, repr=False)

    def splits(self) -> Tuple[str, ...]:
        return tuple(self.lists)

    def resolve(self, split: Optional[str], purpose: str) -> Optional[str]:
        """``split``, or the format's default split for ``purpose`` (``"train"`` or ``"eval"``)."""
        return split if split is not None else (TRAIN_SPLIT if purpose == "train" else EVAL_SPLIT)[self.format]

    def samples(self, split: Optional[str]) -> List[Sample]:
        """The samples of ``split`` (``None``: an ImageFolder's own directory)."""
        key = "" if split is None else split
        if key not in self._read:
            self._read[key] = self._samples(split)
        return self._read[key]

    def _samples(self, split: Optional[str]) -> List[Sample]:
        if self.format == "imagefolder":
            folder = self.root if split is None else self.root / split
            found, samples = _image_folder(folder)
            if not self.classes:
                self.classes.extend(found)  # an ImageFolder's classes are those of the first split read
            elif found != self.classes:
                raise DataError(f"the ImageFolder {folder} has classes {found}, the split read before {self.classes}")
            if not samples:
                raise DataError(f"the ImageFolder {folder} holds no images")
            return [(str(Path(path).relative_to(self.root)), label) for path, label in samples]
        known = VTAB_SPLITS if self.format == "vtab" else FGVC_SPLITS
        if split not in known:
            raise DataError(f"unknown {self.format} split {split!r}; the splits are {', '.join(known)}")
        if split not in self.lists:
            suffix = ".txt" if self.format == "vtab" else ".json"
            raise DataError(f"{self.root / (split + suffix)} is missing ({self.format} layout, split {split!r})")
        index = {name: i for i, name in enumerate(self.classes)}
        samples = []
        for where, path, label in _read_list(self.lists[split], self.format):
            if not (self.image_root / path).is_file():
                raise DataError(f"{where}: image {path} does not exist ({self.image_root / path})")
            samples.append((path, index[str(label)]))
        if not samples:
            raise DataError(f"{self.lists[split]} lists no images")
        return samples

    def check_classes(self, count: int, split: Optional[str]) -> None:
        """Make the layout's classes those of a model head of ``count`` classes: a label of ``split``
        outside it is refused; a VTAB-1k layout whose lists name fewer classes gains the missing
        indices; an ImageFolder or FGVC layout of another class count is refused."""
        for path, label in self.samples(split):
            if label >= count:
                raise DataError(f"{self.image_root / path}: label {self.classes[label]} is out of range for the "
                                f"model's {count} classes")
        if self.format == "vtab":
            self.classes.extend(str(i) for i in range(len(self.classes), count))
        elif len(self.classes) != count:
            raise DataError(f"{self.root} has {len(self.classes)} classes, the model's head {count}")


def open_layout(data: str, format: str = "auto") -> Layout:
    """The layout of directory ``data`` read as ``format`` (one of :data:`FORMATS`)."""
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"no data directory at {root}" if format != "imagefolder" else f"no image folder at {root}")
    kind = detect_format(root) if format == "auto" else format
    if kind == "imagefolder":
        return Layout("imagefolder", root, root, [])
    suffix, names = (".txt", VTAB_SPLITS) if kind == "vtab" else (".json", FGVC_SPLITS)
    lists = {name: root / f"{name}{suffix}" for name in names if (root / f"{name}{suffix}").is_file()}
    if not lists:
        raise DataError(f"{root} has none of the {kind} files {', '.join(n + suffix for n in names)}")
    labels = {label for path in lists.values() for _, _, label in _read_list(path, kind)}
    if not labels:
        raise DataError(f"the {kind} files of {root} ({', '.join(p.name for p in lists.values())}) list no images")
    if kind == "vtab":
        classes = [str(i) for i in range(max(labels) + 1)]
        image_root = root
    else:
        classes = [str(label) for label in sorted(labels)]
        first = next(p for path in lists.values() for _, p, _ in _read_list(path, kind))
        image_root = next((r for r in (root, root / "images", root / "Images") if (r / first).is_file()), root)
    return Layout(kind, root, image_root, classes, lists)


def _image_folder(folder: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Class names and samples of an ImageFolder directory (torchvision's rules for both)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}")
    try:
        classes, index = find_classes(str(folder))
        samples = make_dataset(str(folder), index, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(str(error).splitlines()[0]) from None
    return classes, samples


def _read_list(path: Path, kind: str) -> List[Tuple[str, str, int]]:
    """``(where, relative path, label)`` per entry of a VTAB-1k list or an FGVC JSON file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if kind == "vtab":
        pairs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)  # a path may hold spaces (NOAH's few-shot lists split from the right)
            if len(parts) != 2:
                raise DataError(f"{path} line {number}: expected 'relative/path label', got {line.strip()!r}")
            pairs.append((f"{path} line {number}", parts[0].strip(), parts[1]))
    else:
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not JSON: {error}") from None
        if not isinstance(mapping, dict):
            raise DataError(f"{path} must hold one object {{\"relative/path\": label}}; got {type(mapping).__name__}")
        pairs = [(f"{path} entry {key!r}", key, value) for key, value in mapping.items()]
    entries = []
    for where, relative, label in pairs:
        value = label
        if isinstance(label, str) and label.strip().isdigit():
            value = int(label)
        if type(value) is not int or value < 0:
            raise DataError(f"{where}: label {label!r} is not a non-negative integer")
        entries.append((where, relative, value))
    return entries


def draw_shots(samples: Sequence[Sample], shots: int, seed: int, classes: Sequence[str]) -> List[Sample]:
    """``shots`` samples of every class, drawn with ``random.Random(seed)`` (stable across Python and
    torch versions), class after class, kept in their listed order. A class with fewer images than
    ``shots`` is a DataError naming it."""
    if type(shots) is not int or shots < 1:
        raise DataError(f"shots must be a positive int; got {shots!r}")
    by_class: Dict[int, List[int]] = {c: [] for c in range(len(classes))}
    for i, (_, label) in enumerate(samples):
        by_class[label].append(i)
    rng = random.Random(seed)
    chosen: List[int] = []
    for label, members in by_class.items():
        if len(members) < shots:
            raise DataError(f"class {classes[label]!r} has {len(members)} training images, fewer than --shots {shots}")
        chosen.extend(rng.sample(members, shots))
    return [samples[i] for i in sorted(chosen)]


def check_images(root: Path, samples: Sequence[Sample]) -> None:
    """Open every image with PIL and verify it: the first that cannot be read is a DataError."""
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(root / path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for damaged files
            raise DataError(f"cannot read the image {root / path}: {error}") from None


class ImageList(torch.utils.data.Dataset):
    """``(transform(image), label)`` for samples relative to ``root``; images are read as RGB."""

    def __init__(self, root: Path, samples: Sequence[Sample], transform: Callable[[Any], Any]) -> None:
        self.root, self.samples, self.transform = Path(root), list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(self.root / path) as image:
                return self.transform(image.convert("RGB")), label
        except OSError as error:
            raise DataError(f"cannot read the image {self.root / path}: {error}") from None


def preprocessing(format: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], Any]:
    """The deterministic preprocessing of ``format`` (no augmentation), then ``ToTensor`` and
    ``Normalize(mean, std)``:

    - ``vtab``: a direct resize to ``size`` x ``size``, bicubic: VTAB-1k's protocol as NOAH runs it
      (``--no_aug --direct_resize``, ``transforms.Resize((size, size), interpolation=3)`` in its
      ``lib/datasets.py``).
    - ``fgvc``: VPT's evaluation transform (``src/data/transforms.py``): the shorter side resized to
      ``size * 256 / 224``, then a centre crop of ``size``.
    - ``imagefolder``: a direct resize to ``size`` x ``size``, bilinear (as ``petl-surgery train`` did
      before the formats).
    """
    from torchvision import transforms

    interpolation = transforms.InterpolationMode
    if format == "fgvc":
        steps = [transforms.Resize(int(size * 256 / 224), interpolation=interpolation.BILINEAR), transforms.CenterCrop(size)]
    else:
        mode = interpolation.BICUBIC if format == "vtab" else interpolation.BILINEAR
        steps = [transforms.Resize((size, size), interpolation=mode)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


@dataclass
class TrainingData:
    """What a run trains and validates on, and the record of how it was drawn (:meth:`record`)."""

    layout: Layout
    train: ImageList
    val: Optional[Any]
    split: Optional[str]
    val_name: Optional[str]
    shots: Optional[int] = None
    shot_seed: Optional[int] = None

    @property
    def classes(self) -> List[str]:
        return self.layout.classes

    def record(self) -> Dict[str, Any]:
        """The entries a run's log needs to draw the same data again."""
        entry: Dict[str, Any] = {
            "data": str(self.layout.root), "format": self.layout.format, "split": self.split,
            "val": self.val_name, "shots": self.shots, "shot_seed": self.shot_seed,
            "train_images": len(self.train),
        }
        if self.shots is not None:
            entry["shot_images"] = [path for path, _ in self.train.samples]
        return entry


def training_data(
    data: str,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    format: str = "auto",
    split: Optional[str] = None,
    val: Optional[str] = None,
    val_split: float = 0.0,
    shots: Optional[int] = None,
    shot_seed: int = 0,
    seed: int = 0,
    transform: Optional[Callable[[Any], Any]] = None,
    check: bool = True,
) -> TrainingData:
    """The training (and validation) data of a run, read from ``data`` in ``format``, every list and
    (with ``check``) every image checked before it returns.

    ``split``: the training split (default: the format's, ``train800val200`` for VTAB-1k, ``train`` for
    FGVC, the directory itself for an ImageFolder). ``val``: a validation split of the same layout, or
    for an ImageFolder a second ImageFolder directory; ``val_split``: instead, this fraction of the
    training split, drawn with ``seed``. ``shots``: ``shots`` images per class drawn from the training
    split with ``shot_seed`` (:func:`draw_shots`). ``transform`` replaces :func:`preprocessing` of the
    format (e.g. an augmentation) for the training images; validation keeps the preprocessing.
    """
    if val is not None and val_split:
        raise DataError("a validation split and a validation fraction exclude each other: give one")
    if shots is not None and val_split:
        raise DataError("--shots with --val-split would validate on part of the K-shot set: give --val instead")
    layout = open_layout(data, format)
    split = layout.resolve(split, "train")
    samples = layout.samples(split)
    if shots is not None:
        samples = draw_shots(samples, shots, shot_seed, layout.classes)
    plain = preprocessing(layout.format, size, mean, std)
    val_set, val_name = None, None
    if val is not None:
        if layout.format == "imagefolder":  # a second ImageFolder directory, as --val always was
            other = open_layout(val, "imagefolder")
            val_samples = other.samples(None)
            if other.classes != layout.classes:
                raise DataError(f"the validation folder has classes {other.classes}, the training folder {layout.classes}")
            val_set, val_name = ImageList(other.root, val_samples, plain), str(other.root)
        else:
            val_set, val_name = ImageList(layout.image_root, layout.samples(val), plain), val
        seen = {(layout.image_root / p).resolve() for p, _ in samples}
        overlap = sorted(str(val_set.root / p) for p, _ in val_set.samples if (val_set.root / p).resolve() in seen)
        if overlap:
            raise DataError(f"the validation data {val_name!r} shares {len(overlap)} images with the training split "
                            f"{split!r} (e.g. {overlap[0]})")
    elif val_split > 0:
        train_index, val_index = seeded_split(len(samples), val_split, seed)
        val_set = ImageList(layout.image_root, [samples[i] for i in val_index], plain)
        samples, val_name = [samples[i] for i in train_index], f"{val_split:.0%} of the training split"
    if check:
        check_images(layout.image_root, samples)
        if val_set is not None:
            check_images(val_set.root, val_set.samples)
    train = ImageList(layout.image_root, samples, transform or plain)
    return TrainingData(layout, train, val_set, split, val_name, shots, shot_seed if shots is not None else None)


def evaluation_data(
    data: str,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    format: str = "auto",
    split: Optional[str] = None,
    classes: Optional[int] = None,
    check: bool = True,
) -> Tuple[ImageList, Layout, Optional[str]]:
    """The evaluation images of ``data`` (split default: the format's, ``test`` for VTAB-1k and FGVC,
    the directory itself for an ImageFolder) with the format's :func:`preprocessing`, in listed order;
    with ``classes`` (the model head's), a label outside it is refused. Returns the dataset, the layout
    and the split."""
    layout = open_layout(data, format)
    split = layout.resolve(split, "eval")
    samples = layout.samples(split)
    if classes is not None:
        layout.check_classes(classes, split)
    if check:
        check_images(layout.image_root, samples)
    return ImageList(layout.image_root, samples, preprocessing(layout.format, size, mean, std)), layout, split
