"""AccuracyMatrix, the figures derived from it, and task-aware masking.

Checked three ways: hand-computed matrices (square 3x3 and 4x4, and
non-square streams), Avalanche 0.6's own metric classes on the same
accuracies and on the same predictions of a real Avalanche run, and a
2-process gloo run where each rank feeds different data.
"""

from __future__ import annotations

import doctest
import math
import os
import re
import socket
import sys
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cl_plugin.metrics.accuracy_matrix as accuracy_matrix_module
import cl_plugin.metrics.functional as functional_module
import cl_plugin.metrics.task_aware as task_aware_module
from cl_plugin.errors import ConfigError, StateDictMismatchError
from cl_plugin.metrics import (
    AccuracyMatrix,
    average_accuracy,
    bwt,
    forgetting,
    fwt,
    mask_to_classes,
    max_forgetting,
)

NAN = float("nan")

# ------------------------------------------------------- hand-computed matrices
# R3: experience 0 gains on row 1 (0.80 -> 0.90) before it is partly forgotten,
# so max forgetting (best earlier value) differs from forgetting (diagonal).
R3 = [
    [0.80, 0.10, 0.00],
    [0.90, 0.70, 0.20],
    [0.60, 0.65, 0.90],
]
B3 = [0.10, 0.05, 0.00]
R3_EXPECTED = {
    # rows 0..2, mean over the seen columns 0..i
    "avg_rows": [0.80, (0.90 + 0.70) / 2, (0.60 + 0.65 + 0.90) / 3],
    # (R00 - R20 + R11 - R21) / 2 = (0.20 + 0.05) / 2
    "forgetting": 0.125,
    "bwt": -0.125,
    # (max(0.80, 0.90) - 0.60 + max(0.10, 0.70) - 0.65) / 2 = (0.30 + 0.05) / 2
    "max_forgetting": 0.175,
    # (R01 - b1 + R12 - b2) / 2 = (0.05 + 0.20) / 2
    "fwt": 0.125,
}

R4 = [
    [0.50, 0.30, 0.20, 0.10],
    [0.40, 0.60, 0.25, 0.15],
    [0.55, 0.50, 0.70, 0.30],
    [0.35, 0.55, 0.60, 0.80],
]
B4 = [0.10, 0.10, 0.10, 0.10]
R4_EXPECTED = {
    "avg_rows": [0.50, 0.50, (0.55 + 0.50 + 0.70) / 3, (0.35 + 0.55 + 0.60 + 0.80) / 4],
    # (0.50 - 0.35 + 0.60 - 0.55 + 0.70 - 0.60) / 3 = 0.30 / 3
    "forgetting": 0.10,
    "bwt": -0.10,
    # (max(.50,.40,.55) - .35 + max(.30,.60,.50) - .55 + max(.20,.25,.70) - .60) / 3
    "max_forgetting": (0.20 + 0.05 + 0.10) / 3,
    # (0.30 - 0.10 + 0.25 - 0.10 + 0.30 - 0.10) / 3
    "fwt": (0.20 + 0.15 + 0.20) / 3,
}

CASES = [
    pytest.param(R3, B3, R3_EXPECTED, id="3x3"),
    pytest.param(R4, B4, R4_EXPECTED, id="4x4"),
]


def approx(x):
    return pytest.approx(x, abs=1e-12)


@pytest.mark.parametrize("R, b, expected", CASES)
def test_functional_figures_match_hand_computed(R, b, expected):
    assert float(forgetting(R)) == approx(expected["forgetting"])
    assert float(bwt(R)) == approx(expected["bwt"])
    assert float(max_forgetting(R)) == approx(expected["max_forgetting"])
    assert float(fwt(R, b)) == approx(expected["fwt"])
    for i, value in enumerate(expected["avg_rows"]):
        assert float(average_accuracy(R, i)) == approx(value)
    assert float(average_accuracy(R)) == approx(expected["avg_rows"][-1])  # -1: last row


@pytest.mark.parametrize("R, b, expected", CASES)
def test_metric_methods_call_the_functional_figures(R, b, expected):
    metric = AccuracyMatrix.from_matrix(R)
    torch.testing.assert_close(metric.compute(), torch.tensor(R, dtype=torch.float64))
    assert float(metric.forgetting()) == approx(expected["forgetting"])
    assert float(metric.bwt()) == approx(expected["bwt"])
    assert float(metric.max_forgetting()) == approx(expected["max_forgetting"])
    assert float(metric.fwt(b)) == approx(expected["fwt"])
    assert float(metric.average_accuracy()) == approx(expected["avg_rows"][-1])
    assert float(metric.average_accuracy(1)) == approx(expected["avg_rows"][1])


def test_figures_keep_dtype_and_accept_tensors():
    R = torch.tensor(R3, dtype=torch.float32)
    for value in (forgetting(R), bwt(R), max_forgetting(R), fwt(R, torch.tensor(B3)), average_accuracy(R)):
        assert value.dtype == torch.float32 and value.ndim == 0
    assert forgetting(R3).dtype == torch.float64  # nested lists -> float64


def test_partial_matrix_is_read_up_to_the_last_evaluated_row():
    # Mid-stream after experience 1 of 4: rows 2 and 3 are not evaluated yet.
    R = torch.tensor(R4, dtype=torch.float64)
    R[2:] = NAN
    assert float(average_accuracy(R)) == approx((0.40 + 0.60) / 2)
    assert float(forgetting(R)) == approx(0.50 - 0.40)
    assert float(bwt(R)) == approx(0.40 - 0.50)
    assert float(max_forgetting(R)) == approx(0.50 - 0.40)
    assert float(fwt(R, B4)) == approx(((0.30 - 0.10) + (0.25 - 0.10)) / 2)  # R01, R12
    assert math.isnan(float(average_accuracy(R, 2)))  # row 2 not evaluated


