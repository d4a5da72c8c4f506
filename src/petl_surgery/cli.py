"""The ``petl-surgery`` command line: plan, inspect, train, evaluate, study, demo.

    petl-surgery plan vit_base_patch16_224 --method patt --layers 6:12 --option mid_dim=64
    petl-surgery inspect delta.safetensors
    petl-surgery train vit_small_patch16_224 --data images/ --method lora --epochs 5 --out delta.safetensors
    petl-surgery evaluate vit_small_patch16_224 delta.safetensors --data test_images/ --json result.json
    petl-surgery train torchvision:swin3d_t --format video --data hmdb51/ --frames 8 --frame-stride 2 -m bapat
    petl-surgery study grid.json --out study/
    petl-surgery demo --out petl_demo

Errors print one line (``petl-surgery: error: ...``) and exit with status 1 (2 for bad arguments);
``--traceback`` shows the whole traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

PROG = "petl-surgery"
MODEL_HELP = ("a model spec: a timm name (or timm:NAME), torchvision:NAME (e.g. swin3d_t), hf:DIR (a local "
              "transformers directory) or open_clip:NAME")
MODEL_ARG_HELP = ("a keyword for the zoo's model (timm.create_model, torchvision's get_model, a transformers config "
                  "override, open_clip.create_model)")
PRETRAINED_HELP = ("load the zoo's pretrained weights (timm, torchvision and open_clip: needs hub access; hf:DIR: the "
                   "directory's own weights)")


class UsageError(Exception):
    """A bad command line; exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class RenamedOption(argparse.Action):
    """The old spelling of a renamed option: still accepted, with a FutureWarning naming the new one.

    Options are renamed where torchrun's own parser (which allows abbreviations and reads the options
    after ``-m petl_surgery``) takes them for an abbreviation of one of its options, e.g. ``--log`` for
    ``--log-dir``: under torchrun only the new spelling passes through (tests/test_torchrun_options.py)."""

    def __init__(self, option_strings: Sequence[str], dest: str, renamed_to: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.renamed_to = renamed_to

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        warnings.warn(f"{option_string} is deprecated, use {self.renamed_to} (torchrun refuses {option_string} as an "
                      "ambiguous abbreviation of its own options)", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


# -- argument values ------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """An option value: JSON (``64``, ``0.5``, ``true``, ``["q", "v"]``), Python's True/False/None, a
    comma list (``q,v``), or else the text itself."""
    special = {"True": True, "False": False, "None": None, "none": None}
    if text in special:
        return special[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [parse_value(part) for part in text.split(",") if part != ""]
        return text


def parse_options(pairs: Optional[Sequence[str]]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"option {pair!r} is not of the form key=value")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def parse_layers(text: Optional[str]) -> Union[None, int, slice, List[int]]:
    """``all`` or nothing (every block), ``3``, ``-1``, ``0,2,4``, or a slice ``6:12`` / ``-4:`` / ``::2``."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        items = [int(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected all, an index, a comma list (0,2,4) or a slice (6:12)") from None
    return items[0] if len(items) == 1 else items


def model_spec(text: str) -> Any:
    """The parsed MODEL argument of every subcommand (``timm:NAME`` or ``NAME``, ``torchvision:NAME``,
    ``hf:DIR``, ``open_clip:NAME``; :func:`petl_surgery.training.zoo.parse_model_spec`); an unknown one is
    a usage error with close matches."""
    import petl_surgery as ps
    from petl_surgery.training.zoo import parse_model_spec

    try:
        return parse_model_spec(text)
    except ps.SurgeryError as error:
        raise UsageError(str(error)) from None


def create_model(name: str, *, pretrained: bool = False, weights: Optional[str] = None,
                 num_classes: Optional[int] = None, **kwargs: Any) -> Any:
    """The model of spec ``name`` (:func:`model_spec`) built by its zoo (:func:`petl_surgery.training.zoo.build_model`);
    without ``num_classes``, the zoo's default head (timm's and torchvision's 1000, a transformers config's own)."""
    from petl_surgery.training.zoo import build_model

    spec = model_spec(name)
    if num_classes is None:
        num_classes = _default_classes(spec)
    return build_model(spec, num_classes, pretrained=pretrained, weights=weights, model_args=kwargs)


def _default_classes(spec: Any) -> int:
    if spec.zoo == "hf":
        import transformers

        return int(transformers.AutoConfig.from_pretrained(spec.name).num_labels)
    return 1000


# -- plan -----------------------------------------------------------------------------------------------


def _build_for_plan(name: str, model_args: Dict[str, Any]) -> Tuple[Any, str]:
    """The model without weights: on the meta device when that works, else on the CPU."""
    import torch

    try:
        with torch.device("meta"):
            return create_model(name, **model_args), "meta"
    except UsageError:
        raise
    except Exception:  # a model whose construction computes on its weights
        return create_model(name, **model_args), "cpu"


def cmd_plan(args: argparse.Namespace) -> int:
    import petl_surgery as ps
    from petl_surgery.api import plan
    from petl_surgery.inserted import SHARED_BLOCK
    from petl_surgery.summary import planned_summary

    model_spec(args.model)
    model_args = parse_options(args.model_arg)
    if args.num_classes is not None:
        model_args["num_classes"] = args.num_classes
    options = parse_options(args.option)
    layers = parse_layers(args.layers)
    model, device = _build_for_plan(args.model, model_args)
    try:
        insertions = plan(model, args.method, layers, args.skip_unsupported, **options)
    except ps.SurgeryError:
        if device != "meta":
            raise
        model, device = create_model(args.model, **model_args), "cpu"  # retry with real tensors
        insertions = plan(model, args.method, layers, args.skip_unsupported, **options)

    counts = planned_summary(model, insertions)
    names = {id(module): path for path, module in model.named_modules()}
    found = ps.blocks(model)
    chosen = sorted({row.block for row in counts.rows if row.block != SHARED_BLOCK})
    print(f"model    {args.model} ({type(model).__name__}), built without weights on the {device} device; "
          f"{len(found)} blocks, {counts.total - counts.inserted:,} parameters")
    print(f"method   {args.method}" + (f" with {_format_options(options)}" if options else " (defaults)"))
    print(f"blocks   {_ranges(chosen)} ({len(chosen)} of {len(found)})")
    print()
    by_path = {insertion.path: insertion for insertion in insertions}
    rows = []
    for row in counts.rows:
        insertion = by_path[row.path]
        hooks = ", ".join(
            f"{hook.kind.replace('_', '-')} hook on {names.get(id(hook.target), type(hook.target).__name__) or '(model)'}"
            for hook in insertion.hooks
        )
        patched = "".join(
            f"; sets {patch.name} on {names.get(id(patch.target), type(patch.target).__name__) or '(model)'}"
            for patch in insertion.patches
        )
        block = "shared" if row.block == SHARED_BLOCK else str(row.block)
        rows.append((block, row.path, type(insertion.module).__name__, f"{row.parameters:,}", hooks + patched))
    _table(("block", "inserted module", "class", "parameters", "acts through"), rows, right={0, 3})
    print()
    for method, count in counts.per_method.items():
        print(f"{method:<28} {count:>14,} parameters")
    print(f"{'classifier head (trainable)':<28} {counts.head:>14,} parameters")
    print(f"{'trainable':<28} {counts.trainable:>14,} of {counts.total:,} ({100 * counts.share:.3f}%)")
    return 0


def _ranges(values: Sequence[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts) or "none"


def _format_options(options: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(header))
    print("-" * len(line(["-" * w for w in widths])))
    for row in rows:
        print(line(row))


# -- inspect --------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from petl_surgery.checkpoints.files import read
    from petl_surgery.checkpoints.format import decode, tensors_digest

    path = Path(args.file)
    tensors, raw = read(path)
    meta = decode(raw, str(path))
    checksum_ok = tensors_digest(tensors) == meta["tensors_sha256"]
    model = meta["model"]
    print(f"file         {path} ({path.stat().st_size:,} bytes, {path.stat().st_size / 1024:.1f} KiB)")
    print(f"format       {meta['format']} version {meta['format_version']}, written by petl_surgery "
          f"{meta.get('library_version', '?')}")
    print(f"model        {model.get('class')}" + (f" (timm name {model['timm_name']})" if model.get("timm_name") else "")
          + f", {model.get('blocks', len(model['block_paths']))} blocks")
    print(f"head         {', '.join(meta['head']) or '(none)'}")
    print(f"fingerprint  {meta['fingerprint']}")
    print(f"  w/o head   {meta['fingerprint_without_head']}")
    print(f"checksum     {'ok' if checksum_ok else 'MISMATCH: the tensors are not those that were saved'}")
    print("methods (in apply order)")
    for i, call in enumerate(meta["methods"], 1):
        print(f"  {i}. {call['method']:<8} blocks {_ranges(sorted(call['blocks']))}")
        print(f"     options {_format_options(call['options']) or '(none)'}")
    print()
    head = set(meta["head"])
    rows, per_group = [], {}
    for name in sorted(tensors):
        tensor = tensors[name]
        group = _group_of(name, head)
        per_group.setdefault(group, [0, 0, 0])
        count, size = tensor.numel(), tensor.numel() * tensor.element_size()
        per_group[group][0] += 1
        per_group[group][1] += count
        per_group[group][2] += size
        dtype = str(tensor.dtype).replace("torch.", "")
        rows.append((name, group, dtype, "x".join(map(str, tensor.shape)) or "scalar", f"{count:,}"))
    _table(("tensor", "part", "dtype", "shape", "parameters"), rows, right={4})
    print()
    for group, (n, count, size) in per_group.items():
        print(f"{group:<12} {n:>5} tensors {count:>12,} parameters {size:>12,} bytes")
    n = sum(v[0] for v in per_group.values())
    count = sum(v[1] for v in per_group.values())
    size = sum(v[2] for v in per_group.values())
    print(f"{'total':<12} {n:>5} tensors {count:>12,} parameters {size:>12,} bytes")
    return 0 if checksum_ok else 1


def _group_of(name: str, head: set) -> str:
    if name in head:
        return "head"
    for part in name.split("."):
        if part.startswith("petl_"):
            return part[len("petl_") :]
    return "base"


# -- train ----------------------------------------------------------------------------------------------


def _versions() -> Dict[str, str]:
    import timm
    import torch

    import petl_surgery

    return {"petl_surgery": petl_surgery.__version__, "torch": torch.__version__, "timm": timm.__version__}


def _device(name: str) -> Any:
    """The torch device ``--device`` names; an unavailable or unknown one is a usage error."""
    import petl_surgery as ps
    from petl_surgery.training import choose_device

    try:
        return choose_device(name)
    except ps.SurgeryError as error:
        raise UsageError(str(error)) from None


# -- scale: weights from a file, augmentation, optimizer, compile, torchrun, feature caching ---------------


def _add_scale_arguments(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--weights", metavar="FILE",
                   help="pretrained weights from a local file (safetensors or a torch checkpoint): timm models load "
                        "it as their hub weights, other zoos as a state dict of the model built (head tensors of "
                        "another size dropped); for machines without hub access")
    if not train:
        return
    from petl_surgery.training.augment import AUGMENTATIONS
    from petl_surgery.training.optim import SCHEDULES

    p.add_argument("--aug", choices=AUGMENTATIONS, default="none",
                   help="training images: none (the data's deterministic resize and normalisation; default) or timm "
                        "(timm.data.create_transform's training pipeline from the model's pretrained config)")
    p.add_argument("--opt", default="adamw", help="timm optimizer (timm.optim.create_optimizer_v2; default adamw)")
    p.add_argument("--sched", choices=SCHEDULES, default="cosine",
                   help="timm schedule stepped per update (timm.scheduler.create_scheduler_v2; default cosine)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warm-up from 1e-5 (default 0)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="train through torch.compile (backend inductor unless named, e.g. aot_eager)")
    p.add_argument("--cache-features", action="store_true",
                   help="run the frozen embedding and blocks below the first trained block once per image, and "
                        "train from that block on (refused where it would not give the same training)")


def _check_weights(args: argparse.Namespace) -> None:
    if args.weights and not Path(args.weights).is_file():
        raise UsageError(f"no weights file at {args.weights}")


def _check_scale_arguments(args: argparse.Namespace) -> None:
    """The scale options checked before any data is read or model built."""
    import petl_surgery as ps
    from petl_surgery.training.optim import check_choices

    _check_weights(args)
    if args.cache_features and args.aug != "none":
        raise UsageError(f"--cache-features needs deterministic images; --aug {args.aug} augments them differently "
                         "every epoch")
    try:
        check_choices(args.opt, args.sched, args.warmup_epochs)
    except ps.SurgeryError as error:
        raise UsageError(str(error)) from None


def _train_transform(args: argparse.Namespace, config: Any) -> Any:
    """The training images' transform of ``--aug`` (None: the format's deterministic preprocessing)."""
    from petl_surgery.training.augment import training_transform, transform_for

    if args.aug == "none" or args.format == "video":
        return None
    if model_spec(args.model).is_timm:
        return training_transform(args.model, config.size, args.aug)[0]
    return transform_for(config.size, config.mean, config.std)


def _check_video_arguments(args: argparse.Namespace) -> None:
    """Options that do not apply to the data's kind, refused before anything is read."""
    video = args.format == "video"
    given = [name for name, value in (("--frames", args.frames), ("--frame-stride", args.frame_stride),
                                      ("--video-aug", getattr(args, "video_aug", None)),
                                      ("--test-clips", getattr(args, "test_clips", None)),
                                      ("--test-crops", getattr(args, "test_crops", None))) if value is not None]
    if given and not video:
        raise UsageError(f"{', '.join(given)} apply to videos: give --format video")
    if video and getattr(args, "aug", "none") != "none":
        raise UsageError("--aug augments images; for videos give --video-aug multiscale (the default) or none")
    if video and getattr(args, "cache_features", False):
        raise UsageError("--cache-features caches images; it does not take --format video")


def _create_base(args: argparse.Namespace, num_classes: int, model_args: Dict[str, Any]) -> Tuple[Any, Any]:
    """(model, its input config): the model of the spec with ``--weights FILE``'s weights, or with
    ``--pretrained`` its zoo's, else random weights from the seed; the input config from the model as built
    (``--image-size`` wins)."""
    from petl_surgery.training.zoo import input_config

    spec = model_spec(args.model)
    if args.image_size and spec.is_timm:
        model_args.setdefault("img_size", args.image_size)
    model = create_model(args.model, pretrained=args.pretrained, weights=args.weights, num_classes=num_classes,
                         **model_args)
    return model, input_config(model, spec, args.image_size)


def _clip_spec(args: argparse.Namespace, config: Any) -> Any:
    """The clip sampling of ``--format video`` (None for images)."""
    if args.format != "video":
        return None
    from petl_surgery.training.inputs import clip_spec

    return clip_spec(config, args.frames, args.frame_stride, getattr(args, "video_aug", None) or "multiscale",
                     getattr(args, "test_clips", None) or 1, getattr(args, "test_crops", None) or 1)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    import petl_surgery as ps
    from petl_surgery.training import DataError, accuracy_report
    from petl_surgery.training.inputs import class_names, run_evaluation_data
    from petl_surgery.training.outputs import check_base, check_classes, head_classes, read_run_log

    if not Path(args.delta).is_file():
        raise UsageError(f"no delta checkpoint at {args.delta}")
    _check_weights(args)
    _check_video_arguments(args)
    device = _device(args.device)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1; got {args.batch_size}")
    model_args = parse_options(args.model_arg)
    model_spec(args.model)
    trained = read_run_log(Path(args.delta).with_suffix(".json"))  # the run's log beside its delta, if there
    try:
        names = class_names(args.data, args.format, args.split, "eval")
        check_base(Path(args.delta), trained, seed=args.seed, pretrained=args.pretrained, weights=args.weights,
                   action="evaluate")
        check_classes(Path(args.delta), trained, names)  # before the base is built or anything is read in full
    except (DataError, ps.SurgeryError) as error:
        raise UsageError(str(error)) from None
    count = head_classes(Path(args.delta)) or len(names)
    torch.manual_seed(args.seed)  # a base built without weights is the one `train --seed` built
    model, config = _create_base(args, count, model_args)
    try:
        data, layout, split, wrap = run_evaluation_data(args.data, args.format, config, clips=_clip_spec(args, config),
                                                        split=args.split, classes=count)
    except DataError as error:
        raise UsageError(str(error)) from None
    classes = layout.classes
    ps.load(model, args.delta)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    report = accuracy_report(wrap(model).to(device), loader, classes, device, args.amp)
    report.update(model=args.model, delta=str(args.delta), data=str(args.data), format=layout.format, split=split,
                  device=str(device), precision=args.amp)
    where = f"{args.data}" + (f" ({layout.format} split {split})" if split else "")
    print(f"{args.model} + {args.delta} on {where}: {report['images']} images, top-1 {100 * report['top1']:.1f}%, "
          f"top-{report['k']} {100 * report['top5']:.1f}%")
    for name, value in report["per_class"].items():
        print(f"  {name:<24} {'-' if value is None else f'{100 * value:.1f}%'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    import petl_surgery as ps
    from petl_surgery.training import DataError, EpochRecord, caching, distributed, fit
    from petl_surgery.training.config import run_log
    from petl_surgery.training.inputs import class_names, run_training_data
    from petl_surgery.training.outputs import check_base, check_output_paths, file_digest, read_run_log

    if args.method is None and args.resume is None and args.init is None:
        raise UsageError("give --method (a new delta), --init DELTA (start from another delta's modules) or "
                         "--resume DELTA (continue one)")
    if args.method is not None and args.resume is not None:
        raise UsageError("--method and --resume exclude each other: a resumed delta brings its own surgery")
    init = _init_of(args)  # checked before any data is read
    if args.resume is not None and not Path(args.resume).is_file():
        raise UsageError(f"no delta checkpoint at {args.resume}")
    if args.resume is not None:  # arguments a resumed run would otherwise ignore
        ignored = [name for name, value in (("--layers", args.layers), ("-o/--option", args.option),
                                            ("--statistics", args.statistics)) if value is not None]
        if ignored:
            raise UsageError(f"--resume takes the surgery from {args.resume}: {', '.join(ignored)} would be ignored; "
                             "leave it out")
        _check_weights(args)
        try:
            check_base(Path(args.resume), read_run_log(Path(args.resume).with_suffix(".json")),
                       seed=args.seed, pretrained=args.pretrained, weights=args.weights, action="resume")
        except ps.SurgeryError as error:
            raise UsageError(str(error)) from None
    device = _device(args.device)
    _check_scale_arguments(args)
    _check_video_arguments(args)
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1; got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_suffix(".json")
    try:
        check_output_paths(out, log_path)  # before any data is read or epoch run
    except ps.SurgeryError as error:
        raise UsageError(str(error)) from None
    model_args = parse_options(args.model_arg)
    model_spec(args.model)
    config = run_config(args, model_args)  # the one record of the settings: fit's arguments, the log's
    if args.val and args.val_split:
        raise UsageError("--val and --val-split exclude each other: give a validation folder or a fraction of --data")
    try:
        count = len(class_names(args.data, args.format, args.split, "train"))
    except DataError as error:
        raise UsageError(str(error)) from None
    model, input_config = _create_base(args, count, model_args)  # head from the classes (img_size into model_args)
    try:
        data = run_training_data(
            config.data, config.format, input_config, clips=_clip_spec(args, input_config), split=config.split,
            val=config.val, val_split=config.val_split, shots=config.shots, seed=config.seed,
            shot_seed=config.draw_seed, transform=_train_transform(args, input_config),
        )
    except DataError as error:
        raise UsageError(str(error)) from None
    train_set, val_set, classes = data.train, data.val, data.classes
    init_record = None
    if config.resumed_from:
        ps.load(model, config.resumed_from)
        what = f"resumed from {config.resumed_from}"
    elif init is not None:
        init_record = init.load_into(model, config.method)
        what = f"{'+'.join(c['method'] for c in init_record['surgery'])} started from {config.init}"
    else:
        ps.apply(model, config.method, layers=parse_layers(config.layers), statistics=config.statistics or "frozen",
                 **config.options)
        what = f"{config.method}" + (f" ({_format_options(config.options)})" if config.options else "")
    summary = ps.summary(model)
    cache_start = caching.cache_start(model) if config.cache_features else None  # refused here, before training
    device = distributed.start(device)  # under torchrun: this rank's device, the process group joined
    main_rank = distributed.is_main()
    if main_rank:
        print(f"{config.model}: {what}; trainable {summary.trainable:,} of {summary.total:,} parameters "
              f"({100 * summary.share:.2f}%); {len(classes)} classes, {len(train_set)} training"
              + (f" and {len(val_set)} validation" if val_set is not None else "") + " images", file=sys.stderr)
    started = time.perf_counter()
    loaded = bool(config.resumed_from or init_record)  # a loaded delta brings its own surgery
    config = config.resolved(
        method=config.method or (init_record and "+".join(c["method"] for c in init_record["surgery"])),
        layers=config.layers or (None if loaded else "all"), statistics=summary.statistics, init=init_record,
        image_size=input_config.size, device=str(device),
        cache_features={"start_block": cache_start} if config.cache_features else None,
    )
    log = run_log(config, data.record(), {
        "classes": classes,
        "versions": _versions(),
        "trainable_parameters": summary.trainable,
        "history": [],
        "delta": str(out),
        "weights_sha256": file_digest(Path(config.weights)) if config.weights else None,  # checked by evaluate, --resume
        "world_size": distributed.world_size(),
        "wall_seconds": None,
    })

    def after_epoch(record: EpochRecord) -> None:
        log["history"].append(record.as_dict())
        log["wall_seconds"] = round(time.perf_counter() - started, 3)
        if main_rank:  # one file, from rank 0, after every epoch: an interrupted run keeps its last delta
            ps.save(model, out)
            log_path.write_text(json.dumps(log, indent=2) + "\n")

    try:
        fit(model, train_set, val_set, device=device, after_epoch=after_epoch, **config.fit_arguments())
    finally:
        distributed.finish()
    if not main_rank:
        return 0
    print(f"saved the delta to {out} ({out.stat().st_size / 1024:.1f} KiB) and the log to {log_path}")
    return 0


def run_config(args: argparse.Namespace, model_args: Dict[str, Any]) -> Any:
    """The :class:`petl_surgery.training.config.RunConfig` of ``train``'s arguments (``--amp`` is its
    ``precision``, ``--resume`` its ``resumed_from``, ``--init`` its ``init``)."""
    from petl_surgery.training.config import RunConfig

    return RunConfig(
        model=args.model, data=args.data, model_args=model_args, pretrained=args.pretrained,
        weights=str(args.weights) if args.weights else None, method=args.method, layers=args.layers,
        options=parse_options(args.option), statistics=args.statistics, resumed_from=args.resume, init=args.init,
        format=args.format, split=args.split, val=args.val, val_split=args.val_split, shots=args.shots,
        shot_seed=args.shot_seed, frames=args.frames, frame_stride=args.frame_stride, video_aug=args.video_aug,
        image_size=args.image_size, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, workers=args.workers, grad_accum=args.grad_accum, device=args.device,
        precision=args.amp, seed=args.seed, aug=args.aug, opt=args.opt, sched=args.sched,
        warmup_epochs=args.warmup_epochs, compile=args.compile, cache_features=args.cache_features,
        argv=getattr(args, "argv", None),
    )


def _init_of(args: argparse.Namespace) -> Any:
    """``--init`` and its options as a :class:`petl_surgery.training.initialization.Init`, or None;
    combinations that would be ignored are usage errors."""
    from petl_surgery.training.initialization import Init

    chosen = [name for name, value in (("--init-head", args.init_head), ("--init-methods", args.init_methods),
                                       ("--init-layers", args.init_layers), ("--init-block-map", args.init_block_map))
              if value]
    if args.init is None:
        if chosen:
            raise UsageError(f"{', '.join(chosen)} choose what --init takes: give --init DELTA")
        return None
    if args.resume is not None:
        raise UsageError("--init and --resume exclude each other: --resume continues a run, --init starts a new one "
                         "from another delta's modules")
    ignored = [name for name, value in (("--layers", args.layers), ("-o/--option", args.option),
                                        ("--statistics", args.statistics)) if value is not None]
    if ignored:
        raise UsageError(f"--init takes the surgery from {args.init}: {', '.join(ignored)} would be ignored; leave it "
                         "out (choose with --init-methods and --init-layers)")
    if not Path(args.init).is_file():
        raise UsageError(f"no delta checkpoint at {args.init}")
    blocks = parse_layers(args.init_layers)
    if isinstance(blocks, slice):
        raise UsageError(f"--init-layers {args.init_layers!r}: give saved block indices (3 or 0,2,4), not a slice")
    block_map = None
    if args.init_block_map:
        try:
            block_map = {int(a): int(b) for a, _, b in (p.partition(":") for p in args.init_block_map.split(","))}
        except ValueError:
            raise UsageError(f"--init-block-map {args.init_block_map!r}: expected saved:model pairs, e.g. 0:2,1:3") from None
    methods = [m for m in args.init_methods.split(",") if m] if args.init_methods else None
    return Init(Path(args.init), head=args.init_head, methods=methods,
                blocks=[blocks] if isinstance(blocks, int) else blocks, block_map=block_map)


# -- study ----------------------------------------------------------------------------------------------


def cmd_study(args: argparse.Namespace) -> int:
    import torch

    from petl_surgery.training import run_study

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_study(args.grid, args.out, device=device, plot=not args.no_plot)
    print(f"{len(result.rows)} runs ({result.trained} trained now, {result.reused} finished before): {result.csv}"
          + "".join(f", {path}" for path in (result.gains, result.plot, result.gains_plot) if path))
    return 0


# -- demo -----------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from petl_surgery import demo

    config = demo.FULL if args.full else demo.REDUCED
    demo.run(config, Path(args.out), threads=args.threads, plot=not args.no_plot)
    return 0


# -- main -----------------------------------------------------------------------------------------------


def _head_width(path: str) -> Optional[int]:
    """The number of classes of a delta file's head (the rows of its 2-d head weight), None without one."""
    from petl_surgery.checkpoints.files import read
    from petl_surgery.checkpoints.format import decode

    tensors, raw = read(path)
    head = decode(raw, path)["head"]
    weights = [tensors[name] for name in head if name.endswith("weight") and tensors[name].dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from petl_surgery.serving import ZooBase, serve
    from petl_surgery.training.zoo import input_config

    tasks = {}
    for item in args.task:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise UsageError(f"--task takes NAME=FILE; got {item!r}")
        if name in tasks:
            raise UsageError(f"--task {name!r} is given twice")
        if not Path(file).is_file():
            raise UsageError(f"task {name!r}: no delta checkpoint at {file}")
        tasks[name] = file
    _check_weights(args)
    model_args = parse_options(args.model_arg)
    spec = model_spec(args.model)
    if args.image_size and spec.is_timm:
        model_args.setdefault("img_size", args.image_size)
    given = model_args.pop("num_classes", None)  # a keyword of the builder, taken as the base head's width
    classes = args.num_classes or given or next(filter(None, (_head_width(f) for f in tasks.values())), None) or 1000
    base = ZooBase(spec.text, classes, tuple(sorted(model_args.items())), args.seed, args.pretrained, args.weights)
    sizing = ZooBase(spec.text, classes, base.model_args, args.seed)  # no weights: the input size only
    try:
        with torch.device("meta"):  # nothing allocated
            inputs = input_config(sizing(), spec, args.image_size)
    except Exception:  # a zoo whose model cannot be built on the meta device: built for real, once
        inputs = input_config(sizing(), spec, args.image_size)
    if inputs.video:
        raise UsageError(f"{args.model} is a video model; serve takes one image per request")
    shape = (int(model_args.get("in_chans", 3)), inputs.size, inputs.size)
    devices = args.devices if args.devices == "auto" else int(args.devices)
    serve(base, tasks, shape, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
          batch_timeout=args.batch_timeout, accelerator=args.accelerator, devices=devices,
          workers_per_device=args.workers_per_device)
    return 0


def _add_format_arguments(p: argparse.ArgumentParser, split_help: str, train: bool) -> None:
    p.add_argument("--format", choices=("auto", "imagefolder", "vtab", "fgvc", "video"), default="auto",
                   help="the layout of --data: auto (by the files present; default), imagefolder, vtab "
                        "(train800.txt, val200.txt, train800val200.txt, test.txt), fgvc (train/val/test.json), "
                        "video (train/val/test.csv: 'path label' or 'frame_dir num_frames label'; never auto)")
    p.add_argument("--split", help=split_help + "; for an ImageFolder, a sub-directory")
    p.add_argument("--frames", type=int, help="videos: frames per clip (default: the model's, else 8)")
    p.add_argument("--frame-stride", type=int, help="videos: take every S-th frame (default 4; V-PETL's HMDB51: 2)")
    if train:
        p.add_argument("--video-aug", choices=("multiscale", "none"),
                       help="videos: a random clip and V-PETL's multi-scale crop (multiscale; default) or the middle "
                            "clip and the centre crop (none)")
    else:
        p.add_argument("--test-clips", type=int, help="videos: K evenly spaced clips per video (default 1)")
        p.add_argument("--test-crops", type=int, choices=(1, 3), help="videos: 1 or 3 crops per clip (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Parameter-efficient transfer learning by model surgery.")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the whole traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", help="dry run: where a method would go in a timm model, and its parameter counts")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (built without weights)")
    p.add_argument("--method", "-m", required=True, help="patt, adapter, bapat, lora, ...")
    p.add_argument("--layers", "-l", help="blocks: all (default), 3, 0,2,4, 6:12; negative as --layers=-4:")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--num-classes", type=int, help="classes of the model's head")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help=MODEL_ARG_HELP + ", e.g. depth=6 (repeatable)")
    p.add_argument("--skip-unsupported", action="store_true", help="skip blocks the method cannot operate on")
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser("inspect", help="a delta checkpoint's metadata and tensors")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("evaluate", help="top-1, top-5 and per-class accuracy of a model with a delta")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("delta", metavar="DELTA", help="a delta checkpoint (ps.load)")
    p.add_argument("--data", required=True, help="data directory: ImageFolder, VTAB-1k lists or FGVC JSON files")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    p.add_argument("--image-size", type=int, help="input size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    _add_format_arguments(p, "the split to evaluate (default: test for vtab, fgvc and video; an ImageFolder's own "
                             "directory)", train=False)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--json", help="also write the numbers as JSON here (top1 and top5 as fractions)")
    p.add_argument("--pretrained", action="store_true", help=PRETRAINED_HELP)
    p.add_argument("--seed", type=int, default=0,
                   help="without --pretrained, the seed the base was built with by train (default 0, as train's)")
    _add_scale_arguments(p, train=False)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("train", help="train a method on an ImageFolder directory and save the delta")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="ImageFolder directory (one sub-directory per class)")
    p.add_argument("--val", help="validation data: an ImageFolder directory (same classes), or for vtab and fgvc "
                                  "a split of --data (val200, val)")
    p.add_argument("--val-split", type=float, default=0.0, help="without --val: this fraction of --data validates")
    p.add_argument("--method", "-m", help="the method to apply (not with --resume; with --init, the one to take)")
    p.add_argument("--layers", "-l", help="blocks: all (default), 3, 0,2,4, 6:12; negative as --layers=-4:")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--resume", metavar="DELTA", help="continue from a delta checkpoint (ps.load)")
    p.add_argument("--init", metavar="DELTA",
                   help="start from another delta's modules (PVP), its head left out: ps.load(model, DELTA, load_head=False); "
                        "with --method, the delta must hold that method and only it is taken")
    p.add_argument("--init-head", action="store_true", help="with --init: also take its classifier head")
    p.add_argument("--init-methods", metavar="M1,M2", help="with --init: take only these of its methods")
    p.add_argument("--init-layers", metavar="LAYERS", help="with --init: take only these saved blocks (3 or 0,2,4), as ps.load(layers=)")
    p.add_argument("--init-block-map", metavar="S:M,...",
                   help="with --init: saved block S goes to model block M (a model of another depth)")
    p.add_argument(
        "--statistics", choices=("frozen", "adapt"), default=None,
        help="the base's BatchNorm statistics: frozen (default) or adapted and saved in the delta",
    )
    p.add_argument("--pretrained", action="store_true", help=PRETRAINED_HELP)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, help="input size (default: the model's)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU; default), cpu, cuda, cuda:N, mps")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision: autocast in bf16 or fp16 (with a gradient scaler); default none")
    p.add_argument("--grad-accum", type=int, default=1, help="batches whose gradients make one step (default 1)")
    p.add_argument("--out", default="delta.safetensors", help="where the delta goes (default delta.safetensors)")
    p.add_argument("--log-file", dest="log", metavar="FILE", help="the JSON log (default: --out with .json)")
    p.add_argument("--log", dest="log", action=RenamedOption, renamed_to="--log-file", help=argparse.SUPPRESS)
    _add_format_arguments(p, "the split to train on (default: train800val200 for vtab, train for fgvc and video; "
                             "an ImageFolder's own directory)", train=True)
    p.add_argument("--shots", type=int, help="train on K images per class, drawn with --shot-seed")
    p.add_argument("--shot-seed", type=int, help="the seed of the --shots draw (default: --seed)")
    _add_scale_arguments(p, train=True)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("study", help="a V-PETL study: train every run x shots x seed of a grid, CSV and plot")
    p.add_argument("grid", metavar="GRID.json", help="the grid (see petl_surgery.training.study.load_grid)")
    p.add_argument("--out", required=True, help="the study's directory (a finished run in it is not trained again)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-plot", action="store_true", help="skip tradeoff.png")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("serve", help="serve named task deltas of one base over HTTP (LitServe, mixed-task batches)")
    p.add_argument("model", help="the base every task was trained on, as train takes it: timm:NAME (or NAME), "
                                 "torchvision:NAME, hf:DIR, open_clip:NAME")
    p.add_argument("--task", action="append", required=True, metavar="NAME=FILE",
                   help="a task: its name in requests and its delta checkpoint (repeatable)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="a keyword for the zoo's model builder")
    p.add_argument("--pretrained", action="store_true", help="the zoo's pretrained weights for the base")
    p.add_argument("--weights", metavar="FILE", help="pretrained weights of the base from a local file")
    p.add_argument("--seed", type=int, default=0, help="seed of a base built without weights (default 0)")
    p.add_argument("--image-size", type=int, help="input size (default: the model's own, as train finds it)")
    p.add_argument("--num-classes", type=int,
                   help="classes of the base's own head, used by tasks loaded without one (default: the first "
                        "task's head width, else 1000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=64, help="largest batch LitServe forms (default 64)")
    p.add_argument("--batch-timeout", type=float, default=0.01,
                   help="seconds LitServe waits for a batch to fill (default 0.01)")
    p.add_argument("--accelerator", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--devices", default="auto", help="number of devices, or auto (default)")
    p.add_argument("--workers-per-device", type=int, default=1, help="model copies per device (default 1)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("demo", help="the PVP few-shot demonstration (reduced size: a few minutes on a CPU)")
    p.add_argument("--out", default="petl_demo", help="output directory (default ./petl_demo)")
    p.add_argument("--full", action="store_true", help="the full size (more methods, shots and seeds; long)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    try:
        args = parser.parse_args(argv)
        args.argv = argv  # recorded in a training log
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except UsageError as error:
        if show_traceback:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # SurgeryError, missing files, anything else: one line
        if show_traceback:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        plain = ("SurgeryError", "BranchNeverRanError", "ModelSpecError")
        kind = "" if type(error).__name__ in plain else f"{type(error).__name__}: "
        print(f"{PROG}: error: {kind}{message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
