"""Share: one shared low-rank subspace per layer, tiny coefficients per task.

Kaushik, Vaidya, Chaudhari, Chellappa, Yuille. "Shared LoRA Subspaces for
almost Strict Continual Learning", 2026 (https://arxiv.org/abs/2602.06043).
Reference code: github.com/ankit-vaidya19/Share, where the method is called
*EigenFlux* (basis = ``components``, coefficients = ``loadings``):
``peft/tuners/eigenflux/layer.py`` (the layer), ``NLU/utils.py``
(``get_eigenvectors``, ``eigendecomposition``, ``calculate_eigenflux``,
``get_reconstruction``), ``NLU/weight_update.py::update_eigenflux_weights`` and
``NLU/scripts/run_share_continual.sh`` (the continual pipeline),
``NLG/get_eigenflux.py`` (``get_components``, ``get_loadings``, ``process_timestep``).

The maths implemented here
--------------------------
A wrapped ``nn.Linear`` with frozen W₀ ∈ R^{d_out×d_in} and bias b computes, for task t,

    y = W₀x + b + B_t A_t x,    A_tᵀ = α ε_α,t ∈ R^{d_in×p},    B_t = β ε_β,t ∈ R^{d_out×p},

so ΔW_t = (β ε_β,t)(α ε_α,t)ᵀ. The basis α ∈ R^{d_in×K_α}, β ∈ R^{d_out×K_β}
(orthonormal columns) is shared by all tasks and frozen; the coefficients
ε_α,t ∈ R^{K_α×p}, ε_β,t ∈ R^{K_β×p} are the only per-task storage.

*Training task t* trains ε_α,t, ε_β,t, and with ``temporary_directions=φ > 0``
also φ extra columns per side and their coefficients:
A_tᵀ = α ε_α,t + α̃ ε̃_α, B_t = β ε_β,t + β̃ ε̃_β, with α̃ ∈ R^{d_in×φ}, ε̃_α ∈ R^{φ×p}
(same for β). α̃, β̃ start as orthonormal directions orthogonal to the basis and
ε̃ at zero, so ΔW_t does not jump when training starts. A new task's
coefficients start as the last stored task's (``init="previous"``, what the
reference pipeline does by loading the previous adapter) or fresh
(``init="fresh"``: ε_α ~ U(±1/√K_α), ε_β = 0, so ΔW_t = 0 at the start).

*Basis from factors* (one side at a time; "factors" are the d×p matrices A_tᵀ
or B_t): stack M = [F_1, …, F_n] ∈ R^{d×N}, centre each row,
M_c = M − m1ᵀ with m = M1/N, and take the SVD M_c = UΣVᵀ. Keep K columns:
K = k (fixed, at most d), or, with ``explained_variance=v``, the smallest K with
Σ_{i≤K} σ_i² ≥ v·Σ_i σ_i² (at most k). The basis is the first
min(K, rank M_c) columns of U; if K is larger, it is completed with the part
of m orthogonal to them, then with seeded random orthonormal directions.
Each column's largest-magnitude entry is made positive (SVD signs are
arbitrary; this makes every rank and every run agree).

*Start* (:meth:`SharedSubspace.inject` on layers that carry a trained LoRA,
the paper's "initialise from the first task's LoRA"): the factors are
A_1ᵀ = Aᵀ and B_1 = (alpha/r)·B, the LoRA scaling folded into B.

*After each task* (:meth:`SharedSubspace.finish_task`): per side, stack the
reconstructed factors of every stored task and the new task's trained factor
(temporary part included), recompute the basis as above, then re-project
**every** task: ε_t ← α'ᵀ (A_tᵀ), i.e. the orthogonal projection of each
factor onto the new basis. The temporary directions are then dropped.

*What is preserved*: if K ≥ N (the number of stacked columns) the new basis
spans every stacked factor (span M ⊆ span M_c + span m, and both are in the
basis), so every stored ΔW_t is reproduced up to float rounding. If K <
rank M_c the factor error summed over tasks is
Σ_t ‖F_t − PF_t‖² = Σ_{i>K} σ_i² + N‖(I−P)m‖² ≥ Σ_{i>K} σ_i² (Eckart–Young).

*Inference*: with a task label, :meth:`SharedSubspace.select` picks that
task's coefficients; without one, ``select(None)`` uses the mean update
β C αᵀ with C = mean_t ε_β,t ε_α,tᵀ ∈ R^{K_β×K_α}, which equals mean_t ΔW_t
exactly. :meth:`SharedSubspace.task_delta` gives any task's ΔW as a task
vector for the mergers instead.

*Storage*, per layer: (K_α + K_β)·p numbers per task, plus the shared basis
d_in·K_α + d_out·K_β; a per-task LoRA stores r·(d_in + d_out) per task.

Facts from the reference code that this follows
-----------------------------------------------
- Layout: basis (``components``) d×K, coefficients (``loadings``) K×r; the A
  side computes x·(components·loadings), the B side multiplies by its
  transpose; no alpha/r factor (``EigenFlux_A.forward``, ``EigenFlux_B.forward``).
- Stacking: each LoRA factor is turned so its long side is the rows (Aᵀ is
  d_in×r, B is d_out×r), the factors of all adapters are concatenated column-wise
  and every row is centred by its mean over the columns (``get_eigenvectors``,
  ``eigendecomposition``; ``NLG/get_eigenflux.py::get_components``).
- Coefficients are projections of the *uncentred* factor onto the basis,
  componentsᵀ·Aᵀ and componentsᵀ·B; the mean is neither stored nor added back
  (``calculate_eigenflux``, ``get_loadings``, ``get_reconstruction``).
- Default sizes in ``run_share_continual.sh``: K = 32, r = 8, two temporary
  ("rank update") directions, the first basis from one task's LoRA.

Deliberate differences from the reference
-----------------------------------------
1. alpha/r is folded into B before the first basis. The reference reads the
   raw PEFT factors (``load_peft_weights``) and its layer has no scaling, so
   the first task's update is off by the factor alpha/r.
2. Every stored task is re-projected at every update, and so is the new task.
   The NLU pipeline re-projects only the immediately previous task
   (``run_share_continual.sh::update_previous_weights`` passes T−1 alone to
   ``update_eigenflux_weights``, which recomputes "previous weights only").
3. The new task's factor is projected with its temporary part included (what
   the layer computed in training). ``EigenFlux_A.recalculate_EigenFlux``
   stacks [components·loadings, rv_1·rv_2] for the basis but sets the new
   loadings from components·loadings alone.
4. SVD of the centred stack (float64, on CPU, so every rank and device agrees)
   instead of ``torch.linalg.eig`` of M_c M_cᵀ with the real part kept (NLU)
   or ``torch.svd_lowrank`` (NLG); the kept subspace is the same.
5. When K exceeds rank M_c the basis is completed with the mean direction and
   then seeded random directions; ``eig`` returns arbitrary null-space vectors
   there. This is what makes stored tasks exact when K ≥ N.
6. Temporary directions start orthonormal to the basis with zero
   coefficients (reference: U(−0.5, 0.5) for both factors).
7. ``p`` may differ from the LoRA rank r: the first task then keeps the best
   rank-p approximation of its coefficient core ε_β ε_αᵀ.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cl_plugin._checks import check_finite
from cl_plugin.adapters.lora import (
    InjectionSummary,
    LoRALinear,
    adapter_key,
    check_float,
    check_int,
    check_parent_calls_forward,
    count_parameters,
    freeze_except,
    layer_generator,
    lora_layers,
    replace_module,
)
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError, preview
from cl_plugin.task_vectors import TaskVector

__all__ = ["SharedLinear", "SharedSubspace", "fit_basis"]

_FORMAT = "cl_plugin.SharedSubspace"
_FORMAT_VERSION = 1
_INITS = ("previous", "fresh")
_RANK_RTOL = 1e-10  # singular values below this fraction of the largest count as zero (float64)


# -- the basis maths (pure functions, float64 on CPU) ----------------------------------------
def _fix_signs(basis: Tensor) -> Tensor:
    """Flip columns so that each column's largest-magnitude entry is positive."""
    if basis.numel() == 0:
        return basis
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis.gather(0, idx[None, :]))
    signs[signs == 0] = 1.0
    return basis * signs


