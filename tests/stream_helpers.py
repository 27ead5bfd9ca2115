"""Small models and streams shared by the callback tests (module level, so they pickle for DDP)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

N_FEATURES = 8
N_CLASSES = 4


def experience_data(experience: int, n: int = 64) -> TensorDataset:
    """A seeded toy task: the label depends on a different input feature per experience."""
    g = torch.Generator().manual_seed(1000 + experience)
    x = torch.randn(n, N_FEATURES, generator=g)
    y = (x[:, experience % N_FEATURES] > 0).long() + 2 * (experience % 2)
    return TensorDataset(x, y)


class TinyClassifier(L.LightningModule):
    """An MLP with a BatchNorm (so integer buffers exist) and SGD with momentum."""

    def __init__(self, lr: float = 0.1, skip_experience: int | None = None, crash_at_step: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, N_CLASSES))
        self.lr = lr
        self.skip_experience = skip_experience
        self.crash_at_step = crash_at_step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        dm = self.trainer.datamodule
        if self.skip_experience is not None and dm is not None and dm.current_experience == self.skip_experience:
            return None  # no optimizer step in this experience
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class OffsetSampler(DistributedSampler):
    """A DistributedSampler whose epoch is shifted by ``epoch_offset``.

    A new Trainer counts epochs from 0; with the offset, epoch k of experience
    e in a one-fit-per-experience run sees the order epoch e·E + k sees in a
    one-fit run, so the two runs can be compared bit for bit.
    """

    def __init__(self, *args, epoch_offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_offset = epoch_offset

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch + self.epoch_offset)


class ToyStream(L.LightningDataModule):
    """Serves experience ``current_epoch // epochs_per_experience`` (or a fixed one after set_experience).

    The sampler's order is a pure function of (seed, epoch), so a resumed run
    sees the batches an uninterrupted one would.
    """

    def __init__(self, n_experiences: int = 3, epochs_per_experience: int = 2, batch_size: int = 16, seed: int = 0):
        super().__init__()
        self.n_experiences = n_experiences
        self.epochs_per_experience = epochs_per_experience
        self.batch_size = batch_size
        self.seed = seed
        self._fixed: int | None = None
        self.current_experience = 0
        #: Added to the sampler's epoch (see OffsetSampler).
        self.epoch_offset = 0

    def set_experience(self, i: int) -> None:
        self._fixed = i
        self.current_experience = i

    def train_dataloader(self):
        if self._fixed is None:
            self.current_experience = self.trainer.current_epoch // self.epochs_per_experience
        ds = experience_data(self.current_experience)
        sampler = OffsetSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=True, seed=self.seed,
            epoch_offset=self.epoch_offset,
        )
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def trainer_kwargs(**overrides):
    kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


class DigitsMLP(L.LightningModule):
    """An MLP on the 64 pixels of the digits streams, written as Lightning's docs write one; SGD with momentum.

    ``batchnorm`` adds a BatchNorm1d (running statistics a boundary must not
    disturb); ``crash_at_step`` raises before that step's batch trains.
    """

    def __init__(self, lr: float = 0.05, batchnorm: bool = False, crash_at_step: int | None = None):
        super().__init__()
        norm = [nn.BatchNorm1d(32)] if batchnorm else []
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), *norm, nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr
        self.crash_at_step = crash_at_step

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
