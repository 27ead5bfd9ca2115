"""OPCM: orthogonal projection-based continual merging.

Tang, Li, Shen, Hu, Chen, Tao. "Merging Models on the Fly Without Retraining:
A Sequential Approach to Scalable Continual Model Merging", 2025
(https://arxiv.org/abs/2501.09522). Reference code: FusionBench,
``fusion_bench/method/opcm/opcm.py::OPCMForCLIP``.

Rule. The first task vector is the merged one, λ₁ = 1. For each new τ_t:
* every 2-D tensor: with the SVD of the merged M = U Σ Vᵀ and r the first index
  where Σ_{i≤r} σ_i / Σ_i σ_i > ``alpha``, project P = Uᵀ τ V, zero P's
  diagonal and its top-left r×r block, and set M' = λ_{t−1}·M + U P Vᵀ;
* every other tensor: M' = λ_{t−1}·M + τ;
then with n̄ the mean of ‖τ_1‖, …, ‖τ_t‖ (norms over the whole task vector),
λ_t = ‖M'‖ / n̄ and the merged vector becomes M' · n̄ / ‖M'‖, so its norm stays
the mean task-vector norm. Default scale 1.0.

Differences from the reference:
* the reduced SVD (``full_matrices=False``). Everything the projection
  removes lies in the first min(m, n) singular directions, so
  U P Vᵀ = τ − U_k (mask ⊙ U_kᵀ τ V_k) V_kᵀ with the thin factors gives the
  same result without the m×m and n×n factors of the full SVD;
* "2-D tensor" stands for the reference's ``nn.Linear`` weight: a state dict
  does not say which module a tensor belongs to. A 2-D embedding table is
  therefore projected here and added whole in the reference;
* the arithmetic runs on task vectors, not on θ₀ + τ, which avoids the
  reference's rounding through the weights;
* a merged 2-D tensor that is still all zero (a layer no task changed) takes
  τ unprojected: its SVD has no directions to protect;
* λ and the norm statistics are part of :meth:`state_dict`, so a stream can
  be resumed;
* a wide weight (m < n) is projected through its transpose, which gives the
  same result (the mask is symmetric) from a faster SVD;
* an update whose result is not finite (finite task vectors with entries near
  the dtype's maximum) raises :class:`~cl_plugin.errors.NonFiniteError` and
  leaves the state as it was: it is built in new buffers and checked before
  the swap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cl_plugin._checks import is_finite, max_abs, tensor_norm
from cl_plugin._packed import packed_like
from cl_plugin.errors import CheckpointError, ConfigError, NonFiniteError
from cl_plugin.merging.base import Merger, check_fraction
import cl_plugin.merging.layout as layouts
from cl_plugin.merging.layout import ShardLayout
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector, norm_of_norms

__all__ = ["OPCMMerger", "project_out_merged_directions"]


def split_rank(singular_values: Tensor, alpha: float) -> int:
    """The first index r where the cumulative share of ``singular_values`` exceeds ``alpha`` (0 if all are 0)."""
    total = singular_values.sum()
    if float(total) <= 0.0:
        return 0
    exceeds = (singular_values.cumsum(0) / total) > alpha
    return int(exceeds.float().argmax())


def project_out_merged_directions(merged: Tensor, task: Tensor, alpha: float) -> Tensor:
    """The part of ``task`` that OPCM adds to the 2-D ``merged`` (shapes m×n, float32/float64).

    Returns τ − U_k (mask ⊙ U_kᵀ τ V_k) V_kᵀ, where ``U_k, V_k`` are the thin
    singular vectors of ``merged`` and ``mask`` selects the diagonal and the
    top-left r×r block (r from :func:`split_rank`).
    """
    if merged.shape[0] < merged.shape[1]:
        # LAPACK's SVD of a wide matrix was measured about 3x slower than of its
        # transpose. Mᵀ = V Σ Uᵀ and the mask is symmetric, so the tall problem
        # gives the same result, transposed.
        return project_out_merged_directions(merged.mT, task.mT, alpha).mT
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = split_rank(s, alpha)
    projected = u.mT @ task @ vh.mT
    removed = torch.zeros_like(projected)
    removed.diagonal().copy_(projected.diagonal())
    removed[:r, :r] = projected[:r, :r]
    return task - u @ removed @ vh


def _projection_cost(shape: tuple[int, ...]) -> float:
    """The relative cost of one tensor's update on its owner: an SVD for a matrix, a copy otherwise."""
    if len(shape) == 2:
        m, n = shape
        return float(m) * n * min(m, n)
    return float(math.prod(shape))


