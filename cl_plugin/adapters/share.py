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
from cl_plugin.adapters.config import ShareConfig, adapter_key, check_int
from cl_plugin.adapters.layer import (
    AdapterLayer,
    InjectionSummary,
    check_parent_calls_forward,
    count_parameters,
    freeze_except,
    layer_generator,
    replace_module,
)
from cl_plugin.adapters.lora import lora_layers
from cl_plugin.adapters.lora_layer import LoRALinear
from cl_plugin.adapters.matching import Patterns, match_modules
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError, preview
from cl_plugin.task_vectors import TaskVector

__all__ = ["SharedLinear", "SharedSubspace", "TEMPORARY_NAMES", "fit_basis"]

_FORMAT = "cl_plugin.SharedSubspace"
_FORMAT_VERSION = 1
#: The tensors a task with temporary directions trains besides its coefficients (per layer).
TEMPORARY_NAMES = ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b")
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
class SharedLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus a shared basis and per-task coefficients.

    Built by :meth:`SharedSubspace.inject`; :class:`SharedSubspace` manages the
    tasks. ``weight`` and ``bias`` are the base layer's own Parameters (same
    state-dict names as before wrapping). The layer holds all of Share's state
    for its weight: the basis, every task's coefficients, and while a task
    trains its temporary directions; the manager keeps only its options.

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
    ``tmp_coef_b``. Loading a state dict re-shapes the basis, creates the
    coefficients it names and takes ``p`` from them.

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

    adapter_layer_names = ("coef_a", "coef_b")
    shaped_tensor_names = ("basis_a", "basis_b", *TEMPORARY_NAMES)
    optional_tensor_names = TEMPORARY_NAMES

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
        super().__init__(base, name)
        self.in_features, self.out_features = d_in, d_out
        self.p = check_int(p, "p")
        factory = self._factory()
        self.register_buffer("basis_a", basis_a.detach().to(**factory).contiguous())
        self.register_buffer("basis_b", basis_b.detach().to(**factory).contiguous())
        for attr in TEMPORARY_NAMES:
            self.register_parameter(attr, None)
        self.register_buffer("mean_core", None, persistent=False)
        self.training_task: str | None = None
        self.use_mean = False
        self.train(base.training)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task with coefficients here (the training one included), in order."""
        return self.adapters

    @property
    def has_temporary(self) -> bool:
        return self.tmp_basis_a is not None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, K_a={self.basis_a.shape[1]}, "
            f"K_b={self.basis_b.shape[1]}, p={self.p}, tasks={list(self.tasks)}, "
            f"active={'mean' if self.use_mean else self.active_adapter!r}"
        )

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"coef_a": (self.basis_a.shape[1], self.p), "coef_b": (self.basis_b.shape[1], self.p)}

    # -- coefficients ----------------------------------------------------------------------
    def add_task(self, key: str, coef_a: Tensor, coef_b: Tensor, *, trainable: bool = False) -> None:
        """Store coefficients (K_α×p, K_β×p) for task ``key``, replacing any it had."""
        key = adapter_key(key, "task_id")
        ka, kb = self.basis_a.shape[1], self.basis_b.shape[1]
        if tuple(coef_a.shape) != (ka, self.p) or tuple(coef_b.shape) != (kb, self.p):
            raise ConfigError(
                f"coefficients {tuple(coef_a.shape)} / {tuple(coef_b.shape)} do not fit K_a={ka}, K_b={kb}, p={self.p}."
            )
        for store, value in ((self.coef_a, coef_a), (self.coef_b, coef_b)):
            if key in store and store[key].shape == value.shape:
                with torch.no_grad():
                    store[key].copy_(value.detach())  # keep the Parameter object (optimizers hold it)
                store[key].requires_grad_(trainable)
            else:
                store[key] = self._new_parameter(value, trainable)

    def remove_task(self, key: str) -> None:
        self.delete_adapter(key)

    def set_basis(self, basis_a: Tensor, basis_b: Tensor) -> None:
        factory = self._factory()
        self.basis_a = basis_a.detach().to(**factory).contiguous()
        self.basis_b = basis_b.detach().to(**factory).contiguous()
        self.mean_core = None
        self.use_mean = False

    def set_temporary(self, basis_a: Tensor, coef_a: Tensor, basis_b: Tensor, coef_b: Tensor, *, trainable: bool = True) -> None:
        for attr, value in zip(TEMPORARY_NAMES, (basis_a, coef_a, basis_b, coef_b)):
            setattr(self, attr, self._new_parameter(value, trainable))

    def drop_temporary(self) -> None:
        for attr in TEMPORARY_NAMES:
            setattr(self, attr, None)

    def temporary_parameters(self) -> list[nn.Parameter]:
        """The temporary directions and their coefficients (empty when there are none)."""
        return [getattr(self, attr) for attr in TEMPORARY_NAMES] if self.has_temporary else []

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
    def set_active(self, key: str | int | None) -> None:
        """Use task ``key``'s coefficients (``None``: the base layer alone)."""
        if key is not None:
            key = adapter_key(key, "task label")
            if not self.has_adapter(key):
                raise ConfigError(f"Unknown task {key!r}; this layer holds {list(self.tasks)}.")
        self.active_adapter = key
        self.use_mean = False

    def set_mean(self, core: Tensor) -> None:
        """Use the merged update β C αᵀ (C: K_β×K_α)."""
        self.mean_core = core.detach().to(**self._factory())
        self.use_mean = True
        self.active_adapter = None

    def selection(self) -> object:
        return ("mean", self.mean_core) if self.use_mean else ("task", self.active_adapter)

    def restore_selection(self, token: object) -> None:
        kind, value = token  # type: ignore[misc]
        if kind == "mean":
            self.set_mean(value)
        else:
            self.set_active(value)

    # -- forward ---------------------------------------------------------------------------
    def _base_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def _adapter_forward(self, x: Tensor, key: str) -> Tensor:
        fa, fb = self.factors(key)
        return (x.to(fa.dtype) @ fa) @ fb.T

    def _selected_output(self, x: Tensor) -> Tensor | None:
        if self.use_mean and self.mean_core is not None:
            h = x.to(self.basis_a.dtype) @ self.basis_a
            return (h @ self.mean_core.T) @ self.basis_b.T
        return super()._selected_output(x)

    # -- state dict ------------------------------------------------------------------------
    def _prepare_state(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        # p and the coefficients' shapes come from the state dict, like the basis.
        shapes = {}
        for store in self.adapter_layer_names:
            head = f"{prefix}{store}."
            shapes.update({(store, k[len(head) :]): v.shape for k, v in state_dict.items() if k.startswith(head) and isinstance(v, Tensor)})
        if shapes:
            self.p = int(next(iter(shapes.values()))[-1])
        for (store, key), shape in shapes.items():
            held = getattr(self, store)
            if key in held and held[key].shape != shape:
                del held[key]
        self.mean_core = None
        self.use_mean = False
        super()._prepare_state(state_dict, prefix)


def wrap_for_loading(model: nn.Module, names: Sequence[str]) -> None:
    """Put an empty :class:`SharedLinear` (no basis, no task) at each of ``names``, to load a state dict into.

    The layers take their basis, coefficients and ``p`` from the state dict
    that loads next; the wrapped layers' weights are kept.
    """
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, SharedLinear):
            continue
        empty_a = torch.zeros(base.in_features, 0)
        empty_b = torch.zeros(base.out_features, 0)
        replace_module(model, name, SharedLinear(base, empty_a, empty_b, p=1, name=name))


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

    The tensors live in the :class:`SharedLinear` layers (so in the model's
    ``state_dict``); this object keeps its options, which layers it manages,
    and how many basis updates it made (the seed of the next random draws).
    The tasks are read from the layers.

    Args:
        k, p, explained_variance, temporary_directions, init, seed: the options
            of :class:`~cl_plugin.adapters.ShareConfig` (checked there).
        config: the options as one ``ShareConfig`` instead.

    State (:meth:`state_dict`, a view for files and hand-made checkpoints):
    plain values ``format_version``, ``k``, ``p``, ``explained_variance``,
    ``temporary_directions``, ``init``, ``seed``, ``tasks`` (list of str),
    ``training_task``, ``updates``, ``layers`` (list of str), and CPU tensors
    ``basis_a.<layer>`` (d_in×K_α), ``basis_b.<layer>`` (d_out×K_β),
    ``coef_a.<task>.<layer>`` (K_α×p), ``coef_b.<task>.<layer>`` (K_β×p),
    ``tmp_*.<layer>`` while a task with temporary directions trains.

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
        config: ShareConfig | None = None,
    ) -> None:
        if config is None:
            config = ShareConfig(k, p, explained_variance, temporary_directions, init, seed)
        elif not isinstance(config, ShareConfig):
            raise ConfigError(f"`config` must be a ShareConfig, got {type(config).__name__}.")
        self.config = config
        self._layers: dict[str, SharedLinear] = {}
        self._updates = 0

    def __repr__(self) -> str:
        return (
            f"SharedSubspace(k={self.k}, p={self.p}, explained_variance={self.explained_variance}, "
            f"temporary_directions={self.temporary_directions}, layers={len(self._layers)}, tasks={list(self.tasks)}, "
            f"training={self.training_task!r})"
        )

    # -- options and read-only views -------------------------------------------------------
    k = property(lambda self: self.config.k)
    explained_variance = property(lambda self: self.config.explained_variance)
    temporary_directions = property(lambda self: self.config.temporary_directions)
    init = property(lambda self: self.config.init)
    seed = property(lambda self: self.config.seed)

    @property
    def _first(self) -> SharedLinear | None:
        return next(iter(self._layers.values()), None)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The stored (finished) tasks, in order."""
        first = self._first
        return () if first is None else tuple(t for t in first.tasks if t != first.training_task)

    @property
    def training_task(self) -> str | None:
        first = self._first
        return None if first is None else first.training_task

    @property
    def p(self) -> int | None:
        first = self._first
        return self.config.p if first is None else first.p

    @property
    def updates(self) -> int:
        """How many basis updates (finished tasks after the first basis) were made; seeds the next draws."""
        return self._updates

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
            An :class:`~cl_plugin.adapters.InjectionSummary`.

        Raises:
            ConfigError: already injected; targets mix LoRA and plain layers;
                ``lora_task`` missing (LoRA targets) or given (plain targets);
                ``p`` missing for plain targets; a LoRA is merged.
            NoMatchingModulesError: nothing matches.

        Nothing is changed in ``model`` when an error is raised.
        """
        if self._layers:
            raise ConfigError("This SharedSubspace is already injected; create a new one for another model.")
        k, p_option = self.k, self.config.p
        if target_modules is None:
            found = {n: m for n, m in lora_layers(model).items() if isinstance(m, LoRALinear)}
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
            if p_option is None and len(ranks) > 1:
                raise ConfigError(f"The LoRA layers have different ranks {ranks}; pass `p=` to SharedSubspace.")
            p = p_option if p_option is not None else ranks[0]
        else:
            if lora_task is not None:
                raise ConfigError("`lora_task` is only for LoRA targets; these are plain nn.Linear layers.")
            if p_option is None:
                raise ConfigError("`p` is required when Share starts without a LoRA (SharedSubspace(k=..., p=...)).")
            p = p_option
        too_small = [n for n, m in modules.items() if p > min(m.in_features, m.out_features, k)]
        if too_small:
            raise ConfigError(f"`p`={p} exceeds the size of {preview(too_small)} (or `k`={k}); lower `p`.")
        # -- compute every basis before touching the model --
        plans = {}
        for name, m in modules.items():
            if from_lora:
                key = m.active_adapter
                fa = m.lora_A[key].detach().to("cpu", torch.float64).T
                fb = m.lora_B[key].detach().to("cpu", torch.float64) * m.scaling  # fold alpha/r into B
                basis_a = fit_basis([fa], k, self.explained_variance, generator=self._gen("inject", name, "a"))
                basis_b = fit_basis([fb], k, self.explained_variance, generator=self._gen("inject", name, "b"))
                ea, eb = basis_a.T @ fa, basis_b.T @ fb
                if ea.shape[1] != p:
                    eb, ea = _best_rank_p(eb, ea, p)
                check_finite({f"{name}.coef_a": ea, f"{name}.coef_b": eb}, "SharedSubspace.inject")
                plans[name] = (basis_a, basis_b, (ea, eb))
            else:
                zero_a = torch.zeros(m.in_features, 1, dtype=torch.float64)
                zero_b = torch.zeros(m.out_features, 1, dtype=torch.float64)
                basis_a = fit_basis([zero_a], k, None, generator=self._gen("inject", name, "a"))
                basis_b = fit_basis([zero_b], k, None, generator=self._gen("inject", name, "b"))
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
        if from_lora:
            self.select(first)
        else:
            self.disable()
        trainable_count, total = count_parameters(model)
        return InjectionSummary(tuple(self._layers), trainable_names, trainable_count, total)

    def attach(
        self,
        model: nn.Module,
        target_modules: Patterns | None = None,
        *,
        training_task: str | int | None = None,
        updates: int | None = None,
    ) -> tuple[str, ...]:
        """Manage :class:`SharedLinear` layers that already exist in ``model`` (e.g. loaded from a checkpoint).

        The layers hold the tensors; this records which task trains, freezes
        every other task's coefficients, and selects the training task (else
        the last stored one, else none).

        Args:
            model: the model holding the layers.
            target_modules: which layers (PEFT rules); ``None``: every SharedLinear.
            training_task: the task being trained, if any. Default: the one the
                layers say trains (a task in this process), else the last task
                when the layers hold temporary directions.
            updates: the number of basis updates made so far (default: one per
                stored task), which seeds the next random draws.

        Returns:
            The names of the attached layers.

        Raises:
            ConfigError: this SharedSubspace is already injected, or the layers
                disagree on ``p`` or on their tasks (or ``p`` differs from this
                one's), or ``training_task`` is not one of their tasks.
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
        self._take_over({n: model.get_submodule(n) for n in names}, training_task, updates)
        return names

    def _take_over(self, layers: Mapping[str, SharedLinear], training_task: str | int | None, updates: int | None) -> None:
        """Manage ``layers`` (the checks and settings of :meth:`attach`)."""
        ps = sorted({layer.p for layer in layers.values()})
        tasks = {layer.tasks for layer in layers.values()}
        if len(ps) > 1 or (self.config.p is not None and ps[0] != self.config.p):
            raise ConfigError(f"The SharedLinear layers have p={ps}; this SharedSubspace has p={self.config.p}.")
        if len(tasks) > 1:
            raise ConfigError(f"The SharedLinear layers hold different tasks: {sorted(tasks)}.")
        first = next(iter(layers.values()))
        if training_task is None:
            training = first.training_task
            if training is None and first.has_temporary and first.tasks:
                training = first.tasks[-1]
        else:
            training = adapter_key(training_task, "training_task")
            if training not in first.tasks:
                raise ConfigError(f"`training_task`={training!r} is not a task of the layers ({list(first.tasks)}).")
        stored = [t for t in first.tasks if t != training]
        updates = len(stored) if updates is None else check_int(updates, "updates", low=0)
        self._layers = dict(layers)
        self._updates = updates
        for layer in self._layers.values():
            layer.training_task = training
            layer.set_trainable(training)
            for param in layer.temporary_parameters():
                param.requires_grad_(training is not None)
        if training is not None:
            self.select(training)
        elif stored:
            self.select(stored[-1])
        else:
            self.disable()

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
        if self.training_task is not None:
            raise ConfigError(f"Task {self.training_task!r} is still training; call finish_task() first.")
        key = adapter_key(task_id, "task_id")
        stored = self.tasks
        if key in stored:
            raise ConfigError(f"Task {key!r} is already stored; Share keeps one coefficient set per task.")
        init = self.init if init is None else ShareConfig(k=self.k, init=init).init
        phi = self.temporary_directions
        small = [n for n, layer in self._layers.items() if phi > min(layer.in_features, layer.out_features)]
        if small:
            raise ConfigError(f"`temporary_directions`={phi} exceeds the size of {preview(small)}.")
        for name, layer in self._layers.items():
            p = layer.p
            ka, kb = layer.basis_a.shape[1], layer.basis_b.shape[1]
            if init == "previous" and stored:
                last = stored[-1]
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
        key = self.training_task
        if key is None:
            return []
        out = []
        for layer in self._layers.values():
            out += [layer.coef_a[key], layer.coef_b[key], *layer.temporary_parameters()]
        return out

    def cancel_task(self) -> None:
        """Drop the task being trained (its coefficients and temporary directions) without storing it.

        The basis and the stored tasks are untouched; the last stored task is
        selected again (the base weights when none is stored).

        Raises:
            ConfigError: no task is training.
        """
        self._require_injected()
        key = self.training_task
        if key is None:
            raise ConfigError("No task is training; there is nothing to cancel.")
        for layer in self._layers.values():
            layer.training_task = None
            layer.remove_task(key)
            layer.drop_temporary()
        stored = self.tasks
        if stored:
            self.select(stored[-1])
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
        key = self.training_task
        if key is None:
            raise ConfigError("No task is training; call start_task(task_id) first.")
        order = [*self.tasks, key]
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
        self._updates += 1
        return {name: (basis_a.shape[1], basis_b.shape[1]) for name, (basis_a, basis_b, _) in plans.items()}

    # -- inference -------------------------------------------------------------------------
    def select(self, task_id: str | int | None = None) -> None:
        """Use task ``task_id``'s coefficients; ``None`` (no task label): the mean update of all stored tasks."""
        self._require_injected()
        stored = self.tasks
        if task_id is None:
            if not stored:
                raise ConfigError("No task is stored yet, so there is no mean to select; finish a task first.")
            for layer in self._layers.values():
                layer.set_mean(layer.mean_core_of(stored))
            return
        key = adapter_key(task_id, "task_id")
        if key not in stored and key != self.training_task:
            known = [*stored, *([self.training_task] if self.training_task else [])]
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
        if key not in self.tasks and key != self.training_task:
            raise ConfigError(f"Unknown task {key!r}; stored tasks: {list(self.tasks)}.")
        return TaskVector({f"{n}.weight": layer.delta_weight(key) for n, layer in self._layers.items()})

    def mean_delta(self) -> TaskVector:
        """mean_t ΔW_t over the stored tasks, keyed ``<layer>.weight``."""
        self._require_injected()
        stored = self.tasks
        if not stored:
            raise ConfigError("No task is stored yet; finish a task first.")
        return TaskVector({f"{n}.weight": layer.mean_delta_weight(stored) for n, layer in self._layers.items()})

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

    # -- state (a view of the layers, for files) --------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "explained_variance": self.explained_variance,
            "temporary_directions": self.temporary_directions,
            "init": self.init,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Basis, every task's coefficients and the bookkeeping, as a flat dict (CPU copies of the layers' tensors)."""
        self._require_injected()
        state: dict[str, Any] = {"format_version": _FORMAT_VERSION, **self._options()}
        training = self.training_task
        state.update(p=self.p, tasks=list(self.tasks), training_task=training, updates=self._updates, layers=list(self._layers))
        for name, layer in self._layers.items():
            for key, value in layer.state_dict().items():
                if key in ("weight", "bias"):
                    continue
                store, _, task = key.partition(".")
                flat = f"{store}.{task}.{name}" if task else f"{store}.{name}"
                state[flat] = value.detach().to("cpu").clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into the injected layers.

        Raises:
            ConfigError: not injected, an unknown ``format_version``, or options
                that differ from this object's (the message names them).
            StateDictMismatchError: the layers differ, or tensors are missing,
                unexpected or of shapes that do not fit each other.

        Nothing is changed when an error is raised.
        """
        self._require_injected()
        version = state.get("format_version")
        if version != _FORMAT_VERSION:
            raise ConfigError(f"Unsupported SharedSubspace state format_version={version!r}; expected {_FORMAT_VERSION}.")
        diff = [f"{k}: saved {state.get(k)!r}, here {v!r}" for k, v in self._options().items() if state.get(k) != v]
        if self.config.p is not None and state.get("p") != self.config.p:
            diff.append(f"p: saved {state.get('p')!r}, here {self.config.p!r}")
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
        given = {k for k, v in state.items() if isinstance(v, Tensor)}
        has_tmp = any(k.startswith(TEMPORARY_NAMES) for k in given)
        expected = set()
        for name in layers:
            expected |= {f"basis_a.{name}", f"basis_b.{name}"} | {f"coef_{s}.{t}.{name}" for t in keys for s in "ab"}
            expected |= {f"{attr}.{name}" for attr in TEMPORARY_NAMES} if has_tmp else set()
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise StateDictMismatchError(
                f"SharedSubspace.load_state_dict: missing {len(missing)} tensor(s): {preview(missing)}; "
                f"unexpected {len(unexpected)}: {preview(unexpected)}."
            )
        per_layer = {name: _layer_state(state, name, keys, has_tmp) for name in layers}
        bad = [problem for name, sub in per_layer.items() if (problem := _shape_problem(self._layers[name], sub, p))]
        if bad:
            raise StateDictMismatchError(f"SharedSubspace.load_state_dict: shapes do not fit: {'; '.join(bad[:5])}.")
        check_finite({k: state[k] for k in sorted(given)}, "SharedSubspace.load_state_dict")
        # -- write: every layer loads its part as from a model checkpoint --
        for name, sub in per_layer.items():
            layer = self._layers[name]
            layer.training_task = None
            for t in layer.tasks:
                layer.remove_task(t)
            layer.load_state_dict(sub, strict=False)
        self._take_over(self._layers, training, int(state.get("updates", len(tasks))))

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


