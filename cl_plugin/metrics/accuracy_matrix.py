"""The accuracy matrix of a continual-learning stream, as a torchmetrics ``Metric``.

``R[i, j]`` is the accuracy on the test set of experience ``j`` after training
on experiences ``0..i`` (Lopez-Paz and Ranzato, "Gradient Episodic Memory for
Continual Learning", NeurIPS 2017, https://arxiv.org/abs/1706.08840). The
state is two ``(T, T)`` count tensors, correct and total predictions per cell,
reduced with ``"sum"`` across processes, so under DDP every rank feeds its
own shard and :meth:`AccuracyMatrix.compute` returns the accuracy over all
shards: no rank needs to see every sample, and a rank that saw no sample of a
cell adds nothing to it.

The figures derived from ``R`` (average accuracy, forgetting, max forgetting,
BWT, FWT) are the pure functions of :mod:`cl_plugin.metrics.functional`; the
methods here only call them on :meth:`AccuracyMatrix.compute`. Definitions,
papers and how they compare with Avalanche 0.6 are documented there.

Differences from Avalanche 0.6's ``AccuracyMatrixPluginMetric``
(``avalanche/evaluation/metrics/acc_matrix.py``): the size ``T`` is fixed up
front instead of grown on demand; a cell not evaluated is NaN instead of 0,
so "not evaluated" and "0 % accuracy" stay apart; rows are the experience the
caller names instead of a count of ``train`` calls; the state is counts that
sync across processes instead of a matrix of floats on one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from cl_plugin.errors import ConfigError, StateDictMismatchError
from cl_plugin.metrics import functional as F
from cl_plugin.metrics.functional import MatrixLike, VectorLike

__all__ = ["AccuracyMatrix"]

_STATES = ("correct", "total")


class AccuracyMatrix(Metric):
    """Accuracy on every test experience after every trained experience.

    Feed it predictions with :meth:`update`, or accuracies computed elsewhere
    with :meth:`set_row` / :meth:`from_matrix`; read ``R`` with
    :meth:`compute` and the figures with :meth:`average_accuracy`,
    :meth:`forgetting`, :meth:`max_forgetting`, :meth:`bwt` and :meth:`fwt`.

    Args:
        n_experiences: ``T``, the number of experiences in the stream (>= 1).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g.
            ``sync_on_compute``, ``process_group``).

    State (float64, shape ``(T, T)``, summed across processes, saved in
    ``state_dict`` by default; call ``persistent(False)`` to leave it out):

    * ``correct``: number of correct predictions per cell,
    * ``total``: number of predictions per cell (0: not evaluated).

    Distributed use: :meth:`compute` and every figure method gather the state
    from all processes, so call them on every rank (they are collective
    operations), as with any torchmetrics metric.

    Raises:
        ConfigError: if ``n_experiences`` is not an int >= 1; from
            :meth:`update` and :meth:`set_row`, on an experience index outside
            ``[0, T)`` or inputs of the wrong shape or type.

    Example:
        >>> import torch
        >>> m = AccuracyMatrix(n_experiences=2)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
        >>> m.update(logits, torch.tensor([0, 1, 0, 0]), trained_experience=0, test_experience=0)
        >>> m.set_row(1, [0.5, 1.0])
        >>> m.compute()
        tensor([[0.7500,    nan],
                [0.5000, 1.0000]], dtype=torch.float64)
        >>> float(m.forgetting()), float(m.bwt()), float(m.average_accuracy())
        (0.25, -0.25, 0.75)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor

    def __init__(self, n_experiences: int, **kwargs: Any) -> None:
        if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1:
            raise ConfigError(
                "`n_experiences` must be an int >= 1 (the number of experiences in the "
                f"stream), got {n_experiences!r}."
            )
        super().__init__(**kwargs)
        self.n_experiences = n_experiences
        shape = (n_experiences, n_experiences)
        # float64 counts are exact up to 2**53 samples per cell, and can also hold
        # the accuracies given to set_row (a count of 1 with a fractional "correct").
        for name in _STATES:
            self.add_state(
                name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True
            )

    # ------------------------------------------------------------------ input

    def update(  # type: ignore[override]
        self, preds: Tensor, target: Tensor, trained_experience: int, test_experience: int
    ) -> None:
        """Count one batch of predictions into cell ``(trained_experience, test_experience)``.

        Args:
            preds: ``(N, C)`` floating-point scores (logits or probabilities;
                the class is their argmax over ``C``) or ``(N,)`` integer class
                indices.
            target: ``(N,)`` integer class indices. ``N = 0`` is allowed and
                adds nothing (the cell stays NaN if nothing else reaches it).
            trained_experience: row ``i``: the last experience the model was
                trained on, in ``[0, T)``.
            test_experience: column ``j``: the experience whose test data this
                batch comes from, in ``[0, T)``.

        Raises:
            ConfigError: on an index outside ``[0, T)``, or inputs of the wrong
                shape or dtype; nothing is counted then.
        """
        i = self._index(trained_experience, "trained_experience")
        j = self._index(test_experience, "test_experience")
        n_correct, n_total = F._count_correct(preds, target)
        self.correct[i, j] += n_correct.to(device=self.correct.device, dtype=self.correct.dtype)
        self.total[i, j] += n_total

    def set_row(self, trained_experience: int, accuracies: VectorLike) -> None:
        """Replace row ``trained_experience`` with accuracies computed elsewhere.

        Each finite entry ``a`` is stored as ``a`` correct out of 1 prediction,
        a NaN entry as "not evaluated". Use it for numbers that do not come from
        predictions (a results file, a paper's table); use :meth:`update` for
        predictions. Do not mix the two in one cell: counts of real samples and
        a weight of 1 would be averaged together.

        Under DDP, call it with the same values on every rank (or on one rank
        only): the synced cell is then ``n·a / n = a``.

        Args:
            trained_experience: the row ``i``, in ``[0, T)``.
            accuracies: ``T`` accuracies in ``[0, 1]`` (NaN for a test
                experience that was not evaluated).

        Raises:
            ConfigError: if the row is outside ``[0, T)``, ``accuracies`` does
                not have ``T`` entries, or an entry is outside ``[0, 1]``;
                nothing is changed then.
        """
        i = self._index(trained_experience, "trained_experience")
        values = F._as_float_tensor(accuracies, "accuracies", "of shape (T,)")
        T = self.n_experiences
        if values.ndim != 1 or values.shape[0] != T:
            raise ConfigError(
                f"`accuracies` must have one entry per experience, shape ({T},) for "
                f"AccuracyMatrix(n_experiences={T}), got shape {tuple(values.shape)}. "
                "Use NaN for a test experience that was not evaluated."
            )
        evaluated = ~torch.isnan(values)
        if bool(((values[evaluated] < 0) | (values[evaluated] > 1)).any()):
            raise ConfigError(
                f"`accuracies` must be fractions in [0, 1] (or NaN), got {values.tolist()}. "
                "Divide percentages by 100."
            )
        values = values.to(device=self.correct.device, dtype=self.correct.dtype)
        evaluated = evaluated.to(self.correct.device)
        self.correct[i] = torch.where(evaluated, values, 0.0)
        self.total[i] = evaluated.to(self.total.dtype)
        self._mark_changed()

    @classmethod
    def from_matrix(cls, matrix: MatrixLike, **kwargs: Any) -> AccuracyMatrix:
        """A metric holding the accuracy matrix ``matrix`` (``(T, T)``, NaN: not evaluated).

        Each row goes through :meth:`set_row`, with its rules. ``kwargs`` go to
        the constructor.

        Example:
            >>> AccuracyMatrix.from_matrix([[0.9, 0.2], [0.7, 0.8]]).bwt()
            tensor(-0.2000, dtype=torch.float64)
        """
        R = F._as_matrix(matrix)
        metric = cls(int(R.shape[0]), **kwargs)
        for i, row in enumerate(R):
            metric.set_row(i, row)
        return metric

    # ----------------------------------------------------------------- output

    def compute(self) -> Tensor:
        """The accuracy matrix ``R``: float64, ``(T, T)``, NaN where nothing was evaluated."""
        return F._ratio_matrix(self.correct, self.total)

    def matrix(self) -> Tensor:
        """:meth:`compute`, always ``(T, T)``: torchmetrics squeezes a 1x1 result to a 0-d tensor."""
        return self.compute().reshape(self.n_experiences, self.n_experiences)

    def average_accuracy(self, i: int = -1) -> Tensor:
        """Mean accuracy on experiences ``0..i`` after training ``i``; ``-1``: the last evaluated row.

        See :func:`cl_plugin.metrics.functional.average_accuracy`.
        """
        return F.average_accuracy(self.matrix(), i)

    def forgetting(self) -> Tensor:
        """Avalanche's stream forgetting. See :func:`cl_plugin.metrics.functional.forgetting`."""
        return F.forgetting(self.matrix())

    def max_forgetting(self) -> Tensor:
        """Chaudhry et al.'s forgetting. See :func:`cl_plugin.metrics.functional.max_forgetting`."""
        return F.max_forgetting(self.matrix())

    def bwt(self) -> Tensor:
        """GEM's backward transfer. See :func:`cl_plugin.metrics.functional.bwt`."""
        return F.bwt(self.matrix())

    def fwt(self, baseline: VectorLike) -> Tensor:
        """GEM's forward transfer over ``baseline``, shape ``(T,)``.

        See :func:`cl_plugin.metrics.functional.fwt`.
        """
        return F.fwt(self.matrix(), baseline)

    # --------------------------------------------------------------- plumbing

    def _mark_changed(self) -> None:
        """Record a change of state made outside :meth:`update`.

        Drops the cached result and counts the change as an update, as
        torchmetrics' own wrappers do (``torchmetrics/wrappers/running.py``),
        so :meth:`compute` neither returns a stale matrix nor warns that it ran
        before any update.
        """
        self._computed = None
        self._update_count += 1

    def _index(self, value: object, name: str) -> int:
        T = self.n_experiences
        return F._experience_index(value, name, T, f" for AccuracyMatrix(n_experiences={T})")

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # torchmetrics assigns loaded states as they are; refuse a matrix of
        # another size before anything is assigned.
        T = self.n_experiences
        loaded = any(prefix + name in state_dict for name in _STATES)
        for name in _STATES:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and tuple(value.shape) != (T, T):
                raise StateDictMismatchError(
                    f"AccuracyMatrix(n_experiences={T}) cannot load `{prefix}{name}` of shape "
                    f"{tuple(value.shape)}: expected ({T}, {T}). Build the metric with "
                    f"n_experiences={value.shape[0]} to load this state."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loaded:
            self._mark_changed()

    def extra_repr(self) -> str:
        return f"n_experiences={self.n_experiences}"