def _combined_norm(norms: list[float]) -> float:
    """The norm of a vector made of tensors with these norms, combined as :meth:`TaskVector.norm` does."""
    squared = 0.0
    for value in norms:
        squared += value * value
    return math.sqrt(squared) if math.isfinite(squared) else math.hypot(*norms)


#: Tensors exchanged between ranks with at most this many elements go in batches (:meth:`OPCMMerger._fold_sharded`).
_BATCHED_NUMEL = 1 << 18


def _batches(names: list[str], numel: Callable[[str], int], limit: int) -> list[list[str]]:
    """``names`` in order, cut into consecutive batches of at most ``limit`` elements (a larger name alone)."""
    out: list[list[str]] = []
    total = 0
    for n in names:
        if not out or total + numel(n) > limit:
            out.append([])
            total = 0
        out[-1].append(n)
        total += numel(n)
    return out


def _outcome(in_place: bool) -> str:
    """What an error left behind: nothing, or (an update written in place) a merger that refuses to be used."""
    if in_place:
        return (
            "The update was being written in place, so the merger now refuses to be used or saved: resume from "
            "the last checkpoint."
        )
    return "Nothing was changed."


@register_merger("opcm")
class OPCMMerger(Merger):
    """Streaming OPCM.

    Args:
        alpha: share of the merged vector's singular-value mass whose leading
            directions are protected, in [0, 1) (default 0.5, as in the paper).
        scale: λ for :meth:`apply_to` (default 1.0).

    State: ``merged.<name>`` (float32 for 16-bit inputs), and the scalars
    ``lambda_t`` (λ of the last update) and ``norm_sum`` (Σ_t ‖τ_t‖).

    Example:
        >>> import torch
        >>> m = OPCMMerger()
        >>> m.update({"w": torch.tensor([[3.0, 0.0], [0.0, 1.0]])})
        >>> # The new (0, 0) entry is on a singular direction of the merged
        >>> # vector (P's diagonal) and is dropped; the off-diagonal part is added,
        >>> # then the sum is rescaled to the mean task-vector norm (√10 + 3) / 2.
        >>> m.update({"w": torch.tensor([[1.0, 2.0], [2.0, 0.0]])})
        >>> m.merged()["w"]
        tensor([[2.1787, 1.4525],
                [1.4525, 0.7262]])
    """

    name = "opcm"
    default_scale = 1.0
    tensor_states = {"merged": "accumulate"}
    merged_role = "merged"
    scalar_states = {"lambda_t": 1.0, "norm_sum": 0.0}
    whole_matrix_cost = staticmethod(_projection_cost)

    def __init__(self, *, alpha: float = 0.5, scale: float | None = None) -> None:
        self.alpha = check_fraction(alpha, "alpha", "OPCMMerger", low=0.0, high=1.0, low_open=False)
        if self.alpha >= 1.0:
            raise ConfigError(f"`alpha` must be in [0, 1), got {alpha!r} (OPCMMerger): alpha=1 would protect no direction.")
        super().__init__(scale=scale)

    def options(self):
        return {"alpha": self.alpha}


    @property
    def lambda_t(self) -> float:
        """λ_t of the last update: ‖M'‖ / mean task-vector norm (1.0 after the first task)."""
        return float(self._scalars["lambda_t"])

    streams_by_tensor = True

    def streamed_bounds(self, largest):
        # Written in place, an update cannot be undone: it streams only when no entry can
        # overflow, before or after the rescale. The projection is orthogonal, so |added| <=
        # ‖τ_n‖ <= √numel · max|τ_n|, and |λ·M + added| <= λ·max|M| + that; rescaled, no entry
        # exceeds the mean task-vector norm, at most (Σ_t ‖τ_t‖ + ‖τ‖) / t. Half the dtype's
        # maximum leaves room for rounding. Otherwise the update runs on the whole τ, which
        # checks before the swap. Sharded, each rank bounds ‖τ‖ from its own maxima times
        # the number of ranks, and the ranks agree (ContinualMerge.fold_in_place).
        if not self.num_tasks:
            return {}
        previous_lambda = float(self._scalars["lambda_t"])
        layout = self.layout if self.layout is not None and self.layout.distributed else None
        squares = 0.0
        for n, value in largest.items():
            m = self._state["merged"][n]
            numel = layout[n].numel if layout is not None else m.numel()
            limit = torch.finfo(m.dtype).max / 2
            if not math.sqrt(numel) * value * 1.01 + previous_lambda * max_abs(m) < limit:
                return None
            squares += numel * value * value
        ranks = layout.world if layout is not None else 1
        mean_bound = (float(self._scalars["norm_sum"]) + math.sqrt(ranks * squares)) / (self.num_tasks + 1) * 1.01
        if not all(mean_bound < torch.finfo(m.dtype).max / 2 for m in self._state["merged"].values()):
            return None
        return {}

    def _fold(self, tv: TaskVector) -> None:
        layout = self.layout
        if layout is not None and layout.distributed:
            self._fold_sharded(tv, layout)
            return
        if self._copy_first_task(tv):
            self._scalars.update(lambda_t=1.0, norm_sum=tv.norm())
            return
        self._fold_unsharded(tv, tv.norm(), in_place=False)

    def _fold_difference(self, difference) -> None:
        layout = self.layout
        if layout is not None and layout.distributed:
            self._fold_sharded(difference, layout, in_place=True)
        elif not self.num_tasks:
            norms = []
            for n, m in self._state["merged"].items():
                task = difference[n]
                norms.append(tensor_norm(task))
                m.copy_(task)
            self._scalars.update(lambda_t=1.0, norm_sum=norm_of_norms(norms))
        else:
            self._fold_unsharded(difference, None, in_place=True)

    def _fold_unsharded(self, tv, norm: float | None, *, in_place: bool) -> None:
        """A later task's update on whole tensors; ``norm`` = ‖τ‖ (None: taken tensor by tensor on the way)."""
        merged = self._state["merged"]
        previous_lambda = float(self._scalars["lambda_t"])
        # Unless in place, built into new buffers and swapped in at the end, so a failure
        # midway (an SVD that does not converge) leaves the previous state intact. One flat
        # buffer per dtype and device rather than one tensor per name: a block that large is
        # mapped and unmapped as a whole, where many layer-sized blocks were measured to stay
        # in glibc's heap after the swap and grow the peak by one model copy over 10 tasks.
        new_merged = merged if in_place else packed_like(merged, fill=None)
        norms, task_norms = [], []
        for n in tv:
            t = tv[n]
            if norm is None:
                task_norms.append(tensor_norm(t))
            m = merged[n]
            task = t.to(m.dtype)
            if m.dim() == 2 and bool(m.any()):
                added = project_out_merged_directions(m, task, self.alpha)
            else:
                added = task
            new = new_merged[n]
            torch.add(added, m, alpha=previous_lambda, out=new)
            del added, t, task
            # Finite task vectors can still overflow here (entries near the
            # dtype's maximum, a large λ): refuse before the swap.
            norms.append(tensor_norm(new))
            if not math.isfinite(norms[-1]):
                raise self._overflow(n, new.dtype, in_place)
        if norm is None:
            norm = norm_of_norms(task_norms)
        norm_sum = float(self._scalars["norm_sum"]) + norm
        mean_norm = norm_sum / (self.num_tasks + 1)
        merged_norm = _combined_norm(norms)
        if merged_norm > 0.0:
            factor = mean_norm / merged_norm
            self._check_factor(factor, new_merged, merged_norm, mean_norm, in_place)
            for t in new_merged.values():
                t.mul_(factor)
            # Rescaled, no entry exceeds the mean norm (up to rounding): only a
            # mean norm near the dtype's maximum can overflow.
            for n, t in new_merged.items():
                if mean_norm * 1.001 >= torch.finfo(t.dtype).max and not is_finite(t):
                    raise self._overflow(n, t.dtype, in_place)
        self._state["merged"] = new_merged
        self._scalars.update(lambda_t=merged_norm / mean_norm if mean_norm > 0 else 0.0, norm_sum=norm_sum)

    def _fold_sharded(self, tv: TaskVector, layout: ShardLayout, *, in_place: bool = False) -> None:
        """The same update on this rank's slices: each tensor has an owner rank that works on it whole.

        The owner projects and adds exactly as :meth:`_fold` does on the whole
        tensor and computes its norms. A tensor the owner holds whole (DDP
        places matrices so) needs no communication; small ones are made whole
        on every rank in batches of bucketed broadcasts, the owner's result
        shared back the same way; the others are gathered to the owner and
        their new rows scattered back, in rounds. The norms of every tensor
        are then summed over the ranks (each comes from one owner, the others
        add zero: exact) and combined in the unsharded order, so every rank
        computes the same λ_t and the merge is bit-identical to the unsharded
        one. Owners balance the SVD cost. ``in_place``: the new merged slices
        are written over the old ones (no second copy of the state), and
        ``tv`` is read one tensor at a time.
        """
        merged = self._state["merged"]
        names = list(tv)
        index = {n: i for i, n in enumerate(names)}
        cost = {n: self.whole_matrix_cost(layout[n].shape) for n in names}
        owners = layout.owners(cost)
        first = self.num_tasks == 0
        previous_lambda = float(self._scalars["lambda_t"])
        task_norms = torch.zeros(len(names), dtype=torch.float64)
        new_norms = torch.zeros(len(names), dtype=torch.float64)
        failed = torch.zeros(len(names), dtype=torch.float64)
        new_merged = None if first else merged if in_place else packed_like(merged, fill=None)

        def project(n: str, whole_task: Tensor, whole_merged: Tensor | None) -> Tensor | None:
            """The owner's work on tensor ``n``, exactly as :meth:`_fold` does it; the new merged tensor."""
            i = index[n]
            task_norms[i] = tensor_norm(whole_task)
            if first:
                return None
            try:
                task = whole_task.to(whole_merged.dtype)
                if whole_merged.dim() == 2 and bool(whole_merged.any()):
                    added = project_out_merged_directions(whole_merged, task, self.alpha)
                else:
                    added = task
                new = torch.add(added, whole_merged, alpha=previous_lambda)
                new_norms[i] = tensor_norm(new)
                failed[i] = 0.0 if math.isfinite(float(new_norms[i])) else 1.0
            except Exception:  # noqa: BLE001 - every rank must reach the collectives below
                failed[i] = 2.0
            if failed[i]:
                new = torch.zeros(layout[n].shape, dtype=merged[n].dtype, device=merged[n].device)
            return new

        # Tensors the owner holds whole (DDP places matrices so) need no collective: they come
        # last, so the ones that do are exchanged while the ranks are still in step. Small ones
        # (biases, norms) are exchanged in batches, a few bucketed broadcasts per batch instead of
        # three collectives per tensor.
        alone = {n: r for n, r in owners.items() if layout.holds_whole(n, r)}
        small = [n for n in names if n not in alone and layout[n].numel <= _BATCHED_NUMEL]
        for batch in _batches(small, lambda n: layout[n].numel, layouts.BROADCAST_BUCKET_NUMEL):
            whole_tasks = layout.made_whole({n: tv[n] for n in batch})
            whole_merged = None if first else layout.made_whole({n: merged[n] for n in batch})
            results = {
                n: project(n, whole_tasks[n].view(layout[n].shape), None if first else whole_merged[n].view(layout[n].shape))
                for n in batch
                if owners[n] == layout.rank
            }
            del whole_tasks, whole_merged
            if not first:
                new = {
                    n: results[n].reshape(-1) if n in results else merged[n].new_empty(layout[n].numel) for n in batch
                }
                layout.share_from_owners(new, {n: owners[n] for n in batch})
                for n in batch:
                    new_merged[n].copy_(new[n][layout[n].start : layout[n].stop])
            del results
        batched = set(small)
        exchanged = {n: r for n, r in owners.items() if n not in alone and n not in batched}
        # In each round every rank projects one of its tensors while the others project theirs.
        for group in layout.rounds(exchanged, cost) + layout.rounds(alone, cost):
            gathered = {
                n: (layout.gather_whole(n, tv[n], owners[n]), None if first else layout.gather_whole(n, merged[n], owners[n]))
                for n in group
            }
            mine = [n for n in group if owners[n] == layout.rank]
            results = {n: project(n, *gathered.pop(n)) for n in mine}
            del gathered
            if not first:
                for n in group:
                    layout.scatter_slices(n, results.get(n), owners[n], new_merged[n])
            del results
        for values in (task_norms, new_norms, failed):
            layout.all_reduce_(values)
        bad = [(names[i], int(v)) for i, v in enumerate(failed.tolist()) if v]
        if bad:
            name, kind = bad[0]
            if kind == 1:
                raise self._overflow(name, merged[name].dtype, in_place)
            raise NonFiniteError(
                f"'opcm' merger, task {self.num_tasks + 1}: the projection of tensor {name!r} failed on its owner "
                f"rank {owners[name]} (e.g. an SVD that did not converge). {_outcome(in_place)}"
            )
        norm = _combined_norm(task_norms.tolist())
        if first:
            for n, t in tv.items():
                merged[n].copy_(t)
            self._scalars.update(lambda_t=1.0, norm_sum=norm)
            return
        norm_sum = float(self._scalars["norm_sum"]) + norm
        mean_norm = norm_sum / (self.num_tasks + 1)
        merged_norm = _combined_norm(new_norms.tolist())
        if merged_norm > 0.0:
            factor = mean_norm / merged_norm
            self._check_factor(factor, new_merged, merged_norm, mean_norm, in_place)
            for t in new_merged.values():
                t.mul_(factor)
            overflowed = torch.tensor(
                [float(mean_norm * 1.001 >= torch.finfo(t.dtype).max and not is_finite(t)) for t in new_merged.values()]
            )
            layout.all_reduce_(overflowed)
            if bool(overflowed.any()):
                name = names[int(overflowed.nonzero()[0])]
                raise self._overflow(name, new_merged[name].dtype, in_place)
        self._state["merged"] = new_merged
        self._scalars.update(lambda_t=merged_norm / mean_norm if mean_norm > 0 else 0.0, norm_sum=norm_sum)

    def _overflow(self, name: str, dtype: torch.dtype, in_place: bool = False) -> NonFiniteError:
        return NonFiniteError(
            f"'opcm' merger, task {self.num_tasks + 1}: the update of tensor {name!r} overflows "
            f"{str(dtype).removeprefix('torch.')}: the task vector is finite, but λ·merged + τ is not. "
            f"{_outcome(in_place)} Scale the task vectors down, or merge in float64 from the first task "
            "(task_vector.to(dtype=torch.float64))."
        )

    def _check_factor(self, factor: float, merged, merged_norm: float, mean_norm: float, in_place: bool) -> None:
        """Refuse a rescale whose factor a dtype of the state cannot hold: 0 · inf would write NaN unnoticed."""
        for t in merged.values():
            if not factor < torch.finfo(t.dtype).max:
                raise NonFiniteError(
                    f"'opcm' merger, task {self.num_tasks + 1}: the merged vector's norm ({merged_norm:.3g}) is too "
                    f"small against the mean task-vector norm ({mean_norm:.3g}) to rescale it in "
                    f"{str(t.dtype).removeprefix('torch.')} (factor {factor:.3g}): the update nearly cancels the merge. "
                    f"{_outcome(in_place)} Merge in float64 from the first task (task_vector.to(dtype=torch.float64))."
                )

    def _check_loaded_state(self, *, num_tasks, scalars, tensors, largest):
        for key in ("lambda_t", "norm_sum"):
            if scalars[key] < 0:
                raise CheckpointError(
                    f"State entry {key!r} must be >= 0, got {scalars[key]!r}; the 'opcm' merger state is corrupt."
                )
        norm_sum = scalars["norm_sum"]
        if num_tasks == 0 and norm_sum != 0:
            raise CheckpointError(
                f"State entry 'norm_sum' is {norm_sum!r} with num_tasks=0: it sums the folded task vectors' "
                "norms, so it must be 0. The 'opcm' merger state is corrupt."
            )
        if num_tasks > 0 and norm_sum == 0 and any(v > 0 for v in largest["merged"].values()):
            raise CheckpointError(
                "State entry 'norm_sum' is 0, so every folded task vector was zero, but the merged tensors are "
                "not. The 'opcm' merger state is corrupt."
            )

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["merged"].items()}

