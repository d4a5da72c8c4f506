"""The V-PETL study as one call: train every run of a grid (method, options, layers) at every data
scale (``shots``) and seed, evaluate each, and put the parameter-accuracy trade-off in a table and a
plot.

V-PETL (Yu et al., "Towards a Unified View on Visual Parameter-Efficient Transfer Learning", 2022)
studies where trainable parameters go and how many; a grid file states such a study::

    {"model": "vit_base_patch16_224", "model_args": {}, "image_size": 224, "pretrained": true,
     "data": "vtab-1k/dtd", "format": "vtab", "epochs": 100, "batch_size": 64, "lr": 0.001,
     "runs": [{"method": "patt", "options": {"mid_dim": 64}, "layers": "6:12"},
              {"method": "lora", "options": {"rank": 8}}],
     "shots": [null], "seeds": [0, 1, 2]}

PVP's comparison (pre-trained modules against random ones) is an init axis: ``"inits": ["random",
"source.safetensors"]`` trains every run from each, the second as ``ps.load(model, file, load_head=False)``
restricted to the run's method and blocks (:mod:`.initialization`); a run may name its own ``"init"``.
The printed report, ``gains.csv`` and ``gains.png`` give the paired gain of each init over random per
run and data scale with its 95% interval over seeds (:mod:`.gains`).

Everything a run writes stays under the output directory, so a study interrupted and started again
trains only what it had not finished.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import SurgeryError
from .data import DataError
from .gains import format_gains, paired_gains, plot_gains, write_gains
from .initialization import RANDOM, Init, file_sha256
from .inputs import ALL_FORMATS, class_names, clip_spec, run_evaluation_data, run_training_data
from .config import RunConfig, run_log
from .loop import PRECISIONS, accuracy_report, choose_device, fit
from .outputs import read_run_log
from .tradeoff import plot_tradeoff


class StudyError(SurgeryError):
    """A grid that cannot run as written: the message names the key."""


# key -> (accepted types, default; REQUIRED for none)
REQUIRED = object()
GRID_KEYS: Dict[str, Tuple[Tuple[type, ...], Any]] = {
    "model": ((str,), REQUIRED),
    "data": ((str,), REQUIRED),
    "epochs": ((int,), REQUIRED),
    "batch_size": ((int,), REQUIRED),
    "lr": ((int, float), REQUIRED),
    "runs": ((list,), REQUIRED),
    "seeds": ((list,), REQUIRED),
    "model_args": ((dict,), {}),
    "image_size": ((int, type(None)), None),
    "pretrained": ((bool,), False),
    "weights": ((str, type(None)), None),
    "cache_images": ((bool,), False),
    "format": ((str,), "auto"),
    "train_split": ((str, type(None)), None),
    "eval_split": ((str, type(None)), None),
    "shots": ((list,), [None]),
    "weight_decay": ((int, float), 1e-4),
    "precision": ((str,), "none"),
    "frames": ((int, type(None)), None),
    "frame_stride": ((int, type(None)), None),
    "video_aug": ((str, type(None)), None),
    "test_clips": ((int, type(None)), None),
    "test_crops": ((int, type(None)), None),
    "inits": ((list,), [RANDOM]),
}
RUN_KEYS: Dict[str, Tuple[Tuple[type, ...], Any]] = {
    "method": ((str,), REQUIRED),
    "options": ((dict,), {}),
    "layers": ((int, str, list, type(None)), None),
    "init": ((str, type(None)), None),
}
# the grid's settings a finished run depends on besides its own (method, options, layers, shots, seed)
COMMON = ("model", "model_args", "image_size", "pretrained", "weights", "data", "format", "train_split", "eval_split",
          "epochs", "batch_size", "lr", "weight_decay", "precision", "frames", "frame_stride", "video_aug", "test_clips",
          "test_crops")
CSV_COLUMNS = ("method", "options", "layers", "init", "shots", "seed", "trainable_parameters", "delta_bytes", "accuracy",
               "seconds", "run")


@dataclass(frozen=True)
class Run:
    """One trained delta of a study: a grid run at one data scale and seed."""

    method: str
    options: Dict[str, Any]
    layers: Any
    shots: Optional[int]
    seed: int
    init: str = RANDOM  # "random" or a delta checkpoint's path, as the grid writes it
    init_sha256: Optional[str] = None  # the init file's checksum
    blocks: Tuple[int, ...] = field(default=(), compare=False)  # where the method goes (what an init takes)

    @property
    def name(self) -> str:
        """Its directory under ``out/runs``: the method, a digest of (method, options, layers), for an
        init other than random ``init-`` and the first digits of the file's SHA-256 (another file, or the
        same one changed, is another run), the data scale and the seed."""
        spec = json.dumps([self.method, self.options, self.layers], sort_keys=True)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        init = "" if self.init == RANDOM else f"-init{(self.init_sha256 or '')[:8]}"
        return f"{self.method}-{digest}{init}-shots{'all' if self.shots is None else self.shots}-seed{self.seed}"


@dataclass
class StudyResult:
    """What :func:`run_study` produced: one row per run (the CSV's columns), the CSV, the plot (None
    without matplotlib or with ``plot=False``), and how many runs were trained now or found finished."""

    rows: List[Dict[str, Any]]
    csv: Path
    plot: Optional[Path]
    trained: int = 0
    reused: int = 0
    gains: Optional[Path] = None  # gains.csv, where the grid has an init other than random
    gains_plot: Optional[Path] = None
    messages: List[str] = field(default_factory=list)


class Remembered(torch.utils.data.Dataset):
    """A dataset whose items are computed once and kept (grid key ``cache_images``): the study's
    preprocessing is deterministic, so an image read again would be the same tensor."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.samples, self.kept = dataset, dataset.samples, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index not in self.kept:
            self.kept[index] = self.dataset[index]
        return self.kept[index]