def test_unevaluated_cells_are_left_out():
    # Only seen experiences tested (upper triangle NaN), and R[2, 1] missing.
    R = torch.tensor(R4, dtype=torch.float64).tril()
    R[R == 0] = NAN
    R[3, 1] = NAN
    # forgetting over j = 0, 2 only
    assert float(forgetting(R)) == approx(((0.50 - 0.35) + (0.70 - 0.60)) / 2)
    assert float(max_forgetting(R)) == approx(((0.55 - 0.35) + (0.70 - 0.60)) / 2)
    assert float(average_accuracy(R)) == approx((0.35 + 0.60 + 0.80) / 3)
    assert float(fwt(R, B4)) == 0.0  # no R[j-1, j] at all: Avalanche's empty mean


def test_max_forgetting_includes_rows_before_the_experience_was_trained():
    # Chaudhry et al.: the max runs over every row l < k, also l < j.
    R = [[0.9, 0.95, 0.0], [0.8, 0.7, 0.0], [0.6, 0.5, 0.9]]
    # j0: max(.9, .8) - .6 = .3; j1: max(.95, .7) - .5 = .45
    assert float(max_forgetting(R)) == approx((0.3 + 0.45) / 2)
    assert float(forgetting(R)) == approx((0.3 + 0.2) / 2)


@pytest.mark.parametrize("R", [[[0.7]], [[NAN]]], ids=["T=1", "T=1-empty"])
def test_single_experience(R):
    # Avalanche averages with Mean, which gives 0.0 for no values.
    for figure in (forgetting, bwt, max_forgetting):
        value = figure(R)
        assert float(value) == 0.0 and not math.copysign(1.0, float(value)) < 0  # not -0.0
    assert float(fwt(R, [0.1])) == 0.0
    acc = float(average_accuracy(R))
    assert acc == approx(0.7) if not math.isnan(R[0][0]) else math.isnan(acc)


def test_nothing_evaluated():
    R = torch.full((3, 3), NAN)
    assert math.isnan(float(average_accuracy(R)))
    assert float(forgetting(R)) == 0.0 and float(bwt(R)) == 0.0
    assert float(max_forgetting(R)) == 0.0 and float(fwt(R, [0.0] * 3)) == 0.0


