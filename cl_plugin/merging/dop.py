"""DOP: dual orthogonal projections for data-free continual merging.

Yang, Tang, Shen, Guo, Wang, Cao, Zhang. "Continual Model Merging without Data:
Dual Projections for Balancing Stability and Plasticity", NeurIPS 2025
(https://openreview.net/forum?id=zD5cUX67b9; we found no arXiv version).
Authors' code: github.com/EnnengYang/DOP. Reference code here: FusionBench
0.2.33, ``fusion_bench/method/dop/dop_general.py::DOPMerging`` (its
``_optimize_weight`` and ``cal_loss_i``), with the defaults of
``fusion_bench_config/method/dop/dop.yaml``.

Rule, in two lines: each 2-D weight of the new merged vector is found by 200
Adam steps from (M + τ)/2 that keep it close to the merged vector M and to the
new task vector τ along each one's leading singular directions, the two losses
weighted by MGDA; every other tensor is (M + τ)/2.

In full. The first task vector is the merged one. For each new τ_t, with M the
merged vector so far:
* every 2-D tensor: for each source W ∈ {M, τ_t}, take its SVD W = U Σ Vᵀ and
  keep the first r singular triplets, r = the number of cumulative shares
  Σ_{i≤j} σ_i / Σ_i σ_i below ``svd_epsilon``; the loss of a candidate X is
  L_W(X) = ‖Σ_r U_rᵀ (X − W)‖² + ‖(X − W) V_r Σ_r‖² (both projections for
  ``proj_space="uv"``). Start from X = (M + τ_t)/2 and take ``num_steps`` Adam
  steps (learning rate ``lr``, torch's defaults otherwise) on
  c_M·L_M + c_τ·L_τ, where (c_M, c_τ) starts at (``alpha``, 1 − ``alpha``) and
  moves, by an exponential moving average with decay ``ema_beta``, toward the
  MGDA weights of the step: the min-norm point of the two loss-normalised
  gradients ∇L_W / L_W (Sener & Koltun's two-task solution, clipped to
  [0.001, 0.999]). M' = X;
* every other tensor: M' = (M + τ_t)/2.
Default scale 1.0 (the reference's merged model is θ₀ + M'). A consequence of
the rank rule, kept as the reference has it: a rank-1 source protects nothing
(its first share is already 1), and generically the last singular direction
is left out. The defaults are those of ``dop.yaml``, which FusionBench's
command line uses; ``DOPMerging``'s own constructor defaults differ
(``ema_beta=0.99``, ``svd_epsilon=1.0``, no ``alpha``).

Everything runs on task vectors: X − W is the same difference as the
reference's weights θ₀ + X minus θ₀ + W, without rounding through θ₀. The
state is the merged task vector ``merged.<name>`` (float32 for 16-bit inputs),
so a stream resumes exactly from :meth:`~cl_plugin.merging.base.Merger.state_dict`.

How it is computed (the same loss, gradient and Adam update, fewer operations):
* the gradient in closed form instead of autograd: ∇L_W = 2(P_W D + D Q_W)
  with D = X − W, P_W = U_r Σ_r² U_rᵀ and Q_W = V_r Σ_r² V_rᵀ, and
  L_W = ⟨D, P_W D + D Q_W⟩. Each side is applied as an explicit m×m (n×n)
  matrix when that is cheaper than the two thin products U_r(Σ_r² U_rᵀ D),
  which it is for every side no longer than twice the rank;
* the weighted gradient c_M∇L_M + c_τ∇L_τ is the linear combination of the two
  gradients MGDA already needs (the reference runs the backward pass again on
  the weighted loss);
* the MGDA inner products come from the unnormalised gradients, divided by
  the losses afterwards in float64; no value leaves the device during the
  steps;
* on an accelerator the 2-D tensors of one shape are optimised together as a
  batch (``bmm``); their ranks may differ, the unused singular directions
  carry weight 0.

Differences from the reference:
* "2-D tensor" stands for the reference's ``nn.Linear`` weight: a state dict
  does not say which module a tensor belongs to, so a 2-D embedding table is
  optimised here and averaged there;
* the reference visits leaf modules only, so a parameter held directly by a
  non-leaf module (timm ViT's ``cls_token`` and ``pos_embed``, CLIP's
  ``class_embedding``) keeps θ₀'s value after the first merge; here it is
  averaged like every other non-2-D tensor;
* a source whose singular values are all 0 (a layer that a task did not
  change) protects no direction (r = 0): its loss is identically 0 and its
  normalised gradient is taken as 0. The reference divides 0 by 0 there and
  the layer becomes NaN;
* for 16-bit inputs the merged vector stays in float32 between updates; the
  reference rounds its merged model to the input dtype after every task;
* the thin SVD (``full_matrices=False``); a wide weight is decomposed through
  its transpose (the same factors, swapped);
* an update whose result is not finite (task vectors with entries near the
  dtype's maximum) raises :class:`~cl_plugin.errors.NonFiniteError` and leaves
  the state as it was: the new merged vector is built in new buffers and
  checked before the swap.

The SVDs need whole 2-D tensors: a sharded caller gathers each one first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from cl_plugin._checks import check_bool, is_finite
from cl_plugin.errors import ConfigError, NonFiniteError
from cl_plugin.merging.base import Merger, check_fraction
from cl_plugin._packed import packed_like
from cl_plugin.merging.registry import register_merger
from cl_plugin.task_vectors import TaskVector

__all__ = ["DOPMerger", "DOPOptions", "dop_merge_weights", "dop_split_rank"]

#: torch.optim.Adam's defaults, which the reference uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: The bounds of the two-task MGDA weight (Sener & Koltun's solver).
MGDA_LOW, MGDA_HIGH = 0.001, 0.999
#: On an accelerator, 2-D tensors of one shape are optimised together up to this many elements per batch.
BATCH_NUMEL = 1 << 26
PROJ_SPACES = ("uv", "u", "v")


@dataclass(frozen=True)
class DOPOptions:
    """DOP's hyperparameters (defaults: FusionBench's ``config/method/dop/dop.yaml``)."""

    alpha: float = 0.8
    num_steps: int = 200
    lr: float = 1e-4
    mgda: bool = True
    ema: bool = True
    ema_beta: float = 0.999
    svd_epsilon: float = 0.99999
    proj_space: str = "uv"


def dop_split_rank(singular_values: Tensor, epsilon: float) -> Tensor:
    """The number of leading singular directions DOP protects, per row of ``singular_values`` (shape (..., k)).

    The count of cumulative shares Σ_{i≤j} σ_i / Σ_i σ_i strictly below
    ``epsilon`` (``torch.searchsorted``, left side, as the reference); 0 for a
    row whose singular values are all 0.
    """
    total = singular_values.sum(-1, keepdim=True)
    share = singular_values.cumsum(-1) / total
    value = torch.full_like(total, epsilon)
    rank = torch.searchsorted(share.contiguous(), value).squeeze(-1)
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


class _Side:
    """One projection of one source: applies D ↦ P D (left) or D ↦ D Q (right) to a batch (L, m, n)."""

    def __init__(self, factor: Tensor, left: bool) -> None:
        # factor: (L, d, k) = singular vectors scaled by their singular values, zero beyond the rank.
        self.left = left
        d, used = factor.shape[1], factor.shape[2]
        self.explicit = d <= 2 * used
        self.matrix = factor @ factor.mT if self.explicit else factor  # (L, d, d) or (L, d, k)

    def add_to(self, out: Tensor, d: Tensor, scratch: dict, *, first: bool) -> None:
        """``out (+)= P d`` or ``d Q`` (``first``: overwrite)."""
        m = self.matrix
        beta = 0.0 if first else 1.0
        if self.explicit:
            if self.left:
                out.baddbmm_(m, d, beta=beta)
            else:
                out.baddbmm_(d, m, beta=beta)
            return
        key = ("left" if self.left else "right", m.shape[-1])
        if self.left:  # P d = F (Fᵀ d)
            tmp = scratch.setdefault(key, torch.empty(d.shape[0], m.shape[-1], d.shape[2], dtype=d.dtype, device=d.device))
            torch.bmm(m.mT, d, out=tmp)
            out.baddbmm_(m, tmp, beta=beta)
        else:  # d Q = (d F) Fᵀ
            tmp = scratch.setdefault(key, torch.empty(d.shape[0], d.shape[1], m.shape[-1], dtype=d.dtype, device=d.device))
            torch.bmm(d, m, out=tmp)
            out.baddbmm_(tmp, m.mT, beta=beta)


def _sides(source: Tensor, options: DOPOptions) -> list[_Side]:
    """The projections of one batch of sources (L, m, n), from their thin SVDs."""
    m, n = source.shape[-2:]
    if m < n:  # the SVD of the tall transpose is the faster one; its factors are the same, swapped
        v, s, uh = torch.linalg.svd(source.mT, full_matrices=False)
        u = uh.mT
    else:
        u, s, vh = torch.linalg.svd(source, full_matrices=False)
        v = vh.mT
    rank = dop_split_rank(s, options.svd_epsilon)  # (L,)
    used = int(rank.max()) if rank.numel() else 0
    if used == 0:
        return []
    keep = torch.arange(used, device=s.device) < rank.unsqueeze(-1)  # (L, used)
    weights = (s[:, :used] * keep).unsqueeze(1)  # (L, 1, used): σ_i within the rank, 0 beyond
    sides = []
    if options.proj_space in ("uv", "u"):
        sides.append(_Side(u[..., :used] * weights, left=True))
    if options.proj_space in ("uv", "v"):
        sides.append(_Side(v[..., :used] * weights, left=False))
    return sides


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_l, b_l⟩ for each l of two (L, m, n) batches, shape (L,)."""
    flat_a, flat_b = a.reshape(a.shape[0], 1, -1), b.reshape(b.shape[0], -1, 1)
    return torch.bmm(flat_a, flat_b).view(-1)