def _orthonormal_complement(cols: Tensor, extra: Sequence[Tensor], total: int, gen: torch.Generator) -> Tensor:
    """Extend orthonormal ``cols`` (d×j) to ``total`` columns: first with ``extra`` vectors, then random ones."""
    d = cols.shape[0]
    for v in extra:
        if cols.shape[1] >= total:
            break
        r = v - cols @ (cols.T @ v)
        r = r - cols @ (cols.T @ r)  # second pass: Gram–Schmidt loses orthogonality once
        norm = torch.linalg.vector_norm(r)
        if norm > 1e-8 * max(float(torch.linalg.vector_norm(v)), 1e-300):
            cols = torch.cat([cols, r / norm], dim=1)
    while cols.shape[1] < total:
        need = total - cols.shape[1]
        g = torch.randn(d, need, generator=gen, dtype=torch.float64)
        g = g - cols @ (cols.T @ g)
        g = g - cols @ (cols.T @ g)
        q, rr = torch.linalg.qr(g)
        keep = rr.diagonal().abs() > 1e-8
        cols = torch.cat([cols, q[:, keep]], dim=1)
    return cols[:, :total]


def fit_basis(
    factors: Sequence[Tensor],
    k: int,
    explained_variance: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The Share basis of one side: top singular vectors of the centred, stacked factors.

    Args:
        factors: d×p_i matrices (A_tᵀ or B_t), stacked column-wise.
        k: number of columns, or their maximum when ``explained_variance`` is given.
        explained_variance: keep the smallest K whose squared singular values
            reach this fraction of the total (default: keep k).
        generator: seeds the random completion when K exceeds the rank.

    Returns:
        A d×K float64 CPU tensor with orthonormal columns (see the module docstring).

    Example:
        >>> f = torch.tensor([[1.0, 3.0], [0.0, 0.0]])  # two columns in the x direction
        >>> basis = fit_basis([f], k=2)  # one direction from the data, one completing it
        >>> torch.allclose(basis, torch.eye(2, dtype=torch.float64))
        True
    """
    m = torch.cat([f.detach().to("cpu", torch.float64) for f in factors], dim=1)
    d = m.shape[0]
    mean = m.mean(dim=1, keepdim=True)
    centred = m - mean
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    rank = int((s > s[0] * _RANK_RTOL).sum()) if s.numel() and s[0] > 0 else 0
    if explained_variance is None or rank == 0:
        size = min(k, d)
    else:
        energy = s[:rank] ** 2
        cum = torch.cumsum(energy, 0) / energy.sum()
        size = int(torch.searchsorted(cum, torch.tensor(explained_variance - 1e-12, dtype=cum.dtype))) + 1
        size = max(1, min(size, k, d, rank))
    cols = u[:, : min(size, rank)]
    if cols.shape[1] < size:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        cols = _orthonormal_complement(cols, [mean], size, gen)
    return _fix_signs(cols.contiguous())


def _best_rank_p(coef_b: Tensor, coef_a: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Coefficients (K_β×p, K_α×p) of the best rank-p approximation of coef_b·coef_aᵀ."""
    u, s, vh = torch.linalg.svd(coef_b @ coef_a.T, full_matrices=False)
    j = min(p, s.numel())
    root = s[:j].sqrt()
    eb = torch.zeros(coef_b.shape[0], p, dtype=coef_b.dtype)
    ea = torch.zeros(coef_a.shape[0], p, dtype=coef_a.dtype)
    eb[:, :j] = u[:, :j] * root
    ea[:, :j] = vh[:j].T * root
    return eb, ea


# -- the layer ---------------------------------------------------------------------------------
class SharedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a shared basis and per-task coefficients.

    Built by :meth:`SharedSubspace.inject`; :class:`SharedSubspace` manages the
    tasks. ``weight`` and ``bias`` are the base layer's own Parameters (same
    state-dict names as before wrapping).

    Args:
        base: the ``nn.Linear`` (or unmerged :class:`LoRALinear`) to wrap.
        basis_a: α, in_features × K_α, orthonormal columns.
        basis_b: β, out_features × K_β, orthonormal columns.
        p: number of columns of every coefficient matrix.
        name: the layer's module name (seeds its random draws).

    State dict (all in the weight's dtype): ``weight``, ``bias``, ``basis_a``
    (d_in×K_α), ``basis_b`` (d_out×K_β), ``coef_a.<task>`` (K_α×p),
    ``coef_b.<task>`` (K_β×p), and while a task with temporary directions
    trains, ``tmp_basis_a`` (d_in×φ), ``tmp_coef_a`` (φ×p), ``tmp_basis_b``,
    ``tmp_coef_b``. Loading a state dict re-shapes the basis and creates the
    coefficients it names.

    Raises:
        ConfigError: ``base`` is neither an ``nn.Linear`` nor an unmerged LoRALinear,
            or the basis shapes do not fit it.

    Example:
        >>> layer = SharedLinear(nn.Linear(2, 2), torch.eye(2)[:, :1], torch.eye(2)[:, 1:], p=1)
        >>> layer.add_task("0", torch.tensor([[2.0]]), torch.tensor([[3.0]]))
        >>> layer.delta_weight("0")  # β ε_β (α ε_α)ᵀ
        tensor([[0., 0.],
                [6., 0.]])
    """

    def __init__(self, base: nn.Module, basis_a: Tensor, basis_b: Tensor, *, p: int, name: str = "") -> None:
        if isinstance(base, LoRALinear):
            if base.merged_adapter is not None:
                raise ConfigError("Unmerge the LoRA layer (unmerge_lora) before wrapping it in SharedLinear.")
        elif not isinstance(base, nn.Linear):
            raise ConfigError(f"SharedLinear wraps an nn.Linear, got {type(base).__name__}.")
        d_in, d_out = base.in_features, base.out_features
        if basis_a.dim() != 2 or basis_a.shape[0] != d_in or basis_b.dim() != 2 or basis_b.shape[0] != d_out:
            raise ConfigError(
                f"basis shapes {tuple(basis_a.shape)} / {tuple(basis_b.shape)} do not fit a {d_in}→{d_out} layer; "
                f"expected ({d_in}, K_a) and ({d_out}, K_b)."
            )
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.p = check_int(p, "p")
        self.layer_name = name
        factory = self._factory()
        self.register_buffer("basis_a", basis_a.detach().to(**factory).contiguous())
        self.register_buffer("basis_b", basis_b.detach().to(**factory).contiguous())
        self.coef_a = nn.ParameterDict()
        self.coef_b = nn.ParameterDict()
        for attr in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b"):
            self.register_parameter(attr, None)
        self.register_buffer("mean_core", None, persistent=False)
        self.training_task: str | None = None
        self.active_adapter: str | None = None
        self.use_mean = False
        self.train(base.training)

    def _factory(self) -> dict[str, Any]:
        dtype = self.weight.dtype if self.weight.is_floating_point() else torch.float32
        return {"device": self.weight.device, "dtype": dtype}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.coef_a.keys())

    @property
    def has_temporary(self) -> bool:
        return self.tmp_basis_a is not None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, K_a={self.basis_a.shape[1]}, "
            f"K_b={self.basis_b.shape[1]}, p={self.p}, tasks={list(self.tasks)}, "
            f"active={'mean' if self.use_mean else self.active_adapter!r}"
        )

    # -- coefficients ----------------------------------------------------------------------
    def add_task(self, key: str, coef_a: Tensor, coef_b: Tensor, *, trainable: bool = False) -> None:
        """Store coefficients (K_α×p, K_β×p) for task ``key``, replacing any it had."""
        key = adapter_key(key, "task_id")
        ka, kb = self.basis_a.shape[1], self.basis_b.shape[1]
        if tuple(coef_a.shape) != (ka, self.p) or tuple(coef_b.shape) != (kb, self.p):
            raise ConfigError(
                f"coefficients {tuple(coef_a.shape)} / {tuple(coef_b.shape)} do not fit K_a={ka}, K_b={kb}, p={self.p}."
            )
        factory = self._factory()
        for store, value in ((self.coef_a, coef_a), (self.coef_b, coef_b)):
            value = value.detach().to(**factory)
            if key in store and store[key].shape == value.shape:
                with torch.no_grad():
                    store[key].copy_(value)  # keep the Parameter object (optimizers hold it)
                store[key].requires_grad_(trainable)
            else:
                store[key] = nn.Parameter(value.clone(), requires_grad=trainable)

    def remove_task(self, key: str) -> None:
        del self.coef_a[key]
        del self.coef_b[key]
        if self.active_adapter == key:
            self.active_adapter = None

    def set_basis(self, basis_a: Tensor, basis_b: Tensor) -> None:
        factory = self._factory()
        self.basis_a = basis_a.detach().to(**factory).contiguous()
        self.basis_b = basis_b.detach().to(**factory).contiguous()
        self.mean_core = None
        self.use_mean = False

    def set_temporary(self, basis_a: Tensor, coef_a: Tensor, basis_b: Tensor, coef_b: Tensor, *, trainable: bool = True) -> None:
        factory = self._factory()
        for attr, value in (("tmp_basis_a", basis_a), ("tmp_coef_a", coef_a), ("tmp_basis_b", basis_b), ("tmp_coef_b", coef_b)):
            setattr(self, attr, nn.Parameter(value.detach().to(**factory).clone(), requires_grad=trainable))

    def drop_temporary(self) -> None:
        for attr in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b"):
            setattr(self, attr, None)

    def factors(self, key: str) -> tuple[Tensor, Tensor]:
        """(A_tᵀ, B_t) of task ``key``: d_in×p and d_out×p, temporary part included while it trains."""
        fa = self.basis_a @ self.coef_a[key]
        fb = self.basis_b @ self.coef_b[key]
        if key == self.training_task and self.tmp_basis_a is not None:
            fa = fa + self.tmp_basis_a @ self.tmp_coef_a
            fb = fb + self.tmp_basis_b @ self.tmp_coef_b
        return fa, fb

    @torch.no_grad()
    def delta_weight(self, key: str) -> Tensor:
        """ΔW = B_t A_t of task ``key``, d_out × d_in, in the weight's dtype."""
        fa, fb = self.factors(adapter_key(key, "task_id"))
        return (fb @ fa.T).to(self.weight.dtype)

    @torch.no_grad()
    def mean_delta_weight(self, keys: Sequence[str]) -> Tensor:
        core = self.mean_core_of(keys)
        return (self.basis_b @ core @ self.basis_a.T).to(self.weight.dtype)

    @torch.no_grad()
    def mean_core_of(self, keys: Sequence[str]) -> Tensor:
        """C = mean_t ε_β,t ε_α,tᵀ (K_β×K_α) over ``keys``."""
        core = sum(self.coef_b[k] @ self.coef_a[k].T for k in keys)
        return core / len(keys)

    # -- selection -------------------------------------------------------------------------
    def set_active(self, key: str | None) -> None:
        """Use task ``key``'s coefficients (``None``: the base layer alone)."""
        if key is not None:
            key = adapter_key(key, "task label")
            if key not in self.coef_a:
                raise ConfigError(f"Unknown task {key!r}; this layer holds {list(self.tasks)}.")
        self.active_adapter = key
        self.use_mean = False

    def set_mean(self, core: Tensor) -> None:
        """Use the merged update β C αᵀ (C: K_β×K_α)."""
        self.mean_core = core.detach().to(**self._factory())
        self.use_mean = True
        self.active_adapter = None

    def get_selection(self):
        return ("mean", self.mean_core) if self.use_mean else ("task", self.active_adapter)

    def set_selection(self, state) -> None:
        kind, value = state
        if kind == "mean":
            self.set_mean(value)
        else:
            self.set_active(value)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        result = nn.functional.linear(x, self.weight, self.bias)
        if self.use_mean and self.mean_core is not None:
            h = x.to(self.basis_a.dtype) @ self.basis_a
            return result + ((h @ self.mean_core.T) @ self.basis_b.T).to(result.dtype)
        key = self.active_adapter
        if key is None:
            return result
        fa, fb = self.factors(key)
        return result + ((x.to(fa.dtype) @ fa) @ fb.T).to(result.dtype)

    # -- state dict ------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Re-shape the basis and create the coefficients the state dict names, so a
        # checkpoint taken after any number of tasks loads into a freshly wrapped model.
        factory = self._factory()
        for attr in ("basis_a", "basis_b"):
            value = state_dict.get(prefix + attr)
            if isinstance(value, Tensor) and value.shape != getattr(self, attr).shape:
                setattr(self, attr, torch.empty(value.shape, **factory))
        for attr in ("coef_a", "coef_b"):
            store = getattr(self, attr)
            head = prefix + attr + "."
            for key, value in state_dict.items():
                if key.startswith(head) and isinstance(value, Tensor):
                    task = key[len(head) :]
                    if task and "." not in task and (task not in store or store[task].shape != value.shape):
                        store[task] = nn.Parameter(torch.empty(value.shape, **factory), requires_grad=False)
        for attr in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b"):
            value = state_dict.get(prefix + attr)
            current = getattr(self, attr)
            if isinstance(value, Tensor) and (current is None or current.shape != value.shape):
                setattr(self, attr, nn.Parameter(torch.empty(value.shape, **factory), requires_grad=False))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


# -- the manager -------------------------------------------------------------------------------
class SharedSubspace:
    """Share for a whole model: inject, train task by task, select by task label.

    A run looks like::

        summary = inject_lora(model, VIT_TARGET_MODULES, r=8, trainable=["head"])
        ...train task 0 with LoRA...
        share = SharedSubspace(k=32, temporary_directions=2)
        share.inject(model, lora_task=0)      # basis from task 0's LoRA; task 0 stored
        for t in (1, 2, ...):
            share.start_task(t)               # new coefficients (+ temporary directions) trainable
            ...train: optimizer over share.trainable_parameters() (+ the head)...
            share.finish_task()               # basis update, every task re-projected
        share.select(2)                       # inference with task label 2
        share.select(None)                    # no label: the mean update of all stored tasks

    Layers can also be wrapped without a LoRA (plain ``nn.Linear`` targets): the
    basis then starts as seeded random orthonormal directions and ``p`` must be given.

    Args:
        k: basis size per side (default 32, the reference's), or its upper bound
            when ``explained_variance`` is given.
        p: columns of every coefficient matrix (the pseudo-rank of each task's
            update). Default: the rank r of the LoRA the basis starts from.
        explained_variance: if given, after every task keep the smallest K per
            side whose squared singular values reach this fraction of the total
            (a float in (0, 1]); K then varies per layer and side.
        temporary_directions: φ extra trainable directions per side while a task
            trains, folded in by :meth:`finish_task` (default 0).
        init: a new task's coefficients start as the last stored task's
            (``"previous"``, default, as in the reference pipeline) or fresh
            (``"fresh"``: ΔW = 0 at the start).
        seed: seeds every random draw (per layer, side and task; identical on all ranks).

    State (:meth:`state_dict`): plain values ``format_version``, ``k``, ``p``,
    ``explained_variance``, ``temporary_directions``, ``init``, ``seed``,
    ``tasks`` (list of str), ``training_task``, ``updates``, ``layers`` (list of
    str), and CPU tensors ``basis_a.<layer>`` (d_in×K_α), ``basis_b.<layer>``
    (d_out×K_β), ``coef_a.<task>.<layer>`` (K_α×p), ``coef_b.<task>.<layer>``
    (K_β×p), ``tmp_*.<layer>`` while a task with temporary directions trains.

    Raises:
        ConfigError: an argument is out of range (e.g. ``p > k``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> share = SharedSubspace(k=2, p=1, init="fresh")
        >>> share.inject(net, ["0"]).wrapped
        ('0',)
        >>> share.start_task("a"); share.finish_task()["0"]
        (2, 2)
        >>> share.tasks, share.bytes_per_task()   # (2 + 2) * 1 float32 numbers
        (('a',), 16)
    """

    def __init__(
        self,
        k: int = 32,
        p: int | None = None,
        *,
        explained_variance: float | None = None,
        temporary_directions: int = 0,
        init: str = "previous",
        seed: int = 0,
    ) -> None:
        k = check_int(k, "k")
        if p is not None:
            p = check_int(p, "p")
            if p > k:
                raise ConfigError(f"`p`={p} must not exceed `k`={k}: a task's coefficients are K×p with K <= k.")
        if explained_variance is not None:
            explained_variance = check_float(
                explained_variance, "explained_variance", 0.0, 1.0, low_open=True, high_open=False
            )
        temporary_directions = check_int(temporary_directions, "temporary_directions", low=0)
        if init not in _INITS:
            raise ConfigError(f"`init` must be one of {list(_INITS)}, got {init!r}.")
        seed = check_int(seed, "seed", low=0)
        self.k = k
        self.explained_variance = explained_variance
        self.temporary_directions = temporary_directions
        self.init = init
        self.seed = seed
        self._p_option = p
        self._p: int | None = p
        self._layers: dict[str, SharedLinear] = {}
        self._tasks: list[str] = []
        self._training: str | None = None
        self._updates = 0

    def __repr__(self) -> str:
        return (
            f"SharedSubspace(k={self.k}, p={self._p}, explained_variance={self.explained_variance}, "
            f"temporary_directions={self.temporary_directions}, layers={len(self._layers)}, tasks={self._tasks}, "
            f"training={self._training!r})"
        )

    # -- read-only views -------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        """The stored (finished) tasks, in order."""
        return tuple(self._tasks)

    @property
    def training_task(self) -> str | None:
        return self._training

    @property
    def p(self) -> int | None:
        return self._p

    @property
    def layers(self) -> dict[str, SharedLinear]:
        return dict(self._layers)

    def _require_injected(self) -> None:
        if not self._layers:
            raise ConfigError("This SharedSubspace wraps no layer yet; call share.inject(model, ...) first.")

    # -- injection -------------------------------------------------------------------------
    def inject(
        self,
        model: nn.Module,
        target_modules: Patterns | None = None,
        *,
        exclude_modules: Patterns | None = None,
        lora_task: str | int | None = None,
        trainable: Patterns = (),
    ) -> InjectionSummary:
        """Wrap layers of ``model`` in place with :class:`SharedLinear`.

        Args:
            model: the model.
            target_modules: which layers (PEFT rules, see
                :mod:`cl_plugin.adapters.matching`); ``None`` takes every
                :class:`LoRALinear` of the model.
            exclude_modules: layers never to wrap.
            lora_task: when the targets are LoRA layers: the task id their
                active adapter was trained on. Its factors (with alpha/r folded
                into B) give the first basis, and it becomes the first stored task.
            trainable: modules to train in full (e.g. ``["head"]``); everything
                else but the coefficients is frozen.

        Returns:
            An :class:`~cl_plugin.adapters.lora.InjectionSummary`.

        Raises:
            ConfigError: already injected; targets mix LoRA and plain layers;
                ``lora_task`` missing (LoRA targets) or given (plain targets);
                ``p`` missing for plain targets; a LoRA is merged.
            NoMatchingModulesError: nothing matches.

        Nothing is changed in ``model`` when an error is raised.
        """
        if self._layers:
            raise ConfigError("This SharedSubspace is already injected; create a new one for another model.")
        if target_modules is None:
            found = lora_layers(model)
            if not found:
                raise NoMatchingModulesError(
                    f"{type(model).__name__} has no LoRA layer to start Share from; pass `target_modules=` "
                    "(e.g. ['qkv', 'proj', 'fc1', 'fc2']) to wrap plain nn.Linear layers."
                )
            names = tuple(found)
        else:
            names = match_modules(
                model, target_modules, exclude_modules, module_types=(nn.Linear, LoRALinear), what="target_modules"
            ).matched
        modules = {n: model.get_submodule(n) for n in names}
        is_lora = {n: isinstance(m, LoRALinear) for n, m in modules.items()}
        if len(set(is_lora.values())) > 1:
            lora_names = [n for n, v in is_lora.items() if v]
            plain = [n for n, v in is_lora.items() if not v]
            raise ConfigError(
                f"`target_modules` selects LoRA layers ({preview(lora_names, 3)}) and plain Linear layers "
                f"({preview(plain, 3)}); Share starts either from a trained LoRA or from scratch, not both."
            )
        from_lora = next(iter(is_lora.values()))
        trainable_names: tuple[str, ...] = ()
        if isinstance(trainable, str) or trainable:
            trainable_names = match_modules(model, trainable, None, module_types=None, what="trainable").matched
        both = sorted(set(trainable_names) & set(names))
        if both:
            raise ConfigError(f"{preview(both)} is both wrapped and in `trainable`; remove it from one of them.")
        check_parent_calls_forward(model, names, "target_modules")
        if from_lora:
            if lora_task is None:
                raise ConfigError(
                    "The targets carry LoRA adapters: pass `lora_task=` (the task id the active adapter was trained "
                    "on) so that its update becomes the first stored task."
                )
            first = adapter_key(lora_task, "lora_task")
            merged = [n for n, m in modules.items() if m.merged_adapter is not None]
            if merged:
                raise ConfigError(f"{preview(merged)} hold a merged LoRA; call unmerge_lora(model) first.")
            inactive = [n for n, m in modules.items() if m.active_adapter is None]
            if inactive:
                raise ConfigError(f"{preview(inactive)} have no active LoRA adapter to start from.")
            ranks = sorted({m.r for m in modules.values()})
            if self._p is None and len(ranks) > 1:
                raise ConfigError(f"The LoRA layers have different ranks {ranks}; pass `p=` to SharedSubspace.")
            p = self._p if self._p is not None else ranks[0]
        else:
            if lora_task is not None:
                raise ConfigError("`lora_task` is only for LoRA targets; these are plain nn.Linear layers.")
            if self._p is None:
                raise ConfigError("`p` is required when Share starts without a LoRA (SharedSubspace(k=..., p=...)).")
            p = self._p
        too_small = [n for n, m in modules.items() if p > min(m.in_features, m.out_features, self.k)]
        if too_small:
            raise ConfigError(f"`p`={p} exceeds the size of {preview(too_small)} (or `k`={self.k}); lower `p`.")
        # -- compute every basis before touching the model --
        plans = {}
        for name, m in modules.items():
            if from_lora:
                key = m.active_adapter
                fa = m.lora_A[key].detach().to("cpu", torch.float64).T
                fb = m.lora_B[key].detach().to("cpu", torch.float64) * m.scaling  # fold alpha/r into B
                basis_a = fit_basis([fa], self.k, self.explained_variance, generator=self._gen("inject", name, "a"))
                basis_b = fit_basis([fb], self.k, self.explained_variance, generator=self._gen("inject", name, "b"))
                ea, eb = basis_a.T @ fa, basis_b.T @ fb
                if ea.shape[1] != p:
                    eb, ea = _best_rank_p(eb, ea, p)
                check_finite({f"{name}.coef_a": ea, f"{name}.coef_b": eb}, "SharedSubspace.inject")
                plans[name] = (basis_a, basis_b, (ea, eb))
            else:
                zero_a = torch.zeros(m.in_features, 1, dtype=torch.float64)
                zero_b = torch.zeros(m.out_features, 1, dtype=torch.float64)
                basis_a = fit_basis([zero_a], self.k, None, generator=self._gen("inject", name, "a"))
                basis_b = fit_basis([zero_b], self.k, None, generator=self._gen("inject", name, "b"))
                plans[name] = (basis_a, basis_b, None)
        # -- change the model --
        for name, (basis_a, basis_b, coefs) in plans.items():
            layer = SharedLinear(modules[name], basis_a, basis_b, p=p, name=name)
            if coefs is not None:
                layer.add_task(first, coefs[0], coefs[1], trainable=False)
            replace_module(model, name, layer)
            self._layers[name] = layer
        frozen = {id(t) for layer in self._layers.values() for t in (layer.weight, layer.bias) if t is not None}
        freeze_except(model, trainable_names, frozen)
        self._p = p
        if from_lora:
            self._tasks = [first]
            self.select(first)
        else:
            self.disable()
        trainable_count, total = count_parameters(model)
        return InjectionSummary(tuple(self._layers), trainable_names, trainable_count, total)

    def attach(self, model: nn.Module, target_modules: Patterns | None = None) -> tuple[str, ...]:
        """Manage :class:`SharedLinear` layers that already exist in ``model``.

        For a model wrapped by another :class:`SharedSubspace` (e.g. one that
        was rebuilt after a restart); follow with :meth:`load_state_dict` to
        restore the bookkeeping exactly. Without it, the stored tasks are the
        layers' tasks, and a task with temporary directions counts as training.

        Args:
            model: the model holding the layers.
            target_modules: which layers (PEFT rules); ``None``: every SharedLinear.

        Returns:
            The names of the attached layers.

        Raises:
            ConfigError: this SharedSubspace is already injected, or the layers
                disagree on ``p`` or on their tasks (or ``p`` differs from this one's).
            NoMatchingModulesError: no SharedLinear is selected.
        """
        if self._layers:
            raise ConfigError("This SharedSubspace already manages layers; create a new one for another model.")
        if target_modules is None:
            names = tuple(n for n, m in model.named_modules() if isinstance(m, SharedLinear))
            if not names:
                raise NoMatchingModulesError(f"{type(model).__name__} has no SharedLinear layer to attach to.")
        else:
            names = match_modules(model, target_modules, None, module_types=(SharedLinear,), what="target_modules").matched
        layers = {n: model.get_submodule(n) for n in names}
        ps = sorted({layer.p for layer in layers.values()})
        tasks = {layer.tasks for layer in layers.values()}
        if len(ps) > 1 or (self._p_option is not None and ps[0] != self._p_option):
            raise ConfigError(f"The SharedLinear layers have p={ps}; this SharedSubspace has p={self._p_option}.")
        if len(tasks) > 1:
            raise ConfigError(f"The SharedLinear layers hold different tasks: {sorted(tasks)}.")
        first = next(iter(layers.values()))
        self._layers = layers
        self._p = ps[0]
        self._training = first.training_task
        self._tasks = [t for t in first.tasks if t != first.training_task]
        self._updates = len(self._tasks)
        return names

    def _gen(self, *parts: str) -> torch.Generator:
        return layer_generator(self.seed, "share", str(self._updates), *parts)

    # -- task boundaries -------------------------------------------------------------------
    def start_task(self, task_id: str | int, *, init: str | None = None) -> None:
        """Create task ``task_id``'s coefficients (and temporary directions), trainable and selected.

        Every other coefficient stays frozen (``requires_grad=False``), so DDP
        sees no trainable parameter without a gradient.

        Raises:
            ConfigError: a task is already training, ``task_id`` is stored, or ``init`` is unknown.
        """
        self._require_injected()
        if self._training is not None:
            raise ConfigError(f"Task {self._training!r} is still training; call finish_task() first.")
        key = adapter_key(task_id, "task_id")
        if key in self._tasks:
            raise ConfigError(f"Task {key!r} is already stored; Share keeps one coefficient set per task.")
        init = self.init if init is None else init
        if init not in _INITS:
            raise ConfigError(f"`init` must be one of {list(_INITS)}, got {init!r}.")
        phi = self.temporary_directions
        small = [n for n, layer in self._layers.items() if phi > min(layer.in_features, layer.out_features)]
        if small:
            raise ConfigError(f"`temporary_directions`={phi} exceeds the size of {preview(small)}.")
        p = self._p
        for name, layer in self._layers.items():
            ka, kb = layer.basis_a.shape[1], layer.basis_b.shape[1]
            if init == "previous" and self._tasks:
                last = self._tasks[-1]
                ea, eb = layer.coef_a[last].detach().clone(), layer.coef_b[last].detach().clone()
            else:
                gen = layer_generator(self.seed, "share-init", name, key)
                bound = 1.0 / math.sqrt(ka)
                ea = torch.empty(ka, p, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
                eb = torch.zeros(kb, p, dtype=torch.float64)
            layer.add_task(key, ea, eb, trainable=True)
            if phi:
                tmp_a = self._temporary_basis(layer.basis_a, phi, name, key, "a")
                tmp_b = self._temporary_basis(layer.basis_b, phi, name, key, "b")
                zeros = torch.zeros(phi, p, dtype=torch.float64)
                layer.set_temporary(tmp_a, zeros, tmp_b, zeros, trainable=True)
            layer.training_task = key
            layer.set_active(key)
        self._training = key

    def _temporary_basis(self, basis: Tensor, phi: int, name: str, key: str, side: str) -> Tensor:
        cols = basis.detach().to("cpu", torch.float64)
        gen = layer_generator(self.seed, "share-tmp", name, key, side)
        d, kk = cols.shape
        if kk + phi <= d:
            return _orthonormal_complement(cols, [], kk + phi, gen)[:, kk:]
        return _orthonormal_complement(torch.zeros(d, 0, dtype=torch.float64), [], phi, gen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of the task being trained (coefficients and temporary directions)."""
        self._require_injected()
        if self._training is None:
            return []
        out = []
        for layer in self._layers.values():
            out += [layer.coef_a[self._training], layer.coef_b[self._training]]
            if layer.has_temporary:
                out += [layer.tmp_basis_a, layer.tmp_coef_a, layer.tmp_basis_b, layer.tmp_coef_b]
        return out

    def cancel_task(self) -> None:
        """Drop the task being trained (its coefficients and temporary directions) without storing it.

        The basis and the stored tasks are untouched; the last stored task is
        selected again (the base weights when none is stored).

        Raises:
            ConfigError: no task is training.
        """
        self._require_injected()
        key = self._training
        if key is None:
            raise ConfigError("No task is training; there is nothing to cancel.")
        for layer in self._layers.values():
            layer.remove_task(key)
            layer.drop_temporary()
            layer.training_task = None
        self._training = None
        if self._tasks:
            self.select(self._tasks[-1])
        else:
            self.disable()

    @torch.no_grad()
    def finish_task(self) -> dict[str, tuple[int, int]]:
        """Fold the trained task into the basis and re-project every task onto it.

        Per layer and side: stack the factors of every stored task and of the
        new task (temporary part included), recompute the basis (top K of the
        centred stack), set every task's coefficients to the projection of its
        factor, drop the temporary directions. The new task becomes stored
        and frozen, and stays selected.

        Returns:
            Per layer, the new (K_α, K_β).

        Raises:
            ConfigError: no task is training.
            NonFiniteError: a trained factor holds NaN or inf (nothing is changed).
        """
        self._require_injected()
        key = self._training
        if key is None:
            raise ConfigError("No task is training; call start_task(task_id) first.")
        order = [*self._tasks, key]
        plans = {}
        for name, layer in self._layers.items():
            fas, fbs = {}, {}
            for t in order:
                fa, fb = layer.factors(t)
                fas[t], fbs[t] = fa.to("cpu", torch.float64), fb.to("cpu", torch.float64)
            check_finite({f"{name}.A[{key}]": fas[key], f"{name}.B[{key}]": fbs[key]}, "SharedSubspace.finish_task")
            basis_a = fit_basis(list(fas.values()), self.k, self.explained_variance, generator=self._gen("update", name, "a"))
            basis_b = fit_basis(list(fbs.values()), self.k, self.explained_variance, generator=self._gen("update", name, "b"))
            coefs = {t: (basis_a.T @ fas[t], basis_b.T @ fbs[t]) for t in order}
            plans[name] = (basis_a, basis_b, coefs)
        for name, (basis_a, basis_b, coefs) in plans.items():
            layer = self._layers[name]
            layer.set_basis(basis_a, basis_b)
            for t, (ea, eb) in coefs.items():
                layer.add_task(t, ea, eb, trainable=False)
            layer.drop_temporary()
            layer.training_task = None
            layer.set_active(key)
        self._tasks.append(key)
        self._training = None
        self._updates += 1
        return {name: (basis_a.shape[1], basis_b.shape[1]) for name, (basis_a, basis_b, _) in plans.items()}

    # -- inference -------------------------------------------------------------------------
    def select(self, task_id: str | int | None = None) -> None:
        """Use task ``task_id``'s coefficients; ``None`` (no task label): the mean update of all stored tasks."""
        self._require_injected()
        if task_id is None:
            if not self._tasks:
                raise ConfigError("No task is stored yet, so there is no mean to select; finish a task first.")
            for layer in self._layers.values():
                layer.set_mean(layer.mean_core_of(self._tasks))
            return
        key = adapter_key(task_id, "task_id")
        if key not in self._tasks and key != self._training:
            known = [*self._tasks, *([self._training] if self._training else [])]
            raise ConfigError(f"Unknown task {key!r}; known tasks: {known}.")
        for layer in self._layers.values():
            layer.set_active(key)

    def disable(self) -> None:
        """Use the base weights alone (no task's update)."""
        self._require_injected()
        for layer in self._layers.values():
            layer.set_active(None)

    def task_delta(self, task_id: str | int) -> TaskVector:
        """ΔW of task ``task_id`` for every wrapped layer, keyed ``<layer>.weight`` (feeds the mergers)."""
        self._require_injected()
        key = adapter_key(task_id, "task_id")
        if key not in self._tasks and key != self._training:
            raise ConfigError(f"Unknown task {key!r}; stored tasks: {self._tasks}.")
        return TaskVector({f"{n}.weight": layer.delta_weight(key) for n, layer in self._layers.items()})

    def mean_delta(self) -> TaskVector:
        """mean_t ΔW_t over the stored tasks, keyed ``<layer>.weight``."""
        self._require_injected()
        if not self._tasks:
            raise ConfigError("No task is stored yet; finish a task first.")
        return TaskVector({f"{n}.weight": layer.mean_delta_weight(self._tasks) for n, layer in self._layers.items()})

    # -- storage ---------------------------------------------------------------------------
    def bytes_per_task(self) -> int:
        """Bytes of one task's coefficients over all layers: (K_α + K_β)·p numbers per layer."""
        self._require_injected()
        total = 0
        for layer in self._layers.values():
            size = layer.basis_a.element_size()
            total += (layer.basis_a.shape[1] + layer.basis_b.shape[1]) * layer.p * size
        return total

    def shared_bytes(self) -> int:
        """Bytes of the shared basis over all layers: d_in·K_α + d_out·K_β numbers per layer."""
        self._require_injected()
        return sum(
            (layer.basis_a.numel() + layer.basis_b.numel()) * layer.basis_a.element_size() for layer in self._layers.values()
        )

    # -- state -----------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "explained_variance": self.explained_variance,
            "temporary_directions": self.temporary_directions,
            "init": self.init,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Basis, every task's coefficients and the bookkeeping, as a flat dict (tensors on CPU)."""
        self._require_injected()
        state: dict[str, Any] = {"format_version": _FORMAT_VERSION, **self._options()}
        state.update(
            p=self._p,
            tasks=list(self._tasks),
            training_task=self._training,
            updates=self._updates,
            layers=list(self._layers),
        )
        keys = [*self._tasks, *([self._training] if self._training else [])]
        for name, layer in self._layers.items():
            state[f"basis_a.{name}"] = layer.basis_a.detach().to("cpu").clone()
            state[f"basis_b.{name}"] = layer.basis_b.detach().to("cpu").clone()
            for t in keys:
                state[f"coef_a.{t}.{name}"] = layer.coef_a[t].detach().to("cpu").clone()
                state[f"coef_b.{t}.{name}"] = layer.coef_b[t].detach().to("cpu").clone()
            if self._training is not None and layer.has_temporary:
                for attr in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b"):
                    state[f"{attr}.{name}"] = getattr(layer, attr).detach().to("cpu").clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into the injected layers.

        Raises:
            ConfigError: not injected, an unknown ``format_version``, or options
                that differ from this object's (the message names them).
            StateDictMismatchError: the layers differ, or tensors are missing,
                unexpected or of the wrong shape.

        Nothing is changed when an error is raised.
        """
        self._require_injected()
        version = state.get("format_version")
        if version != _FORMAT_VERSION:
            raise ConfigError(f"Unsupported SharedSubspace state format_version={version!r}; expected {_FORMAT_VERSION}.")
        diff = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in self._options().items() if state.get(k) != v]
        if self._p_option is not None and state.get("p") != self._p_option:
            diff.append(f"p: saved {state.get('p')!r}, here {self._p_option!r}")
        if diff:
            raise ConfigError(
                "The saved SharedSubspace was built with other options (" + "; ".join(diff) + "). Construct "
                "SharedSubspace with the saved options to resume."
            )
        layers = list(state.get("layers", []))
        if layers != list(self._layers):
            missing = [n for n in self._layers if n not in layers]
            unexpected = [n for n in layers if n not in self._layers]
            raise StateDictMismatchError(
                f"SharedSubspace.load_state_dict: the saved layers differ (missing {preview(missing)}; unexpected "
                f"{preview(unexpected)}). Inject with the same target_modules."
            )
        tasks = [adapter_key(t, "task") for t in state.get("tasks", [])]
        training = state.get("training_task")
        p = state.get("p")
        if not isinstance(p, int) or p < 1:
            raise StateDictMismatchError(f"SharedSubspace.load_state_dict: `p` must be a positive int, got {p!r}.")
        keys = [*tasks, *([training] if training else [])]
        expected = set()
        for name in layers:
            expected |= {f"basis_a.{name}", f"basis_b.{name}"}
            expected |= {f"coef_{s}.{t}.{name}" for t in keys for s in "ab"}
        tmp_names = {f"{a}.{n}" for a in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b") for n in layers}
        given = {k for k, v in state.items() if isinstance(v, Tensor)}
        has_tmp = bool(given & tmp_names)
        if has_tmp:
            expected |= tmp_names
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if missing or unexpected:
            raise StateDictMismatchError(
                f"SharedSubspace.load_state_dict: missing {len(missing)} tensor(s): {preview(missing)}; "
                f"unexpected {len(unexpected)}: {preview(unexpected)}."
            )
        bad = []
        for name in layers:
            layer = self._layers[name]
            ba, bb = state[f"basis_a.{name}"], state[f"basis_b.{name}"]
            if ba.dim() != 2 or ba.shape[0] != layer.in_features or bb.dim() != 2 or bb.shape[0] != layer.out_features:
                bad.append(f"{name}: basis {tuple(ba.shape)} / {tuple(bb.shape)}")
                continue
            for t in keys:
                ca, cb = state[f"coef_a.{t}.{name}"], state[f"coef_b.{t}.{name}"]
                if tuple(ca.shape) != (ba.shape[1], p) or tuple(cb.shape) != (bb.shape[1], p):
                    bad.append(f"{name}: coefficients of {t!r} {tuple(ca.shape)} / {tuple(cb.shape)}")
        if bad:
            raise StateDictMismatchError(f"SharedSubspace.load_state_dict: shapes do not fit: {'; '.join(bad[:5])}.")
        check_finite({k: state[k] for k in sorted(given)}, "SharedSubspace.load_state_dict")
        # -- write --
        for name in layers:
            layer = self._layers[name]
            for t in list(layer.tasks):
                layer.remove_task(t)
            layer.drop_temporary()
            layer.p = p
            layer.set_basis(state[f"basis_a.{name}"], state[f"basis_b.{name}"])
            for t in keys:
                layer.add_task(t, state[f"coef_a.{t}.{name}"], state[f"coef_b.{t}.{name}"], trainable=t == training)
            if has_tmp:
                layer.set_temporary(
                    state[f"tmp_basis_a.{name}"],
                    state[f"tmp_coef_a.{name}"],
                    state[f"tmp_basis_b.{name}"],
                    state[f"tmp_coef_b.{name}"],
                    trainable=True,
                )
            layer.training_task = training
        self._p = p
        self._tasks = tasks
        self._training = training
        self._updates = int(state.get("updates", len(tasks)))
        if training:
            self.select(training)
        elif tasks:
            self.select(tasks[-1])
        else:
            self.disable()

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to a safetensors file (plain values in its metadata).

        The file is written atomically; an existing one is replaced, with a log
        line (:func:`cl_plugin._io.atomic_output`).
        """
        from safetensors.torch import save_file

        from cl_plugin._io import atomic_output

        state = self.state_dict()
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, Tensor)}
        plain = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        with atomic_output(path) as tmp:
            save_file(tensors, os.fspath(tmp), metadata={"format": _FORMAT, "state": json.dumps(plain)})

    def load(self, path: str | os.PathLike) -> None:
        """Read a file written by :meth:`save` into the injected layers (see :meth:`load_state_dict`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No SharedSubspace file at {path!r}.")
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ConfigError(f"{path!r} was not written by SharedSubspace.save (format={metadata.get('format')!r}).")
        state: dict[str, Any] = json.loads(metadata["state"])
        state.update(load_file(path))
        self.load_state_dict(state)