def test_functional_input_errors():
    with pytest.raises(ConfigError, match=r"`matrix` must be an accuracy matrix of shape \(T, U\) with T, U >= 1 .* got shape \(3,\)"):
        forgetting([0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match=r"got shape \(2, 0\)"):
        average_accuracy(torch.empty(2, 0))
    with pytest.raises(ConfigError, match=r"got shape \(0, 0\)"):
        bwt(torch.empty(0, 0))
    with pytest.raises(ConfigError, match="infinite"):
        bwt([[0.1, float("inf")], [0.1, 0.2]])
    with pytest.raises(ConfigError, match="`matrix` must be a tensor or nested sequence"):
        forgetting("not a matrix")
    with pytest.raises(ConfigError, match=r"`baseline` must have one accuracy per test experience, shape \(3,\) to match the 3x3 matrix, got shape \(2,\)"):
        fwt(R3, [0.1, 0.1])
    with pytest.raises(ConfigError, match=r"`i` must be an int in \[0, 3\) \(or -1 for the last evaluated row\), got 3"):
        average_accuracy(R3, 3)
    with pytest.raises(ConfigError, match=r"got -2"):
        average_accuracy(R3, -2)
    with pytest.raises(ConfigError, match=r"got True"):
        average_accuracy(R3, True)
    with pytest.raises(ValueError):  # ConfigError stays catchable as ValueError
        average_accuracy(R3, 1.5)


# ------------------------------------------------------------ the Metric itself


def batch(n, n_correct, n_classes=4, logits=False, offset=0):
    """``n`` predictions of which exactly ``n_correct`` are right."""
    target = (torch.arange(n) + offset) % n_classes
    preds = target.clone()
    preds[n_correct:] = (preds[n_correct:] + 1) % n_classes
    if logits:
        preds = torch.nn.functional.one_hot(preds, n_classes).float() * 3.0 - 1.0
    return preds, target


def test_metric_from_predictions_equals_hand_computed():
    metric = AccuracyMatrix(3)
    # counts (correct, total), several batches per cell, logits and indices mixed
    feeds = {
        (0, 0): [(3, 4, True), (1, 6, False)],  # 4 / 10
        (1, 0): [(9, 10, False)],
        (1, 1): [(2, 8, True)],
        (2, 0): [(0, 5, False)],  # 0 / 5: evaluated, zero accuracy
        (2, 1): [(3, 4, False), (3, 4, True)],  # 6 / 8
        (2, 2): [(7, 7, True)],
    }
    for (i, j), parts in feeds.items():
        for n_correct, n, logits in parts:
            metric.update(*batch(n, n_correct, logits=logits), trained_experience=i, test_experience=j)
    expected = torch.tensor(
        [[0.4, NAN, NAN], [0.9, 0.25, NAN], [0.0, 0.75, 1.0]], dtype=torch.float64
    )
    R = metric.compute()
    torch.testing.assert_close(R, expected, equal_nan=True)
    assert R.dtype == torch.float64
    assert float(metric.forgetting()) == approx(((0.4 - 0.0) + (0.25 - 0.75)) / 2)
    assert float(metric.max_forgetting()) == approx(((0.9 - 0.0) + (0.25 - 0.75)) / 2)
    assert float(metric.average_accuracy()) == approx((0.0 + 0.75 + 1.0) / 3)


def test_nan_cells_stay_nan_and_empty_batches_add_nothing():
    metric = AccuracyMatrix(2)
    metric.update(*batch(4, 2), 0, 0)
    metric.update(torch.empty(0, 4), torch.empty(0, dtype=torch.long), 0, 1)  # N = 0
    metric.update(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 1, 1)
    R = metric.compute()
    assert R[0, 0] == 0.5
    assert torch.isnan(R[0, 1]) and torch.isnan(R[1]).all()
    metric.update(*batch(2, 2), 1, 0)
    R = metric.compute()  # recomputed, not cached
    assert R[1, 0] == 1.0 and torch.isnan(R[0, 1]) and torch.isnan(R[1, 1])


def test_forward_accumulates_like_update():
    metric = AccuracyMatrix(2)
    batch_value = metric(*batch(4, 1), 0, 0)
    assert batch_value[0, 0] == 0.25
    batch_value = metric(*batch(4, 3), 0, 0)
    assert batch_value[0, 0] == 0.75  # this batch only
    assert metric.compute()[0, 0] == 0.5  # both batches


def test_set_row_and_from_matrix():
    metric = AccuracyMatrix(3)
    metric.update(*batch(4, 1), 0, 0)
    assert metric.compute()[0, 0] == 0.25
    metric.set_row(0, [0.5, NAN, 0.25])  # replaces the whole row, cache dropped
    metric.set_row(2, torch.tensor([1.0, 0.0, 0.75]))
    expected = torch.tensor([[0.5, NAN, 0.25], [NAN] * 3, [1.0, 0.0, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(metric.compute(), expected, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute before update" warning
        built = AccuracyMatrix.from_matrix(expected)
        torch.testing.assert_close(built.compute(), expected, equal_nan=True)
    assert built.n_experiences == 3


def test_set_row_errors_change_nothing():
    metric = AccuracyMatrix.from_matrix(R3)
    before = metric.compute()
    with pytest.raises(ConfigError, match=r"`accuracies` must have one entry per test experience, shape \(3,\) for AccuracyMatrix\(n_experiences=3\), got shape \(2,\)"):
        metric.set_row(0, [0.1, 0.2])
    with pytest.raises(ConfigError, match=r"`accuracies` must be fractions in \[0, 1\].*Divide percentages by 100"):
        metric.set_row(0, [80.0, 10.0, 0.0])
    with pytest.raises(ConfigError, match=r"`trained_experience` must be an int in \[0, 3\) for AccuracyMatrix\(n_experiences=3\), got 3"):
        metric.set_row(3, [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match=r"shape \(T, U\)"):
        AccuracyMatrix.from_matrix([0.1, 0.2])
    torch.testing.assert_close(metric.compute(), before)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3", None])
def test_n_experiences_must_be_a_positive_int(bad):
    with pytest.raises(ConfigError, match=re.escape(f"`n_experiences` must be an int >= 1 (the number of experiences in the stream), got {bad!r}.")):
        AccuracyMatrix(bad)


def test_unknown_torchmetrics_keyword_is_refused():
    with pytest.raises(ValueError, match="Unexpected keyword arguments: `n_task`"):
        AccuracyMatrix(2, n_task=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(trained_experience=2, test_experience=0), r"`trained_experience` must be an int in \[0, 2\) for AccuracyMatrix\(n_experiences=2\), got 2"),
        (dict(trained_experience=0, test_experience=-1), r"`test_experience` must be an int in \[0, 2\) .* got -1"),
        (dict(trained_experience=False, test_experience=0), r"`trained_experience` .* got False"),
        (dict(trained_experience=0.0, test_experience=0), r"`trained_experience` .* got 0.0"),
    ],
)
def test_update_rejects_bad_experience_indices(kwargs, message):
    metric = AccuracyMatrix(2)
    with pytest.raises(ConfigError, match=message):
        metric.update(*batch(4, 2), **kwargs)
    assert metric.total.sum() == 0  # nothing counted


def test_update_accepts_integer_like_indices():
    metric = AccuracyMatrix(2)
    metric.update(*batch(4, 2), trained_experience=torch.tensor(1), test_experience=1)
    assert metric.compute()[1, 1] == 0.5


@pytest.mark.parametrize(
    "preds, target, message",
    [
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), r"same number of samples N, got 4 \(preds shape \(4, 3\)\) and 5"),
        (torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long), r"`preds` must be floating-point scores of shape \(N, C\)"),
        # a 1-D float is a single logit: binary, so a target of class 2 or 3 is refused
        (torch.zeros(4), torch.arange(4), r"but `target` holds other classes than 0 and 1 \(e.g. \[2, 3\]\). For float class indices, pass `preds.long\(\)`"),
        (torch.zeros(4, 1), torch.tensor([0, 1, 5, 1]), r"`preds` of shape \(4, 1\) .* \(e.g. \[5\]\)"),
        (torch.zeros(4, 0), torch.zeros(4, dtype=torch.long), r"`preds` has no classes: shape \(4, 0\)"),
        (torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), r"single logits of a binary head .* dtype torch.bool"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"got shape \(4, 3\) and dtype torch.int64"),
        (torch.zeros(4, 3), torch.zeros(4), r"`target` must be a 1-D integer tensor of class indices"),
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), r"`target` must be a 1-D .* got shape \(4, 1\)"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), r"`target` must be a 1-D integer .* dtype torch.bool"),
        ([0, 1], torch.zeros(2, dtype=torch.long), r"`preds` and `target` must be tensors, got list and Tensor"),
    ],
)
def test_update_rejects_bad_shapes_and_dtypes(preds, target, message):
    metric = AccuracyMatrix(2)
    with pytest.raises(ConfigError, match=message):
        metric.update(preds, target, 0, 0)
    assert metric.total.sum() == 0


def test_reset_empties_the_matrix():
    metric = AccuracyMatrix.from_matrix(R3)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own warning
        R = metric.compute()
        assert float(metric.forgetting()) == 0.0
    assert torch.isnan(R).all()


