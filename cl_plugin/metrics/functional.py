"""Continual-learning figures as pure functions of an accuracy matrix.

``R`` is a ``(T, T)`` matrix: ``R[i, j]`` is the accuracy on the test set of
experience ``j`` after training on experiences ``0..i``; NaN marks a cell that
was not evaluated. Every figure here reads only ``R`` (and, for FWT, a
baseline vector), so a matrix loaded from ``results.json`` or typed by hand
gives the same numbers as the live :class:`~cl_plugin.metrics.AccuracyMatrix`,
whose methods call these functions.

Sources:

* Lopez-Paz and Ranzato. "Gradient Episodic Memory for Continual Learning",
  NeurIPS 2017 (https://arxiv.org/abs/1706.08840), section 2: ACC, BWT, FWT.
* Chaudhry, Dokania, Ajanthan and Torr. "Riemannian Walk for Incremental
  Learning: Understanding Forgetting and Intransigence", ECCV 2018
  (https://arxiv.org/abs/1801.10112), section 4: the forgetting measure
  (best earlier accuracy minus final accuracy), here :func:`max_forgetting`.
* Avalanche 0.6 (github.com/ContinualAI/avalanche):
  ``avalanche/evaluation/metrics/forgetting_bwt.py::StreamForgetting`` and
  ``::StreamBWT``, ``forward_transfer.py::StreamForwardTransfer``, and
  ``mean.py::Mean.result``.

How a partially filled matrix is read (the same rules as Avalanche's stream
metrics, which follow the stream as it goes):

* The *final row* ``k`` is the last row that holds any value: the experience
  trained most recently. GEM's ``T - 1`` is read as ``k``, so every figure can
  be followed mid-stream; on a full matrix the two are the same.
* A pair of cells with a NaN on either side is left out of an average, as
  Avalanche leaves out an experience that it has not evaluated both times.
* When no pair is left (one experience trained, or nothing evaluated yet),
  forgetting, max forgetting, BWT and FWT are ``0.0``: Avalanche averages
  with ``Mean``, whose result for no values is ``0.0``. Average accuracy is
  NaN instead, because an accuracy of 0 would be a claim, not a default.

Every function returns a 0-d tensor with the dtype and device of the matrix
(float64 when the matrix is given as nested lists), and accepts values in any
unit (fractions or percentages) as long as matrix and baseline share it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

from cl_plugin.errors import ConfigError

__all__ = ["average_accuracy", "forgetting", "max_forgetting", "bwt", "fwt"]

MatrixLike = Union[Tensor, Sequence[Sequence[float]]]
VectorLike = Union[Tensor, Sequence[float]]


# ----------------------------------------------------------------- validation


def _as_float_tensor(value: object, name: str, shape_hint: str) -> Tensor:
    """``value`` as a floating-point tensor (float64 unless it already is one)."""
    if isinstance(value, Tensor):
        tensor = value.detach()
        return tensor if tensor.is_floating_point() else tensor.to(torch.float64)
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"`{name}` must be a tensor or nested sequence of numbers {shape_hint}, "
            f"got {type(value).__name__}: {value!r}."
        ) from err


def _as_matrix(matrix: MatrixLike, name: str = "matrix") -> Tensor:
    """Check that ``matrix`` is a square ``(T, T)`` float matrix, T >= 1, without inf."""
    tensor = _as_float_tensor(matrix, name, "of shape (T, T)")
    if tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1] or tensor.shape[0] < 1:
        raise ConfigError(
            f"`{name}` must be a square accuracy matrix of shape (T, T) with T >= 1 "
            f"(row i: after training experience i; column j: test experience j), "
            f"got shape {tuple(tensor.shape)}."
        )
    if bool(torch.isinf(tensor).any()):
        raise ConfigError(
            f"`{name}` holds an infinite value; use NaN for a cell that was not evaluated."
        )
    return tensor


def _as_baseline(baseline: VectorLike, n_experiences: int, like: Tensor) -> Tensor:
    """Check that ``baseline`` is a vector with one entry per experience."""
    tensor = _as_float_tensor(baseline, "baseline", "of shape (T,)")
    if tensor.ndim != 1 or tensor.shape[0] != n_experiences:
        raise ConfigError(
            f"`baseline` must have one accuracy per experience, shape ({n_experiences},) "
            f"to match the {n_experiences}x{n_experiences} matrix, got shape "
            f"{tuple(tensor.shape)}. Evaluate the initial (untrained) model on every "
            "test experience; entry 0 is not used and may be NaN."
        )
    if bool(torch.isinf(tensor).any()):
        raise ConfigError("`baseline` holds an infinite value; use NaN for an unknown entry.")
    return tensor.to(dtype=like.dtype, device=like.device)


def _experience_index(value: object, name: str, n_experiences: int, where: str = "") -> int:
    """``value`` as an int in ``[0, n_experiences)``, or a :class:`ConfigError`."""
    index = None
    if not isinstance(value, bool):
        try:
            index = operator.index(value)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            index = None
    if index is None or not 0 <= index < n_experiences:
        raise ConfigError(
            f"`{name}` must be an int in [0, {n_experiences}){where}, got {value!r}."
        )
    return index


# ---------------------------------------------------------------- helpers


def _is_minus_one(value: object) -> bool:
    """True for the int -1 (also a numpy or 0-d tensor integer), False for anything else."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) == -1
    except TypeError:
        return False


