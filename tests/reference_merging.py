"""Batch reference implementations of the merging rules, written from the papers.

Each function takes the whole list of task vectors at once, stacks them, and
applies the method's rule directly, with no streaming and no attention to
speed. The tests compare the streaming mergers of :mod:`cl_plugin.merging`
against these.

Conventions: a task vector is a mapping of name to tensor; every function
returns a plain dict in the first task vector's name order. "Flattened" means
all tensors of one task vector concatenated in that order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

TaskVectors = Sequence[Mapping[str, Tensor]]


def _names(task_vectors: TaskVectors) -> list[str]:
    return list(task_vectors[0])


def _stack(task_vectors: TaskVectors, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """The tensors called ``name``, one per task, stacked on a new first axis."""
    return torch.stack([tv[name].to(dtype) if dtype else tv[name] for tv in task_vectors])


def _flatten(tv: Mapping[str, Tensor], names: list[str], dtype: torch.dtype) -> Tensor:
    return torch.cat([tv[n].reshape(-1).to(dtype) for n in names])


def _unflatten(flat: Tensor, like: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    out, start = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = flat[start : start + size].reshape(like[n].shape)
        start += size
    return out


def _sum_in_task_order(stacked: Tensor) -> Tensor:
    """Σ over the first axis, adding one task after the other (the order a stream sees)."""
    total = torch.zeros_like(stacked[0])
    for row in stacked:
        total = total + row
    return total


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# -- MagMax (Marczak et al., ECCV 2024) ---------------------------------------------
def reference_magmax(task_vectors: TaskVectors) -> dict[str, Tensor]:
    """Per entry, the value of the task with the largest |value|; ties go to the later task."""
    out = {}
    for n in _names(task_vectors):
        stacked = _stack(task_vectors, n)
        # argmax returns the first maximum; flipping the task axis makes it the last one.
        last_first = torch.flip(stacked.abs(), dims=[0])
        winner = stacked.shape[0] - 1 - torch.argmax(last_first, dim=0)
        out[n] = torch.gather(stacked, 0, winner.unsqueeze(0)).squeeze(0)
    return out


# -- Random selection (MagMax paper's baseline) -----------------------------------------
def reference_random_sources(task_vectors: TaskVectors, seed: int) -> dict[str, Tensor]:
    """The index of the task each entry comes from, under cl-plugin's seeding contract.

    The contract (``cl_plugin.merging.random_selection``): the t-th task
    (0-based, t >= 1) draws one uniform number per entry of its flattened task
    vector from a generator seeded with ``task_seed(seed, t)``, and its value
    replaces the current one where the number is below 1/(t+1). Written in
    batch form: each entry comes from the last task whose draw was a success,
    or from task 0 when none was.
    """
    from cl_plugin.merging.random_selection import task_seed

    names = _names(task_vectors)
    d = sum(task_vectors[0][n].numel() for n in names)
    source = torch.zeros(d, dtype=torch.long)
    for t in range(1, len(task_vectors)):
        generator = torch.Generator().manual_seed(task_seed(seed, t))
        draws = torch.rand(d, generator=generator)
        source[draws < 1.0 / (t + 1)] = t
    return _unflatten(source, task_vectors[0], names)


def reference_random(task_vectors: TaskVectors, seed: int) -> dict[str, Tensor]:
    """Per entry, the value of the task picked by :func:`reference_random_sources`."""
    sources = reference_random_sources(task_vectors, seed)
    out = {}
    for n, src in sources.items():
        stacked = _stack(task_vectors, n)
        out[n] = torch.gather(stacked, 0, src.unsqueeze(0)).squeeze(0)
    return out


# -- Task arithmetic (Ilharco et al., ICLR 2023) and averaging -----------------------------
def reference_task_arithmetic(task_vectors: TaskVectors) -> dict[str, Tensor]:
    """Σ_t τ_t, computed in float64."""
    return {n: _stack(task_vectors, n, torch.float64).sum(dim=0) for n in _names(task_vectors)}


def reference_average(task_vectors: TaskVectors) -> dict[str, Tensor]:
    """(1/T) Σ_t τ_t, computed in float64."""
    return {n: _stack(task_vectors, n, torch.float64).mean(dim=0) for n in _names(task_vectors)}


# -- TIES-Merging (Yadav et al., NeurIPS 2023) -------------------------------------------------
def reference_ties(task_vectors: TaskVectors, top_k: float = 0.2) -> dict[str, Tensor]:
    """Trim each flattened task vector, elect signs, take the disjoint mean.

    1. trim: with d entries and k = d − ⌊d·top_k⌋, the threshold is the k-th
       smallest |x| of that task vector; entries with |x| >= threshold stay;
    2. elect: γ = sign(Σ_t trimmed_t); entries where that sum is 0 take the sign
       of Σ γ over the whole vector (the majority sign);
    3. disjoint mean: mean of the trimmed entries whose sign agrees with γ
       (x > 0 where γ > 0, x < 0 otherwise); 0 where none does.

    Sums run in task order in the accumulation dtype (float32 for 16-bit
    inputs), so the result is comparable bit for bit with a stream.
    """
    names = _names(task_vectors)
    dtype = _accumulate_dtype(task_vectors[0][names[0]].dtype)
    stacked = torch.stack([_flatten(tv, names, dtype) for tv in task_vectors])  # (T, d)
    n_tasks, d = stacked.shape

    k = d - math.floor(d * top_k)
    trimmed = torch.zeros_like(stacked)
    for t in range(n_tasks):
        magnitudes = stacked[t].abs()
        threshold = torch.kthvalue(magnitudes, k).values if k > 0 else torch.tensor(0.0, dtype=dtype)
        trimmed[t] = torch.where(magnitudes >= threshold, stacked[t], torch.zeros_like(stacked[t]))

    elected = torch.sign(_sum_in_task_order(trimmed))
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority

    agrees = torch.where(elected > 0, trimmed > 0, trimmed < 0)  # (T, d)
    kept_sum = _sum_in_task_order(trimmed * agrees)
    kept_count = agrees.sum(dim=0)
    merged = kept_sum / kept_count.clamp(min=1)
    return _unflatten(merged, task_vectors[0], names)


# -- OPCM (Tang et al., 2025) -----------------------------------------------------------------
def _norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def split_rank_reference(singular_values: Tensor, alpha: float) -> int:
    """The first index r at which Σ_{i<=r} σ_i / Σ_i σ_i exceeds ``alpha``."""
    share = singular_values.cumsum(0) / singular_values.sum()
    return int(torch.nonzero(share > alpha)[0])


def reference_opcm_added(merged: Tensor, task: Tensor, alpha: float) -> Tensor:
    """What OPCM adds to the 2-D ``merged`` for the new ``task``, with the FULL SVD.

    M = U Σ Vᵀ with square U (m×m) and V (n×n); P = Uᵀ τ V; P's diagonal and
    its top-left r×r block are zeroed; the result is U P Vᵀ.
    """
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    v = vh.mT
    r = split_rank_reference(s, alpha)
    projected = u.mT @ task @ v
    projected.diagonal().zero_()
    projected[:r, :r] = 0
    return u @ projected @ v.mT


def reference_opcm(task_vectors: TaskVectors, alpha: float = 0.5) -> tuple[dict[str, Tensor], list[float]]:
    """OPCM over the whole stream, in float64; returns (merged, [λ_1, ..., λ_T]).

    λ_1 = 1 and M = τ_1. For each later τ_t: M' = λ_{t−1}·M + added, where
    ``added`` is :func:`reference_opcm_added` for 2-D tensors and τ itself for
    the others; with n̄ the mean of ‖τ_1‖..‖τ_t‖, λ_t = ‖M'‖/n̄ and
    M = M'·n̄/‖M'‖. As cl-plugin documents, a 2-D merged tensor that is all zero
    takes τ whole.
    """
    names = _names(task_vectors)
    tvs = [{n: tv[n].double() for n in names} for tv in task_vectors]
    norms = [_norm(tv) for tv in tvs]
    merged = dict(tvs[0])
    lambdas = [1.0]
    for t in range(1, len(tvs)):
        previous_lambda = lambdas[-1]
        new = {}
        for n in names:
            m, tau = merged[n], tvs[t][n]
            if m.dim() == 2 and bool(m.any()):
                added = reference_opcm_added(m, tau, alpha)
            else:
                added = tau
            new[n] = previous_lambda * m + added
        mean_norm = sum(norms[: t + 1]) / (t + 1)
        new_norm = _norm(new)
        lambdas.append(new_norm / mean_norm)
        merged = {n: x * (mean_norm / new_norm) for n, x in new.items()}
    return merged, lambdas


def reference(name: str, task_vectors: TaskVectors, **options) -> dict[str, Tensor]:
    """Dispatch by method name (as registered in :data:`cl_plugin.merging.MERGERS`)."""
    if name == "magmax":
        return reference_magmax(task_vectors)
    if name == "random":
        return reference_random(task_vectors, options.get("seed", 0))
    if name == "average":
        return reference_average(task_vectors)
    if name == "task_arithmetic":
        return reference_task_arithmetic(task_vectors)
    if name == "ties":
        return reference_ties(task_vectors, options.get("top_k", 0.2))
    if name == "opcm":
        return reference_opcm(task_vectors, options.get("alpha", 0.5))[0]
    raise KeyError(name)
