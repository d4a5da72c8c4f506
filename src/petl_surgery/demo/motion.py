"""A video task that needs time: scikit-learn's handwritten digits moving across a dark canvas, the class
being the direction of motion, so that no single frame tells it (every frame shows one digit somewhere).

Each video shows one 8 x 8 digit scan (upsampled by ``scale``, copied to three channels) starting at a
random place from which its whole path fits, moving ``speed`` pixels per frame in its class's direction.
:data:`AXES` (right, left, down, up) is the usual target; :data:`DIAGONALS` is a related task to pre-train
on (``examples/video_bapat.py``). :func:`write_motion_dataset` writes a video data directory
(:mod:`petl_surgery.training.video`'s layout) either as mp4 files (PyAV's always-present ``mpeg4``
encoder) or as mmaction2-style frame folders of PNGs, with ``train.csv``, ``val.csv`` and ``test.csv``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np

AXES: Dict[str, Tuple[int, int]] = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
DIAGONALS: Dict[str, Tuple[int, int]] = {"down-right": (1, 1), "up-left": (-1, -1), "down-left": (1, -1),
                                         "up-right": (-1, 1)}


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def motion_clip(digit: np.ndarray, direction: Tuple[int, int], rng: random.Random, *, frames: int = 16,
                canvas: int = 32, scale: int = 2, speed: int = 1) -> np.ndarray:
    """uint8 ``(frames, canvas, canvas, 3)``: ``digit`` (8 x 8, values 0..16) upsampled ``scale`` times,
    moving ``speed`` px per frame along ``direction`` (rows, columns) from a random start that keeps it
    inside the canvas."""
    sprite = np.kron(digit / 16.0, np.ones((scale, scale)))
    side = sprite.shape[0]
    travel = speed * (frames - 1)
    if side + travel > canvas:
        raise ValueError(f"a {side} px digit moving {travel} px does not fit a {canvas} px canvas")
    starts = []
    for step in direction:
        low = travel if step < 0 else 0
        high = canvas - side - (travel if step > 0 else 0)
        starts.append(rng.randint(low, high))
    video = np.zeros((frames, canvas, canvas), dtype=np.float64)
    for t in range(frames):
        r, c = starts[0] + direction[0] * speed * t, starts[1] + direction[1] * speed * t
        video[t, r:r + side, c:c + side] = sprite
    return np.repeat((video * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """``frames`` (T, H, W, 3) uint8 as an mp4 with the ``mpeg4`` encoder at high quality."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """``frames`` as ``img_00001.png`` ... in ``folder`` (mmaction2's naming)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(frames, 1):
        Image.fromarray(array).save(folder / f"img_{i:05d}.png")


def write_motion_dataset(
    root: Union[str, Path],
    *,
    per_class: Dict[str, int] = None,  # type: ignore[assignment]
    directions: Dict[str, Tuple[int, int]] = AXES,
    kind: str = "video",
    frames: int = 16,
    canvas: int = 32,
    scale: int = 2,
    speed: int = 1,
    digits: Sequence[int] = tuple(range(10)),
    seed: int = 0,
    separator: str = " ",
) -> Path:
    """Write the task to ``root``: ``per_class`` videos per class and split (default train 8, val 4, test 4),
    the digits drawn (with ``seed``) from the scans of ``digits``, as ``kind`` ``"video"`` (``.mp4``, lists
    ``path label``) or ``"frames"`` (folders, lists ``dir num_frames label``), lines separated by
    ``separator``. Class ``i`` is the ``i``-th direction of ``directions``. Returns ``root``."""
    if kind not in ("video", "frames"):
        raise ValueError(f"kind must be 'video' or 'frames'; got {kind!r}")
    per_class = per_class or {"train": 8, "val": 4, "test": 4}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, targets = _digits()
    pool = [i for i in range(len(images)) if int(targets[i]) in set(digits)]
    rng = random.Random(seed)
    for split, count in per_class.items():
        lines = []
        for label, (name, direction) in enumerate(directions.items()):
            for k in range(count):
                clip = motion_clip(images[rng.choice(pool)], direction, rng, frames=frames, canvas=canvas,
                                   scale=scale, speed=speed)
                relative = f"{split}/{name}_{k:03d}"
                if kind == "video":
                    (root / split).mkdir(exist_ok=True)
                    write_video(root / f"{relative}.mp4", clip)
                    lines.append(f"{relative}.mp4{separator}{label}")
                else:
                    write_frames(root / relative, clip)
                    lines.append(f"{relative}{separator}{frames}{separator}{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root