def _last_row(matrix: Tensor) -> int | None:
    """Index of the last row with any value (the final row ``k``), or None."""
    filled = torch.nonzero((~torch.isnan(matrix)).any(dim=1)).flatten()
    return int(filled[-1]) if filled.numel() else None


def _mean_defined(values: Tensor) -> Tensor:
    """Mean of the non-NaN entries, or 0 when there are none (Avalanche's ``Mean``)."""
    keep = ~torch.isnan(values)
    if not bool(keep.any()):
        return values.new_zeros(())
    return values[keep].mean()


def _final_minus_first(matrix: Tensor) -> Tensor:
    """``R[k, j] - R[j, j]`` for every ``j < k``, k the final row (empty if k is 0 or None)."""
    k = _last_row(matrix)
    if not k:
        return matrix.new_empty(0)
    return matrix[k, :k] - torch.diagonal(matrix)[:k]


# ---------------------------------------------------------------- figures


def average_accuracy(matrix: MatrixLike, i: int = -1) -> Tensor:
    r"""Mean accuracy over the experiences seen so far, after training experience ``i``.

    .. math:: \mathrm{ACC}_i = \frac{1}{i + 1} \sum_{j=0}^{i} R_{i, j}

    GEM's ACC is this figure for the last row, ``i = T - 1``.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``.
        i: the row, i.e. the number of trained experiences minus one. The
            default ``-1`` means the final row: the last row that holds any
            value, so mid-stream it is the experience trained most recently,
            not row ``T - 1``. Other negative values are not accepted.

    Returns:
        A 0-d tensor. Columns ``0..i`` that were not evaluated (NaN) are left
        out of the mean; NaN when none was evaluated (or nothing at all).

    Raises:
        ConfigError: if ``matrix`` is not square, or ``i`` is neither -1 nor an
            int in ``[0, T)``.

    Example:
        >>> average_accuracy([[0.9, float("nan")], [0.6, 0.8]])
        tensor(0.7000, dtype=torch.float64)
        >>> average_accuracy([[0.9, float("nan")], [0.6, 0.8]], i=0)
        tensor(0.9000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    if _is_minus_one(i):
        row = _last_row(R)
        if row is None:
            return R.new_full((), float("nan"))
    else:
        row = _experience_index(
            i, "i", R.shape[0], " (or -1 for the last evaluated row)"
        )
    seen = R[row, : row + 1]
    seen = seen[~torch.isnan(seen)]
    return seen.mean() if seen.numel() else R.new_full((), float("nan"))


def forgetting(matrix: MatrixLike) -> Tensor:
    r"""Avalanche's stream forgetting: accuracy right after learning ``j`` minus final accuracy on ``j``.

    .. math:: F = \frac{1}{k} \sum_{j=0}^{k-1} \left(R_{j, j} - R_{k, j}\right)

    with ``k`` the final row (the last row that holds any value). The
    experience trained last is left out: it has had no time to be forgotten.
    This is Avalanche 0.6's ``StreamForgetting`` after the evaluation that
    follows training experience ``k``: per experience, the first value
    (recorded when the training and evaluation experiences are the same)
    minus the last one, averaged over the experiences that have both. Positive
    means accuracy was lost. It equals ``-bwt(matrix)``.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``.

    Returns:
        A 0-d tensor; ``0.0`` when no ``j < k`` has both cells (``T = 1``, a
        single trained experience, or nothing evaluated), as in Avalanche.

    Raises:
        ConfigError: if ``matrix`` is not a square matrix.

    Example:
        >>> forgetting([[0.9, 0.1], [0.6, 0.8]])
        tensor(0.3000, dtype=torch.float64)
    """
    return _mean_defined(-_final_minus_first(_as_matrix(matrix)))


def bwt(matrix: MatrixLike) -> Tensor:
    r"""Backward transfer (GEM): how training later experiences changed earlier ones.

    .. math:: \mathrm{BWT} = \frac{1}{k} \sum_{j=0}^{k-1} \left(R_{k, j} - R_{j, j}\right)

    with ``k`` the final row; on a full matrix ``k = T - 1`` as in Lopez-Paz and
    Ranzato (2017). Negative means forgetting. Avalanche 0.6's ``StreamBWT``
    is the negated ``StreamForgetting`` and gives the same number.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (see :func:`forgetting`).

    Raises:
        ConfigError: if ``matrix`` is not a square matrix.

    Example:
        >>> bwt([[0.9, 0.1], [0.6, 0.8]])
        tensor(-0.3000, dtype=torch.float64)
    """
    return _mean_defined(_final_minus_first(_as_matrix(matrix)))


def max_forgetting(matrix: MatrixLike) -> Tensor:
    r"""Forgetting as in Chaudhry et al. (2018): best earlier accuracy minus final accuracy.

    .. math::
        f_j = \max_{l < k} R_{l, j} - R_{k, j}, \qquad
        F_{\max} = \frac{1}{k} \sum_{j=0}^{k-1} f_j

    with ``k`` the final row. Unlike :func:`forgetting`, the reference is the
    best accuracy ``j`` ever had before the final row, so a gain that was
    later lost counts. As in the paper, the maximum runs over every earlier
    row ``l < k``, including rows ``l < j`` (before ``j`` was trained) when
    they were evaluated; in class-incremental streams those are near zero and
    change nothing. NaN cells are skipped in the maximum; an experience with
    no earlier value, or no final value, is left out.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (see :func:`forgetting`).

    Raises:
        ConfigError: if ``matrix`` is not a square matrix.

    Example:
        >>> max_forgetting([[0.7, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.7, 0.9]])
        tensor(0.2000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    k = _last_row(R)
    if not k:
        return R.new_zeros(())
    earlier = R[:k, :k]
    best = torch.where(torch.isnan(earlier), float("-inf"), earlier).amax(dim=0)
    best = torch.where(torch.isinf(best), float("nan"), best)  # no earlier value
    return _mean_defined(best - R[k, :k])


def fwt(matrix: MatrixLike, baseline: VectorLike) -> Tensor:
    r"""Forward transfer (GEM): accuracy on ``j`` just before training it, over a baseline.

    .. math:: \mathrm{FWT} = \frac{1}{T - 1} \sum_{j=1}^{T-1} \left(R_{j-1, j} - b_j\right)

    ``b_j`` is the accuracy on experience ``j`` of the model before any
    training in the stream (GEM uses a random initialisation; with a
    pretrained start, the pretrained model). This is Avalanche 0.6's
    ``StreamForwardTransfer``, which takes ``b`` from an evaluation at
    initialisation. Pairs with a NaN (``R[j-1, j]`` not evaluated, e.g. when
    only seen experiences are tested) are left out.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``.
        baseline: ``b``, shape ``(T,)``; ``b[0]`` is not used.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (``T = 1``, or no
        ``R[j-1, j]`` evaluated), as in Avalanche.

    Raises:
        ConfigError: if ``matrix`` is not square or ``baseline`` does not have
            ``T`` entries.

    Example:
        >>> fwt([[0.9, 0.3], [0.6, 0.8]], baseline=[0.1, 0.1])
        tensor(0.2000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    b = _as_baseline(baseline, R.shape[0], like=R)
    return _mean_defined(torch.diagonal(R, offset=1) - b[1:])


# ------------------------------------------- steps of AccuracyMatrix.update/compute


def _is_integer(tensor: Tensor) -> bool:
    """True for integer dtypes (bool excluded: it is not a class index)."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _count_correct(preds: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """Check ``preds``/``target`` and return (number correct as a 0-d tensor, number of samples).

    ``preds`` is ``(N, C)`` floating-point scores (logits or probabilities,
    arg-maxed over ``C``) or ``(N,)`` integer class indices; ``target`` is
    ``(N,)`` integer class indices.
    """
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise ConfigError(
            "`preds` and `target` must be tensors, got "
            f"{type(preds).__name__} and {type(target).__name__}."
        )
    if target.ndim != 1 or not _is_integer(target):
        raise ConfigError(
            "`target` must be a 1-D integer tensor of class indices, shape (N,), got "
            f"shape {tuple(target.shape)} and dtype {target.dtype}."
        )
    if preds.ndim == 2 and preds.is_floating_point():
        if preds.shape[1] < 1:
            raise ConfigError(f"`preds` has no classes: shape {tuple(preds.shape)}.")
        labels = preds.argmax(dim=1)
    elif preds.ndim == 1 and _is_integer(preds):
        labels = preds
    else:
        raise ConfigError(
            "`preds` must be floating-point scores of shape (N, C) (logits or "
            "probabilities) or integer class indices of shape (N,), got shape "
            f"{tuple(preds.shape)} and dtype {preds.dtype}. For a 1-D float tensor of "
            "class indices, pass `preds.long()`."
        )
    if labels.shape[0] != target.shape[0]:
        raise ConfigError(
            f"`preds` and `target` must have the same number of samples N, got "
            f"{labels.shape[0]} (preds shape {tuple(preds.shape)}) and {target.shape[0]}."
        )
    return (labels == target.to(labels.device)).sum(), int(target.shape[0])


def _ratio_matrix(correct: Tensor, total: Tensor) -> Tensor:
    """``correct / total`` cell by cell, NaN where ``total`` is 0 (not evaluated)."""
    evaluated = total > 0
    return torch.where(evaluated, correct / torch.where(evaluated, total, 1.0), float("nan"))
