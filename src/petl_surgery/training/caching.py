"""Frozen-prefix feature caching: when everything that trains sits in blocks >= k, the embedding and the
blocks before k compute the same tokens for an image in every epoch. They run once per image; every epoch
then starts at block k.

When it is the same training. Training on the cached tokens gives the delta that training without the
cache gives (same seed, same batches, same random draws; equal up to float rounding, since the kernels
see other batch compositions) when

- every inserted module and every trainable base parameter lies in a block >= k (k >= 1) or after the
  blocks (the final norm, the head);
- the preprocessing is deterministic: an image reads the same every epoch (no augmentation);
- the prefix computes in train mode what it computes in eval mode: no dropout, drop path, patch dropout or
  BatchNorm is active before block k. The cache is computed in eval mode; under this condition that is what
  the train-mode prefix would give, so nothing random is skipped and the random stream the rest of the
  model draws from (dropout after block k, the head's dropout) stays aligned;
- the model runs its blocks one after another on the tokens, then ``norm`` and ``forward_head``: timm's
  flat-token families (VisionTransformer and its variants, Eva, Beit, ...). Other inputs the blocks receive
  (Eva's rotary embedding, Beit's shared relative position bias) must be the same for every image.

Each condition is checked before anything is cached (the structure on the model, the rest on the first
batch, the side inputs on every batch) and a failed one raises :class:`CacheError` naming it. The cache
holds ``images x tokens x width`` values in the prefix's output dtype on the training device.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..api import blocks as model_blocks
from ..errors import SurgeryError
from ..inventory import inserted_modules

# transform classes whose output changes from one read to the next (torchvision and timm names), besides
# every class whose name starts with "Random"
RANDOM_TRANSFORMS = frozenset({
    "ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "AugMixAugment", "GaussianBlur",
    "ElasticTransform",
})


# images of the first batch every condition is checked on (twice through the prefix, once through the rest)
PROBE_IMAGES = 2


class CacheError(SurgeryError):
    """Feature caching cannot give the training without it: the message says which condition fails."""


@dataclass
class FeatureCache:
    """The cached tokens of the training (and validation) images and the module that trains on them."""

    start: int
    train: torch.utils.data.TensorDataset
    val: Optional[torch.utils.data.TensorDataset]
    runner: nn.Module

    @property
    def nbytes(self) -> int:
        sets = [self.train] + ([self.val] if self.val is not None else [])
        return sum(t.numel() * t.element_size() for s in sets for t in s.tensors)


class _Stop(Exception):
    """Raised by the hook at block k once its input is seen: the rest of the forward is not needed."""

    def __init__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        super().__init__("prefix done")
        self.args, self.kwargs = args, kwargs


class Suffix(nn.Module):
    """Blocks ``start``.. of ``model`` on cached tokens, then its ``norm`` and ``forward_head``: the
    model's forward from block ``start`` on. ``context[i]`` holds block i's inputs besides the tokens."""

    def __init__(self, model: nn.Module, start: int, context: Dict[int, Tuple[Tuple[Any, ...], Dict[str, Any]]]) -> None:
        super().__init__()
        self.model, self.start, self.context = model, start, context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for i in range(self.start, len(self.model.blocks)):
            args, kwargs = self.context[i]
            x = self.model.blocks[i](x, *args, **kwargs)
        return self.model.forward_head(self.model.norm(x))


# -- what can be cached ----------------------------------------------------------------------------------


def _block_of(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def cache_start(model: nn.Module) -> int:
    """k, the first block that must run every epoch: the lowest block holding an inserted module or a
    trainable parameter (the number of blocks when only what follows the blocks trains). Raises
    CacheError when the model is not a flat sequence of ``blocks`` followed by ``norm`` and
    ``forward_head``, when nothing trains, or when something trains in block 0 (nothing to cache)."""
    name = type(model).__name__
    sequence = getattr(model, "blocks", None)
    if not isinstance(sequence, (nn.Sequential, nn.ModuleList)) or not callable(getattr(model, "forward_head", None)) \
            or not isinstance(getattr(model, "norm", None), nn.Module):
        raise CacheError(
            f"feature caching needs a model that runs one sequential list `blocks` and then `norm` and `forward_head` "
            f"(timm's flat-token families: VisionTransformer, Eva, Beit, ...); {name} is not one"
        )
    paths = [block.path for block in model_blocks(model)]
    if paths != [f"blocks.{i}" for i in range(len(sequence))]:
        shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
        raise CacheError(
            f"feature caching needs the transformer blocks to be the model's one list `blocks`; {name}'s blocks are "
            f"{shown or 'none'} (stages or other containers: no single point to cache at)"
        )
    where: Dict[str, int] = {}
    for path, module in inserted_modules(model):
        where[f"{path} ({module.method})"] = module.block
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise CacheError("nothing in the model is trainable: there is nothing to train on cached features")
    inserted = tuple(f"{path}." for path, _ in inserted_modules(model))
    for parameter in trainable:
        block = _block_of(parameter)
        if parameter.startswith(inserted):
            continue
        if block is not None:
            where.setdefault(parameter, block)
    start = min(where.values(), default=len(sequence))
    if start == 0:
        first = [what for what, block in where.items() if block == 0]
        raise CacheError(
            f"nothing can be cached: {', '.join(first[:3])} {'is' if len(first) == 1 else 'are'} in block 0, so "
            "every block runs every epoch (caching needs everything that trains in blocks >= 1)"
        )
    return start


def _random_in_train_mode(module: nn.Module) -> Optional[str]:
    """Why ``module`` computes otherwise in train mode than in eval mode, or None."""
    kind = type(module).__name__
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"{kind}(p={module.p:g})"
    if kind == "DropPath" and getattr(module, "drop_prob", 0.0):
        return f"DropPath({module.drop_prob:g})"
    if kind == "PatchDropout" and getattr(module, "prob", 0.0):
        return f"PatchDropout({module.prob:g})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{kind} (batch statistics in train mode)"
    return None


def _transforms(dataset: Any) -> Iterator[Any]:
    """Every transform a dataset (through Subset/ConcatDataset wrappers) applies, Compose opened."""
    pending, seen = [dataset], set()
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if not isinstance(item, torch.utils.data.Dataset):
            yield item
        for attr in ("dataset", "transform", "target_transform", "transforms"):
            value = getattr(item, attr, None)
            if isinstance(value, (list, tuple)):
                pending.extend(value)
            elif value is not None and not isinstance(value, (str, bytes)):
                pending.append(value)
        pending.extend(getattr(item, "datasets", None) or [])


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """torch's, Python's and NumPy's random states as they were, whatever the body draws."""
    state = random.getstate()
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torchvision
        numpy, numpy_state = None, None
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state)
    if numpy is not None:
        numpy.random.set_state(numpy_state)