def test_state_dict_round_trip():
    metric = AccuracyMatrix(3)
    metric.update(*batch(8, 5, logits=True), 0, 0)
    metric.update(*batch(4, 3), 1, 0)
    metric.set_row(2, [0.5, 0.25, 1.0])
    metric.update_initial(*batch(4, 1), 2)
    state = metric.state_dict()
    assert set(state) == {"correct", "total", "initial_correct", "initial_total"}
    assert state["total"].dtype == torch.float64 and state["total"].shape == (3, 3)
    assert state["initial_total"].dtype == torch.float64 and state["initial_total"].shape == (3,)
    restored = AccuracyMatrix(3)
    restored.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded state counts as updated: no warning
        torch.testing.assert_close(restored.compute(), metric.compute(), equal_nan=True)
        torch.testing.assert_close(restored.initial_accuracies(), metric.initial_accuracies(), equal_nan=True)
    # loading into a metric of another size fails before anything changes
    other = AccuracyMatrix(2)
    with pytest.raises(StateDictMismatchError, match=r"AccuracyMatrix\(n_experiences=2\) cannot load `correct` of shape \(3, 3\): expected \(2, 2\)"):
        other.load_state_dict(state)
    assert other.total.shape == (2, 2) and other.total.sum() == 0
    # inside a parent module the states carry the module prefix
    parent = torch.nn.ModuleDict({"acc": metric})
    assert set(parent.state_dict()) == {"acc.correct", "acc.total", "acc.initial_correct", "acc.initial_total"}
    # opting out of persistence
    metric.persistent(False)
    assert metric.state_dict() == {}


def test_docstring_examples():
    for module in (functional_module, accuracy_matrix_module, task_aware_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_no_lightning_import_in_metrics():
    for module in (functional_module, accuracy_matrix_module, task_aware_module):
        source = open(module.__file__, encoding="utf-8").read()
        assert not re.search(r"^\s*(import|from)\s+(lightning|pytorch_lightning)\b", source, re.M)


# ----------------------------------------------------------- non-square streams
# R_NI: new-instances stream, 3 trained experiences, 1 test experience.
R_NI = [[0.70], [0.80], [0.85]]
# R_JOINT: a joint upper bound, 1 training "experience", 3 test experiences.
R_JOINT = [[0.90, 0.60, 0.75]]
# R_WIDE: 2 trained experiences, 3 test experiences, row 1 partly evaluated.
R_WIDE = [[0.50, 0.30, 0.10], [0.40, NAN, 0.90]]
DIAGONAL_FIGURES = {
    "forgetting": forgetting,
    "bwt": bwt,
    "max_forgetting": max_forgetting,
    "fwt": lambda R, **kw: fwt(R, [0.1] * len(R[0]), **kw),
}


@pytest.mark.parametrize(
    "R, avg_rows",
    [
        pytest.param(R_NI, [0.70, 0.80, 0.85], id="3x1"),
        pytest.param(R_JOINT, [(0.90 + 0.60 + 0.75) / 3], id="1x3"),
        pytest.param(R_WIDE, [(0.50 + 0.30 + 0.10) / 3, (0.40 + 0.90) / 2], id="2x3"),
    ],
)
def test_non_square_average_accuracy_is_the_mean_over_all_test_experiences(R, avg_rows):
    for i, value in enumerate(avg_rows):
        assert float(average_accuracy(R, i)) == approx(value)
    assert float(average_accuracy(R)) == approx(avg_rows[-1])
    metric = AccuracyMatrix.from_matrix(R)
    assert (metric.n_experiences, metric.n_test_experiences) == (len(R), len(R[0]))
    assert float(metric.average_accuracy()) == approx(avg_rows[-1])


@pytest.mark.parametrize("R", [R_NI, R_JOINT, R_WIDE], ids=["3x1", "1x3", "2x3"])
@pytest.mark.parametrize("name", list(DIAGONAL_FIGURES))
def test_non_square_figures_without_a_diagonal_are_nan_or_raise_when_strict(R, name):
    figure = DIAGONAL_FIGURES[name]
    value = figure(R)
    assert value.ndim == 0 and value.dtype == torch.float64 and math.isnan(float(value))
    T, U = len(R), len(R[0])
    with pytest.raises(ConfigError, match=rf"{name} needs a square accuracy matrix, .* this one is {T}x{U} \({T} trained, {U} test experiences\)"):
        figure(R, strict=True)
    # the methods report NaN, never raise: ContinualEvaluation logs them as they come
    metric = AccuracyMatrix.from_matrix(R, initial=[0.1] * U)
    assert math.isnan(float(getattr(metric, name)()))


def test_strict_changes_nothing_on_a_square_matrix():
    for name, figure in DIAGONAL_FIGURES.items():
        assert float(figure(R3, strict=True)) == approx(float(figure(R3))), name


def test_non_square_baseline_has_one_entry_per_test_experience():
    with pytest.raises(ConfigError, match=r"shape \(1,\) to match the 3x1 matrix, got shape \(3,\)"):
        fwt(R_NI, [0.1, 0.1, 0.1])


def test_non_square_metric_from_predictions():
    metric = AccuracyMatrix(3, n_test_experiences=1)
    assert not metric.is_square and AccuracyMatrix(2).is_square
    assert repr(metric) == "AccuracyMatrix(n_experiences=3, n_test_experiences=1)"
    metric.update(*batch(4, 3), 0, 0)
    metric.update(*batch(8, 6, logits=True), 2, 0)
    R = metric.matrix()
    torch.testing.assert_close(R, torch.tensor([[0.75], [NAN], [0.75]], dtype=torch.float64), equal_nan=True)
    assert float(metric.average_accuracy()) == 0.75 and float(metric.average_accuracy(0)) == 0.75
    assert math.isnan(float(metric.average_accuracy(1)))  # row 1 not evaluated
    with pytest.raises(ConfigError, match=r"`test_experience` must be an int in \[0, 1\) for AccuracyMatrix\(n_experiences=3, n_test_experiences=1\), got 1"):
        metric.update(*batch(4, 3), 0, 1)
    with pytest.raises(ConfigError, match=r"`accuracies` must have one entry per test experience, shape \(1,\) for AccuracyMatrix\(n_experiences=3, n_test_experiences=1\), got shape \(3,\)"):
        metric.set_row(1, [0.5, 0.5, 0.5])
    torch.testing.assert_close(metric.matrix(), R, equal_nan=True)  # nothing changed


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (2, 3)])
def test_matrix_is_always_two_dimensional(shape):
    T, U = shape
    metric = AccuracyMatrix(T, U)
    for i in range(T):
        metric.set_row(i, [0.5] * U)
    assert metric.matrix().shape == shape
    assert metric(*batch(2, 1), 0, 0).reshape(shape)[0, 0] == 0.5  # forward works too


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_n_test_experiences_must_be_a_positive_int_or_none(bad):
    with pytest.raises(ConfigError, match=re.escape(f"`n_test_experiences` must be an int >= 1 (the number of test experiences), got {bad!r}.")):
        AccuracyMatrix(2, bad)
    assert AccuracyMatrix(2, None).n_test_experiences == 2
    assert AccuracyMatrix(2, 2).is_square


