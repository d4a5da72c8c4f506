"""Checkpointing and resuming a PETL run with transformers' ``Trainer``.

The Trainer saves and reloads the model's own weights, and on resume (``resume_from_checkpoint``) and for
``load_best_model_at_end`` it reloads the modules surgery inserted at their initial values without a
word: the names it wrote are not converted back when it reads them (transformers issue 43701). A resumed
PETL run then silently restarts its delta. :class:`PetlCheckpointCallback` keeps the delta beside the
Trainer's files instead::

    from petl_surgery.integrations.transformers import PetlCheckpointCallback

    ps.apply(model, "lora", rank=8)
    trainer = Trainer(model=model, args=args, train_dataset=..., callbacks=[PetlCheckpointCallback()])
    trainer.train()                                  # checkpoint-N/petl_delta.safetensors with each save
    trainer.train(resume_from_checkpoint=True)       # the delta of the last checkpoint, not the init

- ``on_save``: the main process writes ``ps.save(model)`` to ``<output_dir>/checkpoint-<step>/`` (the
  directory the Trainer has just written), file name :data:`DELTA_NAME`.
- ``on_train_begin`` of a resumed run (the state's ``global_step`` is above 0): loads the delta of
  ``checkpoint-<global_step>`` into the model, in place (the optimizer keeps its parameters, and the
  Trainer has restored the optimizer's state for them). A resumed run whose checkpoint holds no delta is
  refused, naming the file, instead of training on from the initial values.
- ``on_train_end`` with ``load_best_model_at_end``: loads the delta of ``state.best_model_checkpoint``.

The model the callbacks receive must be the one surgery was applied to (the Trainer passes the unwrapped
model). ``ps.save`` of the trained model afterwards writes the same delta as ever.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints import save
from ..errors import SurgeryError
from ..loading import load

DELTA_NAME = "petl_delta.safetensors"
UPSTREAM_ISSUE = "https://github.com/huggingface/transformers/issues/43701"


def checkpoint_delta(folder: os.PathLike | str) -> Path:
    """Where the callback keeps the delta of a Trainer checkpoint directory."""
    return Path(folder) / DELTA_NAME


class PetlCheckpointCallback(TrainerCallback):
    """Writes the delta beside each Trainer checkpoint and restores it on resume and for the best model
    (see the module's documentation). No options: the Trainer's own ``output_dir``, ``save_steps`` and
    ``load_best_model_at_end`` decide when and where."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save(_model(model, "on_save"), checkpoint_delta(folder))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if state.global_step > 0:  # the Trainer restored a checkpoint's state: this run resumes it
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            _restore(_model(model, "on_train_begin"), folder, "resume from")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            _restore(_model(model, "on_train_end"), Path(state.best_model_checkpoint), "load the best model of")


def _model(model: Optional[nn.Module], event: str) -> nn.Module:
    if model is None:
        raise SurgeryError(f"PetlCheckpointCallback.{event} received no model: give it to the Trainer (model=...)")
    return model


def _restore(model: nn.Module, folder: Path, what: str) -> None:
    path = checkpoint_delta(folder)
    if not path.is_file():
        raise SurgeryError(
            f"cannot {what} {folder}: it holds no {DELTA_NAME}, so the inserted modules would train on from their "
            f"initial values (the Trainer does not reload them: {UPSTREAM_ISSUE}). Checkpoints written with "
            "PetlCheckpointCallback among the Trainer's callbacks hold it"
        )
    load(model, path)  # the same surgery is on the model: only the values are loaded, in place
