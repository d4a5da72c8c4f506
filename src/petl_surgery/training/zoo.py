"""Models from every zoo by one spec, for every command that builds a model (train, evaluate, study, plan):

``timm:NAME`` (or a bare ``NAME``)
    ``timm.create_model(NAME, num_classes=..., **keywords)``; ``--pretrained`` loads the hub's weights,
    ``--weights FILE`` a local file through timm's own loading (:mod:`.weights`).
``torchvision:NAME``
    ``torchvision.models.get_model(NAME, num_classes=..., **keywords)`` (e.g. ``swin3d_t``, ``vit_b_16``);
    ``--pretrained`` builds with the ``DEFAULT`` weights of the name, then a new head of the classes.
``hf:DIR``
    a local transformers directory (``config.json``, from ``save_pretrained``): the video classification
    class of its config where transformers has one (VideoMAE), else the image classification class, with
    ``num_labels`` classes and the keywords as config overrides; ``--pretrained`` loads the directory's
    weights (the head re-initialised when its size differs), otherwise the config alone.
``open_clip:NAME``
    ``open_clip.create_model(NAME, **keywords)``'s image tower (``.visual``) and a linear head on its
    embedding; ``--pretrained`` loads the first pretrained tag open_clip lists for the name.

``--weights FILE`` works for each zoo: timm through its loader (position embeddings resampled), the others
as a state dict of the model as built here (safetensors or a torch checkpoint, ``state_dict``/``model``
nesting allowed) whose head tensors are dropped when their shape differs from the classes asked for.

transformers models are wrapped (:class:`LogitsOf`) so that every model maps a batch to logits; VideoMAE
takes ``(B, T, C, H, W)``, the wrapper receives ``(B, C, T, H, W)`` as torchvision's Video Swin does, which
is the layout of :mod:`.video`'s clips.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import SurgeryError

ZOOS = ("timm", "torchvision", "hf", "open_clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's and transformers' ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelSpecError(SurgeryError):
    """A model spec that names nothing known, or a model that cannot be built or loaded as asked."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: the zoo, the name in it (a directory for ``hf``) and the text as given."""

    zoo: str
    name: str
    text: str

    @property
    def is_timm(self) -> bool:
        return self.zoo == "timm"


@dataclass(frozen=True)
class InputConfig:
    """What the data must feed a built model: the square input size, normalisation mean and std, and for a
    model with a fixed clip length (VideoMAE's ``num_frames``) that length, else None; ``video`` says the
    model takes clips ``(B, C, T, H, W)``."""

    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    frames: Optional[int] = None
    video: bool = False


