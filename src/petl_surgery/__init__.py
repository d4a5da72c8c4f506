"""petl_surgery: parameter-efficient transfer learning for timm and PyTorch vision models, by surgery.

    import timm, petl_surgery as ps
    model = timm.create_model("vit_small_patch16_224", num_classes=10)
    ps.apply(model, "bapat")                    # in place; only the delta and the head train
    print(ps.summary(model))
    ps.save(model, "delta.safetensors")         # the delta alone, with the surgery described
    ps.load(fresh_model, "delta.safetensors")   # re-applies the surgery and loads the delta
"""

from .version import __version__

from .api import blocks, plan, summary
from .errors import (
    CheckpointError,
    OptionError,
    SurgeryError,
    SurgeryRuntimeError,
    UnsupportedBlockError,
    UnsupportedModelError,
)
from .interop import export
from .loading import load
from .methods import (
    METHODS,
    AdapterOptions,
    AdapterPlusOptions,
    BapatOptions,
    ConvpassOptions,
    DoraOptions,
    FactOptions,
    HoulsbyOptions,
    LoraOptions,
    PattOptions,
    PrefixOptions,
    RepAdapterOptions,
    SsfOptions,
    VptOptions,
)
from .sites import Block
from .statistics import StatefulBaseError
from .summary import Summary
from .verification import BranchNeverRanError
from .tasks import (
    TaskError,
    active_task,
    forward_tasks,
    remove_task,
    select_task,
    swap_task,
    task_classes,
    task_logits,
    task_names,
    using_task,
)
from .tasks.public import apply, merge, remove, save

__all__ = [
    "METHODS",
    "AdapterOptions",
    "AdapterPlusOptions",
    "BapatOptions",
    "ConvpassOptions",
    "DoraOptions",
    "FactOptions",
    "HoulsbyOptions",
    "LoraOptions",
    "PattOptions",
    "PrefixOptions",
    "RepAdapterOptions",
    "SsfOptions",
    "VptOptions",
    "BranchNeverRanError",
    "Block",
    "CheckpointError",
    "OptionError",
    "Summary",
    "StatefulBaseError",
    "SurgeryError",
    "SurgeryRuntimeError",
    "UnsupportedBlockError",
    "UnsupportedModelError",
    "TaskError",
    "__version__",
    "active_task",
    "forward_tasks",
    "remove_task",
    "select_task",
    "swap_task",
    "task_classes",
    "task_logits",
    "task_names",
    "using_task",
    "apply",
    "blocks",
    "export",
    "load",
    "merge",
    "plan",
    "remove",
    "save",
    "summary",
]
