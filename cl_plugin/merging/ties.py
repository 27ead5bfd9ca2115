"""TIES-Merging: trim, elect sign, disjoint mean.

Yadav, Tam, Choshen, Raffel, Bansal. "TIES-Merging: Resolving Interference
When Merging Models", NeurIPS 2023 (https://arxiv.org/abs/2306.01708).
Reference code: github.com/prateeky2806/ties-merging, ``src/ties_minimal.ipynb``
(``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``).

Rule, per task vector τ_t flattened over all its tensors:
1. trim: keep the entries with |τ_t| >= the k-th smallest magnitude, where
   k = d − ⌊d·top_k⌋ (so the top ``top_k`` fraction, ties included); zero the rest;
2. elect: γ = sign(Σ_t trimmed_t) per entry; entries where the sum is 0 take the
   majority sign sign(Σ_i γ_i) over the whole vector;
3. disjoint mean: the mean of the trimmed entries whose sign agrees with γ
   (0 where none does).
Default scale 0.55 (our choice between the paper's tuned λ values; tune it on
validation data).

Streaming and exact: the trim of τ_t depends on τ_t alone, and steps 2 and 3
need only the sums and counts of the kept positive and negative entries
(Σ trimmed = positive sum + negative sum). The merger keeps those four
tensors, so it returns exactly the batch result for any number of tasks. A
task vector whose kept entries would overflow a sum is refused before
anything is added.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from cl_plugin._checks import max_abs
from cl_plugin.errors import CheckpointError
from cl_plugin._packed import aligned_runs
from cl_plugin.merging._kernels import disjoint_mean, sign_balance, ties_fold_
from cl_plugin.merging.layout import ShardLayout, kth_smallest_magnitude, kth_smallest_magnitude_of
from cl_plugin.merging.base import Merger, check_fraction
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["TiesMerger", "trim_threshold"]


def trim_threshold(tv: TaskVector, top_k: float, layout: ShardLayout | None = None) -> float:
    """The magnitude at or above which TIES keeps an entry of ``tv``.

    The k-th smallest |entry| over all tensors flattened together, with
    k = d − ⌊d·top_k⌋; ``top_k = 1`` keeps everything (threshold 0). With a
    distributed ``layout``, ``tv`` holds this rank's slices and the selection
    runs over every rank's (:func:`~cl_plugin.merging.layout.kth_smallest_magnitude`,
    exact: the same value as on the whole vector).
    """
    values = list(tv.values())
    k = _trimmed(_numel(tv, values, layout), top_k)
    return kth_smallest_magnitude(values, k, _distributed(layout)) if k > 0 else 0.0


def _distributed(layout: ShardLayout | None) -> ShardLayout | None:
    return layout if layout is not None and layout.distributed else None


def _numel(names, tensors, layout: ShardLayout | None) -> int:
    """The number of entries over every rank (the global shapes when sharded)."""
    if _distributed(layout) is not None:
        return sum(layout[n].numel for n in names)
    return sum(t.numel() for t in tensors)


def _trimmed(numel: int, top_k: float) -> int:
    """k of the trim: the entries below the k-th smallest magnitude are zeroed."""
    return numel - int(numel * top_k)


@register_merger("ties")
class TiesMerger(Merger):
    """Streaming, exact TIES-Merging.

    Args:
        top_k: fraction of entries kept by magnitude per task vector, in (0, 1]
            (default 0.2, the paper's 20%).
        scale: λ for :meth:`apply_to` (default 0.55).

    State per tensor: ``pos_sum``/``neg_sum`` (float32 for 16-bit inputs) and
    ``pos_count``/``neg_count`` (int32): 4 tensors the size of the model,
    however many tasks.

    Example:
        >>> import torch
        >>> m = TiesMerger(top_k=1.0)
        >>> m.update({"w": torch.tensor([2.0, -1.0, 1.0])})
        >>> m.update({"w": torch.tensor([4.0, 3.0, -3.0])})
        >>> m.merged()["w"]
        tensor([ 3.,  3., -3.])
    """

    name = "ties"
    default_scale = 0.55
    tensor_states = {"pos_sum": "accumulate", "neg_sum": "accumulate", "pos_count": "count", "neg_count": "count"}
    summed_roles = ("pos_sum", "neg_sum")

    streams = True
    finalizes_by_tensor = True

    def __init__(self, *, top_k: float = 0.2, scale: float | None = None) -> None:
        self.top_k = check_fraction(top_k, "top_k", "TiesMerger")
        super().__init__(scale=scale)

    def options(self):
        return {"top_k": self.top_k}

    def _prepare(self, tv: TaskVector) -> None:
        # Once per update, on every rank (a collective when sharded), before the
        # overflow check and the fold, which both need it.
        self._threshold = (tv, trim_threshold(tv, self.top_k, self.layout))

    def _prepare_streamed(self, theta0, passes) -> None:
        # The same selection as trim_threshold, over τ's chunks formed twice on the fly.
        k = _trimmed(_numel(theta0, theta0.values(), self.layout), self.top_k)
        self._threshold = (None, kth_smallest_magnitude_of(passes, k, _distributed(self.layout)) if k > 0 else 0.0)

    def _trim_threshold(self, tv: TaskVector | None) -> float:
        cached = getattr(self, "_threshold", None)
        if cached is not None and cached[0] is tv:
            return cached[1]
        return trim_threshold(tv, self.top_k, self.layout)

    def _fold(self, tv: TaskVector) -> None:
        threshold = self._trim_threshold(tv)
        self._threshold = None
        for pos_sum, neg_sum, pos_count, neg_count, incoming in self._runs(tv, *self.tensor_states):
            ties_fold_(pos_sum, neg_sum, pos_count, neg_count, incoming, threshold)

    def _sums(self) -> list[Tensor]:
        return [t for role in ("pos_sum", "neg_sum") for t in self._state[role].values()]

    def _known_majority(self) -> float | None:
        """The whole vector's majority sign, counted at most once per state (see :meth:`_finalizes_by_tensor_now`).

        None for inference tensors, which keep no version counter.
        """
        sums = self._sums()
        if any(t.is_inference() for t in sums):
            return None
        # The same tensor objects (held weakly: a replaced state is freed) at the same versions:
        # every write into them bumps their version counters.
        versions = tuple(t._version for t in sums)
        known = getattr(self, "_majority", None)
        if (
            known is None
            or len(known[0]) != len(sums)
            or any(ref() is not t for ref, t in zip(known[0], sums))
            or known[1] != versions
        ):
            known = (tuple(weakref.ref(t) for t in sums), versions, self._majority_of_state())
            self._majority = known
        return known[2]

    def _finalizes_by_tensor_now(self) -> bool:
        # A tensor alone can be finalised once the whole vector's majority sign is known: it is
        # counted on first use after each change of the state (one read of the two sums; under
        # sharding one all_reduce, so every rank reads the merge in the same order, as the
        # boundary core does). Inference tensors keep no version, so the merge is then
        # finalised whole each time, which counts the sign as part of it.
        return not any(t.is_inference() for t in self._sums())

    def _majority_of_state(self) -> float:
        """sign(Σ_i γ_i) over the whole merged vector, γ = sign(pos_sum + neg_sum); a collective when sharded.

        Counted in integers (a float sum of ±1 over ~10^8 entries is inexact),
        in one read of the two sums.
        """
        names = list(self._state["pos_sum"])
        runs = aligned_runs([self._state["pos_sum"][n] for n in names], [self._state["neg_sum"][n] for n in names])
        balance = torch.tensor([sum(sign_balance(pos, neg) for pos, neg in runs)])
        layout = _distributed(self.layout)
        if layout is not None:
            layout.all_reduce_(balance)  # the majority sign is the whole vector's
        balance = int(balance)
        return float((balance > 0) - (balance < 0))

    def _finalize_one(self, name):
        return self._mean_of(name, self._known_majority())

    def _mean_of(self, name: str, majority: float) -> Tensor:
        s = self._state
        return disjoint_mean(s["pos_sum"][name], s["neg_sum"][name], s["pos_count"][name], s["neg_count"][name], majority)

    def _fold_chunk(self, first: bool, pos_sum, neg_sum, pos_count, neg_count, incoming) -> None:
        # The state starts at zero, so the first task folds as every other does.
        ties_fold_(pos_sum, neg_sum, pos_count, neg_count, incoming, self._trim_threshold(None))

    def _fold_max_abs(self, tv, keys):
        # The kept entries only, selected as ties_fold_ selects them: in the
        # sum's dtype, |x| >= threshold, positive ones into pos_sum.
        threshold = self._trim_threshold(tv)
        out = {}
        for role, n in keys:
            s = self._state[role][n]
            x = tv[n].to(s.dtype)
            keep = (x.abs() >= threshold) & ((x > 0) if role == "pos_sum" else (x < 0))
            out[(role, n)] = max_abs(s + torch.where(keep, x, 0.0))
        return out

    def _check_loaded_state(self, *, num_tasks, scalars, tensors, largest):
        # Each task adds at most one to one of the two counts of an entry, and
        # only positive (negative) values to the positive (negative) sum.
        for n in tensors["pos_count"]:
            pos, neg = tensors["pos_count"][n], tensors["neg_count"][n]
            for role, counts in (("pos_count", pos), ("neg_count", neg)):
                if counts.numel():
                    low, high = (int(v) for v in torch.aminmax(counts))
                    if low < 0 or high > num_tasks:
                        raise CheckpointError(
                            f"State entry '{role}.{n}' holds counts in [{low}, {high}]; they must lie in "
                            f"[0, num_tasks={num_tasks}]. The 'ties' merger state is corrupt."
                        )
            if pos.numel() and num_tasks < 2**30 and int((pos + neg).max()) > num_tasks:
                raise CheckpointError(
                    f"State entries 'pos_count.{n}' + 'neg_count.{n}' exceed num_tasks={num_tasks}: a task counts "
                    "an entry at most once. The 'ties' merger state is corrupt."
                )
            for role, sign in (("pos_sum", 1), ("neg_sum", -1)):
                t = tensors[role][n]
                if t.numel() and min(sign * float(v) for v in torch.aminmax(t)) < 0:
                    raise CheckpointError(
                        f"State entry '{role}.{n}' holds values of the wrong sign: it sums only "
                        f"{'positive' if role == 'pos_sum' else 'negative'} entries. The 'ties' merger state is corrupt."
                    )

    def _finalize(self):
        majority = self._known_majority()
        if majority is None:  # inference tensors; a collective when sharded, as merged() is
            majority = self._majority_of_state()
        return {n: self._mean_of(n, majority) for n in self._state["pos_sum"]}
