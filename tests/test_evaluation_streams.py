"""ContinualEvaluation on what users bring: mapping batches and datamodule hooks, streams that are not square, task-aware accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cl_plugin.benchmarks import ContinualDataModule, split_digits
from cl_plugin.callbacks import ContinualEvaluation, ModelMerging

from stream_helpers import trainer_kwargs


class DictDigits(Dataset):
    """Items as a Hugging Face dataset gives them: {"pixel_values": ..., "labels": ...}."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class HFStyleClassifier(L.LightningModule):
    """forward(**inputs) -> an output with .logits, as transformers models do; the loss from batch["labels"]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, pixel_values):
        return SimpleNamespace(logits=self.net(pixel_values))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["pixel_values"]).logits, batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Flat(HFStyleClassifier):
    """The same network written as Lightning's docs write one: ``x, y = batch``, ``forward(x)``."""

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class DictStream(L.LightningDataModule):
    """Two experiences of digits as dict batches; the transfer hook inverts the images (so skipping it shows)."""

    def __init__(self):
        super().__init__()
        self.benchmark = split_digits(2, seed=0)
        self.n_experiences = 2
        self.current_experience = 0
        self.hook_calls = 0

    def _sets(self, stream):
        out = []
        for e in stream:
            xs, ys = zip(*[(item[0], item[1]) for item in e.dataset])
            out.append(DictDigits(1.0 - torch.stack(xs), torch.tensor(ys)))  # stored inverted
        return out

    def setup(self, stage):
        self.train_sets = self._sets(self.benchmark.train_stream)
        self.test_sets = self._sets(self.benchmark.test_stream)

    def set_experience(self, e):
        self.current_experience = e

    def train_dataloader(self):
        return DataLoader(self.train_sets[self.current_experience], batch_size=64, shuffle=False)

    def test_dataloader(self):
        return [DataLoader(s, batch_size=128) for s in self.test_sets]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.hook_calls += 1
        return {**batch, "pixel_values": 1.0 - batch["pixel_values"]}  # undo the inversion


def test_mapping_batches_go_through_the_datamodule_hooks_and_find_their_labels():
    L.seed_everything(0, verbose=False)
    dm = DictStream()
    model = HFStyleClassifier()
    evaluation = ContinualEvaluation(compare=["average"])
    merging = ModelMerging("magmax")  # the same callbacks for every fit of the loop
    for e in range(2):
        dm.set_experience(e)
        L.Trainer(max_epochs=3, callbacks=[evaluation, merging], **trainer_kwargs()).fit(model, datamodule=dm)
    assert dm.hook_calls > 0
    # The evaluation saw the batches as training did (hook applied): the merged model's row matches a hand count.
    dm.setup("test")
    with torch.no_grad():
        model.eval()
        hand = [
            float((model(1.0 - s.x).logits.argmax(-1) == s.y).float().mean()) for s in dm.test_sets
        ]
    assert evaluation.results["magmax"]["accuracy_matrix"][-1] == pytest.approx(hand, abs=1e-6)
    # The training weights right after experience 0, on experience 0: well above chance only if the hook
    # un-inverted the images (on the stored, inverted ones the same weights score below 0.1).
    assert evaluation.results["sequential_finetuning"]["accuracy_matrix"][0][0] > 0.5


def test_a_stream_with_one_test_experience_gives_a_matrix_per_trained_experience():
    from avalanche.benchmarks import ni_benchmark

    full = split_digits(1, seed=0)
    bm = ni_benchmark(full.train_stream[0].dataset, full.test_stream[0].dataset, n_experiences=3, seed=0)
    dm = ContinualDataModule(bm, batch_size=64, epochs_per_experience=1)
    evaluation = ContinualEvaluation(compare=["average"])
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[ModelMerging(), evaluation], **trainer_kwargs())
    trainer.fit(Flat(), datamodule=dm)
    for name, result in evaluation.results.items():
        matrix = torch.tensor(result["accuracy_matrix"])
        assert matrix.shape == (3, 1), name
        assert not torch.isnan(matrix).any()
        # forgetting and BWT need test experience j to be training experience j: not defined here
        assert result["forgetting"] != result["forgetting"] and result["bwt"] != result["bwt"]
        assert 0.0 <= result["average_accuracy"] <= 1.0


def test_task_aware_evaluation_masks_each_experience_to_its_classes():
    def run(task_aware):
        L.seed_everything(0, verbose=False)
        dm = ContinualDataModule(split_digits(5, seed=0), batch_size=32, epochs_per_experience=1)
        evaluation = ContinualEvaluation(task_aware=task_aware)
        L.Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[evaluation], **trainer_kwargs()).fit(
            Flat(), datamodule=dm
        )
        return evaluation.results["sequential_finetuning"]["average_accuracy"]

    class_incremental, task_aware = run(False), run(True)
    # Sequential fine-tuning forgets the old classes' logits; within each experience's two classes it still separates them.
    assert task_aware > class_incremental + 0.3
