"""Fisher-weighted merging, streaming, and the diagonal Fisher of a model.

Matena, Raffel. "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(https://arxiv.org/abs/2111.09832). Reference code: FusionBench 0.2.33,
``fusion_bench/method/fisher_merging/fisher_merging.py::merging_with_fisher_weights``
(after github.com/yule-BUAA/MergeLM), with the defaults of
``fusion_bench_config/method/fisher_merging/fisher_merging.yaml``; the paper's
own code is github.com/mmatena/model_merging, ``model_merging/merging.py``.

Rule, in two lines: per entry, merged = Σ_t w_t F'_t τ_t / Σ_t w_t F'_t, the
task vectors averaged with their diagonal Fisher F_t as weights.
Here F'_t = F_t + ``min_fisher`` and, with ``normalize``, w_t = 1 / (‖F_t‖ +
``min_fisher``) (‖·‖ over all tensors of the task), else w_t = 1. Default
scale 1.0: θ₀ + merged is the Fisher-weighted average of the fine-tuned models.

Streaming and exact: the merger keeps the two sums Σ w_t F'_t τ_t and
Σ w_t F'_t (float32 for 16-bit inputs), so memory does not grow with the
number of tasks, and w_t depends on task t alone. (FusionBench's weights are
w_t / (T · Σ_s w_s): the factor common to all tasks cancels in the ratio.)

Where Σ F = 0. FusionBench adds ``minimal_fisher_weight = 1e-6`` to every
entry of every Fisher (our default ``min_fisher``), so the denominator is never
0 and an entry no task has information about gets the plain weighted mean;
the paper's code instead raises each Fisher to at least 1e-6
(``tf.maximum``). With ``min_fisher=0`` an entry whose sum of weighted Fishers
is 0 keeps θ₀ (merged value 0): no task weighs it.

Differences from the reference:
* merging task vectors rather than weights: Σ w F' θ_t / Σ w F' with
  θ_t = θ₀ + τ_t is θ₀ + Σ w F' τ_t / Σ w F', since the weights of each entry
  sum to 1; this avoids rounding through θ₀;
* the reference averages parameters only (``named_parameters``); here every
  floating-point tensor of the task vector that has a Fisher is merged (pass
  ``include``/``exclude`` to the task vectors to leave buffers out).

:func:`diagonal_fisher` estimates F from data. It computes the *empirical*
Fisher over batches: the mean over batches of the squared gradient of the
batch's loss, (1/B) Σ_b (∂L_b/∂θ)², one backward pass per batch. With batches
of one example this is the per-example empirical Fisher; larger batches
square the mean gradient of the batch, a cheaper and coarser estimate (as
FusionBench's, which squares the per-batch gradient of
Σ_x Σ_y √p(y|x) log p(y|x)). The paper's Fisher takes the expectation over the
model's predicted labels per example instead of the observed ones.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_bool, max_abs, tensor_norm
from cl_plugin.errors import CheckpointError, ConfigError, NoMatchingModulesError, NonFiniteError, did_you_mean, preview
from cl_plugin.merging.base import Merger, accumulate_dtype
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["FisherMerger", "diagonal_fisher", "fisher_task_weight"]

#: FusionBench's ``minimal_fisher_weight``.
DEFAULT_MIN_FISHER = 1e-6


def fisher_task_weight(fisher: Mapping[str, Tensor], min_fisher: float, normalize: bool) -> float:
    """w_t: ``1 / (‖F‖ + min_fisher)`` over all tensors of ``fisher`` if ``normalize``, else 1.0.

    A Fisher that is 0 everywhere with ``min_fisher=0`` gets weight 1.0 (it
    contributes nothing either way).
    """
    if not normalize:
        return 1.0
    norms = [tensor_norm(f) for f in fisher.values()]
    squared = sum(v * v for v in norms)
    norm = math.sqrt(squared) if math.isfinite(squared) else math.hypot(*norms)
    total = norm + min_fisher
    return 1.0 / total if total > 0 else 1.0


@register_merger("fisher")
class FisherMerger(Merger):
    """Streaming Fisher-weighted averaging of task vectors.

    Args:
        normalize: weigh each task by 1 / (‖F_t‖ + ``min_fisher``), so that a
            task's overall Fisher scale does not matter (default True, as
            FusionBench and the paper).
        min_fisher: added to every Fisher entry, >= 0 (default 1e-6, FusionBench's
            ``minimal_fisher_weight``).
        scale: λ for :meth:`apply_to` (default 1.0).

    Raises:
        ConfigError: ``normalize`` is not a bool, ``min_fisher`` is not a finite real >= 0.

    ``update(task_vector, fisher=F)`` needs the task's diagonal Fisher: one
    non-negative, finite floating-point tensor per name of the task vector, of
    the same shape (e.g. from :func:`diagonal_fisher`). Without it, or with a
    negative or non-finite entry, it raises before anything changes.

    State: ``num.<name>`` = Σ_t w_t F'_t τ_t and ``den.<name>`` = Σ_t w_t F'_t
    (float32 for 16-bit inputs, else the input dtype).

    Example:
        >>> import torch
        >>> m = FisherMerger(normalize=False, min_fisher=0.0)
        >>> m.update({"w": torch.tensor([1.0, 4.0])}, fisher={"w": torch.tensor([3.0, 0.0])})
        >>> m.update({"w": torch.tensor([3.0, 2.0])}, fisher={"w": torch.tensor([1.0, 1.0])})
        >>> m.merged()["w"]  # (3·1 + 1·3) / 4 = 1.5; the first task has no Fisher on entry 1
        tensor([1.5000, 2.0000])
    """

    name = "fisher"
    default_scale = 1.0
    tensor_states = {"num": "accumulate", "den": "accumulate"}
    summed_roles = ("num", "den")
    requires_fisher = True

    def __init__(self, *, normalize: bool = True, min_fisher: float = DEFAULT_MIN_FISHER, scale: float | None = None) -> None:
        self.normalize = check_bool(normalize, "normalize", "FisherMerger")
        if (
            isinstance(min_fisher, bool)
            or not isinstance(min_fisher, numbers.Real)
            or not math.isfinite(float(min_fisher))
            or min_fisher < 0
        ):
            raise ConfigError(f"`min_fisher` must be a finite real number >= 0, got {min_fisher!r} (FisherMerger).")
        self.min_fisher = float(min_fisher)
        super().__init__(scale=scale)

    def options(self):
        return {"normalize": self.normalize, "min_fisher": self.min_fisher}

    def _weighted(self, f: Tensor, weight: float, dtype: torch.dtype) -> Tensor:
        """w · (F + min_fisher) in the state's dtype (a new tensor)."""
        out = f.to(dtype=dtype, copy=True)
        if self.min_fisher:
            out.add_(self.min_fisher)
        if weight != 1.0:
            out.mul_(weight)
        return out

    def _fold(self, tv: TaskVector, *, fisher: Mapping[str, Tensor]) -> None:
        weight = fisher_task_weight(fisher, self.min_fisher, self.normalize)
        num, den = self._state["num"], self._state["den"]
        for n, t in tv.items():
            wf = self._weighted(fisher[n], weight, den[n].dtype)
            den[n].add_(wf)
            num[n].addcmul_(wf, t.to(num[n].dtype))

    def _incoming_max_abs(self, tv, largest, *, fisher):
        weight = fisher_task_weight(fisher, self.min_fisher, self.normalize)
        slack = 1.0 + 8.0 * torch.finfo(torch.float32).eps  # the roundings of w·(F + min), then of ·τ
        den = {n: weight * (max_abs(fisher[n]) + self.min_fisher) * slack for n in tv}
        return {"den": den, "num": {n: den[n] * largest[n] * slack for n in tv}}

    def _fold_max_abs(self, tv, keys, *, fisher):
        weight = fisher_task_weight(fisher, self.min_fisher, self.normalize)
        out = {}
        for role, n in keys:
            s = self._state[role][n]
            wf = self._weighted(fisher[n], weight, s.dtype)
            out[(role, n)] = max_abs(s + wf if role == "den" else torch.addcmul(s, wf, tv[n].to(s.dtype)))
        return out

    def _check_loaded_state(self, *, num_tasks, scalars, tensors, largest):
        for n, den in tensors["den"].items():
            if den.numel() and float(den.min()) < 0:
                raise CheckpointError(
                    f"State entry 'den.{n}' holds negative values; it sums weighted Fishers, which are >= 0. "
                    "The 'fisher' merger state is corrupt."
                )

    def _finalize(self):
        out = {}
        for n, den in self._state["den"].items():
            num = self._state["num"][n]
            out[n] = torch.where(den > 0, num / den, torch.zeros_like(num))
        return out


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], Tensor],
    *,
    names: Iterable[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, Tensor]:
    """The empirical diagonal Fisher of ``model``'s parameters: the mean over batches of the squared gradient of the loss.

    F[n] = (1/B) Σ_b (∂L_b/∂θ_n)² with L_b = ``loss_fn(model, batch)`` for each
    of the first ``max_batches`` batches (all when None). With batches of one
    example this is the per-example empirical Fisher; see the module docstring.

    The gradients are taken with :func:`torch.autograd.grad`, so the
    parameters' ``.grad`` are left as they were, and the model's mode is not
    changed: call ``model.eval()`` first if dropout should be off.

    Args:
        model: the model, on the device ``loss_fn`` puts the batches on.
        batches: an iterable of batches, each passed to ``loss_fn`` as it is.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]), b[1])``.
        names: parameter names to compute (default: every floating-point
            parameter that requires grad; a tied parameter once, under its first name).
        max_batches: the number of batches to use, >= 1 (default all).

    Returns:
        name -> F, detached, on the parameter's device, in float32 for 16-bit
        parameters (else the parameter's dtype), in ``named_parameters`` order.
        A parameter the loss does not depend on gets zeros.

    Raises:
        ConfigError: ``max_batches`` is not a positive integer, ``batches`` is
            empty, ``loss_fn`` does not return a scalar tensor that depends on
            the parameters, or ``names`` is empty.
        NoMatchingModulesError: a name in ``names`` is not a floating-point
            parameter of ``model`` (the available names are listed).
        NonFiniteError: a batch's loss or gradient is NaN or infinite.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1
    ):
        raise ConfigError(f"`max_batches` must be a positive integer or None, got {max_batches!r} (diagonal_fisher).")
    available = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if names is None:
        params = {n: p for n, p in available.items() if p.requires_grad}
    else:
        wanted = list(names)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise NoMatchingModulesError(
                f"diagonal_fisher: {preview(unknown)} "
                f"{'is not a floating-point parameter' if len(unknown) == 1 else 'are not floating-point parameters'} "
                f"of the model.{did_you_mean(unknown[0], available)} It has {preview(list(available), 10)}."
            )
        params = {n: available[n] for n in available if n in set(wanted)}
    if not params:
        raise ConfigError("diagonal_fisher: no parameter to compute (pass `names`, or leave requires_grad on).")
    sums = {n: torch.zeros(p.shape, dtype=accumulate_dtype(p.dtype), device=p.device) for n, p in params.items()}
    tensors = list(params.values())
    count = 0
    for batch in batches:
        if max_batches is not None and count >= max_batches:
            break
        loss = loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ConfigError(f"diagonal_fisher: `loss_fn` must return a scalar tensor (the batch's loss), got {got}.")
        if not loss.requires_grad:
            raise ConfigError(
                "diagonal_fisher: the loss does not depend on any parameter that requires grad; "
                "do not compute it under torch.no_grad()."
            )
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteError(f"diagonal_fisher: the loss of batch {count} is {float(loss.detach())}.")
        grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
        with torch.no_grad():
            for (n, acc), g in zip(sums.items(), grads):
                if g is not None:
                    acc.addcmul_(g.to(acc.dtype), g.to(acc.dtype))
        count += 1
    if count == 0:
        raise ConfigError("diagonal_fisher: `batches` yielded no batch; pass at least one.")
    out = {}
    for n, acc in sums.items():
        acc.div_(count)
        if not bool(torch.isfinite(acc).all()):
            raise NonFiniteError(f"diagonal_fisher: the Fisher of {n!r} is not finite (a gradient overflowed).")
        out[n] = acc
    return out
