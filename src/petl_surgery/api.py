"""The public functions: apply, remove, blocks, summary. Each checks everything before it changes the model."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .checkpointing import guard_checkpointing
from .deprecation import renamed
from .errors import OptionError, SurgeryError
from .freezing import (
    compile_patterns,
    head_parameter_names,
    remember_original_flags,
    restore_original_flags,
    set_trainable,
    trained_head_names,
    unfrozen_names,
)
from .hooks import hook_owner
from .inventory import delta_names, inserted_modules, next_order
from .methods import Insertion, PetlModule, capable, get_method
from .methods.base import MergeableModule, options_dict
from .methods.planning import PlanContext
from .patches import undo_patches
from .roots import check_apply_target, check_not_nested, sole_root, surgery_roots
from .selection import LayerSelection
from .sites import Block, discover
from .statistics import give_back_statistics, resolve_mode, take_statistics
from .summary import Summary, summarize
from .verification import forget_removed, start_run_check
from .wrappers import inner


def blocks(model: nn.Module) -> List[Block]:
    """The transformer blocks of ``model`` in depth order, with one global index across stages.

    Each :class:`Block` names its ``path`` and its ``attention`` and ``mlp`` sites (with their module
    paths). A model with no recognised block gives an empty list.
    """
    return discover(inner(model, changes=False)).blocks


def plan(
    model: nn.Module,
    method: str,
    layers: LayerSelection = None,
    skip_unsupported: bool = False,
    **options: Any,
) -> List[Insertion]:
    """The dry run of :func:`apply`: the insertions it would make, built without changing the model (what
    ``petl-surgery plan`` prints).

    Takes ``apply``'s ``method``, ``layers``, ``skip_unsupported`` and the method's options, and refuses
    what ``apply`` refuses, with the same exceptions. Each :class:`~petl_surgery.methods.Insertion` names
    its ``block``, its ``path`` (the inserted module's path once committed) and its ``module``, whose
    parameters are the ones ``apply`` would add.
    """
    return plan_on_device(model, method, layers, skip_unsupported, options)


def plan_on_device(
    model: nn.Module,
    method: str,
    layers: LayerSelection,
    skip_unsupported: bool,
    options: Mapping[str, Any],
    device: Optional[torch.device] = None,
) -> List[Insertion]:
    """:func:`plan` with its inserted modules built on ``device`` (None, :func:`plan`'s: beside the
    layers they extend; :data:`~petl_surgery.methods.planning.SIZES_ONLY`: their sizes only, what
    ``load`` checks a file against before allocating)."""
    method_type = get_method(method)
    parsed = method_type.parse_options(options)
    context = PlanContext(method, options_dict(parsed), skip_unsupported, device)
    return method_type.plan(model, layers, parsed, context)


def commit(model: nn.Module, insertions: Sequence[Insertion], statistics: str) -> None:
    """Carry out planned insertions (all checks are done by then, ``statistics`` resolved by
    ``resolve_mode``): freeze or adapt the base's running statistics, and watch the next forward for
    branches that never run and the first training forward for base buffers that change."""
    remember_original_flags(model)
    take_statistics(model, statistics)
    order = next_order(model)
    for insertion in insertions:
        insertion.module.order = order
        insertion.commit()
    start_run_check(
        model, [(hook.target, hook.kind, insertion.path) for insertion in insertions for hook in insertion.hooks]
    )
    guard_checkpointing(model)


def apply(
    model: nn.Module,
    method: str,
    *,
    layers: LayerSelection = None,
    train_head: bool = True,
    head: Optional[Union[str, Sequence[str]]] = None,
    unfreeze: Union[str, Sequence[str]] = (),
    skip_unsupported: bool = False,
    branch_dtype: Optional[torch.dtype] = None,
    statistics: Optional[str] = None,
    **options: Any,
) -> nn.Module:
    """Insert ``method`` into ``model`` in place, freeze the rest, and return the same model.

    Args:
        model: a timm (or torch, transformers, open_clip) model, or any module holding one (a
            LightningModule-like wrapper, a detection or segmentation model): the surgery then sits in
            the module given, whichever submodule holds the blocks. Its class, parameters and state_dict
            keys stay as they are. Further methods go to the same module; ``save``, ``load``, ``summary``,
            ``merge`` and ``remove`` take it or any module holding it (``apply(net.backbone, ...)``, then
            ``save(net, ...)``).
        method: the name of a registered method (``petl_surgery.METHODS``: "patt", "lora", "vpt", ...;
            see the methods' pages).
        layers: which blocks: None (all), an int, an iterable of ints or a slice, over the global block
            index of :func:`blocks` (negative indices count from the end). Not with LoRA's and SSF's
            ``modules`` option, which chooses layers by name pattern instead (any model, blocks or not).
        train_head: keep the classifier head trainable (default True). Where a head is expected (the
            model is or holds a timm, transformers or open_clip model) and none is found, this raises a
            SurgeryError naming ``head=``, unless the model has none by construction: a timm model built
            with ``num_classes=0``, a transformers base model (``ViTModel``), open_clip's vision tower,
            or a module holding only such models. A wrapper holding a timm model with ``num_classes=0``
            beside a classifier of its own under an unconventional name raises. A plain torch model
            without a conventional head trains none. Pass ``train_head=False`` to train no head.
        head: module path(s) of the classifier head; by default timm's ``get_classifier()``, or for
            other models the first of ``heads.head``, ``head``, ``heads``, ``fc``, ``classifier`` that
            holds parameters, or else the heads of the outermost timm or transformers models the module
            holds (``net.backbone.head``).
        unfreeze: regular expressions (``re.search`` on parameter names) of further base parameters to
            train, e.g. ``r"norm"`` or ``r"\\.bias$"``.
        skip_unsupported: skip the chosen blocks the method cannot operate on (attention that is not a
            softmax over tokens, a missing projection) and the attention modules petl_surgery does not
            understand, instead of refusing the model (default False). ``summary`` lists what was
            skipped.
        branch_dtype: the floating dtype of the inserted modules' tensors, for the methods that declare
            ``takes_branch_dtype`` (``petl_surgery.methods.capable("takes_branch_dtype")``);
            None (default): that of the base parameters beside them. ``torch.float32`` on a bfloat16 or
            float16 model keeps the trainable branches in float32: each branch casts its input to
            float32 and its result back to the model's dtype, except under autocast, which chooses the
            dtype of every matmul itself (a float32 model under ``torch.autocast`` needs nothing: its
            branch weights stay float32 and autocast casts them per op). ``load`` re-creates branches
            in the model's dtype.
        statistics: what happens to the running statistics of the base's BatchNorm (and every module
            that keeps running statistics) in training mode. ``"frozen"`` (the default for a model
            without surgery): those modules stay in eval mode while surgery is present and normalise
            with their stored statistics, as a frozen backbone's ``FrozenBatchNorm2d`` does; the base
            comes out of training exactly as it went in. ``"adapt"``: they train as usual and their
            statistics become part of the delta (saved, loaded, counted by ``summary``). None: the
            setting of the surgery already on the model. One model has one setting; ``remove`` of the
            last method gives back the statistics it had before the first apply.
        **options: the method's options; see its options class for names and defaults.

    After apply, exactly the inserted modules of every method applied so far, the head (if
    ``train_head``) and the ``unfreeze`` matches have ``requires_grad=True``; each call sets this anew.
    The first forward afterwards checks that every inserted branch ran, and raises
    :class:`BranchNeverRanError` naming those that did not.
    """
    if branch_dtype is not None:
        if not isinstance(branch_dtype, torch.dtype) or not branch_dtype.is_floating_point:
            raise OptionError(f"branch_dtype must be a floating torch.dtype or None; got {branch_dtype!r}")
        if not get_method(method).takes_branch_dtype:
            raise OptionError(
                f"branch_dtype is supported by methods {', '.join(capable('takes_branch_dtype'))}; not by {method!r}"
            )
    check_apply_target(inner(model))
    mode = resolve_mode(inner(model), statistics)
    insertions = plan(model, method, layers, skip_unsupported, **options)
    if branch_dtype is not None:
        for insertion in insertions:
            insertion.module.to(dtype=branch_dtype)
    excluded = delta_names(model)
    trainable = unfrozen_names(model, compile_patterns(unfreeze), excluded)
    heads = trained_head_names(model, head) if train_head else head_parameter_names(model, head)
    if train_head:
        trainable |= heads
    commit(model, insertions, mode)
    set_trainable(model, trainable)
    return model


def remove(
    model: nn.Module, methods: Union[None, str, Sequence[str]] = None, *, method: Optional[str] = None
) -> nn.Module:
    """Remove ``methods`` (a list of applied methods' names, as :func:`petl_surgery.load` takes, or one
    name; None, the default: every method) from ``model`` in place and return it.

    The removed modules and their hooks are gone; once no method is left, the model's modules,
    outputs, state_dict (running statistics included), requires_grad flags and train/eval modes are
    exactly those it had before the first apply (the modes as last set by ``train()``/``eval()``).

    ``model`` may be the module surgery was applied to or any module holding it; surgeries applied
    separately to several of its submodules are each removed from their own.

    Deprecated: ``method="lora"`` works and warns; pass ``methods=["lora"]``.
    """
    if method is not None:
        renamed("remove", "method", "methods")
        if methods is not None:
            raise OptionError("remove takes methods= (a list of names); give it alone, without the deprecated method=")
        methods = [method]
    if isinstance(methods, str):
        methods = [methods]
    if methods is not None and (not isinstance(methods, (list, tuple)) or not methods):
        raise OptionError(f"methods must be a method name or a non-empty list of them; got {methods!r}")
    model = inner(model)
    present = inserted_modules(model)
    if not present:
        raise SurgeryError(f"{type(model).__name__} carries no petl_surgery method to remove")
    if methods is not None:
        for name in methods:
            get_method(name)
        applied = sorted({module.method for _, module in present})
        absent = [name for name in methods if name not in applied]
        if absent:
            raise SurgeryError(f"method {absent[0]!r} is not applied to this model; applied: {', '.join(applied)}")
    roots = surgery_roots(model)
    if not roots:
        sole_root(model, "remove surgery from")  # applied to an enclosing module: raises naming it
    check_not_nested(model, roots, "remove surgery from")
    for _, root in roots:  # each surgery's flags and statistics go back to the module they were taken from
        chosen = [(path, module) for path, module in inserted_modules(root) if methods is None or module.method in methods]
        if chosen:
            _take_out(root, chosen)
    return model


def _take_out(model: nn.Module, present: Sequence[Tuple[str, PetlModule]], restore_statistics: bool = True) -> None:
    """Remove inserted modules, their hooks and their hosts' patches; once none is left anywhere, give
    back the original requires_grad flags and (with ``restore_statistics``) running statistics."""
    for path, module in present:
        module.detach_hooks(model)
        host_path, _, name = path.rpartition(".")
        host = model.get_submodule(host_path)
        delattr(host, name)
        undo_patches(model, module.uid)
    forget_removed(model, [path for path, _ in present])
    guard_checkpointing(model)
    if not inserted_modules(model):
        restore_original_flags(model)
        give_back_statistics(model, restore=restore_statistics)


def merge(model: nn.Module, *, keep_unmergeable: bool = False) -> nn.Module:
    """Fold every mergeable method into the base weights and remove it, in place; return the model.

    Mergeable: every method whose inserted modules are :class:`~petl_surgery.methods.base.MergeableModule`
    s: LoRA (``W += (alpha / r) B A`` on each target's rows of a plain Linear or 1x1 Conv2d, or on the
    whole weight of a layer chosen by name, a convolution of any kernel included), DoRA
    (``W += (m / n - 1) W0 + (m / n) (alpha / r) B A`` row-wise, ``n`` the norm its forward uses), FacT
    (``W += s V K U`` per target, the factors shared across blocks), SSF (``W <- diag(gamma) W``,
    ``b <- gamma * b + beta`` on each target's rows of a plain Linear or convolution that has a bias) and
    RepAdapter (``W <- W (I + s B A)``, ``b <- b + s W (B a + b_B)`` on the q/k/v and fc1 projections
    whose input it adapts; refused while another branch reads that input, unless it is a LoRA applied
    before it). Not mergeable: PATT and the bottleneck adapters (their tanh/ReLU branches depend on the
    input nonlinearly), prefix tuning and VPT (they add tokens). With any of those present, merge raises
    naming them unless ``keep_unmergeable=True``, which leaves them in place; a method that transforms its
    projection's output (SSF) or input (RepAdapter) is then merged only where no kept branch adds into
    that output before it or reads that input.

    Order: modules acting on their projections' outputs are folded in the order they were applied, which
    is the order their hooks run; modules transforming a projection's input (``acts_on_input``) come
    after them, latest applied first (the projection's weight multiplies everything folded before).
    Every module reads what it needs from the unmerged model before any is folded (``before_merge``).
    Once nothing else is left, the model's state_dict has exactly the plain model's keys, and its outputs
    equal the unmerged model's up to floating-point rounding (statistics adapted with
    ``statistics="adapt"`` stay in the merged model). ``model`` may be the module surgery was applied to
    or any module holding it.
    """
    model = inner(model)
    if not inserted_modules(model):
        raise SurgeryError(f"{type(model).__name__} carries no mergeable method (LoRA, DoRA, FacT, SSF, ...); applied: none")
    _, model = sole_root(model, "merge")
    present = inserted_modules(model)
    mergeable = [(path, module) for path, module in present if isinstance(module, MergeableModule)]
    mergeable = sorted(
        [item for item in mergeable if not item[1].acts_on_input], key=lambda item: item[1].order
    ) + sorted([item for item in mergeable if item[1].acts_on_input], key=lambda item: -item[1].order)
    others = sorted({module.method for _, module in present if not isinstance(module, MergeableModule)})
    if not mergeable:
        raise SurgeryError(
            f"{type(model).__name__} carries no mergeable method ({', '.join(capable('mergeable'))}); applied: "
            f"{', '.join(others) or 'none'}"
        )
    if others and not keep_unmergeable:
        raise SurgeryError(
            f"method(s) {', '.join(others)} cannot be merged into the base weights (their branches are not "
            "linear in the input, or they add tokens); remove them first, or pass keep_unmergeable=True"
        )
    merged = {id(module) for _, module in mergeable}
    hosts = {path: model.get_submodule(path.rpartition(".")[0]) for path, _ in mergeable}
    for path, module in mergeable:
        reason = module.merge_refusal(hosts[path]) or _kept_before(module, hosts[path], merged)
        if reason is not None:
            raise SurgeryError(f"{path} ({module.method}) cannot be merged: {reason}")
    for path, module in mergeable:
        module.before_merge(hosts[path])
    for path, module in mergeable:
        module.merge_into(hosts[path])
    _take_out(model, mergeable, restore_statistics=False)  # adapted statistics belong to the merged model
    return model


def _kept_before(module: MergeableModule, host: nn.Module, merged: Set[int]) -> Optional[str]:
    """For a module that transforms its producers' outputs: a branch that stays (is not merged) and runs
    before it on one of its producers, named; for one that transforms their input: any branch that stays
    on them (it reads that input); None otherwise."""
    if module.additive and not module.acts_on_input:
        return None
    for producer in module.producers():
        layer = host.get_submodule(producer)
        hooks = list(layer._forward_hooks.values())
        if module.acts_on_input:
            hooks += list(layer._forward_pre_hooks.values())
        for hook in hooks:
            owner = hook_owner(hook)
            if owner is module:
                if module.acts_on_input:
                    continue
                break
            if isinstance(owner, PetlModule) and id(owner) not in merged:
                if module.acts_on_input:
                    return (
                        f"the {owner.method} branch on {producer!r}, which stays, reads that projection's input; "
                        "remove that method first"
                    )
                return (
                    f"the {owner.method} branch on {producer!r}, which stays, adds into that output before it; "
                    "remove that method first"
                )
    return None


def summary(model: nn.Module) -> Summary:
    """A table of trainable parameters per method and per block, with totals and share of the model.

    ``model`` may be the module surgery was applied to or any module holding it (paths are then named
    from ``model``, and its head is found as ``apply`` finds it)."""
    return summarize(inner(model, changes=False))