def _check_type(value: Any, types: Tuple[type, ...], key: str) -> None:
    if isinstance(value, bool) and bool not in types:  # JSON true is not an int
        raise StudyError(f"grid key {key!r} must be {' or '.join(t.__name__ for t in types)}; got {value!r}")
    if not isinstance(value, types):
        raise StudyError(f"grid key {key!r} must be {' or '.join(t.__name__ for t in types)}; got {value!r}")


def _fill(raw: Mapping[str, Any], keys: Mapping[str, Tuple[Tuple[type, ...], Any]], where: str) -> Dict[str, Any]:
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise StudyError(f"unknown grid key {where}{unknown[0]!r}; the keys are {', '.join(keys)}")
    filled = {}
    for key, (types, default) in keys.items():
        if key not in raw:
            if default is REQUIRED:
                raise StudyError(f"grid key {where}{key!r} is missing")
            filled[key] = json.loads(json.dumps(default))
            continue
        _check_type(raw[key], types, f"{where}{key}")
        filled[key] = raw[key]
    return filled


def _layers(value: Any, where: str) -> Any:
    """A run's ``layers`` as ``apply`` takes them: null or ``"all"``, an int, a list of ints, or a
    slice written ``"6:12"`` / ``"-4:"``."""
    if value is None or value == "all":
        return None
    if isinstance(value, list):
        if not all(type(v) is int for v in value):
            raise StudyError(f"grid key {where}'layers' must hold ints; got {value!r}")
        return value
    if isinstance(value, str):
        try:
            parts = [int(p) if p.strip() else None for p in value.split(":")]
        except ValueError:
            parts = []
        if not 2 <= len(parts) <= 3:
            raise StudyError(f"grid key {where}'layers' {value!r}: expected all, an int, a list or a slice like 6:12")
        return slice(*parts)
    return value


