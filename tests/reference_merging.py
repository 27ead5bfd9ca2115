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
def _splitmix53(key: int, index: int) -> int:
    """SplitMix64's finaliser of ``key + (index + 1)·γ`` in Python integers (modulo 2⁶⁴), top 53 bits."""
    mask = (1 << 64) - 1
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z = z ^ (z >> 31)
    return z >> 11


def reference_random_sources(task_vectors: TaskVectors, seed: int) -> dict[str, Tensor]:
    """The index of the task each entry comes from, under cl-plugin's drawing contract.

    The contract (``cl_plugin.merging.random_selection``): in the t-th task
    (0-based, t >= 1), entry i of tensor ``name`` takes the task's value when
    the 53-bit SplitMix64 draw of (``draw_key(seed, t, name)``, i) is below
    ⌊2⁵³/(t+1)⌋. Written here in batch form and in plain Python integers (an
    implementation independent of the int64 tensor arithmetic of the merger):
    each entry comes from the last task whose draw succeeded, or from task 0.
    """
    from cl_plugin.merging.random_selection import draw_key

    names = _names(task_vectors)
    out = {}
    for n in names:
        numel = task_vectors[0][n].numel()
        source = torch.zeros(numel, dtype=torch.long)
        for t in range(1, len(task_vectors)):
            key, threshold = draw_key(seed, t, n), (1 << 53) // (t + 1)
            taken = [i for i in range(numel) if _splitmix53(key, i) < threshold]
            source[taken] = t
        out[n] = source.reshape(task_vectors[0][n].shape)
    return out


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


# -- Fisher merging (Matena & Raffel, NeurIPS 2022) ----------------------------------------------
def reference_fisher(
    task_vectors: TaskVectors, fishers: TaskVectors, normalize: bool = True, min_fisher: float = 1e-6
) -> dict[str, Tensor]:
    """Σ_t w_t (F_t + min_fisher) τ_t / Σ_t w_t (F_t + min_fisher), in float64.

    w_t = 1 / (‖F_t‖ + min_fisher) with the norm over all tensors of task t
    when ``normalize``, else 1. An entry whose denominator is 0 is 0.
    """
    names = _names(task_vectors)
    weights = []
    for f in fishers:
        norm = math.sqrt(sum(float((f[n].double() ** 2).sum()) for n in names))
        weights.append(1.0 / (norm + min_fisher) if normalize and norm + min_fisher > 0 else 1.0)
    out = {}
    for n in names:
        taus = _stack(task_vectors, n, torch.float64)
        fs = torch.stack([f[n].double() + min_fisher for f in fishers])
        w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (taus.dim() - 1))
        num, den = (w * fs * taus).sum(0), (w * fs).sum(0)
        out[n] = torch.where(den > 0, num / den, torch.zeros_like(num))
    return out