def test_non_square_state_dict_round_trip_and_mismatch():
    metric = AccuracyMatrix.from_matrix(R_WIDE, initial=[0.1, 0.2, NAN])
    restored = AccuracyMatrix(2, 3)
    restored.load_state_dict(metric.state_dict())
    torch.testing.assert_close(restored.matrix(), metric.matrix(), equal_nan=True)
    torch.testing.assert_close(restored.initial_accuracies(), torch.tensor([0.1, 0.2, NAN], dtype=torch.float64), equal_nan=True)
    square = AccuracyMatrix(2)
    with pytest.raises(StateDictMismatchError, match=r"AccuracyMatrix\(n_experiences=2\) cannot load `correct` of shape \(2, 3\): expected \(2, 2\). Build the metric with n_experiences=2, n_test_experiences=3"):
        square.load_state_dict(metric.state_dict())
    assert square.total.sum() == 0


# ------------------------------------------------------ single-logit binary heads


@pytest.mark.parametrize("shape", [(6,), (6, 1)], ids=["(N,)", "(N, 1)"])
def test_single_logit_is_a_binary_prediction(shape):
    logits = torch.tensor([2.0, -1.0, 0.0, 0.3, -0.2, 5.0]).reshape(shape)
    target = torch.tensor([1, 0, 1, 0, 1, 1])
    # predicted 1, 0, 0 (0 is not > 0), 1, 0, 1 -> right, right, wrong, wrong, wrong, right
    metric = AccuracyMatrix(1)
    metric.update(logits, target, 0, 0)
    assert float(metric.matrix()[0, 0]) == 0.5
    # torchmetrics reads values outside [0, 1] as logits and thresholds sigmoid at 0.5: the same
    from torchmetrics.functional.classification import binary_accuracy

    assert float(binary_accuracy(logits.reshape(-1), target)) == 0.5
    # not the argmax over one class, which would score the share of class 0: 1/6
    assert float(metric.matrix()[0, 0]) != float((target == 0).float().mean())


def test_single_logit_reads_logits_not_probabilities():
    target = torch.tensor([0, 0, 1, 1])
    probabilities = torch.tensor([0.1, 0.4, 0.6, 0.9])  # sigmoid outputs: every one > 0
    metric = AccuracyMatrix(1, 3)
    metric.update(probabilities, target, 0, 0)  # read as logits: all class 1
    metric.update(torch.stack([1 - probabilities, probabilities], dim=1), target, 0, 1)  # (N, 2)
    metric.update((probabilities > 0.5).long(), target, 0, 2)  # thresholded by the caller
    torch.testing.assert_close(metric.matrix(), torch.tensor([[0.5, 1.0, 1.0]], dtype=torch.float64))


def test_integer_predictions_stay_class_indices():
    metric = AccuracyMatrix(1)
    metric.update(torch.tensor([2, 0, 1, 3]), torch.tensor([2, 0, 0, 3]), 0, 0)  # not thresholded
    assert float(metric.matrix()[0, 0]) == 0.75


# ------------------------------------------------------------ task-aware masking


def test_mask_to_classes_keeps_only_the_experience_classes():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 4.0, 0.0, 3.0], [0.0, 0.0, 1.0, 2.0]], requires_grad=True)
    before = logits.detach().clone()
    masked = mask_to_classes(logits, [2, 3])
    assert torch.equal(logits.detach(), before)  # input unchanged
    assert masked.dtype == logits.dtype and masked.shape == logits.shape
    assert torch.isinf(masked[:, :2]).all() and (masked[:, :2] < 0).all()
    assert torch.equal(masked[:, 2:], before[:, 2:])
    masked[:, 2:].sum().backward()
    assert torch.equal(logits.grad, torch.tensor([[0.0, 0, 1, 1]] * 3))
    # a tensor of classes, repeated entries and half precision work too
    half = mask_to_classes(before.half(), torch.tensor([3, 3]))
    assert half.dtype == torch.float16 and half.argmax(dim=1).tolist() == [3, 3, 3]


def test_task_aware_accuracy_differs_from_class_incremental():
    # Experience 1 owns classes 2 and 3; the head prefers class 0 or 1 for two samples.
    logits = torch.tensor([[5.0, 0.0, 2.0, 1.0], [0.0, 4.0, 0.0, 3.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 1.0]])
    target = torch.tensor([2, 3, 3, 2])
    class_incremental, task_aware = AccuracyMatrix(2), AccuracyMatrix(2)
    class_incremental.update(logits, target, 1, 1)
    task_aware.update(mask_to_classes(logits, [2, 3]), target, 1, 1)
    assert float(class_incremental.matrix()[1, 1]) == 0.5  # samples 0 and 1 go to classes 0, 1
    assert float(task_aware.matrix()[1, 1]) == 1.0