def _close(name: str, known: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return f"; close matches: {', '.join(matches)}" if matches else ""


def torchvision_names() -> List[str]:
    from torchvision import models

    return list(models.list_models())


def parse_model_spec(text: str) -> ModelSpec:
    """The spec ``text`` checked against its zoo without building anything: an unknown name is one
    :class:`ModelSpecError` with the zoo's close matches by name (``difflib``), a ``hf:`` directory without a
    ``config.json`` is one naming the directory. A prefix that is no zoo is part of a timm name."""
    zoo, sep, name = text.partition(":")
    if not sep or zoo not in ZOOS:
        zoo, name = "timm", text
    if not name:
        raise ModelSpecError(f"model spec {text!r} names no model; write {zoo}:NAME")
    if zoo == "timm":
        import timm

        if not timm.is_model(name):
            raise ModelSpecError(f"unknown timm model {name!r}{_close(name, timm.list_models())}")
    elif zoo == "torchvision":
        names = torchvision_names()
        if name not in names:
            raise ModelSpecError(f"unknown torchvision model {name!r}{_close(name, names)}")
    elif zoo == "open_clip":
        import open_clip

        names = open_clip.list_models()
        if name not in names:
            raise ModelSpecError(f"unknown open_clip model {name!r}{_close(name, names)}")
    elif not (Path(name) / "config.json").is_file():
        raise ModelSpecError(f"hf:{name}: no transformers directory there (a config.json, as save_pretrained writes)")
    return ModelSpec(zoo, name, text)


class LogitsOf(nn.Module):
    """A transformers classification model as a module from a batch to its logits. ``frames_first``:
    the model reads ``(B, T, C, H, W)`` (VideoMAE) and the batch, ``(B, C, T, H, W)``, is transposed.
    ``get_classifier`` names the head for the surgery (it keeps training)."""

    def __init__(self, model: nn.Module, frames_first: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frames_first = frames_first

    def get_classifier(self) -> nn.Module:
        return self.model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frames_first:
            x = x.transpose(1, 2)
        return self.model(pixel_values=x).logits


class ImageTowerClassifier(nn.Module):
    """An open_clip image tower (``visual``) and a linear ``head`` on its embedding."""

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(int(visual.output_dim), num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.visual(x)
        return self.head(features[0] if isinstance(features, tuple) else features)


def build_model(
    spec: ModelSpec,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: Optional[str] = None,
    model_args: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """The model of ``spec`` with a head of ``num_classes``, its zoo's keywords ``model_args``, and the
    pretrained weights of its zoo (``pretrained``) or of a local file (``weights``); random weights (from
    torch's seed) otherwise. A model that cannot be built is a ModelSpecError naming the spec."""
    if pretrained and weights:
        raise ModelSpecError("--pretrained and --weights exclude each other: the weights come from one place")
    kwargs = dict(model_args or {})
    try:
        if spec.zoo == "timm":
            return _timm(spec, num_classes, pretrained, weights, kwargs)
        if spec.zoo == "torchvision":
            model = _torchvision(spec, num_classes, pretrained, kwargs)
        elif spec.zoo == "hf":
            model = _transformers(spec, num_classes, pretrained, kwargs)
        else:
            model = _open_clip(spec, num_classes, pretrained, kwargs)
    except SurgeryError:
        raise
    except Exception as error:  # each zoo raises its own kinds for bad keywords
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelSpecError(f"cannot build {spec.text}: {type(error).__name__}: {detail}") from None
    if weights:
        load_weights_file(model, weights, spec.text)
    return model


def _timm(spec: ModelSpec, num_classes: int, pretrained: bool, weights: Optional[str], kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    if weights:
        from .weights import create_with_weights

        return create_with_weights(spec.name, weights, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ModelSpecError(f"cannot build {spec.text}: {error}") from None


def _torchvision(spec: ModelSpec, num_classes: int, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    from torchvision import models

    if not pretrained:
        return models.get_model(spec.name, num_classes=num_classes, **kwargs)
    model = models.get_model(spec.name, weights="DEFAULT", **kwargs)
    _new_head(model, num_classes, spec.text)
    return model


def _new_head(model: nn.Module, num_classes: int, what: str) -> None:
    """Replace the linear head of ``model`` (:func:`petl_surgery.freezing.find_heads`) by a fresh one of
    ``num_classes`` outputs, unless it has that many already."""
    from ..freezing import find_heads

    heads = find_heads(model)
    if len(heads) != 1 or not isinstance(heads[0], nn.Linear):
        raise ModelSpecError(f"{what}: cannot find the one linear head to give {num_classes} classes")
    head = heads[0]
    if head.out_features == num_classes:
        return
    for path, module in model.named_modules():
        if module is head:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Linear(head.in_features, num_classes))
            return


def _transformers(spec: ModelSpec, num_classes: int, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(spec.name, num_labels=num_classes, **kwargs)
    model: Optional[nn.Module] = None
    for auto in (transformers.AutoModelForVideoClassification, transformers.AutoModelForImageClassification):
        try:
            if pretrained:
                model = auto.from_pretrained(spec.name, config=config, ignore_mismatched_sizes=True)
            else:
                model = auto.from_config(config)
            break
        except ValueError:  # the auto class has no entry for this config
            continue
    if model is None:
        raise ModelSpecError(f"{spec.text}: transformers has no image or video classification class for "
                             f"model_type {config.model_type!r}")
    return LogitsOf(model, frames_first=hasattr(config, "num_frames"))


def _open_clip(spec: ModelSpec, num_classes: int, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    import open_clip

    tag = None
    if pretrained:
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if not tags:
            raise ModelSpecError(f"open_clip lists no pretrained weights for {spec.name!r}")
        tag = tags[0]
    model = open_clip.create_model(spec.name, pretrained=tag, **kwargs)
    return ImageTowerClassifier(model.visual, num_classes)


def _read_state(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} holds no state dict")
    return state


def load_weights_file(model: nn.Module, file: str, what: str) -> None:
    """Load the state dict in ``file`` into ``model``: every tensor must fit, except head tensors whose shape
    differs from the model's (another number of classes), which keep their fresh values."""
    from ..freezing import head_parameter_names

    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"no weights file at {path}")
    try:
        state = _read_state(path)
    except ModelSpecError:
        raise
    except Exception as error:
        raise ModelSpecError(f"cannot read the weights {path}: {type(error).__name__}: {error}") from None
    own = model.state_dict()
    head = head_parameter_names(model)
    state = {k: v for k, v in state.items() if not (k in head and k in own and own[k].shape != v.shape)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelSpecError(f"cannot load the weights {path} into {what}: {detail}") from None
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ModelSpecError(f"the weights {path} do not fit {what}: {len(missing)} tensors missing (e.g. "
                             f"{(missing or ['-'])[0]}), {len(result.unexpected_keys)} unexpected (e.g. "
                             f"{(result.unexpected_keys or ['-'])[0]})")


def input_config(model: nn.Module, spec: ModelSpec, image_size: Optional[int] = None) -> InputConfig:
    """What the data must feed ``model`` as built from ``spec``: ``image_size`` wins; else the model's own
    size (timm's ``patch_embed.img_size``, torchvision's ``image_size``, the transformers config's
    ``image_size``, open_clip's ``visual.image_size``), else its pretrained config's, else 224. Mean and std
    from the zoo's config of the model: timm's pretrained config, torchvision's ``DEFAULT`` weights'
    transforms (ImageNet's statistics without weights), the directory's ``preprocessor_config.json``
    (``image_mean``/``image_std``; ImageNet's without one), open_clip's ``preprocess_cfg``."""
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    size: Optional[int] = None
    frames: Optional[int] = None
    video = False
    if spec.zoo == "timm":
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model)
        mean, std = config["mean"], config["std"]
        size = _side(getattr(getattr(model, "patch_embed", None), "img_size", None)) or config["input_size"][-1]
    elif spec.zoo == "torchvision":
        from torchvision import models

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        size = _side(getattr(model, "image_size", None))
        try:
            transforms = models.get_model_weights(spec.name).DEFAULT.transforms()
            mean, std = tuple(transforms.mean), tuple(transforms.std)
            size = size or _side(getattr(transforms, "crop_size", None))
        except (ValueError, AttributeError, KeyError):
            pass  # a model torchvision registers no weights for: ImageNet's statistics, the size as built
        video = spec.name in _torchvision_video_names()
    elif spec.zoo == "hf":
        config = model.model.config
        size = _side(getattr(config, "image_size", None))
        frames = getattr(config, "num_frames", None)
        video = frames is not None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        processor = Path(spec.name) / "preprocessor_config.json"
        if processor.is_file():
            saved = json.loads(processor.read_text())
            mean, std = saved.get("image_mean", mean), saved.get("image_std", std)
    else:
        visual = model.visual
        size = _side(getattr(visual, "image_size", None))
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        mean, std = preprocess.get("mean", mean), preprocess.get("std", std)
    return InputConfig(int(image_size or size or 224), tuple(mean), tuple(std), frames, video)


def _torchvision_video_names() -> List[str]:
    from torchvision import models

    return list(models.list_models(module=models.video))


def _side(value: Any) -> Optional[int]:
    """The side of a square size given as an int or a pair; None for anything else."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return int(value[-1])
    return None
