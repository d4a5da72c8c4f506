"""transformers' Trainer with a surgered model: training, the delta round trip, and
``petl_surgery.integrations.transformers.PetlCheckpointCallback`` for resume and load_best_model_at_end
(the Trainer alone reloads the inserted tensors at their initial values: transformers issue 43701)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T

import petl_surgery as ps
from petl_surgery.integrations.transformers import DELTA_NAME, PetlCheckpointCallback

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
              patch_size=8, num_labels=3)


class Images(torch.utils.data.Dataset):
    def __init__(self, count: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 3, 16, 16, generator=generator)
        self.y = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def base() -> torch.nn.Module:
    torch.manual_seed(0)  # random weights standing in for pretrained ones: the same base every time
    return T.ViTForImageClassification(T.ViTConfig(**CONFIG))


def surgered() -> torch.nn.Module:
    return ps.apply(base(), "lora", rank=2)


def arguments(folder, **overrides) -> T.TrainingArguments:
    settings = dict(output_dir=str(folder), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                    learning_rate=0.05, report_to=[], use_cpu=True, seed=0, logging_strategy="no",
                    dataloader_num_workers=0, disable_tqdm=True, save_strategy="steps")
    return T.TrainingArguments(**{**settings, **overrides})


def delta(model: torch.nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def inserted(values: dict) -> dict:
    return {name: value for name, value in values.items() if ".petl_" in name}


def test_trainer_trains_the_delta_and_saves_it_beside_each_checkpoint(tmp_path):
    model = surgered()
    before = delta(model)
    T.Trainer(model=model, args=arguments(tmp_path), train_dataset=Images(),
              callbacks=[PetlCheckpointCallback()]).train()
    after = delta(model)
    assert inserted(after) and all(not torch.equal(before[n], after[n]) for n in inserted(after))  # every one learnt
    assert sorted(p.name for p in tmp_path.glob(f"checkpoint-*/{DELTA_NAME}")) == [DELTA_NAME] * 2
    fresh = ps.load(base(), tmp_path / "checkpoint-6" / DELTA_NAME)
    x = Images().x[:4]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)


def test_a_resumed_run_continues_from_the_saved_delta_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = surgered()
    T.Trainer(model=whole, args=arguments(tmp_path / "whole"), train_dataset=Images(),
              callbacks=[PetlCheckpointCallback()]).train()

    first = surgered()  # trained to the checkpoint of step 3, then "interrupted"
    T.Trainer(model=first, args=arguments(tmp_path / "run", max_steps=6), train_dataset=Images(),
              callbacks=[PetlCheckpointCallback()]).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")

    resumed = surgered()  # a new process would start from the initial values
    T.Trainer(model=resumed, args=arguments(tmp_path / "run"), train_dataset=Images(),
              callbacks=[PetlCheckpointCallback()]).train(resume_from_checkpoint=str(checkpoint))
    expected = delta(whole)
    for name, value in delta(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_the_callback_the_trainer_resumes_the_inserted_tensors_from_their_initial_values(tmp_path):
    """The upstream behaviour the callback exists for (transformers issue 43701); if this starts failing,
    transformers reloads the inserted tensors itself and the callback's restore is a harmless repeat."""
    trained = surgered()
    T.Trainer(model=trained, args=arguments(tmp_path, max_steps=3), train_dataset=Images()).train()
    resumed = surgered()
    initial = delta(resumed)
    T.Trainer(model=resumed, args=arguments(tmp_path, max_steps=3), train_dataset=Images()).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # nothing left to train: the reload alone
    assert all(torch.equal(value, initial[name]) for name, value in inserted(delta(resumed)).items())


def test_resuming_a_checkpoint_without_a_delta_is_refused(tmp_path):
    T.Trainer(model=surgered(), args=arguments(tmp_path, max_steps=3), train_dataset=Images()).train()
    trainer = T.Trainer(model=surgered(), args=arguments(tmp_path), train_dataset=Images(),
                        callbacks=[PetlCheckpointCallback()])
    with pytest.raises(ps.SurgeryError, match=f"checkpoint-3: it holds no {DELTA_NAME}.*issues/43701"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


class Snapshots(T.TrainerCallback):
    def __init__(self) -> None:
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = delta(model)


def test_load_best_model_at_end_restores_the_best_checkpoints_delta(tmp_path):
    scores = iter([0.0, 1.0])  # the first evaluation (step 3) is the best: lower is better
    snapshots = Snapshots()
    model = surgered()
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                     metric_for_best_model="score", greater_is_better=False)
    T.Trainer(model=model, args=args, train_dataset=Images(), eval_dataset=Images(4, seed=1),
              compute_metrics=lambda prediction: {"score": next(scores)},
              callbacks=[snapshots, PetlCheckpointCallback()]).train()
    assert not all(torch.equal(snapshots.at[3][n], snapshots.at[6][n]) for n in inserted(snapshots.at[3]))
    for name, value in delta(model).items():
        assert torch.equal(value, snapshots.at[3][name]), name


def test_importing_petl_surgery_imports_no_integration():
    code = "import sys, petl_surgery; print(sorted(m for m in sys.modules if 'integrations' in m or m == 'transformers'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("reentrant", [True, False])
def test_trainer_gradient_checkpointing_trains_the_delta_as_without_it(tmp_path, reentrant):
    """TrainingArguments(gradient_checkpointing=True) in both modes: every inserted tensor learns, and the
    delta after the steps is the one the same run without checkpointing ends with."""
    plain = surgered()
    T.Trainer(model=plain, args=arguments(tmp_path / "plain", save_strategy="no"), train_dataset=Images()).train()
    model = surgered()
    before = delta(model)
    args = arguments(tmp_path / "checkpointed", save_strategy="no", gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    T.Trainer(model=model, args=args, train_dataset=Images()).train()
    after, expected = delta(model), delta(plain)
    assert inserted(after) and all(not torch.equal(before[n], after[n]) for n in inserted(after))
    for name in after:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6)
