"""Continual-learning figures as pure functions of an accuracy matrix.

``R`` is a ``(T, U)`` matrix: ``R[i, j]`` is the accuracy on the test set of
experience ``j`` after training on experiences ``0..i``; NaN marks a cell that
was not evaluated. Rows are the ``T`` trained experiences, columns the ``U``
test experiences. Every figure here reads only ``R`` (and, for FWT, a
baseline vector), so a matrix loaded from ``results.json`` or typed by hand
gives the same numbers as the live :class:`~cl_plugin.metrics.AccuracyMatrix`,
whose methods call these functions. ``docs/metrics.md`` explains the figures
with the worked example below.

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

Square and non-square streams. A square matrix (``U = T``) is read as an
*aligned* stream: column ``j`` is the test set of training experience ``j``,
so the diagonal ``R[j, j]`` is "just after learning ``j``". That is what
forgetting, max forgetting, BWT and FWT are built on. A stream whose test
stream is not aligned with its training stream has ``U != T``: one test
experience for several training experiences (Avalanche's ``ni_benchmark``,
``new_instances_benchmark``, CORe50's NI scenario), or one training
experience for several test experiences (a joint upper bound). There:

* :func:`average_accuracy` is the mean over *all* ``U`` test experiences of
  the row (no column is "seen" or "unseen": none belongs to a training
  experience);
* :func:`forgetting`, :func:`max_forgetting`, :func:`bwt` and :func:`fwt` are
  NaN (not defined: no cell is "just after learning the test experience"),
  or raise a :class:`~cl_plugin.errors.ConfigError` with ``strict=True``.
  Avalanche 0.6 pairs experiences by index instead, so for a one-test-
  experience stream it reports ``R[0, 0] - R[k, 0]`` as forgetting: the change
  since the *first* training experience, which is not a learned-then-lost
  figure. NaN, not 0.0: 0.0 would claim that nothing was forgotten.

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
  NaN instead, because an accuracy of 0 would be a claim, not a default; so
  is FWT when the baseline holds no value at all (nothing to compare with).

Every function returns a 0-d tensor with the dtype and device of the matrix
(float64 when the matrix is given as nested lists), and accepts values in any
unit (fractions or percentages) as long as matrix and baseline share it.

Worked example (``docs/metrics.md``): three experiences of 100, 100 and 200
test images, and ``b`` the accuracies of the initial model:

    >>> R = [[0.90, 0.05, 0.10],
    ...      [0.92, 0.85, 0.20],
    ...      [0.60, 0.75, 0.95]]
    >>> b = [0.10, 0.10, 0.10]
    >>> figures = {
    ...     "ACC": average_accuracy(R),          # (0.60 + 0.75 + 0.95) / 3
    ...     "ACC after experience 1": average_accuracy(R, 1),  # (0.92 + 0.85) / 2
    ...     "forgetting": forgetting(R),         # ((0.90 - 0.60) + (0.85 - 0.75)) / 2
    ...     "max forgetting": max_forgetting(R), # ((0.92 - 0.60) + (0.85 - 0.75)) / 2
    ...     "BWT": bwt(R),                       # -forgetting
    ...     "FWT": fwt(R, b),                    # ((0.05 - 0.10) + (0.20 - 0.10)) / 2
    ... }
    >>> {name: round(float(value), 4) for name, value in figures.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'ACC': 0.7667, 'ACC after experience 1': 0.885, 'forgetting': 0.2,
     'max forgetting': 0.21, 'BWT': -0.2, 'FWT': 0.025}

Avalanche's ``Top1_Acc_Stream`` pools the samples of the whole evaluated
stream, the experiences not trained yet included, so it weighs experience 2
twice and counts it before it is learned:

    >>> sizes = torch.tensor([100.0, 100.0, 200.0])
    >>> pooled = torch.tensor(R, dtype=torch.float64) @ sizes.double() / sizes.sum()
    >>> [round(float(value), 4) for value in pooled[1:]]  # after experiences 1 and 2
    [0.5425, 0.8125]

A stream with one test experience (``ni_benchmark``): ``R`` is ``(3, 1)``,
average accuracy is the row's only cell, and the figures built on the
diagonal are not defined:

    >>> R_ni = [[0.70], [0.80], [0.85]]
    >>> float(average_accuracy(R_ni))
    0.85
    >>> [float(f(R_ni)) for f in (forgetting, max_forgetting, bwt)], float(fwt(R_ni, [0.1]))
    ([nan, nan, nan], nan)
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
    """Check that ``matrix`` is a ``(T, U)`` float matrix, T, U >= 1, without inf."""
    tensor = _as_float_tensor(matrix, name, "of shape (T, U)")
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ConfigError(
            f"`{name}` must be an accuracy matrix of shape (T, U) with T, U >= 1 "
            f"(row i: after training experience i; column j: test experience j), "
            f"got shape {tuple(tensor.shape)}."
        )
    if bool(torch.isinf(tensor).any()):
        raise ConfigError(
            f"`{name}` holds an infinite value; use NaN for a cell that was not evaluated."
        )
    return tensor


def _as_baseline(baseline: VectorLike, n_test_experiences: int, like: Tensor) -> Tensor:
    """Check that ``baseline`` is a vector with one entry per test experience."""
    tensor = _as_float_tensor(baseline, "baseline", "of shape (U,)")
    if tensor.ndim != 1 or tensor.shape[0] != n_test_experiences:
        T, U = like.shape
        raise ConfigError(
            f"`baseline` must have one accuracy per test experience, shape ({U},) "
            f"to match the {T}x{U} matrix, got shape {tuple(tensor.shape)}. Evaluate the "
            "initial (untrained) model on every test experience; entry 0 is not used and "
            "may be NaN."
        )
    if bool(torch.isinf(tensor).any()):
        raise ConfigError("`baseline` holds an infinite value; use NaN for an unknown entry.")
    return tensor.to(dtype=like.dtype, device=like.device)


def _as_accuracies(value: VectorLike, name: str, n_test_experiences: int, where: str) -> Tensor:
    """Check that ``value`` is ``(U,)`` fractions in [0, 1] or NaN (not evaluated)."""
    U = n_test_experiences
    values = _as_float_tensor(value, name, "of shape (U,)")
    if values.ndim != 1 or values.shape[0] != U:
        raise ConfigError(
            f"`{name}` must have one entry per test experience, shape ({U},) for {where}, "
            f"got shape {tuple(values.shape)}. Use NaN for a test experience that was not "
            "evaluated."
        )
    evaluated = ~torch.isnan(values)
    if bool(((values[evaluated] < 0) | (values[evaluated] > 1)).any()):
        raise ConfigError(
            f"`{name}` must be fractions in [0, 1] (or NaN), got {values.tolist()}. "
            "Divide percentages by 100."
        )
    return values


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


def _is_aligned(matrix: Tensor) -> bool:
    """Whether column ``j`` is the test set of training experience ``j`` (a square matrix)."""
    return matrix.shape[0] == matrix.shape[1]


def _needs_diagonal(matrix: Tensor, figure: str, strict: bool) -> bool:
    """True when ``figure`` is defined on ``matrix``; False (the caller returns NaN) or raise if not."""
    if _is_aligned(matrix):
        return True
    if strict:
        T, U = matrix.shape
        raise ConfigError(
            f"{figure} needs a square accuracy matrix, whose column j is the test set of "
            f"training experience j; this one is {T}x{U} ({T} trained, {U} test experiences), "
            "so no cell is 'just after learning' a test experience. Use average_accuracy, "
            "or strict=False to get NaN."
        )
    return False


def _nan(matrix: Tensor) -> Tensor:
    return matrix.new_full((), float("nan"))


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
    r"""Mean accuracy over the test experiences seen so far, after training experience ``i``.

    .. math:: \mathrm{ACC}_i = \frac{1}{i + 1} \sum_{j=0}^{i} R_{i, j}

    GEM's ACC is this figure for the last row, ``i = T - 1``. It is a mean over
    experiences, each weighing the same whatever its number of test samples
    (Avalanche's ``Top1_Acc_Stream`` pools samples instead; see the module
    docstring).

    On a non-square ``(T, U)`` matrix, where the test stream is not aligned
    with the training stream (one test experience, or one training
    experience), no test experience is "seen" before another, and the mean
    runs over all of them:

    .. math:: \mathrm{ACC}_i = \frac{1}{U} \sum_{j=0}^{U-1} R_{i, j}

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, U)``.
        i: the row, i.e. the number of trained experiences minus one. The
            default ``-1`` means the final row: the last row that holds any
            value, so mid-stream it is the experience trained most recently,
            not row ``T - 1``. Other negative values are not accepted.

    Returns:
        A 0-d tensor. Columns that were not evaluated (NaN) are left out of
        the mean; NaN when none was evaluated (or nothing at all).

    Raises:
        ConfigError: if ``matrix`` is not a 2-D matrix, or ``i`` is neither -1
            nor an int in ``[0, T)``.

    Example:
        >>> average_accuracy([[0.9, float("nan")], [0.6, 0.8]])
        tensor(0.7000, dtype=torch.float64)
        >>> average_accuracy([[0.9, float("nan")], [0.6, 0.8]], i=0)
        tensor(0.9000, dtype=torch.float64)
        >>> average_accuracy([[0.5, 0.7, 0.9]])  # one training experience, 3 test experiences
        tensor(0.7000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    if _is_minus_one(i):
        row = _last_row(R)
        if row is None:
            return _nan(R)
    else:
        row = _experience_index(
            i, "i", R.shape[0], " (or -1 for the last evaluated row)"
        )
    seen = R[row, : row + 1] if _is_aligned(R) else R[row]
    seen = seen[~torch.isnan(seen)]
    return seen.mean() if seen.numel() else _nan(R)


def forgetting(matrix: MatrixLike, *, strict: bool = False) -> Tensor:
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
        matrix: the accuracy matrix ``R``, shape ``(T, T)``; a non-square one
            gives NaN (see ``strict``).
        strict: raise instead of returning NaN for a non-square matrix.

    Returns:
        A 0-d tensor; ``0.0`` when no ``j < k`` has both cells (``T = 1``, a
        single trained experience, or nothing evaluated), as in Avalanche;
        NaN for a non-square matrix (no diagonal: see the module docstring).

    Raises:
        ConfigError: if ``matrix`` is not a 2-D matrix, or with ``strict=True``
            if it is not square.

    Example:
        >>> forgetting([[0.9, 0.1], [0.6, 0.8]])
        tensor(0.3000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    if not _needs_diagonal(R, "forgetting", strict):
        return _nan(R)
    return _mean_defined(-_final_minus_first(R))


def bwt(matrix: MatrixLike, *, strict: bool = False) -> Tensor:
    r"""Backward transfer (GEM): how training later experiences changed earlier ones.

    .. math:: \mathrm{BWT} = \frac{1}{k} \sum_{j=0}^{k-1} \left(R_{k, j} - R_{j, j}\right)

    with ``k`` the final row; on a full matrix ``k = T - 1`` as in Lopez-Paz and
    Ranzato (2017). Negative means forgetting. Avalanche 0.6's ``StreamBWT``
    is the negated ``StreamForgetting`` and gives the same number.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``; a non-square one
            gives NaN (see ``strict``).
        strict: raise instead of returning NaN for a non-square matrix.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (see :func:`forgetting`);
        NaN for a non-square matrix.

    Raises:
        ConfigError: if ``matrix`` is not a 2-D matrix, or with ``strict=True``
            if it is not square.

    Example:
        >>> bwt([[0.9, 0.1], [0.6, 0.8]])
        tensor(-0.3000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    if not _needs_diagonal(R, "bwt", strict):
        return _nan(R)
    return _mean_defined(_final_minus_first(R))


def max_forgetting(matrix: MatrixLike, *, strict: bool = False) -> Tensor:
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
        matrix: the accuracy matrix ``R``, shape ``(T, T)``; a non-square one
            gives NaN (see ``strict``).
        strict: raise instead of returning NaN for a non-square matrix.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (see :func:`forgetting`);
        NaN for a non-square matrix.

    Raises:
        ConfigError: if ``matrix`` is not a 2-D matrix, or with ``strict=True``
            if it is not square.

    Example:
        >>> max_forgetting([[0.7, 0.0, 0.0], [0.9, 0.8, 0.0], [0.6, 0.7, 0.9]])
        tensor(0.2000, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    if not _needs_diagonal(R, "max_forgetting", strict):
        return _nan(R)
    k = _last_row(R)
    if not k:
        return R.new_zeros(())
    earlier = R[:k, :k]
    best = torch.where(torch.isnan(earlier), float("-inf"), earlier).amax(dim=0)
    best = torch.where(torch.isinf(best), float("nan"), best)  # no earlier value
    return _mean_defined(best - R[k, :k])


def fwt(matrix: MatrixLike, baseline: VectorLike, *, strict: bool = False) -> Tensor:
    r"""Forward transfer (GEM): accuracy on ``j`` just before training it, over a baseline.

    .. math:: \mathrm{FWT} = \frac{1}{T - 1} \sum_{j=1}^{T-1} \left(R_{j-1, j} - b_j\right)

    ``b_j`` is the accuracy on experience ``j`` of the model before any training in
    the stream (GEM uses a random initialisation; with a pretrained start, the
    pretrained model): :meth:`AccuracyMatrix.update_initial
    <cl_plugin.metrics.AccuracyMatrix.update_initial>` records it. This is
    Avalanche 0.6's ``StreamForwardTransfer``, which takes ``b`` from an
    evaluation at initialisation. Pairs with a NaN (``R[j-1, j]`` not
    evaluated, e.g. when only seen experiences are tested, or ``b_j``
    unknown) are left out.

    Args:
        matrix: the accuracy matrix ``R``, shape ``(T, T)``; a non-square one
            gives NaN (see ``strict``).
        baseline: ``b``, shape ``(U,)`` (one entry per test experience);
            ``b[0]`` is not used.
        strict: raise instead of returning NaN for a non-square matrix.

    Returns:
        A 0-d tensor; ``0.0`` when no pair is defined (``T = 1``, or no
        ``R[j-1, j]`` evaluated), as in Avalanche; NaN when ``T >= 2`` and no
        ``b[1:]`` is known (all NaN: no baseline to compare with, where
        Avalanche would give 0.0), or for a non-square matrix.

    Raises:
        ConfigError: if ``matrix`` is not a 2-D matrix, ``baseline`` does not
            have ``U`` entries, or with ``strict=True`` if ``matrix`` is not
            square.

    Example:
        >>> fwt([[0.9, 0.3], [0.6, 0.8]], baseline=[0.1, 0.1])
        tensor(0.2000, dtype=torch.float64)
        >>> fwt([[0.9, 0.3], [0.6, 0.8]], baseline=[float("nan")] * 2)
        tensor(nan, dtype=torch.float64)
    """
    R = _as_matrix(matrix)
    b = _as_baseline(baseline, R.shape[1], like=R)
    if not _needs_diagonal(R, "fwt", strict):
        return _nan(R)
    if b.shape[0] > 1 and bool(torch.isnan(b[1:]).all()):
        return _nan(R)
    return _mean_defined(torch.diagonal(R, offset=1) - b[1:])


# ------------------------------------------- steps of AccuracyMatrix.update/compute


def _is_integer(tensor: Tensor) -> bool:
    """True for integer dtypes (bool excluded: it is not a class index)."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _count_correct(preds: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """Check ``preds``/``target`` and return (number correct as a 0-d tensor, number of samples).

    ``preds`` is one of:

    * ``(N, C)`` floating-point scores, ``C >= 2`` (logits or probabilities,
      arg-maxed over ``C``);
    * ``(N,)`` or ``(N, 1)`` floating-point single logits of a binary head
      (class 1 where the logit is > 0, else class 0; ``target`` must then be
      0 or 1);
    * ``(N,)`` integer class indices.

    ``target`` is ``(N,)`` integer class indices.
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
    single_logit = preds.is_floating_point() and (
        preds.ndim == 1 or (preds.ndim == 2 and preds.shape[1] == 1)
    )
    if single_logit:
        # A one-output head: its argmax would always be class 0. Read the logit
        # as a binary decision instead; 0 is the logit of probability 0.5.
        labels = (preds.reshape(-1) > 0).to(torch.long)
    elif preds.ndim == 2 and preds.is_floating_point():
        if preds.shape[1] < 1:
            raise ConfigError(f"`preds` has no classes: shape {tuple(preds.shape)}.")
        labels = preds.argmax(dim=1)
    elif preds.ndim == 1 and _is_integer(preds):
        labels = preds
    else:
        raise ConfigError(
            "`preds` must be floating-point scores of shape (N, C) (logits or "
            "probabilities), single logits of a binary head of shape (N,) or (N, 1), "
            "or integer class indices of shape (N,), got shape "
            f"{tuple(preds.shape)} and dtype {preds.dtype}."
        )
    if labels.shape[0] != target.shape[0]:
        raise ConfigError(
            f"`preds` and `target` must have the same number of samples N, got "
            f"{labels.shape[0]} (preds shape {tuple(preds.shape)}) and {target.shape[0]}."
        )
    if single_logit and bool(((target != 0) & (target != 1)).any()):
        others = sorted({int(v) for v in target[(target != 0) & (target != 1)].unique()[:5]})
        raise ConfigError(
            f"`preds` of shape {tuple(preds.shape)} and dtype {preds.dtype} is read as one "
            "logit per sample of a binary head (class 1 where the logit is > 0), but "
            f"`target` holds other classes than 0 and 1 (e.g. {others}). For float class "
            "indices, pass `preds.long()`; for C classes, pass scores of shape (N, C)."
        )
    return (labels == target.to(labels.device)).sum(), int(target.shape[0])


def _ratio_matrix(correct: Tensor, total: Tensor) -> Tensor:
    """``correct / total`` cell by cell, NaN where ``total`` is 0 (not evaluated)."""
    evaluated = total > 0
    return torch.where(evaluated, correct / torch.where(evaluated, total, 1.0), float("nan"))