def check_deterministic(dataset: Any, what: str = "the training data") -> None:
    """Refuse ``dataset`` when its preprocessing is random: a known augmentation among its transforms,
    or its first image read twice (random states kept) giving two different tensors."""
    for transform in _transforms(dataset):
        kind = type(transform).__name__
        if kind.startswith("Random") or kind in RANDOM_TRANSFORMS:
            raise CacheError(
                f"{what} is augmented ({kind}): a cached image would be the same in every epoch, the augmented one "
                "is not. Train without --cache-features, or without augmentation"
            )
    if len(dataset) == 0:
        return
    with kept_random_state():
        first, again = dataset[0][0], dataset[0][0]
    if isinstance(first, torch.Tensor) and not torch.equal(first, again):
        raise CacheError(f"{what} reads differently each time (its first image, read twice, differs): the "
                         "preprocessing is random, so cached features would not be the images training sees")


# -- the first batch: every condition, checked ------------------------------------------------------------


class _Probe:
    """One forward of the model with hooks that see which modules run before block k, what each block
    receives and returns, and (``stop``) end the forward at block k."""

    def __init__(self, model: nn.Module, start: int, stop: bool) -> None:
        self.model, self.start, self.stop = model, start, stop
        self.before: Set[int] = set()
        self.order: List[int] = []
        self.inputs: Dict[int, Tuple[Tuple[Any, ...], Dict[str, Any]]] = {}
        self.outputs: Dict[int, Any] = {}
        self.in_prefix = True

    def __enter__(self) -> "_Probe":
        self.handles = []
        if not self.stop:
            for module in self.model.modules():
                self.handles.append(module.register_forward_pre_hook(self._seen))
        depth = len(self.model.blocks)
        for i, block in enumerate(self.model.blocks):
            if self.stop and i not in (self.start, depth - 1):
                continue
            # prepended: the block's input as the previous block gave it, before any inserted pre-hook
            self.handles.append(block.register_forward_pre_hook(
                lambda m, a, k, i=i: self._enter(i, a, k), with_kwargs=True, prepend=True))
            self.handles.append(block.register_forward_hook(lambda m, a, out, i=i: self._leave(i, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _seen(self, module: nn.Module, args: Any) -> None:
        if self.in_prefix:
            self.before.add(id(module))

    def _enter(self, i: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if i == self.start:
            self.in_prefix = False
            if self.stop:
                raise _Stop(args, kwargs)
        self.order.append(i)
        self.inputs[i] = (args, kwargs)

    def _leave(self, i: int, output: Any) -> None:
        self.outputs[i] = output
        if self.stop and self.start == len(self.model.blocks) and i == self.start - 1:
            raise _Stop((output,), {})


def _prefix_tokens(model: nn.Module, x: torch.Tensor, start: int) -> Tuple[torch.Tensor, Tuple[Any, ...], Dict[str, Any]]:
    """The input of block ``start`` (the last block's output when ``start`` is the depth) and the
    block's other inputs, the forward ended there."""
    try:
        with _Probe(model, start, stop=True):
            model(x)
    except _Stop as stop:
        return stop.args[0], stop.args[1:], stop.kwargs
    raise CacheError(f"the forward of {type(model).__name__} never reached block {start}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _owner_chain(model: nn.Module, name: str) -> List[nn.Module]:
    """The modules above parameter ``name``, the root excluded, nearest last."""
    chain, module = [], model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        chain.append(module)
    return chain


def _check_first_batch(model: nn.Module, x: torch.Tensor, start: int) -> Suffix:
    """Every condition on the first batch (the model in eval mode); the Suffix that trains from ``start``."""
    depth = len(model.blocks)
    with _Probe(model, start, stop=False) as probe:
        logits = model(x)
    if probe.order != list(range(depth)):
        raise CacheError(f"the forward of {type(model).__name__} ran its blocks in the order {probe.order}, not once "
                         "each in sequence: no block's input holds everything the later blocks need")
    for i in range(1, depth):
        args = probe.inputs[i][0]
        if not args or args[0] is not probe.outputs[i - 1]:
            raise CacheError(f"block {i} of {type(model).__name__} does not receive the tokens block {i - 1} returns: "
                             "the blocks are not one sequential chain")
    # modules that ran before block k, containers of later blocks (the root, `blocks`) left out: their
    # children that ran are in the list themselves
    later = {id(block) for block in list(model.blocks)[start:]}
    prefix_modules = [m for m in model.modules()
                      if id(m) in probe.before and not any(id(sub) in later for sub in m.modules())]
    named = {id(m): n for n, m in model.named_modules()}
    for module in prefix_modules:
        for sub in module.modules():
            why = _random_in_train_mode(sub)
            if why is not None:
                raise CacheError(
                    f"{named.get(id(sub), type(sub).__name__)} runs before block {start} and is {why}: in train mode "
                    "the prefix gives other tokens each epoch, cached ones would not. Build the model without "
                    "dropout/drop path there, or train without --cache-features"
                )
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        block = _block_of(name)
        if block is not None and block >= start:
            continue
        chain = _owner_chain(model, name)
        if not chain or any(id(m) in probe.before for m in chain):
            raise CacheError(f"{name} is trainable and takes part before block {start}: caching would freeze it")
    context = {i: (probe.inputs[i][0][1:], probe.inputs[i][1]) for i in range(start, depth)}
    tokens = probe.inputs[start][0][0] if start < depth else probe.outputs[depth - 1]
    suffix = Suffix(model, start, context)
    if not torch.allclose(suffix(tokens).float(), logits.float(), rtol=1e-5, atol=1e-6):
        raise CacheError(f"{type(model).__name__}'s forward after its blocks is not norm then forward_head: running "
                         f"from block {start} on does not give its outputs")
    # the train-mode prefix, its random draws and buffer updates undone, must give the eval-mode tokens
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            model.train()
            trained, _, _ = _prefix_tokens(model, x, start)
    finally:
        model.eval()
        changed = [name for name, b in model.named_buffers() if not torch.equal(b, buffers[name])]
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    if changed:
        raise CacheError(f"the prefix (before block {start}) changes {', '.join(changed[:4])} in train mode: "
                         "cached features would skip those updates")
    if not torch.allclose(trained.float(), tokens.float(), rtol=1e-5, atol=1e-6):
        raise CacheError(f"the prefix (embedding and blocks < {start}) computes otherwise in train mode than in eval "
                         "mode: cached tokens would not be the ones training sees")
    return suffix


# -- the cache ----------------------------------------------------------------------------------------------


def _cache(model: nn.Module, dataset: Any, start: int, context: Tuple[Tuple[Any, ...], Dict[str, Any]],
           device: torch.device, autocast: Any, batch_size: int, workers: int) -> torch.utils.data.TensorDataset:
    # a generator of its own: iterating draws no number from the global stream training uses
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    tokens: Optional[torch.Tensor] = None
    labels: List[torch.Tensor] = []
    done = 0
    for x, y in loader:
        with autocast:
            features, args, kwargs = _prefix_tokens(model, x.to(device), start)
        if start < len(model.blocks) and not _same((args, kwargs), context):
            raise CacheError(f"block {start} receives inputs besides the tokens that change from one batch to the "
                             "next: they cannot be cached with the tokens")
        if tokens is None:
            tokens = torch.empty((len(dataset), *features.shape[1:]), dtype=features.dtype, device=device)
        tokens[done : done + len(features)] = features.detach()
        labels.append(torch.as_tensor(y))
        done += len(features)
    assert tokens is not None
    return torch.utils.data.TensorDataset(tokens, torch.cat(labels).to(device))


def build_cache(
    model: nn.Module,
    train_set: Any,
    val_set: Optional[Any] = None,
    *,
    device: torch.device,
    autocast: Any = None,
    batch_size: int = 32,
    workers: int = 0,
) -> FeatureCache:
    """Check every condition (module docstring), then run the frozen prefix of ``model`` (already on
    ``device``) once over ``train_set`` and ``val_set`` in eval mode, under ``autocast`` (a context, as
    training uses). The model's mode is restored. Raises CacheError before caching when a condition
    fails."""
    start = cache_start(model)
    check_deterministic(train_set)
    if val_set is not None:
        check_deterministic(val_set, "the validation data")
    if len(train_set) == 0:
        raise CacheError("the training data is empty")
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = torch.utils.data.default_collate([train_set[i] for i in range(min(PROBE_IMAGES, len(train_set)))])
            with autocast:
                suffix = _check_first_batch(model, first[0].to(device), start)
            block_context = suffix.context.get(start, ((), {}))
            train = _cache(model, train_set, start, block_context, device, autocast, batch_size, workers)
            val = _cache(model, val_set, start, block_context, device, autocast, batch_size, workers) \
                if val_set is not None and len(val_set) else None
    finally:
        model.train(was_training)
    return FeatureCache(start, train, val, suffix)


__all__: Sequence[str] = ["CacheError", "FeatureCache", "Suffix", "build_cache", "cache_start", "check_deterministic"]