def dop_merge_weights(merged: Tensor, task: Tensor, options: DOPOptions = DOPOptions()) -> Tensor:
    """DOP's new merged value of 2-D tensors: ``merged`` (M) and ``task`` (τ), shapes (m, n) or (L, m, n).

    A batch (L, m, n) optimises L independent weights at once. Runs in the
    inputs' dtype (float32 or float64) on their device and returns a new tensor
    of the same shape. See the module docstring for the rule.
    """
    batched = merged.dim() == 3
    m_src = merged if batched else merged.unsqueeze(0)
    t_src = task if batched else task.unsqueeze(0)
    layers = m_src.shape[0]
    x = m_src * 0.5
    x.add_(t_src, alpha=0.5)  # (M + τ)/2 without overflow: halving is exact
    sources = [(src, _sides(src, options)) for src in (m_src, t_src)]
    if options.num_steps == 0 or not any(sides for _, sides in sources):
        return x if batched else x.squeeze(0)

    dtype, device = x.dtype, x.device
    beta1, beta2 = ADAM_BETAS
    exp_avg = torch.zeros_like(x)
    exp_avg_sq = torch.zeros_like(x)
    diffs = [torch.empty_like(x), torch.empty_like(x)]
    grads = [torch.empty_like(x), torch.empty_like(x)]
    scratch: dict = {}
    weights = torch.tensor([options.alpha, 1.0 - options.alpha], dtype=torch.float64, device=device)
    weights = weights.unsqueeze(1).expand(2, layers).clone()  # (2, L): (c_M, c_τ) per layer
    losses = torch.empty(2, layers, dtype=torch.float64, device=device)
    for step in range(1, options.num_steps + 1):
        for i, (src, sides) in enumerate(sources):
            d, h = diffs[i], grads[i]
            torch.sub(x, src, out=d)
            if not sides:
                h.zero_()
            for j, side in enumerate(sides):
                side.add_to(h, d, scratch, first=j == 0)
            # h = ∇L/2; L = ⟨D, P D + D Q⟩
            losses[i] = _batched_dot(d, h)
        if options.mgda:
            inv = torch.where(losses != 0, 1.0 / losses, torch.zeros_like(losses))
            g00 = _batched_dot(grads[0], grads[0]).double() * inv[0] * inv[0]
            g01 = _batched_dot(grads[0], grads[1]).double() * inv[0] * inv[1]
            g11 = _batched_dot(grads[1], grads[1]).double() * inv[1] * inv[1]
            interior = (g11 - g01) / (g00 + g11 - 2.0 * g01)
            gamma = torch.where(
                g01 >= g00,
                torch.full_like(g00, MGDA_HIGH),
                torch.where(g01 >= g11, torch.full_like(g00, MGDA_LOW), interior),
            )
            solution = torch.stack([gamma, 1.0 - gamma])
            if options.ema:
                weights.mul_(options.ema_beta).add_(solution, alpha=1.0 - options.ema_beta)
                current = weights
            else:
                current = solution
        else:
            current = weights
        scale = (2.0 * current).to(dtype).view(2, layers, 1, 1)
        grad = diffs[0]  # the differences are no longer needed this step
        torch.mul(grads[0], scale[0], out=grad)
        grad.addcmul_(grads[1], scale[1])
        # torch.optim.Adam's update (single-tensor path, no weight decay, no amsgrad)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        denom = diffs[1]
        torch.sqrt(exp_avg_sq, out=denom)
        denom.div_(bias_correction2**0.5).add_(ADAM_EPS)
        x.addcdiv_(exp_avg, denom, value=-options.lr / bias_correction1)
    return x if batched else x.squeeze(0)