@pytest.mark.parametrize(
    "logits, classes, message",
    [
        (torch.zeros(2, 4), [], r"`classes` is empty"),
        (torch.zeros(2, 4), [1, 4], r"`classes` must hold ints in \[0, 4\) for logits over 4 classes, got 4 in \[1, 4\]"),
        (torch.zeros(2, 4), [-1], r"got -1"),
        (torch.zeros(2, 4), [True], r"got True"),
        (torch.zeros(2, 4), [1.0], r"got 1.0"),
        (torch.zeros(2, 4), 2, r"`classes` must be a sequence of ints .* got int: 2"),
        (torch.zeros(2, 4), "01", r"got str"),
        (torch.zeros(2, 4), torch.tensor([1.0]), r"1-D integer tensor .* dtype torch.float32"),
        (torch.zeros(2, 4), torch.tensor([[1]]), r"shape \(1, 1\)"),
        (torch.zeros(4), [0], r"`logits` must be a floating-point tensor of shape \(N, C\), got \(4,\) and dtype torch.float32"),
        (torch.zeros(2, 4, dtype=torch.long), [0], r"dtype torch.int64"),
        ([[0.0, 1.0]], [0], r"got list"),
    ],
)
def test_mask_to_classes_errors(logits, classes, message):
    with pytest.raises(ConfigError, match=message):
        mask_to_classes(logits, classes)


# ------------------------------------------------- the initial model (FWT's b)


def test_update_initial_gives_the_fwt_baseline():
    metric = AccuracyMatrix.from_matrix(R3)
    assert torch.isnan(metric.initial_accuracies()).all()
    assert math.isnan(float(metric.fwt()))  # no baseline at all: not 0.0
    # b = [1/4 (unused), 1/20, 0/8]; B3 is [0.10, 0.05, 0.00]
    metric.update_initial(*batch(4, 1), 0)
    metric.update_initial(*batch(10, 1, logits=True), 1)
    metric.update_initial(*batch(10, 0), 1)
    metric.update_initial(*batch(8, 0), 2)
    torch.testing.assert_close(metric.initial_accuracies(), torch.tensor([0.25, 0.05, 0.0], dtype=torch.float64))
    assert float(metric.fwt()) == approx(R3_EXPECTED["fwt"])  # (R01 - b1 + R12 - b2) / 2
    assert float(metric.fwt([0.0, 0.0, 0.0])) == approx((0.10 + 0.20) / 2)  # an explicit baseline wins
    # only b1 known: the pair j = 2 is left out
    partial = AccuracyMatrix.from_matrix(R3, initial=[NAN, 0.05, NAN])
    assert float(partial.fwt()) == approx(0.10 - 0.05)


def test_set_initial_and_its_errors():
    metric = AccuracyMatrix(3)
    metric.update_initial(*batch(4, 1), 0)
    metric.set_initial([NAN, 0.5, 0.25])  # replaces everything, like set_row
    torch.testing.assert_close(metric.initial_accuracies(), torch.tensor([NAN, 0.5, 0.25], dtype=torch.float64), equal_nan=True)
    with pytest.raises(ConfigError, match=r"`accuracies` must have one entry per test experience, shape \(3,\)"):
        metric.set_initial([0.5, 0.5])
    with pytest.raises(ConfigError, match=r"Divide percentages by 100"):
        metric.set_initial([50.0, 50.0, 50.0])
    with pytest.raises(ConfigError, match=r"`test_experience` must be an int in \[0, 3\) for AccuracyMatrix\(n_experiences=3\), got 3"):
        metric.update_initial(*batch(4, 1), 3)
    with pytest.raises(ConfigError, match=r"same number of samples"):
        metric.update_initial(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 0)
    torch.testing.assert_close(metric.initial_accuracies(), torch.tensor([NAN, 0.5, 0.25], dtype=torch.float64), equal_nan=True)
    metric.reset()
    assert metric.initial_total.sum() == 0


def test_update_initial_alone_counts_as_an_update():
    metric = AccuracyMatrix(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute before update" warning
        metric.update_initial(*batch(2, 1), 1)
        assert torch.isnan(metric.compute()).all()
        assert float(metric.initial_accuracies()[1]) == 0.5


def test_old_state_dict_without_initial_accuracies_loads():
    metric = AccuracyMatrix.from_matrix(R3)
    old = {k: v for k, v in metric.state_dict().items() if not k.startswith("initial_")}
    restored = AccuracyMatrix(3)
    restored.set_initial([0.1, 0.1, 0.1])  # stale values must not survive the load
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.matrix(), metric.matrix())
    assert torch.isnan(restored.initial_accuracies()).all()
    # a wrong initial shape is refused before anything is assigned
    bad = dict(metric.state_dict(), initial_total=torch.zeros(2, dtype=torch.float64))
    fresh = AccuracyMatrix(3)
    with pytest.raises(StateDictMismatchError, match=r"cannot load `initial_total` of shape \(2,\): expected \(3,\). Build the metric with n_test_experiences=2"):
        fresh.load_state_dict(bad)
    assert fresh.total.sum() == 0


# ------------------------------------------------------------ against Avalanche


