"""What Lightning offers around a fit sees the merged model: checkpoints, BatchNorm, skipped experiences, reused Trainers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from cl_plugin.callbacks import LoRAAdapters, ModelMerging
from cl_plugin.errors import ConfigError

from stream_helpers import TinyClassifier, ToyStream, experience_data, trainer_kwargs

N_EXP, EPE = 3, 2


def float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ValidatedClassifier(TinyClassifier):
    """TinyClassifier with a validation step that logs a metric, as Lightning's docs write one."""

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())


class ValStream(ToyStream):
    """One val and one test loader, as Lightning's docs write a datamodule."""

    def val_dataloader(self):
        return torch.utils.data.DataLoader(experience_data(0, n=32), batch_size=32)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(experience_data(1, n=32), batch_size=32)


# -- checkpoints hold the merge --------------------------------------------------------------------------------
def test_after_a_stream_the_last_checkpoint_holds_the_merged_model(tmp_path):
    L.seed_everything(0, verbose=False)
    model = ValidatedClassifier()
    last = ModelCheckpoint(dirpath=tmp_path / "last", save_last=True, every_n_epochs=1)  # monitor=None: best = latest
    monitored = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1)
    cb = ModelMerging("magmax")
    trainer = L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb, last, monitored],
        **trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path),
    )
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(monitor='val_loss'\) keeps the epochs with the best"):
        trainer.fit(model, datamodule=ValStream(N_EXP, EPE))
    merged = float_state(model)
    assert same(merged, {k: v for k, v in cb.merged_state_dict(model).items() if k in merged})
    for path in (last.last_model_path, last.best_model_path):
        loaded = ValidatedClassifier.load_from_checkpoint(path)
        assert same(float_state(loaded), merged), path
    # trainer.test(ckpt_path="last") evaluates the merged model: the same number as the module in memory
    in_memory = trainer.test(model, datamodule=ValStream(N_EXP, EPE), verbose=False)[0]["test_acc"]
    from_last = trainer.test(ValidatedClassifier(), datamodule=ValStream(N_EXP, EPE), ckpt_path="last", verbose=False)
    assert from_last[0]["test_acc"] == in_memory
    # and resuming that checkpoint leaves the finished stream as it is
    resumed = ValidatedClassifier()
    again = ModelMerging("magmax")
    L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[again], **trainer_kwargs(default_root_dir=tmp_path)
    ).fit(resumed, datamodule=ValStream(N_EXP, EPE), ckpt_path=last.last_model_path)
    assert again.merger.num_tasks == N_EXP and same(float_state(resumed), merged)


def test_each_fit_of_a_loop_leaves_its_merge_in_its_last_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    cb = ModelMerging("average")
    dm = ToyStream(N_EXP, 1)
    for e in range(N_EXP):
        dm.set_experience(e)
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(e), save_last=True)
        trainer = L.Trainer(max_epochs=1, callbacks=[cb, ckpt], **trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path))
        trainer.fit(model, datamodule=dm)
        assert same(float_state(TinyClassifier.load_from_checkpoint(ckpt.last_model_path)), float_state(model))


# -- a skipped last experience -------------------------------------------------------------------------------------
def test_a_skipped_last_experience_still_hands_back_the_merge_of_what_was_folded():
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(skip_experience=N_EXP - 1)
    cb = ModelMerging("magmax")
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs())
    with pytest.warns(UserWarning, match=r"Experience 2 ended before any optimizer step"):
        trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
    assert cb.merger.num_tasks == N_EXP - 1
    merged = cb.core.merged_tensors()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in merged.items())


# -- a reused Trainer --------------------------------------------------------------------------------------------
def test_a_reused_trainer_that_reached_max_epochs_is_refused_with_the_value_to_pass():
    model = TinyClassifier()
    cb = ModelMerging("magmax")
    dm = ToyStream(2, EPE)
    trainer = L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs())
    dm.set_experience(0)
    trainer.fit(model, datamodule=dm)
    dm.set_experience(1)
    with pytest.raises(ConfigError, match=r"already reached its limits \(current_epoch=2, max_epochs=2.*trainer.fit_loop.max_epochs = 2 \+"):
        trainer.fit(model, datamodule=dm)
    assert cb.merger.num_tasks == 1
    trainer.fit_loop.max_epochs += EPE  # what the message says
    trainer.fit(model, datamodule=dm)
    assert cb.merger.num_tasks == 2


# -- BatchNorm ---------------------------------------------------------------------------------------------------
class ShrinkingVariance(TinyClassifier):
    """Ends every experience with BatchNorm running variances of 0.1 (θ₀: 1)."""

    def on_train_epoch_end(self):
        self.net[1].running_var.fill_(0.1)


@pytest.mark.parametrize("statistics", ["average", "merge"])
def test_merged_batchnorm_variances_stay_valid_by_default(statistics):
    L.seed_everything(0, verbose=False)
    model = ShrinkingVariance()
    cb = ModelMerging("task_arithmetic", scale=1.0, start_from="pretrained", statistics=statistics)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs())
    if statistics == "merge":  # 1 + 3·(0.1 − 1) < 0: reported, not silent
        with pytest.warns(UserWarning, match=r"negative variances in 'net.1.running_var'.*statistics='average'"):
            trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
        assert bool((model.net[1].running_var < 0).all())
    else:
        trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
        torch.testing.assert_close(model.net[1].running_var, torch.full((16,), 0.1))


def test_a_timm_resnet_merged_with_task_arithmetic_gives_finite_logits():
    timm = pytest.importorskip("timm")

    class ResNetClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("resnet18", pretrained=False, num_classes=4, in_chans=1)

        def forward(self, x):
            return self.net(x.view(-1, 1, 2, 4).repeat_interleave(8, -1).repeat_interleave(16, -2))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    L.seed_everything(0, verbose=False)
    model = ResNetClassifier()
    cb = ModelMerging("task_arithmetic", start_from="pretrained")
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs(limit_train_batches=2))
    trainer.fit(model, datamodule=ToyStream(2, 1))
    variances = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert variances and all(bool((v >= 0).all()) for v in variances)
    model.eval()
    assert bool(torch.isfinite(model(experience_data(0).tensors[0][:8])).all())


def test_per_task_lora_on_a_batchnorm_backbone_keeps_each_task_exactly():
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()  # net.0 adapted, net.1 BatchNorm (frozen), net.3 head per task
    cb = LoRAAdapters(["net.0"], r=2, alpha=4.0, trainable=["net.3"], mode="per_task", trainable_per_task=True)
    dm = ToyStream(2, EPE)
    x = experience_data(0).tensors[0][:8]
    outputs = []
    for e in range(2):
        dm.set_experience(e)
        L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
        model.eval()
        with torch.no_grad():
            outputs.append(cb.forward_by_task(model, x, torch.zeros(8, dtype=torch.long)))
    assert torch.equal(outputs[0], outputs[1]), "task 0's outputs moved while task 1 trained"
