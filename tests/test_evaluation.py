"""ContinualEvaluation, ClassIncrementalMasking and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn

from cl_plugin import demo
from cl_plugin.benchmarks import ContinualDataModule, split_digits
from cl_plugin.callbacks import ClassIncrementalMasking, ContinualEvaluation, ModelMerging
from cl_plugin.errors import ConfigError, NoMatchingModulesError

from stream_helpers import trainer_kwargs
from test_callbacks import RecordingLogger


class FlatClassifier(L.LightningModule):
    """A linear classifier on the 64 pixels, SGD without weight decay."""

    def __init__(self, lr: float = 0.5):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.lr = lr

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def stream(n_experiences=2, epochs=1):
    return ContinualDataModule(
        split_digits(n_experiences=n_experiences, class_order=range(10)), batch_size=64, epochs_per_experience=epochs
    )


@torch.no_grad()
def accuracies(module, datamodule):
    return demo.accuracy_per_experience(module, datamodule.experience_dataloaders("test"))


def test_evaluation_fills_matrices_for_training_and_merged_weights(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = stream()
    module = FlatClassifier()
    merging = ModelMerging("magmax")
    # Listed after ModelMerging on purpose: it must move itself before it.
    evaluation = ContinualEvaluation(compare=["average", "ties"], output_dir=tmp_path)
    logger = RecordingLogger()
    trainer = L.Trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[merging, evaluation],
        **trainer_kwargs(logger=logger),
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.callbacks.index(evaluation) < trainer.callbacks.index(merging)
    assert set(evaluation.results) == {"sequential_finetuning", "magmax", "average", "ties"}
    for name, result in evaluation.results.items():
        matrix = torch.tensor(result["accuracy_matrix"])
        assert matrix.shape == (2, 2) and not torch.isnan(matrix).any(), name
    # The module now holds the MagMax weights: the last row must be their accuracy.
    final_row = evaluation.results["magmax"]["accuracy_matrix"][-1]
    assert final_row == pytest.approx(accuracies(module, dm), abs=1e-9)
    # Sequential fine-tuning forgets class-incrementally without masking: experience 0 drops.
    seq = evaluation.results["sequential_finetuning"]["accuracy_matrix"]
    assert seq[1][0] < seq[0][0]
    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written["magmax"]) == {"average_accuracy", "forgetting", "bwt", "fwt", "accuracy_matrix", "initial_accuracies"}
    # θ₀ was evaluated once, before the first experience: the same initial accuracies for every model
    initial = written["sequential_finetuning"]["initial_accuracies"]
    assert all(written[name]["initial_accuracies"] == initial for name in written) and len(initial) == 2
    assert (tmp_path / "accuracy_matrix_magmax.png").stat().st_size > 1000
    logged = {k for metrics, _ in logger.metrics for k in metrics}
    assert {"cl/magmax/avg_acc", "cl/magmax/forgetting", "cl/magmax/bwt", "cl/sequential_finetuning/avg_acc"} <= logged


def test_compared_methods_fold_the_same_task_vectors_as_model_merging():
    # MagMax and OPCM form τ inside the fold from the weights, DOP from one shared τ; all fold
    # before any merge is written into the module for evaluation, so each sees the trained weights.
    L.seed_everything(0, verbose=False)
    dm = stream()
    module = FlatClassifier()
    merging = ModelMerging("opcm")
    evaluation = ContinualEvaluation(compare=["opcm", "magmax", "dop"])
    trainer = L.Trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[merging, evaluation],
        **trainer_kwargs(),
    )
    trainer.fit(module, datamodule=dm)
    cores = evaluation._cores
    assert not cores["dop"].folds_in_place and cores["magmax"].folds_in_place
    assert all(core.num_tasks == 2 for core in cores.values())
    expected, got = merging.core.merged_tensors(), cores["opcm"].merged_tensors()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_evaluation_without_model_merging_uses_its_own_theta0():
    L.seed_everything(0, verbose=False)
    dm = stream()
    evaluation = ContinualEvaluation(compare=["magmax"])
    trainer = L.Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[evaluation], **trainer_kwargs())
    module = FlatClassifier()
    trainer.fit(module, datamodule=dm)
    # Without ModelMerging the module keeps its training weights.
    assert evaluation.results["sequential_finetuning"]["accuracy_matrix"][-1] == pytest.approx(accuracies(module, dm))


def test_evaluation_state_round_trip():
    L.seed_everything(0, verbose=False)
    dm = stream()
    evaluation = ContinualEvaluation(compare=["magmax"])
    trainer = L.Trainer(max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[evaluation], **trainer_kwargs())
    trainer.fit(FlatClassifier(), datamodule=dm)
    restored = ContinualEvaluation(compare=["magmax"])
    restored.load_state_dict(evaluation.state_dict())
    assert restored._mergers["magmax"].num_tasks == 2
    for name, matrix in evaluation.matrices.items():
        assert torch.equal(restored.matrices[name].compute(), matrix.compute())
    assert restored.results == evaluation.results


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compare=["magmix"]), r"Unknown merging method 'magmix'.*Did you mean 'magmax'"),
        (dict(compare=["ties"], scales={"ties": 0}), r"`scale` must be a real number in \(0, 10\], got 0"),
        (dict(compare=["ties"], method_options={"opcm": {"alpha": 0.5}}), r"options for 'opcm', which is not in `compare`"),
        (dict(compare=["ties"], method_options={"ties": {"topk": 0.5}}), r"Unknown option\(s\) \['topk'\]"),
        (dict(predict=3), r"`predict` must be a function"),
    ],
)
def test_evaluation_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContinualEvaluation(**kwargs)


def test_masking_leaves_other_classes_head_rows_untouched():
    L.seed_everything(0, verbose=False)
    dm = stream(n_experiences=5)
    dm.set_experience(0)  # classes 0 and 1
    module = FlatClassifier()
    before = module.head.weight.detach().clone(), module.head.bias.detach().clone()
    trainer = L.Trainer(max_epochs=1, callbacks=[ClassIncrementalMasking(head="head")], **trainer_kwargs())
    trainer.fit(module, datamodule=dm)
    weight, bias = module.head.weight.detach(), module.head.bias.detach()
    assert torch.equal(weight[2:], before[0][2:]) and torch.equal(bias[2:], before[1][2:])
    assert not torch.equal(weight[:2], before[0][:2])
    # Evaluation is not masked: the model predicts over all classes.
    module.eval()
    x = dm.experience_dataloaders("test")[1].dataset[0][0][None]
    assert torch.isfinite(module(x)).all()


def test_masking_errors():
    with pytest.raises(ConfigError, match="`head` must be the name"):
        ClassIncrementalMasking(head="")
    dm = stream()
    trainer = L.Trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1,
        callbacks=[ClassIncrementalMasking(head="classifier")], **trainer_kwargs(),
    )
    with pytest.raises(NoMatchingModulesError, match=r"no module named 'classifier'.*Modules that exist: 'body'"):
        trainer.fit(FlatClassifier(), datamodule=dm)


def test_demo_writes_results_in_the_documented_schema(tmp_path, monkeypatch):
    # A one-epoch pretraining keeps the test fast; the real recipe is tested by benchmarks/quality.py.
    monkeypatch.setitem(demo.RECIPES, "split_digits", demo.StreamRecipe("upright", 1, 3e-3, mask_classes=True))
    results = demo.run_demo(
        out=tmp_path, benchmarks=["split_digits"], seeds=2, epochs=1, methods=("magmax", "average"), progress=False
    )
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    methods = written["split_digits"]
    assert {"sequential_finetuning", "joint", "magmax", "average", "magmax_from_scratch"} <= set(methods)
    for name, r in methods.items():
        assert {"average_accuracy", "forgetting", "bwt", "accuracy_matrix", "seeds"} <= set(r), name
        assert 0.0 <= r["average_accuracy"] <= 1.0
    assert methods["magmax"]["seeds"] == 2
    # λ chosen on the validation stream at every boundary: the last one per seed, from MagMax's grid
    assert len(methods["magmax"]["scale"]) == 2
    assert all(v in {round(0.5 * f, 6) for f in demo.DEMO_SCALE_FACTORS} for v in methods["magmax"]["scale"])
    assert "scale" not in methods["joint"]
    assert (tmp_path / "split_digits" / "accuracy_matrix_magmax.png").exists()
    assert (tmp_path / "cache").is_dir()


def test_demo_jobs_give_the_same_results_in_worker_processes():
    # The CLI runs the demo's jobs in 2 worker processes; each job seeds itself and runs one thread,
    # so the numbers must not depend on where it ran (and a forked worker must not hang).
    jobs = [
        ("joint", dict(spec=demo.RunSpec(benchmark="split_digits", seed=seed, epochs=1, n_experiences=2), progress=False))
        for seed in (0, 1)
    ]
    inline = demo.run_jobs(jobs, workers=1)
    in_workers = demo.run_jobs(jobs, workers=2)
    assert in_workers == inline
    assert inline[0] != inline[1]  # two seeds, two results: the comparison can fail


def test_demo_cli_rejects_a_non_embedded_benchmark_without_a_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cl_plugin.cli", "demo", "--benchmark", "split_cifar100", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "pass a timm model with --model" in result.stderr


def test_cli_version():
    result = subprocess.run([sys.executable, "-m", "cl_plugin.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("cl-plugin ")