def _avalanche(module, *names):
    """Import names from Avalanche without its import-time warnings (e.g. about QP solvers)."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = importlib.import_module(module)
    return tuple(getattr(imported, name) for name in names)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@pytest.mark.parametrize("R", [R3, R4], ids=["3x3", "4x4"])
def test_standalone_avalanche_forgetting_and_bwt(R):
    BWT, Forgetting = _avalanche("avalanche.evaluation.metrics", "BWT", "Forgetting")

    T = len(R)
    for k in range(T):  # after every experience, as the stream goes
        partial = torch.tensor(R, dtype=torch.float64)
        partial[k + 1 :] = NAN
        av_forgetting, av_bwt = Forgetting(), BWT()
        for j in range(k + 1):
            for metric in (av_forgetting, av_bwt):
                metric.update(j, R[j][j], initial=True)  # right after training j
                if j < k:  # Avalanche resets "last" per evaluation; j == k has only "initial"
                    metric.update(j, R[k][j])
        assert float(forgetting(partial)) == approx(_mean(av_forgetting.result().values()))
        assert float(bwt(partial)) == approx(_mean(av_bwt.result().values()))
        for j, value in av_forgetting.result().items():
            assert value == approx(R[j][j] - R[k][j])


def test_against_avalanche_plugin_metrics_on_the_same_predictions():
    """A real Avalanche Naive run; our metric is fed the very predictions Avalanche scores."""
    from torch.utils.data import TensorDataset

    (class_incremental_benchmark,) = _avalanche(
        "avalanche.benchmarks.scenarios.supervised", "class_incremental_benchmark"
    )
    accuracy_metrics, bwt_metrics, forgetting_metrics, forward_transfer_metrics = _avalanche(
        "avalanche.evaluation.metrics",
        "accuracy_metrics",
        "bwt_metrics",
        "forgetting_metrics",
        "forward_transfer_metrics",
    )
    (Naive,) = _avalanche("avalanche.training", "Naive")
    EvaluationPlugin, SupervisedPlugin = _avalanche(
        "avalanche.training.plugins", "EvaluationPlugin", "SupervisedPlugin"
    )

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 8, generator=g) * 2.0

    class Data(TensorDataset):
        def __init__(self, n_per_class):
            y = torch.arange(6).repeat_interleave(n_per_class)
            super().__init__(centres[y] + torch.randn(len(y), 8, generator=g), y)
            self.targets = y.tolist()

    T = 3
    bench = class_incremental_benchmark(
        {"train": Data(30), "test": Data(11)}, class_order=list(range(6)), num_experiences=T
    )
    ours = AccuracyMatrix(T)
    init_counts = torch.zeros(T, 2, dtype=torch.float64)  # baseline b: accuracy of the untrained model

    class FeedOurs(SupervisedPlugin):
        trained = None

        def before_training_exp(self, strategy, **kwargs):
            self.trained = strategy.experience.current_experience

        def after_eval_iteration(self, strategy, **kwargs):
            j = strategy.experience.current_experience
            if self.trained is None:
                init_counts[j] += torch.tensor(
                    [float((strategy.mb_output.argmax(1) == strategy.mb_y).sum()), len(strategy.mb_y)]
                )
                ours.update_initial(strategy.mb_output.detach(), strategy.mb_y, j)
            else:
                ours.update(strategy.mb_output.detach(), strategy.mb_y, self.trained, j)

    model = torch.nn.Linear(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": on purpose
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            forward_transfer_metrics(experience=True, stream=True),
            loggers=[],
        )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
        train_mb_size=16,
        train_epochs=2,
        eval_mb_size=7,  # several mini-batches per experience
        evaluator=evaluator,
        plugins=[FeedOurs()],
        eval_every=0,  # Avalanche's forward transfer requires eval_every > -1
        device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.eval(bench.test_stream)  # at initialisation: Avalanche's FWT reference
        baseline = init_counts[:, 0] / init_counts[:, 1]
        torch.testing.assert_close(ours.initial_accuracies(), baseline.double())
        saw_forgetting = False
        for k, experience in enumerate(bench.train_stream):
            strategy.train(experience, eval_streams=[])
            strategy.eval(bench.test_stream)
            av = evaluator.get_last_metrics()

            R = ours.compute()
            assert not torch.isnan(R[: k + 1]).any() and torch.isnan(R[k + 1 :]).all()
            for name, value in av.items():
                exp = re.search(r"/Exp(\d+)$", name)
                if name.startswith("Top1_Acc_Exp/eval_phase/test_stream") and exp:
                    assert float(R[k, int(exp.group(1))]) == approx(value), name
                if name.startswith("ExperienceForgetting/") and exp:
                    j = int(exp.group(1))
                    assert float(R[j, j] - R[k, j]) == approx(value), name
            assert float(ours.forgetting()) == approx(av["StreamForgetting/eval_phase/test_stream"])
            assert float(ours.bwt()) == approx(av["StreamBWT/eval_phase/test_stream"])
            assert float(ours.fwt(baseline)) == approx(av["StreamForwardTransfer/eval_phase/test_stream"])
            assert float(ours.fwt()) == approx(av["StreamForwardTransfer/eval_phase/test_stream"])
            saw_forgetting |= abs(float(ours.forgetting())) > 0.05
    assert saw_forgetting, "the run should forget something, or the comparison proves little"


# ----------------------------------------------------------------------- DDP
# Two processes, gloo on CPU; each rank feeds different predictions.
# cell: {rank: [(n_correct, n), ...]}; cells absent from both stay NaN.
DDP_FEEDS = {
    (0, 0): {0: [(3, 4)], 1: [(2, 6)]},  # 5 / 10
    (0, 1): {0: [(1, 4)], 1: [(0, 0)]},  # rank 1 sends an empty batch: 1 / 4
    (1, 2): {1: [(0, 0)]},  # only an empty batch: stays NaN
    (1, 0): {0: [(5, 5)]},  # rank 1 sees no data here
    (1, 1): {1: [(1, 2), (2, 2)]},  # rank 0 sees no data here: 3 / 4
    (2, 0): {0: [(2, 4)], 1: [(1, 4)]},  # 3 / 8
    (2, 1): {0: [(1, 2)], 1: [(3, 6)]},  # 4 / 8
    (2, 2): {0: [(10, 10)], 1: [(8, 10)]},  # 18 / 20
}
DDP_EXPECTED = [[0.5, 0.25, NAN], [1.0, 0.75, NAN], [0.375, 0.5, 0.9]]
# The initial model: test experience: {rank: [(n_correct, n), ...]}
DDP_INITIAL_FEEDS = {
    0: {0: [(1, 4)], 1: [(1, 4)]},  # 2 / 8
    1: {0: [(1, 10)]},  # rank 1 sees no data here: 1 / 10
    2: {1: [(3, 10)], 0: [(0, 0)]},  # rank 0 sends an empty batch: 3 / 10
}
DDP_INITIAL_EXPECTED = [0.25, 0.1, 0.3]
# A 3x1 stream (one test experience): row: {rank: (n_correct, n)}
DDP_NI_FEEDS = {0: {0: (1, 4), 1: (3, 4)}, 1: {1: (2, 4)}, 2: {0: (5, 8), 1: (3, 8)}}
DDP_NI_EXPECTED = [[0.5], [0.5], [0.5]]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; no hostname lookup
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        if dist.get_world_size() != 2:
            raise RuntimeError(f"expected 2 processes, got {dist.get_world_size()}")
        metric = AccuracyMatrix(3)
        for (i, j), per_rank in DDP_FEEDS.items():
            for n_correct, n in per_rank.get(rank, []):
                # rank 0 sends logits, rank 1 class indices
                metric.update(*batch(n, n_correct, logits=rank == 0, offset=rank), i, j)
        local_total = metric.total.clone()
        R = metric.compute()
        figures = {
            "forgetting": metric.forgetting(),
            "bwt": metric.bwt(),
            "max_forgetting": metric.max_forgetting(),
            "average_accuracy": metric.average_accuracy(),
            "fwt": metric.fwt([0.0, 0.1, 0.25]),
        }
        # after compute, each rank keeps accumulating its own counts
        assert torch.equal(metric.total, local_total)
        # a later update reaches the synced result (the cache is dropped)
        metric.update(*batch(2, 1 - rank), 0, 2)  # rank 0: 1 / 2, rank 1: 0 / 2
        R_after = metric.compute()
        # set_row on one rank only, and the same from_matrix on every rank
        one_rank = AccuracyMatrix(2)
        if rank == 0:
            one_rank.set_row(0, [0.2, NAN])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank 1 computes without a local update
            R_one_rank = one_rank.compute()
        R_from_matrix = AccuracyMatrix.from_matrix(R4).compute()
        # the initial model's counts sync like the matrix's
        for j, per_rank in DDP_INITIAL_FEEDS.items():
            for n_correct, n in per_rank.get(rank, []):
                metric.update_initial(*batch(n, n_correct, logits=rank == 1, offset=rank), j)
        initial = metric.initial_accuracies()
        fwt_initial = metric.fwt()
        # a non-square metric, single-logit binary predictions on both ranks
        ni = AccuracyMatrix(3, n_test_experiences=1)
        for i, per_rank in DDP_NI_FEEDS.items():
            if rank in per_rank:
                n_correct, n = per_rank[rank]
                target = torch.arange(n) % 2
                logits = torch.where(target == 1, 1.0, -1.0)
                logits[n_correct:] = -logits[n_correct:]
                ni.update(logits, target, i, 0)
        R_ni = ni.matrix()
        ni_figures = {"average_accuracy": ni.average_accuracy(), "forgetting": ni.forgetting(), "bwt": ni.bwt()}
        torch.save(
            {
                "world_size": dist.get_world_size(),
                "local_total": local_total,
                "R": R,
                "figures": figures,
                "R_after": R_after,
                "R_one_rank": R_one_rank,
                "R_from_matrix": R_from_matrix,
                "initial": initial,
                "fwt_initial": fwt_initial,
                "local_initial_total": metric.initial_total.clone(),
                "R_ni": R_ni,
                "ni_figures": ni_figures,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_ddp_two_processes_sync_to_the_closed_form(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.fail("torch.distributed with the gloo backend is required for this test and is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    expected = torch.tensor(DDP_EXPECTED, dtype=torch.float64)
    forgetting_expected = ((0.5 - 0.375) + (0.75 - 0.5)) / 2
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]  # fails if a rank wrote nothing
    for rank, res in enumerate(results):
        assert res["world_size"] == 2
        torch.testing.assert_close(res["R"], expected, equal_nan=True)
        figures = {k: float(v) for k, v in res["figures"].items()}
        assert figures["forgetting"] == approx(forgetting_expected)
        assert figures["bwt"] == approx(-forgetting_expected)
        assert figures["max_forgetting"] == approx(((1.0 - 0.375) + (0.75 - 0.5)) / 2)
        assert figures["average_accuracy"] == approx((0.375 + 0.5 + 0.9) / 3)
        assert figures["fwt"] == approx(0.25 - 0.1)  # R[1, 2] is NaN: only j = 1 counts
        after = expected.clone()
        after[0, 2] = 0.25
        torch.testing.assert_close(res["R_after"], after, equal_nan=True)
        torch.testing.assert_close(
            res["R_one_rank"], torch.tensor([[0.2, NAN], [NAN, NAN]], dtype=torch.float64), equal_nan=True
        )
        torch.testing.assert_close(res["R_from_matrix"], torch.tensor(R4, dtype=torch.float64))
        torch.testing.assert_close(res["initial"], torch.tensor(DDP_INITIAL_EXPECTED, dtype=torch.float64))
        # R_after: R01 = 0.25, R12 = NaN; b1 = 0.1
        assert float(res["fwt_initial"]) == approx(0.25 - 0.1)
        torch.testing.assert_close(res["R_ni"], torch.tensor(DDP_NI_EXPECTED, dtype=torch.float64))
        assert float(res["ni_figures"]["average_accuracy"]) == approx(0.5)
        assert math.isnan(float(res["ni_figures"]["forgetting"])) and math.isnan(float(res["ni_figures"]["bwt"]))
    # the ranks really held different data
    assert not torch.equal(results[0]["local_total"], results[1]["local_total"])
    assert results[1]["local_initial_total"][1] == 0 and results[0]["local_initial_total"][2] == 0
    assert results[1]["local_total"][1, 0] == 0 and results[0]["local_total"][1, 1] == 0