class _Shape:
    """The shape, dtype and device of a whole tensor that a rank holds only a slice of (for :func:`_batches`)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, device

    def numel(self) -> int:
        return math.prod(self.shape)


def _batches(names: list[str], tensors: dict[str, Tensor]) -> list[list[str]]:
    """Groups of same-shape 2-D tensors optimised together: one name each on a CPU, up to :data:`BATCH_NUMEL` elsewhere."""
    groups: list[list[str]] = []
    open_groups: dict[tuple, list[str]] = {}
    for n in names:
        t = tensors[n]
        if t.device.type == "cpu":
            groups.append([n])
            continue
        key = (tuple(t.shape), t.dtype, t.device)
        group = open_groups.get(key)
        if group is None or (len(group) + 1) * t.numel() > BATCH_NUMEL:
            group = open_groups[key] = []
            groups.append(group)
        group.append(n)
    return groups


def _check_options(alpha, num_steps, lr, mgda, ema, ema_beta, svd_epsilon, proj_space) -> DOPOptions:
    owner = "DOPMerger"
    alpha = check_fraction(alpha, "alpha", owner, low=0.0, high=1.0, low_open=False)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 0:
        raise ConfigError(f"`num_steps` must be an integer >= 0, got {num_steps!r} ({owner}).")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(float(lr)) or lr <= 0:
        raise ConfigError(f"`lr` must be a positive real number, got {lr!r} ({owner}).")
    mgda = check_bool(mgda, "mgda", owner)
    ema = check_bool(ema, "ema", owner)
    ema_beta = check_fraction(ema_beta, "ema_beta", owner, low=0.0, high=1.0, low_open=False)
    svd_epsilon = check_fraction(svd_epsilon, "svd_epsilon", owner, low=0.0, high=1.0, low_open=False)
    if proj_space not in PROJ_SPACES:
        raise ConfigError(
            f"`proj_space` must be one of {list(PROJ_SPACES)}, got {proj_space!r} ({owner}): 'u' projects on the "
            "left singular vectors, 'v' on the right ones, 'uv' on both."
        )
    return DOPOptions(alpha, int(num_steps), float(lr), mgda, ema, ema_beta, svd_epsilon, proj_space)


@register_merger("dop")
class DOPMerger(Merger):
    """Streaming DOP.

    Args:
        alpha: the stability weight c_M at the start of each optimisation, in
            [0, 1] (default 0.8); without MGDA the fixed weight.
        num_steps: Adam steps per 2-D tensor and update (default 200).
        lr: Adam's learning rate (default 1e-4).
        mgda: weigh the two losses by MGDA (default True); else by ``alpha``.
        ema: smooth the MGDA weights by an exponential moving average (default True).
        ema_beta: its decay, in [0, 1] (default 0.999).
        svd_epsilon: share of the singular-value mass whose directions each
            source protects, in [0, 1] (default 0.99999).
        proj_space: ``"uv"`` (both projections, default), ``"u"`` or ``"v"``.
        scale: λ for :meth:`apply_to` (default 1.0).

    Raises:
        ConfigError: an option out of its range or of the wrong type.

    State: ``merged.<name>`` (float32 for 16-bit inputs, else the input dtype).

    Example:
        >>> import torch
        >>> m = DOPMerger()
        >>> m.update({"w": torch.tensor([[0.02, 0.0], [0.0, 0.01]]), "b": torch.tensor([0.1, 0.3])})
        >>> m.update({"w": torch.tensor([[0.0, 0.01], [0.01, 0.0]]), "b": torch.tensor([0.3, 0.1])})
        >>> m.merged()["b"]  # not 2-D: the mean of the merged and the new vector
        tensor([0.2000, 0.2000])
        >>> w = m.merged()["w"]  # 2-D: 200 Adam steps from the mean, toward the first task's directions
        >>> bool(w[0, 0] > 0.01 and w[0, 1] < 0.005)
        True
    """

    name = "dop"
    default_scale = 1.0
    tensor_states = {"merged": "accumulate"}
    merged_role = "merged"

    def __init__(
        self,
        *,
        alpha: float = 0.8,
        num_steps: int = 200,
        lr: float = 1e-4,
        mgda: bool = True,
        ema: bool = True,
        ema_beta: float = 0.999,
        svd_epsilon: float = 0.99999,
        proj_space: str = "uv",
        scale: float | None = None,
    ) -> None:
        self.dop = _check_options(alpha, num_steps, lr, mgda, ema, ema_beta, svd_epsilon, proj_space)
        super().__init__(scale=scale)

    def options(self):
        o = self.dop
        return {
            "alpha": o.alpha,
            "num_steps": o.num_steps,
            "lr": o.lr,
            "mgda": o.mgda,
            "ema": o.ema,
            "ema_beta": o.ema_beta,
            "svd_epsilon": o.svd_epsilon,
            "proj_space": o.proj_space,
        }

    def _fold(self, tv: TaskVector) -> None:
        merged = self._state["merged"]
        if self._copy_first_task(tv):
            return
        if self.layout is not None and self.layout.distributed:
            self._fold_sharded(tv, self.layout)
            return
        # Built into new buffers and swapped in at the end (as OPCM does): a failure midway
        # (an SVD that does not converge, an overflow) leaves the previous state intact.
        new_merged = packed_like(merged, fill=None)
        tasks = {n: t.to(merged[n].dtype) for n, t in tv.items()}
        matrices = [n for n, m in merged.items() if m.dim() == 2]
        for n, m in merged.items():
            if m.dim() != 2:
                torch.mul(m, 0.5, out=new_merged[n]).add_(tasks[n], alpha=0.5)
        for group in _batches(matrices, merged):
            m_batch = torch.stack([merged[n] for n in group])
            t_batch = torch.stack([tasks[n] for n in group])
            out = dop_merge_weights(m_batch, t_batch, self.dop)
            for i, n in enumerate(group):
                new_merged[n].copy_(out[i])
            del m_batch, t_batch, out
        for n, t in new_merged.items():
            if not is_finite(t):
                raise NonFiniteError(
                    f"'dop' merger, task {self.num_tasks + 1}: the update of tensor {n!r} is not finite in "
                    f"{str(t.dtype).removeprefix('torch.')} although the task vector is. Nothing was changed. "
                    "Scale the task vectors down, or merge in float64 from the first task "
                    "(task_vector.to(dtype=torch.float64))."
                )
        self._state["merged"] = new_merged

    def _fold_sharded(self, tv: TaskVector, layout) -> None:
        """The same update on this rank's slices (a sharded merge).

        Elementwise tensors are averaged on the slices. Each group of matrices
        that :meth:`_fold` optimises together has an owner rank (the groups
        balanced by size), which gathers the group's merged and task slices,
        runs the same optimisation on the same batch, and scatters the rows
        back: the result is bit-identical to the unsharded update.
        """
        merged = self._state["merged"]
        new_merged = packed_like(merged, fill=None)
        tasks = {n: t.to(merged[n].dtype) for n, t in tv.items()}
        whole = {n: _Shape(layout[n].shape, merged[n].dtype, merged[n].device) for n in merged}
        matrices = [n for n in merged if len(layout[n].shape) == 2]
        for n in merged:
            if len(layout[n].shape) != 2:
                torch.mul(merged[n], 0.5, out=new_merged[n]).add_(tasks[n], alpha=0.5)
        groups = {str(i): g for i, g in enumerate(_batches(matrices, whole))}
        cost = {k: float(sum(whole[n].numel() for n in g)) for k, g in groups.items()}
        owners = layout.owners(cost)
        failed = torch.zeros(1)
        # In each round every rank optimises one of its groups while the others optimise theirs.
        for round_keys in layout.rounds(owners, cost):
            gathered = {
                k: (
                    [layout.gather_whole(n, merged[n], owners[k]) for n in groups[k]],
                    [layout.gather_whole(n, tasks[n], owners[k]) for n in groups[k]],
                )
                for k in round_keys
            }
            out: dict[str, Tensor] = {}
            for k in round_keys:
                if owners[k] != layout.rank:
                    continue
                gathered_m, gathered_t = gathered.pop(k)
                try:
                    out[k] = dop_merge_weights(torch.stack(gathered_m), torch.stack(gathered_t), self.dop)
                except Exception:  # noqa: BLE001 - every rank must reach the collectives below
                    failed += 1
                    first = groups[k][0]
                    out[k] = torch.zeros((len(groups[k]), *layout[first].shape), dtype=merged[first].dtype)
                del gathered_m, gathered_t
            del gathered
            for k in round_keys:
                for j, n in enumerate(groups[k]):
                    layout.scatter_slices(n, out[k][j] if k in out else None, owners[k], new_merged[n])
            del out
        layout.all_reduce_(failed)
        bad = torch.tensor([0.0 if is_finite(t) else 1.0 for t in new_merged.values()])
        layout.all_reduce_(bad)
        if int(failed) or bool(bad.any()):
            name = list(new_merged)[int(bad.nonzero()[0])] if bool(bad.any()) else "a matrix"
            raise NonFiniteError(
                f"'dop' merger, task {self.num_tasks + 1}: the update of {name!r} failed or is not finite on its "
                "owner rank. Nothing was changed."
            )
        self._state["merged"] = new_merged

    def _finalize(self):
        return {n: t.clone() for n, t in self._state["merged"].items()}
