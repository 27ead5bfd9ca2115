"""λ chosen on held-out data: ``ModelMerging(scale="validate")``, ``ContinualEvaluation(scales="validate")``,
and the digits streams' ``validation_stream``."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from cl_plugin.benchmarks import ContinualDataModule, benchmark_by_name, rotated_digits, split_digits
from cl_plugin.callbacks import ContinualEvaluation, ModelMerging
from cl_plugin.callbacks import _boundary_data
from cl_plugin.demo import format_scale, format_table
from cl_plugin.errors import ConfigError

from stream_helpers import DigitsMLP, trainer_kwargs

N_EXP, EPE = 2, 1
GRID = (0.25, 0.5, 1.0, 1.5)


def datamodule(**options) -> ContinualDataModule:
    bm = rotated_digits(n_experiences=N_EXP, **{"validation_stream": True, **options})
    return ContinualDataModule(bm, batch_size=64, epochs_per_experience=EPE)


def fit(callbacks, dm=None, model=None):
    L.seed_everything(0, verbose=False)
    model = model or DigitsMLP(lr=0.1)
    dm = dm or datamodule()
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, datamodule=dm)
    return model, dm, trainer


@torch.no_grad()
def accuracy(model, loaders) -> float:
    model.eval()
    per = []
    for loader in loaders:
        correct = total = 0
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        per.append(correct / total)
    return sum(per) / len(per)


@pytest.fixture(scope="module")
def validated_run():
    seen = []
    original = _boundary_data.accuracies

    def spy(trainer, pl_module, loaders, *args, **kwargs):
        seen.append([len(loader.dataset) for loader in loaders])
        return original(trainer, pl_module, loaders, *args, **kwargs)

    _boundary_data.accuracies = spy
    try:
        merging = ModelMerging("average", scale="validate", scale_grid=GRID, start_from="pretrained")
        evaluation = ContinualEvaluation(compare=["magmax"], scales={"magmax": "validate"})
        model, dm, trainer = fit([merging, evaluation])
    finally:
        _boundary_data.accuracies = original
    return model, dm, merging, evaluation, seen


def test_validation_stream_of_the_digits():
    bm = split_digits(validation_stream=True, n_experiences=5)
    train = [len(e.dataset) for e in bm.train_stream]
    valid = [len(e.dataset) for e in bm.valid_stream]
    test = [len(e.dataset) for e in bm.test_stream]
    assert (sum(train), sum(valid), sum(test)) == (1005, 252, 540)
    assert [sorted(e.classes_in_this_experience) for e in bm.valid_stream] == [
        sorted(e.classes_in_this_experience) for e in bm.test_stream
    ]
    assert bm.n_classes == 10
    rotated = rotated_digits(n_experiences=2, angles=[0, 90], validation_stream=True)
    x0, x1 = rotated.valid_stream[0].dataset[0][0], rotated.valid_stream[1].dataset[0][0]
    assert torch.equal(x1, x0.rot90(1, dims=(1, 2)))
    assert [len(e.dataset) for e in rotated.test_stream] == [540, 540]
    by_name = benchmark_by_name("permuted_digits", n_experiences=2, validation_stream=True)
    assert [len(e.dataset) for e in by_name.valid_stream] == [252, 252]
    assert ContinualDataModule(by_name).has_validation_stream
    assert not ContinualDataModule(rotated_digits(n_experiences=2)).has_validation_stream
    with pytest.raises(ConfigError, match="`validation=True` and `validation_stream=True` exclude each other"):
        rotated_digits(validation=True, validation_stream=True)


def test_each_boundary_chooses_the_best_lambda_on_the_validation_data_only(validated_run):
    model, dm, merging, evaluation, seen = validated_run
    assert [r["experience"] for r in merging.scale_log] == [0, 1]
    # every loader any choice read is a validation loader (252 images; the test ones hold 540), of the experiences seen
    assert seen and all(set(sizes) == {252} for sizes in seen)
    assert sorted({len(sizes) for sizes in seen}) == [1, 2]
    for record in merging.scale_log:
        scores = record["validation_accuracy"]
        best = max(range(len(GRID)), key=lambda i: (scores[i], -i))
        assert record["grid"] == list(GRID) and record["scale"] == GRID[best]
    assert merging.scale == merging.scale_log[-1]["scale"]
    # the last record's accuracies are those of θ₀ + λ·merged, evaluated independently
    merged = merging.merger.merged()
    theta0 = merging.base_weights
    probe = DigitsMLP(lr=0.1)
    loaders = dm.experience_dataloaders("val")
    for value, score in zip(GRID, merging.scale_log[-1]["validation_accuracy"]):
        probe.load_state_dict({n: theta0[n] + value * merged[n] for n in theta0})
        assert math.isclose(accuracy(probe, loaders), score, rel_tol=1e-12)
    # the module handed back holds θ₀ + chosen·merged
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, theta0[n] + merging.scale * merged[n])


def test_evaluation_reports_the_chosen_lambda(validated_run):
    _, _, merging, evaluation, _ = validated_run
    result = evaluation.results["average"]  # ModelMerging's method: validated as it is
    assert result["scale"] == [r["scale"] for r in merging.scale_log]
    assert result["scale_validation"] == [
        {f"{v:g}": a for v, a in zip(r["grid"], r["validation_accuracy"])} for r in merging.scale_log
    ]
    magmax = evaluation.results["magmax"]
    assert len(magmax["scale"]) == 2 and len(magmax["scale_validation"]) == 2
    assert set(magmax["scale_validation"][0]) == {f"{0.5 * f:g}" for f in _boundary_data.SCALE_GRID_FACTORS}
    assert "scale_validation" not in evaluation.results["independent_finetuning"]


def test_merged_weights_of_the_evaluation_and_restore(validated_run):
    model, dm, _, evaluation, _ = validated_run
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with evaluation.merged_weights(model, "magmax", scale=0.5):
        inside = {n: t.clone() for n, t in model.state_dict().items()}
    assert any(not torch.equal(before[n], inside[n]) for n in before)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(ConfigError, match="evaluates no method 'ties'"):
        with evaluation.merged_weights(model, "ties"):
            pass


def test_one_fit_per_experience_validates_on_the_experiences_seen():
    dm = datamodule()
    model = DigitsMLP(lr=0.1)
    merging = ModelMerging("magmax", scale="validate", scale_grid=[0.5, 1.0])
    for k in range(N_EXP):
        dm.set_experience(k)
        L.Trainer(max_epochs=1, callbacks=[merging], **trainer_kwargs()).fit(model, datamodule=dm)
    assert [r["experience"] for r in merging.scale_log] == [0, 1]


def test_scale_validate_needs_a_validation_stream():
    dm = ContinualDataModule(rotated_digits(n_experiences=2), batch_size=64)
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[ModelMerging(scale="validate")], **trainer_kwargs())
    with pytest.raises(ConfigError, match=r"no `valid_stream`.*validation_stream=True.*benchmark_with_validation_stream"):
        trainer.fit(DigitsMLP(lr=0.1), datamodule=dm)
    evaluation = ContinualEvaluation(compare=["average"], scales="validate")
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[evaluation], **trainer_kwargs())
    with pytest.raises(ConfigError, match="ContinualEvaluation: `scale='validate'`"):
        trainer.fit(DigitsMLP(lr=0.1), datamodule=dm)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": "validat"}, r"`scale` must be a number in \(0, 10\], None .* or 'validate' .*got 'validat'.*Did you mean"),
        ({"scale_grid": [0.5]}, r"`scale_grid` \(\[0.5\]\) is the λ tried with scale='validate'"),
        ({"scale": "validate", "scale_grid": [0.5, 11]}, r"must be a real number in \(0, 10\]"),
        ({"scale": "validate", "scale_grid": []}, r"`scale_grid` must be a non-empty list"),
    ],
)
def test_bad_scale_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelMerging("magmax", **kwargs)


def test_evaluation_scales_validate_errors():
    with pytest.raises(ConfigError, match=r"`scales` must be a mapping .* or 'validate'"):
        ContinualEvaluation(compare=["magmax"], scales="best")
    with pytest.raises(ConfigError, match=r"`scales\['magmax'\]` must be a number in \(0, 10\] or 'validate'"):
        ContinualEvaluation(compare=["magmax"], scales={"magmax": "auto"})


def test_default_grid_is_method_aware():
    assert ModelMerging("magmax", scale="validate").scale_grid == tuple(round(0.1 * i, 6) for i in range(1, 11))
    assert ModelMerging("average", scale="validate").scale_grid[-1] == 2.0
    assert ModelMerging("task_arithmetic", scale="validate").scale_grid[:2] == (0.06, 0.12)
    assert ModelMerging("magmax").scale_grid is None


def test_resume_keeps_the_chosen_lambda_and_refuses_a_switch(validated_run):
    _, _, merging, _, _ = validated_run
    state = merging.state_dict()
    fresh = ModelMerging("average", scale="validate", scale_grid=GRID, start_from="pretrained")
    fresh.load_state_dict(state)
    assert fresh.scale == merging.scale and fresh.scale_log == merging.scale_log
    fixed = ModelMerging("average", scale=1.0, start_from="pretrained")
    with pytest.raises(ConfigError, match="written with scale='validate', this run has scale=1.0"):
        fixed.load_state_dict(state)
    other_grid = ModelMerging("average", scale="validate", scale_grid=[0.5, 1.0], start_from="pretrained")
    with pytest.raises(ConfigError, match="scale_grid: checkpoint"):
        other_grid.load_state_dict(state)
    numeric = ModelMerging("average", scale=1.0, start_from="pretrained")
    numeric.core.bind(nn.Linear(1, 1))  # any state without merges: a numeric scale stays changeable
    plain_state = ModelMerging("average", scale=0.5, start_from="pretrained").state_dict()
    numeric.load_state_dict(plain_state)
    with pytest.raises(ConfigError, match="written with scale=0.5, this run has scale='validate'"):
        ModelMerging("average", scale="validate", start_from="pretrained").load_state_dict(plain_state)


def test_demo_table_shows_the_chosen_lambda():
    result = {"average_accuracy": 0.8, "average_accuracy_std": 0.01, "forgetting": 0.1, "bwt": -0.1, "seeds": 2, "scale": [0.4, 0.5]}
    assert format_scale(result) == "0.4/0.5"
    table = format_table({"rotated_digits": {"magmax": result, "joint": {**result, "scale": None}}})
    assert "| λ |" in table and "0.4/0.5" in table