def _layers_text(value: Any) -> str:
    if value is None:
        return "all"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_grid(grid: Union[str, Path, Mapping[str, Any]]) -> Dict[str, Any]:
    """The grid (a JSON file or a mapping) with every key checked and the defaults filled in; a bad
    one raises StudyError naming the key. Required: ``model``, ``data``, ``epochs``, ``batch_size``,
    ``lr``, ``runs`` (each ``method``, optional ``options`` and ``layers``) and ``seeds``; optional:
    ``model_args`` ({}), ``image_size`` (the model's), ``pretrained`` (false), ``weights`` (null: a local
    file of pretrained weights, loaded as ``train --weights`` loads it), ``cache_images`` (false: true
    keeps the preprocessed images in memory across epochs and runs, for data that fits), ``format`` ("auto"),
    ``train_split`` and ``eval_split`` (the format's), ``shots`` ([null]: every image),
    ``weight_decay`` (1e-4), ``precision`` ("none"), ``inits`` (["random"]: each run from each of these
    inits, "random" or a delta checkpoint's path), and per run ``init`` (that run from this init only); for
    ``"format": "video"``: ``frames`` and ``frame_stride`` (the model's clip length, else 8, and 4),
    ``video_aug`` ("multiscale"), ``test_clips`` and ``test_crops`` (1 and 1). ``model`` is a model spec of
    any zoo (:mod:`.zoo`)."""
    from ..methods import METHODS

    if not isinstance(grid, Mapping):
        path = Path(grid)
        try:
            grid = json.loads(path.read_text())
        except OSError as error:
            raise StudyError(f"cannot read the grid {path}: {error.strerror or error}") from None
        except ValueError as error:
            raise StudyError(f"the grid {path} is not JSON: {error}") from None
        if not isinstance(grid, dict):
            raise StudyError(f"the grid {path} must hold one JSON object")
    filled = _fill(grid, GRID_KEYS, "")
    for key in ("epochs", "batch_size"):
        if filled[key] < 1:
            raise StudyError(f"grid key {key!r} must be at least 1; got {filled[key]}")
    if filled["format"] not in ALL_FORMATS:
        raise StudyError(f"grid key 'format' {filled['format']!r} is not one of {', '.join(ALL_FORMATS)}")
    video_keys = [key for key in ("frames", "frame_stride", "video_aug", "test_clips", "test_crops") if filled[key] is not None]
    if video_keys and filled["format"] != "video":
        raise StudyError(f"grid keys {', '.join(video_keys)} apply to videos: set 'format' to 'video'")
    if filled["weights"] is not None and filled["pretrained"]:
        raise StudyError("grid keys 'weights' and 'pretrained' exclude each other: weights from a file or the hub's")
    if filled["weights"] is not None and not Path(filled["weights"]).is_file():
        raise StudyError(f"grid key 'weights': no weights file at {filled['weights']}")
    if filled["precision"] not in PRECISIONS:
        raise StudyError(f"grid key 'precision' {filled['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if not filled["runs"]:
        raise StudyError("grid key 'runs' is empty")
    if not filled["seeds"] or not all(type(s) is int for s in filled["seeds"]):
        raise StudyError(f"grid key 'seeds' must be a non-empty list of ints; got {filled['seeds']!r}")
    if not filled["shots"] or not all(s is None or (type(s) is int and s > 0) for s in filled["shots"]):
        raise StudyError(f"grid key 'shots' must be a non-empty list of positive ints or null; got {filled['shots']!r}")
    inits = filled["inits"]
    if not inits or not all(isinstance(i, str) and i for i in inits) or len(set(inits)) != len(inits):
        raise StudyError(f"grid key 'inits' must be a non-empty list of distinct strings (\"random\" or a delta "
                         f"checkpoint's path); got {inits!r}")
    runs = []
    for i, run in enumerate(filled["runs"]):
        where = f"runs[{i}]."
        if not isinstance(run, dict):
            raise StudyError(f"grid key 'runs[{i}]' must be an object with method, options, layers; got {run!r}")
        run = _fill(run, RUN_KEYS, where)
        if run["method"] not in METHODS:
            raise StudyError(f"grid key {where}'method': unknown method {run['method']!r}; known: {', '.join(METHODS)}")
        _layers(run["layers"], where)
        if run["init"] == "":
            raise StudyError(f"grid key {where}'init' must be \"random\" or a delta checkpoint's path; got \"\"")
        runs.append(run)
    filled["runs"] = runs
    return filled


def _spec(grid: Mapping[str, Any]) -> Any:
    from .zoo import parse_model_spec

    try:
        return parse_model_spec(grid["model"])
    except SurgeryError as error:
        raise StudyError(f"grid key 'model': {error}") from None


def _build(grid: Mapping[str, Any], classes: int, seed: int) -> torch.nn.Module:
    from .zoo import build_model

    spec = _spec(grid)
    model_args = dict(grid["model_args"])
    if grid["image_size"] and spec.is_timm:
        model_args.setdefault("img_size", grid["image_size"])
    torch.manual_seed(seed)  # the base's weights without pretrained ones, and the head's
    return build_model(spec, classes, pretrained=grid["pretrained"], weights=grid["weights"], model_args=model_args)


def _inits_of(grid: Mapping[str, Any], run: Mapping[str, Any]) -> List[str]:
    return [run["init"]] if run["init"] is not None else list(grid["inits"])


def _built(grid: Mapping[str, Any], classes: int) -> torch.nn.Module:
    """The grid's model without pretrained weights, for the checks (nothing trains on it)."""
    try:
        return _build({**grid, "pretrained": False, "weights": None}, classes, 0)
    except StudyError:
        raise
    except Exception as error:
        raise StudyError(f"grid keys 'model'/'model_args': cannot build {grid['model']!r}: {error}") from None


def _probe(grid: Mapping[str, Any], classes: int) -> Tuple[Any, Any]:
    """(the input config, the clip spec or None) of the grid's model, built once without pretrained weights."""
    from .zoo import input_config

    config = input_config(_built(grid, classes), _spec(grid), grid["image_size"])
    clips = None
    if grid["format"] == "video":
        try:
            clips = clip_spec(config, grid["frames"], grid["frame_stride"], grid["video_aug"] or "multiscale",
                              grid["test_clips"] or 1, grid["test_crops"] or 1)
        except DataError as error:
            raise StudyError(f"grid keys 'model'/'frames': {error}") from None
    return config, clips


def _check_runs(grid: Mapping[str, Any], classes: int) -> List[Tuple[int, ...]]:
    """Apply every run on a model without weights (no training): unknown options and bad layers are
    refused now. Every init other than random must hold the run's method, with the same options, on the
    same blocks (so that its gain over random compares like with like) and fit the model. Returns each
    run's blocks."""
    from ..api import apply
    from ..inventory import surgery_record

    def model() -> torch.nn.Module:
        return _built(grid, classes)

    blocks = []
    for i, run in enumerate(grid["runs"]):
        fresh = model()
        try:
            apply(fresh, run["method"], layers=_layers(run["layers"], ""), **run["options"])
        except SurgeryError as error:
            raise StudyError(f"grid key runs[{i}] ({run['method']}): {error}") from None
        expected = surgery_record(fresh)
        blocks.append(tuple(expected[0]["blocks"]))
        for init in _inits_of(grid, run):
            if init == RANDOM:
                continue
            where = f"grid key runs[{i}] ({run['method']}), init {init!r}"
            if not Path(init).is_file():
                raise StudyError(f"{where}: no delta checkpoint at {init}")
            loaded = model()
            try:
                Init(Path(init), blocks=list(blocks[-1])).load_into(loaded, run["method"])
            except SurgeryError as error:
                raise StudyError(f"{where}: {error}") from None
            got = surgery_record(loaded)
            if got != expected:
                raise StudyError(f"{where}: it holds {got[0]['method']} with options {got[0]['options']} on blocks "
                                 f"{got[0]['blocks']}, the run {expected[0]['options']} on blocks "
                                 f"{expected[0]['blocks']}: a gain over random would compare other modules")
    return blocks


def _same_grid(out: Path, grid: Mapping[str, Any]) -> None:
    """Refuse an output directory that holds a study of other common settings (its finished runs would
    not be comparable); write the settings there otherwise."""
    record = out / "grid.json"
    common = {key: grid[key] for key in COMMON}
    if record.exists():
        try:
            before = json.loads(record.read_text())
        except (OSError, ValueError):
            raise StudyError(f"{record} is not a study's settings file: choose another --out") from None
        changed = [key for key in COMMON if before.get(key) != common[key]]
        if changed:
            raise StudyError(f"{out} holds a study with other settings ({', '.join(changed)} differ): "
                             "choose another --out to run this grid")
    else:
        record.write_text(json.dumps(common, indent=2) + "\n")


def _row(run: Run, result: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "method": run.method, "options": json.dumps(run.options, sort_keys=True), "layers": _layers_text(run.layers),
        "init": run.init,
        "shots": "all" if run.shots is None else run.shots, "seed": run.seed,
        "trainable_parameters": result["trainable_parameters"], "delta_bytes": result["delta_bytes"],
        "accuracy": result["accuracy"], "seconds": result["seconds"], "run": run.name,
    }


def run_study(
    grid: Union[str, Path, Mapping[str, Any]],
    out: Union[str, Path],
    *,
    device: Union[str, torch.device] = "auto",
    plot: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Train and evaluate every run x shots x seed of ``grid`` (a JSON file or a mapping; see
    :func:`load_grid`) and write under ``out``:

    - ``runs/<run>/delta.safetensors`` and ``runs/<run>/log.json`` for each run (its settings, every
      epoch, its result); a run whose log records a result is finished and never trained again;
    - ``results.csv``: one row per run, with the columns :data:`CSV_COLUMNS` (accuracy: top-1 on the
      evaluation split as a fraction; seconds: training wall time);
    - ``tradeoff.png``: accuracy against trainable parameters (log axis), mean and spread over seeds,
      the Pareto front marked (:func:`petl_surgery.training.tradeoff.plot_tradeoff`); without
      matplotlib, or with ``plot=False``, no plot (``log`` says so when matplotlib is missing).

    Each run builds the model (``torch.manual_seed(seed)`` first, so the seed also draws the weights of
    a base without ``pretrained``), applies the method, trains with :func:`fit` (AdamW, cosine decay,
    the grid's ``lr``, ``weight_decay``, ``batch_size`` and ``epochs``, batches shuffled with the seed)
    on the training split (``shots`` images per class drawn with the seed), and evaluates.
    Everything is checked before the first run trains: the grid's keys, the data (every split and
    image, each ``shots`` draw), and each run's method, options and layers, planned on the model.
    ``log`` receives one line per run."""
    grid = load_grid(grid)
    out = Path(out)
    device = choose_device(device) if isinstance(device, str) else device
    _spec(grid)
    try:
        classes = len(class_names(grid["data"], grid["format"], grid["eval_split"], "eval"))
    except DataError as error:
        raise StudyError(f"grid key 'data': {error}") from None
    config, clips = _probe(grid, classes)
    try:
        evaluation, layout, eval_split, wrap = run_evaluation_data(grid["data"], grid["format"], config, clips=clips,
                                                                   split=grid["eval_split"])
        data_of: Dict[Tuple[Optional[int], Optional[int]], Any] = {}
        for shots in grid["shots"]:
            for seed in grid["seeds"] if shots is not None else [None]:  # every image: the same data for all seeds
                data_of[shots, seed] = run_training_data(
                    grid["data"], grid["format"], config, clips=clips, split=grid["train_split"],
                    shots=shots, shot_seed=seed or 0,
                )
    except DataError as error:
        raise StudyError(f"grid key 'data': {error}") from None
    if grid["cache_images"]:
        evaluation = Remembered(evaluation)
        for data in data_of.values():
            data.train = Remembered(data.train)
    evaluated = {path for path, _ in evaluation.samples}
    for data in data_of.values():
        shared = [path for path, _ in data.train.samples if path in evaluated]
        if shared:
            raise StudyError(f"grid key 'eval_split': the evaluation split {eval_split or grid['data']!r} shares "
                             f"{len(shared)} images with the training split {data.split or grid['data']!r} "
                             f"(e.g. {shared[0]}); give train_split and eval_split")
    if len(layout.classes) != classes:
        raise StudyError(f"grid key 'data': the evaluation split has {len(layout.classes)} classes, the lists {classes}")
    blocks = _check_runs(grid, classes)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file, not a directory")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _same_grid(out, grid)

    checksums = {init: file_sha256(Path(init)) for r in grid["runs"] for init in _inits_of(grid, r) if init != RANDOM}
    runs = [Run(r["method"], r["options"], r["layers"], shots, seed, init, checksums.get(init), blocks[i])
            for i, r in enumerate(grid["runs"]) for init in _inits_of(grid, r)
            for shots in grid["shots"] for seed in grid["seeds"]]
    result = StudyResult([], out / "results.csv", None)
    eval_loader = torch.utils.data.DataLoader(evaluation, batch_size=grid["batch_size"])
    for number, run in enumerate(runs, 1):
        folder = out / "runs" / run.name
        delta, log_path = folder / "delta.safetensors", folder / "log.json"
        finished = read_run_log(log_path)
        if finished is not None and "result" in finished and delta.is_file():
            result.rows.append(_row(run, finished["result"]))
            result.reused += 1
            log(f"[{number}/{len(runs)}] {run.name}: finished before, accuracy {finished['result']['accuracy']:.4f}")
            continue
        folder.mkdir(exist_ok=True)
        outcome = _train_one(grid, run, data_of[run.shots, None if run.shots is None else run.seed], eval_loader, classes, layout.classes,
                             eval_split, device, delta, log_path, wrap)
        result.rows.append(_row(run, outcome))
        result.trained += 1
        log(f"[{number}/{len(runs)}] {run.name}: accuracy {outcome['accuracy']:.4f}, "
            f"{outcome['trainable_parameters']:,} trainable parameters, {outcome['seconds']:.1f} s")
    with result.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result.rows)
    title = f"{grid['model']} on {Path(grid['data']).name}"
    gains = paired_gains(result.rows)
    if gains:
        result.gains = write_gains(gains, out / "gains.csv")
        log(format_gains(gains))
    if plot:
        result.plot, message = plot_tradeoff(result.rows, out / "tradeoff.png", title=title)
        if gains and message is None:
            result.gains_plot, message = plot_gains(gains, out / "gains.png", title=title)
        if message:
            result.messages.append(message)
            log(message)
    return result


def run_config(grid: Mapping[str, Any], run: Run, device: torch.device) -> RunConfig:
    """The :class:`~.config.RunConfig` of one run of a checked grid (:func:`load_grid`): the grid's model,
    data and recipe, the run's method, options, layers, shots and seed (which also draws the shots); the
    rest :func:`fit`'s defaults."""
    return RunConfig(
        model=grid["model"], data=grid["data"], model_args=grid["model_args"], pretrained=grid["pretrained"],
        weights=grid["weights"], method=run.method, layers=run.layers, options=run.options, format=grid["format"],
        split=grid["train_split"], shots=run.shots, shot_seed=run.seed, frames=grid["frames"],
        frame_stride=grid["frame_stride"], video_aug=grid["video_aug"], image_size=grid["image_size"],
        epochs=grid["epochs"], lr=grid["lr"], weight_decay=grid["weight_decay"], batch_size=grid["batch_size"],
        device=str(device), precision=grid["precision"], seed=run.seed, init=run.init,
    )


def _train_one(
    grid: Mapping[str, Any], run: Run, data: Any, eval_loader: Any, classes: int, class_names: List[str],
    eval_split: Optional[str], device: torch.device, delta: Path, log_path: Path,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model,
) -> Dict[str, Any]:
    import timm

    from ..api import apply, summary
    from ..checkpoints import save
    from ..version import __version__

    model = _build(grid, classes, run.seed)
    if run.init == RANDOM:
        apply(model, run.method, layers=_layers(run.layers, ""), **run.options)
        init: Any = RANDOM
    else:  # checked to fit before the first run (_check_runs)
        init = Init(Path(run.init), blocks=list(run.blocks)).load_into(model, run.method)
    counts = summary(model)
    config = run_config(grid, run, device).resolved(init=init, statistics=counts.statistics)
    record = run_log(config, data.record(), {
        # the grid's settings a RunConfig does not hold (the evaluation's), and what the run measured
        "train_split": grid["train_split"], "eval_split": eval_split, "test_clips": grid["test_clips"],
        "test_crops": grid["test_crops"], "classes": class_names, "history": [],
        "versions": {"petl_surgery": __version__, "torch": torch.__version__, "timm": timm.__version__},
    })
    started = time.perf_counter()
    history = fit(model, data.train, data.val, device=device, **config.fit_arguments())
    seconds = time.perf_counter() - started
    save(model, delta)
    report = accuracy_report(wrap(model), eval_loader, class_names, device, grid["precision"])
    record["history"] = [epoch.as_dict() for epoch in history]
    record["evaluation"] = report
    record["result"] = {
        "accuracy": report["top1"], "trainable_parameters": counts.trainable, "delta_bytes": delta.stat().st_size,
        "seconds": round(seconds, 3),
    }
    log_path.write_text(json.dumps(record, indent=2) + "\n")
    return record["result"]