# -- DOP (Yang et al., NeurIPS 2025) ----------------------------------------------------------------
def reference_dop_weight(
    merged: Tensor,
    task: Tensor,
    *,
    alpha: float = 0.8,
    num_steps: int = 200,
    lr: float = 1e-4,
    mgda: bool = True,
    ema: bool = True,
    ema_beta: float = 0.999,
    svd_epsilon: float = 0.99999,
    proj_space: str = "uv",
) -> Tensor:
    """DOP's merge of one 2-D weight, written from the paper with autograd and torch.optim.Adam.

    For each source W in (M, τ): full SVD, r = the number of cumulative
    singular-value shares below ``svd_epsilon`` (0 when all are 0), and the loss
    L_W(X) = ‖diag(σ_r) U_rᵀ (X − W)‖² + ‖(X − W) V_r diag(σ_r)‖². X starts at
    (M + τ)/2; each step computes both losses and their gradients, the two-task
    min-norm weight γ of the loss-normalised gradients (0.999 if ⟨g1,g2⟩ >= ⟨g1,g1⟩,
    0.001 if ⟨g1,g2⟩ >= ⟨g2,g2⟩, else ⟨g2,g2−g1⟩/‖g1−g2‖²; a zero loss gives a zero
    normalised gradient), an exponential moving average of (γ, 1 − γ) started at
    (alpha, 1 − alpha), and one Adam step on the weighted loss.
    """
    x = ((merged + task) / 2).clone().requires_grad_(True)
    projections = []
    for source in (merged, task):
        u, s, vh = torch.linalg.svd(source, full_matrices=True)
        if float(s.sum()) > 0:
            r = int(torch.searchsorted(s.cumsum(0) / s.sum(), torch.tensor([svd_epsilon], dtype=s.dtype)))
        else:
            r = 0
        projections.append((source, u[:, :r], s[:r], vh.mT[:, :r]))

    def loss(source, u, s, v):
        d = x - source
        parts = []
        if proj_space in ("uv", "u"):
            parts.append((torch.diag(s) @ u.mT @ d).pow(2).sum())
        if proj_space in ("uv", "v"):
            parts.append((d @ v @ torch.diag(s)).pow(2).sum())
        return sum(parts)

    optimizer = torch.optim.Adam([x], lr=lr, foreach=False)
    weights = [alpha, 1.0 - alpha]
    for _ in range(num_steps):
        if mgda:
            grads, values = [], []
            for p in projections:
                value = loss(*p)
                (grad,) = torch.autograd.grad(value, x)
                values.append(float(value.detach()))
                grads.append(grad / values[-1] if values[-1] != 0 else torch.zeros_like(grad))
            v11, v12, v22 = (float((a * b).sum()) for a, b in ((grads[0], grads[0]), (grads[0], grads[1]), (grads[1], grads[1])))
            if v12 >= v11:
                gamma = 0.999
            elif v12 >= v22:
                gamma = 0.001
            else:
                gamma = (v22 - v12) / (v11 + v22 - 2 * v12)
            solution = [gamma, 1.0 - gamma]
            weights = [ema_beta * w + (1 - ema_beta) * g for w, g in zip(weights, solution)] if ema else solution
        optimizer.zero_grad()
        total = weights[0] * loss(*projections[0]) + weights[1] * loss(*projections[1])
        total.backward()
        optimizer.step()
    return x.detach()


def reference_dop(task_vectors: TaskVectors, **options) -> dict[str, Tensor]:
    """DOP over the whole stream, in float64: 2-D tensors by :func:`reference_dop_weight`, the others averaged pairwise."""
    names = _names(task_vectors)
    merged = {n: task_vectors[0][n].double() for n in names}
    for tv in task_vectors[1:]:
        merged = {
            n: reference_dop_weight(merged[n], tv[n].double(), **options) if merged[n].dim() == 2 else (merged[n] + tv[n].double()) / 2
            for n in names
        }
    return merged


# -- DARE (Yu et al., ICML 2024) --------------------------------------------------------------------
_U64 = (1 << 64) - 1


def reference_dare_draw(key: int, index: int) -> int:
    """cl-plugin's DARE draw of entry ``index`` for stream ``key``, in Python integers.

    SplitMix64 on key + (index + 1)·0x9E3779B97F4A7C15 (mod 2⁶⁴); the top 53 bits.
    """
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    z ^= z >> 31
    return z >> 11


def reference_dare(tensor: Tensor, p: float, key: int) -> Tensor:
    """Entry i is dropped when its draw is below ⌊p·2⁵³⌋, else divided by 1 − p (entry by entry, in Python)."""
    threshold = math.floor(p * 2.0**53)
    flat = tensor.reshape(-1)
    out = [0.0 if reference_dare_draw(key, i) < threshold else None for i in range(flat.numel())]
    kept = flat / (1 - p)
    return torch.stack([kept[i] if v is None else torch.zeros((), dtype=flat.dtype) for i, v in enumerate(out)]).reshape(
        tensor.shape
    )


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
    if name == "dop":
        return reference_dop(task_vectors, **options)
    raise KeyError(name)
