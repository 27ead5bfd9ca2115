"""The accuracy matrix of a continual-learning stream, as a torchmetrics ``Metric``.

``R[i, j]`` is the accuracy on the test set of experience ``j`` after training
on experiences ``0..i`` (Lopez-Paz and Ranzato, "Gradient Episodic Memory for
Continual Learning", NeurIPS 2017, https://arxiv.org/abs/1706.08840). Rows are
the ``T`` trained experiences, columns the ``U`` test experiences (``U = T``
unless the test stream is not aligned with the training stream, e.g. one test
experience for a new-instances stream). The state is two ``(T, U)`` count
tensors, correct and total predictions per cell, and two ``(U,)`` count
tensors for the model before any training (the ``b`` of forward transfer),
all reduced with ``"sum"`` across processes, so under DDP every rank feeds its
own shard and :meth:`AccuracyMatrix.compute` returns the accuracy over all
shards: no rank needs to see every sample, and a rank that saw no sample of a
cell adds nothing to it.

The figures derived from ``R`` (average accuracy, forgetting, max forgetting,
BWT, FWT) are the pure functions of :mod:`cl_plugin.metrics.functional`; the
methods here only call them on :meth:`AccuracyMatrix.compute`. Definitions,
papers, which figures a non-square matrix has, and how they compare with
Avalanche 0.6 are documented there and in ``docs/metrics.md``.

Differences from Avalanche 0.6's ``AccuracyMatrixPluginMetric``
(``avalanche/evaluation/metrics/acc_matrix.py``): the size ``T x U`` is fixed
up front instead of grown on demand; a cell not evaluated is NaN instead of
0, so "not evaluated" and "0 % accuracy" stay apart; rows are the experience
the caller names instead of a count of ``train`` calls; the state is counts
that sync across processes instead of a matrix of floats on one process; a
head with a single output is scored as a binary classifier.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from cl_plugin.errors import ConfigError, StateDictMismatchError
from cl_plugin.metrics import functional as F
from cl_plugin.metrics.functional import MatrixLike, VectorLike

__all__ = ["AccuracyMatrix"]

_STATES = ("correct", "total")  # (T, U): the matrix
_INITIAL_STATES = ("initial_correct", "initial_total")  # (U,): the model before training


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "experiences in the stream" if name == "n_experiences" else "test experiences"
        raise ConfigError(f"`{name}` must be an int >= 1 (the number of {what}), got {value!r}.")


class AccuracyMatrix(Metric):
    """Accuracy on every test experience after every trained experience.

    Feed it predictions with :meth:`update`, or accuracies computed elsewhere
    with :meth:`set_row` / :meth:`from_matrix`; read ``R`` with
    :meth:`compute` (or :meth:`matrix`, always 2-D) and the figures with
    :meth:`average_accuracy`, :meth:`forgetting`, :meth:`max_forgetting`,
    :meth:`bwt` and :meth:`fwt`. The accuracies of the model before any
    training, the baseline of :meth:`fwt`, go in with :meth:`update_initial`
    (or :meth:`set_initial`) and come out with :meth:`initial_accuracies`.

    Predictions (:meth:`update`, :meth:`update_initial`): ``(N, C)``
    floating-point scores are arg-maxed over ``C``; a single output per
    sample, ``(N,)`` or ``(N, 1)`` floats, is a *logit* of a binary head and
    predicts class 1 where it is > 0 (pass probabilities as ``(N, 2)``, or
    threshold them yourself into integer classes); ``(N,)`` integers are
    class indices. For task-aware accuracy, mask the logits first with
    :func:`~cl_plugin.metrics.mask_to_classes`.

    Args:
        n_experiences: ``T``, the number of trained experiences: the rows (>= 1).
        n_test_experiences: ``U``, the number of test experiences: the
            columns (>= 1). ``None`` (default): ``U = T``, a stream whose test
            experience ``j`` belongs to training experience ``j``. Give it for
            a stream that is not aligned, e.g. ``1`` for a new-instances
            stream with one test experience; forgetting, max forgetting, BWT
            and FWT are then NaN (they need that alignment) and average
            accuracy is the mean over all test experiences.
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g.
            ``sync_on_compute``, ``process_group``).

    State (float64, summed across processes, saved in ``state_dict`` by
    default; call ``persistent(False)`` to leave it out):

    * ``correct``, ``total``: shape ``(T, U)``, number of correct predictions
      and of predictions per cell (total 0: not evaluated);
    * ``initial_correct``, ``initial_total``: shape ``(U,)``, the same for the
      model before any training. A ``state_dict`` written before these
      existed loads, with no initial accuracies.

    Distributed use: :meth:`compute`, :meth:`initial_accuracies` and every
    figure method gather the state from all processes, so call them on every
    rank (they are collective operations), as with any torchmetrics metric.

    Raises:
        ConfigError: if ``n_experiences`` or ``n_test_experiences`` is not an
            int >= 1; from :meth:`update`, :meth:`set_row` and the initial
            counterparts, on an experience index out of range or inputs of the
            wrong shape or type.

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

        A stream with one test experience, and a binary head with one logit:

        >>> ni = AccuracyMatrix(n_experiences=3, n_test_experiences=1)
        >>> target = torch.tensor([0, 1, 0, 1])
        >>> ni.update(torch.tensor([-1.0, -2.0, 0.5, 1.0]), target, 0, 0)  # 0, 0, 1, 1
        >>> ni.update(torch.tensor([-1.0, 2.0, 0.5, 1.0]), target, 1, 0)  # 0, 1, 1, 1
        >>> ni.update(torch.tensor([-1.0, 2.0, -0.5, 1.0]), target, 2, 0)  # 0, 1, 0, 1
        >>> ni.matrix()
        tensor([[0.5000],
                [0.7500],
                [1.0000]], dtype=torch.float64)
        >>> float(ni.average_accuracy()), float(ni.forgetting())
        (1.0, nan)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor
    initial_correct: Tensor
    initial_total: Tensor

    def __init__(
        self, n_experiences: int, n_test_experiences: Optional[int] = None, **kwargs: Any
    ) -> None:
        _check_size("n_experiences", n_experiences)
        if n_test_experiences is not None:
            _check_size("n_test_experiences", n_test_experiences)
        super().__init__(**kwargs)
        self.n_experiences = n_experiences
        self.n_test_experiences = n_experiences if n_test_experiences is None else n_test_experiences
        shapes = {
            "correct": (self.n_experiences, self.n_test_experiences),
            "total": (self.n_experiences, self.n_test_experiences),
            "initial_correct": (self.n_test_experiences,),
            "initial_total": (self.n_test_experiences,),
        }
        # float64 counts are exact up to 2**53 samples per cell, and can also hold
        # the accuracies given to set_row (a count of 1 with a fractional "correct").
        for name, shape in shapes.items():
            self.add_state(
                name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum", persistent=True
            )

    @property
    def is_square(self) -> bool:
        """Whether test experience ``j`` belongs to training experience ``j`` (``U = T``).

        Forgetting, max forgetting, BWT and FWT are defined only then.
        """
        return self.n_experiences == self.n_test_experiences

    # ------------------------------------------------------------------ input

    def update(  # type: ignore[override]
        self, preds: Tensor, target: Tensor, trained_experience: int, test_experience: int
    ) -> None:
        """Count one batch of predictions into cell ``(trained_experience, test_experience)``.

        Args:
            preds: ``(N, C)`` floating-point scores (logits or probabilities;
                the class is their argmax over ``C``), ``(N,)`` or ``(N, 1)``
                floating-point logits of a single-output binary head (class 1
                where the logit is > 0, else 0; logits, not probabilities), or
                ``(N,)`` integer class indices.
            target: ``(N,)`` integer class indices (0 or 1 for a single logit).
                ``N = 0`` is allowed and adds nothing (the cell stays NaN if
                nothing else reaches it).
            trained_experience: row ``i``: the last experience the model was
                trained on, in ``[0, T)``.
            test_experience: column ``j``: the experience whose test data this
                batch comes from, in ``[0, U)``.

        Raises:
            ConfigError: on an index out of range, or inputs of the wrong
                shape or dtype (also: a single logit with a target other than 0
                or 1); nothing is counted then.
        """
        i = self._index(trained_experience, "trained_experience", self.n_experiences)
        j = self._index(test_experience, "test_experience", self.n_test_experiences)
        n_correct, n_total = F._count_correct(preds, target)
        self.correct[i, j] += n_correct.to(device=self.correct.device, dtype=self.correct.dtype)
        self.total[i, j] += n_total

    def update_initial(self, preds: Tensor, target: Tensor, test_experience: int) -> None:
        """Count one batch of predictions of the model *before any training* on ``test_experience``.

        These counts give :meth:`initial_accuracies`, the baseline ``b`` that
        :meth:`fwt` uses when no other is passed (GEM's accuracy of the
        initial model; Avalanche evaluates the stream before training for it).
        ``preds`` and ``target`` are read as in :meth:`update`.

        Raises:
            ConfigError: on ``test_experience`` outside ``[0, U)`` or inputs of
                the wrong shape or dtype; nothing is counted then.
        """
        j = self._index(test_experience, "test_experience", self.n_test_experiences)
        n_correct, n_total = F._count_correct(preds, target)
        self.initial_correct[j] += n_correct.to(
            device=self.initial_correct.device, dtype=self.initial_correct.dtype
        )
        self.initial_total[j] += n_total
        self._mark_changed()

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
            accuracies: ``U`` accuracies in ``[0, 1]`` (NaN for a test
                experience that was not evaluated).

        Raises:
            ConfigError: if the row is outside ``[0, T)``, ``accuracies`` does
                not have ``U`` entries, or an entry is outside ``[0, 1]``;
                nothing is changed then.
        """
        i = self._index(trained_experience, "trained_experience", self.n_experiences)
        values = F._as_accuracies(accuracies, "accuracies", self.n_test_experiences, self._describe())
        self.correct[i], self.total[i] = self._as_counts(values)
        self._mark_changed()

    def set_initial(self, accuracies: VectorLike) -> None:
        """Replace the initial model's accuracies (the baseline of :meth:`fwt`) with ones computed elsewhere.

        The counterpart of :meth:`set_row` for :meth:`update_initial`, with
        the same rules.

        Args:
            accuracies: ``U`` accuracies in ``[0, 1]`` (NaN: not evaluated).

        Raises:
            ConfigError: if ``accuracies`` does not have ``U`` entries, or an
                entry is outside ``[0, 1]``; nothing is changed then.
        """
        values = F._as_accuracies(accuracies, "accuracies", self.n_test_experiences, self._describe())
        self.initial_correct[:], self.initial_total[:] = self._as_counts(values)
        self._mark_changed()

    @classmethod
    def from_matrix(
        cls, matrix: MatrixLike, initial: Optional[VectorLike] = None, **kwargs: Any
    ) -> AccuracyMatrix:
        """A metric holding the accuracy matrix ``matrix`` (``(T, U)``, NaN: not evaluated).

        Each row goes through :meth:`set_row`, and ``initial`` (the initial
        model's ``(U,)`` accuracies, if given) through :meth:`set_initial`,
        with their rules. ``kwargs`` go to the constructor.

        Example:
            >>> AccuracyMatrix.from_matrix([[0.9, 0.2], [0.7, 0.8]]).bwt()
            tensor(-0.2000, dtype=torch.float64)
            >>> AccuracyMatrix.from_matrix([[0.9, 0.2], [0.7, 0.8]], initial=[0.1, 0.1]).fwt()
            tensor(0.1000, dtype=torch.float64)
        """
        R = F._as_matrix(matrix)
        metric = cls(int(R.shape[0]), int(R.shape[1]), **kwargs)
        for i, row in enumerate(R):
            metric.set_row(i, row)
        if initial is not None:
            metric.set_initial(initial)
        return metric

    # ----------------------------------------------------------------- output

    def compute(self) -> Tensor:
        """The accuracy matrix ``R``: float64, ``(T, U)``, NaN where nothing was evaluated.

        torchmetrics squeezes a one-cell result to a 0-d tensor; :meth:`matrix`
        does not.
        """
        return F._ratio_matrix(self.correct, self.total)

    def matrix(self) -> Tensor:
        """:meth:`compute`, always ``(T, U)``: torchmetrics squeezes a 1x1 result to a 0-d tensor."""
        return self.compute().reshape(self.n_experiences, self.n_test_experiences)

    def initial_accuracies(self) -> Tensor:
        """Accuracy of the model before any training on each test experience: float64, ``(U,)``.

        NaN where :meth:`update_initial` / :meth:`set_initial` gave nothing.
        Gathered from all processes, like :meth:`compute`.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync,
            should_unsync=self._should_unsync,
        ):
            return F._ratio_matrix(self.initial_correct, self.initial_total).clone()

    def average_accuracy(self, i: int = -1) -> Tensor:
        """Mean accuracy on test experiences ``0..i`` after training ``i``; ``-1``: the last evaluated row.

        On a non-square matrix, the mean over all test experiences. See
        :func:`cl_plugin.metrics.functional.average_accuracy`.
        """
        return F.average_accuracy(self.matrix(), i)

    def forgetting(self) -> Tensor:
        """Avalanche's stream forgetting; NaN if not square. See :func:`cl_plugin.metrics.functional.forgetting`."""
        return F.forgetting(self.matrix())

    def max_forgetting(self) -> Tensor:
        """Chaudhry et al.'s forgetting; NaN if not square. See :func:`cl_plugin.metrics.functional.max_forgetting`."""
        return F.max_forgetting(self.matrix())

    def bwt(self) -> Tensor:
        """GEM's backward transfer; NaN if not square. See :func:`cl_plugin.metrics.functional.bwt`."""
        return F.bwt(self.matrix())

    def fwt(self, baseline: Optional[VectorLike] = None) -> Tensor:
        """GEM's forward transfer over ``baseline``, shape ``(U,)``; NaN if not square.

        ``baseline=None`` (default) uses :meth:`initial_accuracies`; NaN when
        neither a baseline is passed nor any initial accuracy recorded. See
        :func:`cl_plugin.metrics.functional.fwt`.
        """
        R = self.matrix()
        return F.fwt(R, self.initial_accuracies() if baseline is None else baseline)

    # --------------------------------------------------------------- plumbing

    def _as_counts(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Accuracies (NaN: not evaluated) as (correct, total) with a weight of 1 per evaluated entry."""
        values = values.to(device=self.correct.device, dtype=self.correct.dtype)
        evaluated = ~torch.isnan(values)
        return torch.where(evaluated, values, 0.0), evaluated.to(self.correct.dtype)

    def _mark_changed(self) -> None:
        """Record a change of state made outside :meth:`update`.

        Drops the cached result and counts the change as an update, as
        torchmetrics' own wrappers do (``torchmetrics/wrappers/running.py``),
        so :meth:`compute` neither returns a stale matrix nor warns that it ran
        before any update.
        """
        self._computed = None
        self._update_count += 1

    def _describe(self) -> str:
        if self.is_square:
            return f"AccuracyMatrix(n_experiences={self.n_experiences})"
        return (
            f"AccuracyMatrix(n_experiences={self.n_experiences}, "
            f"n_test_experiences={self.n_test_experiences})"
        )

    def _index(self, value: object, name: str, size: int) -> int:
        return F._experience_index(value, name, size, f" for {self._describe()}")

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
        # torchmetrics assigns loaded states as they are; refuse a state of another
        # size before anything is assigned.
        T, U = self.n_experiences, self.n_test_experiences
        expected = {name: (T, U) for name in _STATES}
        expected.update({name: (U,) for name in _INITIAL_STATES})
        for name, shape in expected.items():
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and tuple(value.shape) != shape:
                raise StateDictMismatchError(
                    f"{self._describe()} cannot load `{prefix}{name}` of shape "
                    f"{tuple(value.shape)}: expected {shape}. {_rebuild_hint(name, value)}"
                )
        loaded = any(prefix + name in state_dict for name in _STATES)
        missing_initial = not any(prefix + name in state_dict for name in _INITIAL_STATES)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if loaded:
            if missing_initial:  # a state written before the initial accuracies existed
                for name in _INITIAL_STATES:
                    setattr(self, name, torch.zeros_like(getattr(self, name)))
            self._mark_changed()

    def extra_repr(self) -> str:
        if self.is_square:
            return f"n_experiences={self.n_experiences}"
        return f"n_experiences={self.n_experiences}, n_test_experiences={self.n_test_experiences}"


def _rebuild_hint(name: str, value: Tensor) -> str:
    """What to build to load ``value`` as state ``name``."""
    if name in _STATES and value.ndim == 2:
        return (
            f"Build the metric with n_experiences={value.shape[0]}, "
            f"n_test_experiences={value.shape[1]} to load this state."
        )
    if name in _INITIAL_STATES and value.ndim == 1:
        return f"Build the metric with n_test_experiences={value.shape[0]} to load this state."
    return "The state is damaged."