def _layer_state(state: Mapping[str, Any], name: str, keys: Sequence[str], has_tmp: bool) -> dict[str, Tensor]:
    """Layer ``name``'s part of a flat :meth:`SharedSubspace.state_dict`, keyed as in the layer's own state dict."""
    sub = {"basis_a": state[f"basis_a.{name}"], "basis_b": state[f"basis_b.{name}"]}
    for t in keys:
        sub[f"coef_a.{t}"] = state[f"coef_a.{t}.{name}"]
        sub[f"coef_b.{t}"] = state[f"coef_b.{t}.{name}"]
    if has_tmp:
        sub.update({attr: state[f"{attr}.{name}"] for attr in TEMPORARY_NAMES})
    return sub


def _shape_problem(layer: SharedLinear, sub: Mapping[str, Tensor], p: int) -> str | None:
    """Why the layer state ``sub`` does not fit ``layer`` (or itself), or None."""
    ba, bb = sub["basis_a"], sub["basis_b"]
    if ba.dim() != 2 or ba.shape[0] != layer.in_features or bb.dim() != 2 or bb.shape[0] != layer.out_features:
        return f"{layer.layer_name}: basis {tuple(ba.shape)} / {tuple(bb.shape)}"
    for key, value in sub.items():
        if key.startswith("coef_"):
            k = ba.shape[1] if key.startswith("coef_a") else bb.shape[1]
            if tuple(value.shape) != (k, p):
                return f"{layer.layer_name}: {key} {tuple(value.shape)}, expected {(k, p)}"
    return None
