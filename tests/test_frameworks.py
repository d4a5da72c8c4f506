"""The frameworks users wrap a surgered model in, used as users use them: Lightning (fit, ModelCheckpoint,
reload), accelerate (prepare, gradient accumulation, save_state/load_state), timm's ModelEmaV3 and
create_optimizer_v2. transformers' Trainer: tests/test_integration_transformers.py."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import petl_surgery as ps

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def vit() -> torch.nn.Module:
    torch.manual_seed(0)  # random weights standing in for pretrained ones: the same base every time
    return timm.create_model("vit_small_patch16_224", **TINY)


def surgered(method: str = "patt", **options) -> torch.nn.Module:
    return ps.apply(vit(), method, **options)


def images(count: int = 16, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(count, 3, 32, 32, generator=generator),
                                          torch.randint(0, 3, (count,), generator=generator))


def trainable(model: torch.nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def inserted(values: dict) -> dict:
    return {name: value for name, value in values.items() if ".petl_" in name}


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images(4, seed=9).tensors[0])


# -- Lightning ------------------------------------------------------------------------------------------


class Classifier(L.LightningModule):
    """The usual pattern: the timm model as an attribute, surgery applied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = surgered("lora", rank=2)

    def training_step(self, batch, index):
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def fit(module: Classifier, folder, steps: int, resume=None) -> L.Trainer:
    # a checkpoint at the end of every epoch of 2 steps (a plain DataLoader resumes at epoch boundaries)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1,
                                                      save_on_train_epoch_end=True)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], deterministic=True)
    loader = torch.utils.data.DataLoader(images(8), batch_size=4)
    trainer.fit(module, loader, ckpt_path=resume)
    return trainer


def test_lightning_fit_trains_the_delta_and_its_checkpoint_reloads_into_a_fresh_surgered_module(tmp_path):
    module = Classifier()
    before = trainable(module.backbone)
    fit(module, tmp_path, steps=4)
    after = trainable(module.backbone)
    assert inserted(after) and all(not torch.equal(before[n], after[n]) for n in inserted(after))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]

    fresh = Classifier()  # the checkpoint's state_dict holds the inserted tensors under the names surgery gives
    fresh.load_state_dict(torch.load(tmp_path / "epoch=1-step=4.ckpt", weights_only=False)["state_dict"])
    assert torch.equal(outputs(fresh.backbone), outputs(module.backbone))
    ps.save(module.backbone, tmp_path / "delta.safetensors")  # the delta alone, for a plain timm model
    assert torch.equal(outputs(ps.load(vit(), tmp_path / "delta.safetensors")), outputs(module.backbone))


def test_lightning_resuming_from_a_checkpoint_restores_the_inserted_tensors(tmp_path):
    interrupted = Classifier()
    fit(interrupted, tmp_path, steps=2)
    resumed = Classifier()  # a new process: the inserted tensors at their initial values
    fit(resumed, tmp_path / "again", steps=2, resume=tmp_path / "epoch=0-step=2.ckpt")  # restores, trains no step
    expected = trainable(interrupted.backbone)
    assert inserted(expected)
    for name, value in trainable(resumed.backbone).items():
        assert torch.equal(value, expected[name]), name


# -- accelerate -----------------------------------------------------------------------------------------


@pytest.fixture
def new_accelerator():
    """A factory of Accelerators on the CPU accumulating 2 batches, each with accelerate's shared state reset
    (an Accelerator's save_state/load_state covers every model prepared since that state was made)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, gradient_accumulation_steps=2)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerate_steps(accelerator, model, optimizer, loader) -> None:
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()


def test_accelerate_accumulates_gradients_saves_and_loads_its_state_and_the_unwrapped_model_saves(new_accelerator, tmp_path):
    accelerator = new_accelerator()
    model = surgered("adapter")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(images(), batch_size=2)  # 8 batches of 2: 4 updates of 2 batches
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerate_steps(accelerator, model, optimizer, loader)

    plain = surgered("adapter")  # the same 4 updates, each on the 4 images of 2 batches at once
    reference = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    for x, y in torch.utils.data.DataLoader(images(), batch_size=4):
        F.cross_entropy(plain.train()(x), y).backward()
        reference.step()
        reference.zero_grad()
    expected = trainable(plain)
    trained = trainable(accelerator.unwrap_model(model))
    assert inserted(trained)
    for name, value in trained.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)

    accelerator.save_state(tmp_path / "state")
    ps.save(accelerator.unwrap_model(model), tmp_path / "delta.safetensors")

    restarted = new_accelerator()  # a new process: a fresh surgered model at its initial values
    again = surgered("adapter")
    again_optimizer = torch.optim.SGD([p for p in again.parameters() if p.requires_grad], lr=0.1)
    again, again_optimizer = restarted.prepare(again, again_optimizer)
    restarted.load_state(tmp_path / "state")
    for name, value in trainable(restarted.unwrap_model(again)).items():
        assert torch.equal(value, trained[name]), name

    assert torch.equal(outputs(ps.load(vit(), tmp_path / "delta.safetensors")), outputs(accelerator.unwrap_model(model)))


# -- timm utilities -------------------------------------------------------------------------------------


def test_timms_ema_copy_carries_the_surgery_averages_the_inserted_tensors_and_saves(tmp_path):
    model = surgered("patt")
    ema = ModelEmaV3(model, decay=0.5)
    assert ps.summary(ema.module).per_method == ps.summary(model).per_method
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = images(8).tensors
    for _ in range(2):
        previous = dict(ema.module.named_parameters())
        previous = {n: p.detach().clone() for n, p in previous.items()}
        F.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        now = dict(model.named_parameters())
        for name, value in inserted(dict(ema.module.named_parameters())).items():
            torch.testing.assert_close(value, 0.5 * previous[name] + 0.5 * now[name].detach(), msg=name)
    assert any(not torch.equal(v, dict(model.named_parameters())[n])
               for n, v in inserted(dict(ema.module.named_parameters())).items())  # an average, not a copy

    ps.save(ema.module, tmp_path / "ema.safetensors")
    assert torch.equal(outputs(ps.load(vit(), tmp_path / "ema.safetensors")), outputs(ema.module))


@pytest.mark.parametrize("method, options", [("patt", {}), ("ssf", {}), ("vpt", {"num_tokens": 2}), ("lora", {"rank": 2})])
def test_timms_create_optimizer_v2_holds_exactly_the_trainable_tensors_grouped_by_weight_decay(method, options):
    model = surgered(method, **options)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {group["weight_decay"]: sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups}
    trainable_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(groups[0.0] + groups[0.05]) == trainable_names  # no frozen tensor, each trainable once
    assert any(".petl_" in n for n in groups[0.0] + groups[0.05])
    for name in trainable_names:  # timm's rule: no decay on 1-D tensors (biases, scales, shifts)
        decays = model.get_parameter(name).ndim > 1 and not name.endswith(".bias")
        assert (name in groups[0.05]) == decays, name
