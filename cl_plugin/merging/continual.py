"""The boundary core: θ₀, the streaming merge of a model's weights, and its normalisation statistics.

Every caller that folds a model's weights at task boundaries (the
``ModelMerging`` callback, ``ContinualEvaluation``'s comparison methods, the
Avalanche plugin) goes through :class:`ContinualMerge`, so the rules below
hold for all of them:

* **Which tensors.** The module's floating-point parameters and buffers,
  minus ``exclude`` globs, one name per tensor: a tensor that several names
  share (tied weights) is taken once, under its first name, and left out when
  ``exclude`` matches any of its names. Integer buffers pass through.
* **Normalisation statistics** (the ``running_mean``/``running_var`` buffers
  of BatchNorm and of InstanceNorm with ``track_running_stats``) are not
  merged like weights: a sum or a selection of variance differences can make
  a variance negative (seen: task arithmetic on a timm ResNet gave NaN
  logits). With ``statistics="average"`` (the default) the merged model's
  statistics are the mean of the statistics each experience ended with, which
  is always a valid mean and a non-negative variance. ``statistics="merge"``
  merges them with the method like any tensor; a merged variance below zero
  or non-finite is then reported with a warning.
* **All or nothing.** :meth:`fold` reads the module, checks every value, and
  changes the state only when the whole fold succeeded; the merged weights are
  checked finite before anyone writes them. :meth:`fold_in_place` checks the
  same before it writes anything; an error inside the fold itself after that
  (out of memory, an SVD that does not converge) leaves a merger that refuses
  to be used or saved, rather than one that holds part of a task.

No Lightning import: usable from any training loop.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cl_plugin._checkpoint import check_tensor_dict, read
from cl_plugin._distributed_checkpoint import is_dtensor, shard_mesh_dim, sharded_view
from cl_plugin._checks import check_bool, check_same_layout, check_scale, is_finite, max_abs
from cl_plugin.errors import (
    CheckpointError,
    ClPluginError,
    ConfigError,
    DivergedError,
    NonFiniteError,
    did_you_mean,
    preview,
)
from cl_plugin._packed import aligned_runs, packed_like
from cl_plugin.merging.layout import ShardLayout, cpu_group, cpu_mesh_group, split_range
from cl_plugin.merging.registry import MERGERS, get_merger
from cl_plugin.task_vectors import TaskVector, select_names, tied_aliases

__all__ = [
    "ContinualMerge",
    "STATISTICS",
    "check_exclude",
    "merge_method_options",
    "normalisation_statistics",
    "snapshot",
    "write_into",
]

#: How normalisation statistics are merged (see the module docstring).
STATISTICS = ("average", "merge")

_STAT_BUFFERS = ("running_mean", "running_var")


def normalisation_statistics(module: nn.Module) -> list[str]:
    """State-dict names of the running statistics of every BatchNorm / InstanceNorm layer in ``module``."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            for buffer in _STAT_BUFFERS:
                if getattr(sub, buffer, None) is not None:
                    names.append(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def _snapshot(state: Mapping[str, Tensor], names: Iterable[str], device: torch.device) -> dict[str, Tensor]:
    with torch.no_grad():
        return {n: state[n].detach().to(device=device, copy=True) for n in names}


def snapshot(module: nn.Module, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Copies of the module's named state entries on ``device`` (detached, never aliasing the module)."""
    return _snapshot(module.state_dict(), names, torch.device(device))


def write_into(module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into the module's parameters and buffers in place.

    In place, so an optimizer's references to the parameters stay valid (and
    DDP's buckets keep pointing at the same storage).
    """
    state = module.state_dict()
    with torch.no_grad():
        for n, value in tensors.items():
            state[n].copy_(value)


def merge_method_options(mapping: Mapping[str, Any] | None, keywords: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """One dict of merger options from ``method_options={...}`` and ``**keywords`` (configuration files use the mapping)."""
    if mapping is not None and not isinstance(mapping, Mapping):
        raise ConfigError(f"`method_options` must be a mapping of option name to value, got {mapping!r} ({owner}).")
    mapping = dict(mapping or {})
    both = sorted(set(mapping) & set(keywords))
    if both:
        raise ConfigError(f"{both} given both in `method_options` and as keywords ({owner}); give each option once.")
    return {**mapping, **keywords}


def check_exclude(exclude: object, owner: str) -> tuple[str, ...]:
    """``exclude`` as a tuple of glob patterns (one string is one pattern), else ConfigError."""
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"`exclude` must be glob patterns (strings), got {exclude!r} ({owner}).") from None
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"`exclude` must be glob patterns (strings), got {exclude!r} ({owner}).")
    return patterns


#: Matrices are placed whole on their owners (``ContinualMerge(whole_matrices=True)``) only
#: while no rank then holds more than this fraction above the even split's largest share.
WHOLE_MATRIX_EXCESS = 0.01


class ContinualMerge:
    """θ₀ and the streaming merge of one model's weights over a stream of experiences.

    Args:
        method: a name in :data:`cl_plugin.merging.MERGERS` (default ``"magmax"``).
        scale: λ in θ₀ + λ·merged; None: the method's default.
        exclude: glob patterns of state-dict names that are not merged.
        statistics: ``"average"`` (default) or ``"merge"``: how normalisation
            statistics are merged (module docstring).
        device: where θ₀ and the merger state live (default CPU).
        method_options: the merger's options (e.g. ``{"alpha": 0.5}`` for OPCM).
        whole_matrices: when the core splits replicated weights itself (DDP)
            for a merger that works on whole matrices (OPCM), place each matrix
            whole on its owner rank, so its fold needs no communication; done
            only while no rank then holds more than 1% above an even split.
            False: always split evenly (cores that share θ₀ slices with others
            need one layout).

    Raises:
        ConfigError: an unknown method, option or ``statistics``.

    Example:
        >>> core = ContinualMerge("average")
        >>> net = nn.Linear(2, 1)
        >>> core.bind(net); core.capture_theta0(net)
        >>> with torch.no_grad(): _ = net.weight.add_(1.0)
        >>> core.fold(net)["weight"]
        tensor([[1., 1.]])
        >>> core.num_tasks
        1
    """

    def __init__(
        self,
        method: str = "magmax",
        *,
        scale: float | None = None,
        exclude: Iterable[str] = (),
        statistics: str = "average",
        device: str | torch.device = "cpu",
        method_options: Mapping[str, Any] | None = None,
        whole_matrices: bool = True,
    ) -> None:
        if not isinstance(method, str) or method not in MERGERS:
            raise ConfigError(
                f"Unknown merging method {method!r}. Choose one of {sorted(MERGERS)}.{did_you_mean(str(method), MERGERS)}"
            )
        if statistics not in STATISTICS:
            raise ConfigError(
                f"`statistics` must be one of {list(STATISTICS)}, got {statistics!r}.{did_you_mean(str(statistics), STATISTICS)}"
            )
        self.method = method
        self.whole_matrices = check_bool(whole_matrices, "whole_matrices", "ContinualMerge")
        self.method_options = dict(method_options or {})
        self.merger = get_merger(method, **self.method_options)
        #: λ in θ₀ + λ·merged (the method's default unless given); may be changed between boundaries.
        self.scale = self.merger.default_scale if scale is None else check_scale(scale, f"ContinualMerge(method={method!r})")
        self.exclude = check_exclude(exclude, "ContinualMerge")
        self.statistics = statistics
        self.device = torch.device(device)
        self._statistics_merger = get_merger("average")
        self.names: list[str] | None = None  # merged by the method
        self.statistic_names: list[str] = []  # averaged (statistics="average")
        self.aliases: dict[str, str] = {}
        self.float_names: list[str] | None = None  # every float entry of the module, to notice changes
        self._theta0: dict[str, Tensor] | None = None
        self._theta0_largest: dict[str, tuple[int, float]] = {}  # name -> (θ₀'s version, max |θ₀|)
        self._module_statistics: frozenset[str] = frozenset()
        #: This rank's slice of every merged tensor (None: unsharded); set by :meth:`bind`.
        self.layout: ShardLayout | None = None

    # -- the model ------------------------------------------------------------------------------------
    @property
    def theta0(self) -> dict[str, Tensor] | None:
        """θ₀: this rank's part of each tensor (name -> tensor, flat when sharded), on :attr:`device`; None before it is taken."""
        return self._theta0

    @theta0.setter
    def theta0(self, value: dict[str, Tensor] | None) -> None:
        self._theta0 = value
        self._theta0_largest = {}

    @property
    def num_tasks(self) -> int:
        return self.merger.num_tasks

    @property
    def all_names(self) -> list[str]:
        """Every tensor θ₀ holds: the merged ones, then the averaged statistics."""
        return (self.names or []) + self.statistic_names

    def select(self, module: nn.Module) -> tuple[list[str], list[str], dict[str, str], list[str]]:
        """(merged names, statistic names, aliases, all float names) of ``module``, without binding."""
        state = module.state_dict()
        floats = [n for n, t in state.items() if t.is_floating_point()]
        if not floats:
            raise ConfigError(f"{type(module).__name__} has no floating-point parameters or buffers: there is nothing to merge.")
        selected = set(select_names(floats, exclude=self.exclude or None))
        aliases = tied_aliases({n: state[n] for n in floats})
        excluded_tensors = {aliases.get(n, n) for n in floats if n not in selected}
        kept = [n for n in floats if n not in aliases and n not in excluded_tensors]
        statistics = set(normalisation_statistics(module)) if self.statistics == "average" else set()
        names = [n for n in kept if n not in statistics]
        statistic_names = [n for n in kept if n in statistics]
        aliases = {a: n for a, n in aliases.items() if n in set(kept)}
        return names, statistic_names, aliases, floats

    def bind(
        self, module: nn.Module, names: Iterable[str] | None = None, *, shard: tuple[int, int, Any] | None = None
    ) -> None:
        """Choose the tensors of ``module`` to merge; on a later call, raise if they changed.

        Args:
            module: the model.
            names: merge exactly these state-dict entries (e.g. the base
                weights of adapted layers); default: every floating-point
                tensor minus ``exclude``, statistics as ``statistics`` says.
            shard: ``(rank, world_size, process_group)`` to split the merge of
                replicated weights over (DDP): each rank then holds and folds
                1/world_size of every tensor. Parameters that are FSDP2
                ``DTensor`` shards are split as they are sharded, over their
                mesh's shard group, whatever ``shard`` says. Default: unsharded.

        Raises:
            ConfigError: the module's floating-point tensors differ from the
                ones bound before (added, removed), or ``names`` are not
                floating-point entries of ``module``.
        """
        if names is None:
            names, statistic_names, aliases, floats = self.select(module)
        else:
            names, statistic_names = list(names), []
            state = module.state_dict()
            bad = [n for n in names if n not in state or not state[n].is_floating_point()]
            if bad:
                raise ConfigError(f"{preview(bad, 3)} are not floating-point state entries of {type(module).__name__}.")
            floats = [n for n, t in state.items() if t.is_floating_point()]
            aliases = {a: n for a, n in tied_aliases({n: state[n] for n in floats}).items() if n in set(names)}
        if self.names is not None and (names, statistic_names) != (self.names, self.statistic_names):
            before, now = self.all_names, names + statistic_names
            raise ConfigError(
                f"The model's floating-point tensors changed since the first experience (added "
                f"{[n for n in now if n not in before][:5]}, removed {[n for n in before if n not in now][:5]}). "
                "Task vectors need one architecture for the whole stream."
            )
        self.names, self.statistic_names, self.aliases, self.float_names = names, statistic_names, aliases, floats
        self._module_statistics = frozenset(normalisation_statistics(module))
        self.layout = self._layout_of(module.state_dict(), shard)
        for merger in (self.merger, self._statistics_merger):
            merger.layout = self.layout

    def _layout_of(self, state: Mapping[str, Tensor], shard: tuple[int, int, Any] | None) -> ShardLayout | None:
        """Each merged tensor's slice on this rank (None: unsharded, every tensor whole)."""
        tensors = {n: state[n] for n in self.all_names}
        dtensors = {n: t for n, t in tensors.items() if is_dtensor(t)}
        if not dtensors and (shard is None or shard[1] <= 1):
            return None
        shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        if not dtensors:
            rank, world, group = shard
            group = cpu_group(group)  # the core's collectives exchange CPU tensors (NCCL alone refuses them)
            return ShardLayout.split(shapes, rank, world, group, whole_on=self._matrix_owners(shapes, rank, world, group))
        first = next(iter(dtensors.values()))
        dim = shard_mesh_dim(first)
        mesh = first.device_mesh
        for t in dtensors.values():
            if shard_mesh_dim(t) != dim or t.device_mesh != mesh:
                raise ConfigError("cl-plugin merges FSDP2 parameters sharded over one device mesh; this model uses several.")
        group = cpu_mesh_group(mesh, dim)  # the core's collectives exchange CPU tensors (NCCL alone refuses them)
        rank, world = mesh.get_local_rank(dim), mesh.size(dim)
        local = {n: (t.to_local().numel() if is_dtensor(t) else None) for n, t in tensors.items()}
        layout = ShardLayout.from_local_sizes(shapes, local, rank, world, group)
        layout.mesh, layout.mesh_dim = mesh, dim
        return layout

    def _matrix_owners(self, shapes: Mapping[str, tuple[int, ...]], rank: int, world: int, group) -> dict[str, int]:
        """For a merger that works on whole matrices: each merged 2-D tensor's owner rank, as its fold assigns them."""
        cost = self.merger.whole_matrix_cost
        if cost is None or not self.whole_matrices:
            return {}
        owners = ShardLayout.split(shapes, rank, world, group).owners({n: cost(shapes[n]) for n in self.names})
        placed = {n: r for n, r in owners.items() if len(shapes[n]) == 2}
        # Whole matrices trade the even split for no communication: only while no rank
        # holds more than 1% above its even share (few large matrices over many ranks would).
        held, even = [0] * world, [0] * world
        for n, shape in shapes.items():
            numel = math.prod(shape)
            for r in range(world):
                start, stop = split_range(numel, r, world)
                even[r] += stop - start
                held[r] += (numel if placed[n] == r else 0) if n in placed else stop - start
        return placed if max(held) <= (1.0 + WHOLE_MATRIX_EXCESS) * max(even) else {}

    def local(self, tensor: Tensor, name: str) -> Tensor:
        """This rank's part of a module tensor: the whole tensor unsharded, else its flat slice (a view)."""
        if self.layout is None:
            return tensor.detach()
        if is_dtensor(tensor):
            return tensor.to_local().detach().reshape(-1)
        shard = self.layout[name]
        return tensor.detach().reshape(-1)[shard.start : shard.stop]

    def snapshot(self, module: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Copies of this rank's part of the module's tensors, on :attr:`device`."""
        state = module.state_dict()
        parts = {n: self.local(state[n], n) for n in (names or self.all_names)}
        copies = packed_like(parts, device=self.device, fill=None)
        with torch.no_grad():
            for n, part in parts.items():
                copies[n].copy_(part)
        return copies

    def whole(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors, on every rank, from every rank's parts ``tensors`` (a collective when sharded)."""
        if self.layout is None or not self.layout.distributed:
            return dict(tensors)
        return {n: t.reshape(self.layout[n].shape) for n, t in self.layout.made_whole(tensors).items()}

    def norm(self, tensors: Mapping[str, Tensor]) -> float:
        """‖tensors‖ over the whole model from this rank's parts (e.g. a task vector); a collective when sharded.

        Each rank's slices are disjoint, so the norm is the hypotenuse of the
        ranks' own norms: every rank gets the same value. (It may differ from
        the norm of the whole tensors in the last bits.)
        """
        local = (tensors if isinstance(tensors, TaskVector) else TaskVector(dict(tensors), check_finite=False)).norm()
        return self._combined_norm(local)

    def merged_norm(self) -> float:
        """‖merged‖ over the whole model (the merger's own norm of this rank's slices, combined over the ranks)."""
        return self._combined_norm(self.merger.merged_norm())

    def _combined_norm(self, local: float) -> float:
        if self.layout is None or not self.layout.distributed:
            return local
        norms = torch.zeros(self.layout.world, dtype=torch.float64)
        norms[self.layout.rank] = local
        self.layout.all_reduce_(norms)  # one rank per slot: exact
        return math.hypot(*norms.tolist())

    def write(self, module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
        """Write this rank's parts ``tensors`` into the module in place; replicated tensors are completed on every rank.

        Under a sharded layout every rank must call it (the replicated tensors
        are completed from the ranks' slices by broadcasts).
        """
        state = module.state_dict()
        replicated = {}
        with torch.no_grad():
            for n, value in tensors.items():
                dest = state[n]
                if self.layout is None:
                    dest.copy_(value)
                    continue
                self.local(dest, n).copy_(value.reshape(-1))
                if not is_dtensor(dest):
                    replicated[n] = dest.view(-1)
            if replicated:
                self.layout.complete_in_place(replicated)

    def check_unchanged(self, module: nn.Module, when: str) -> None:
        """Raise a ConfigError if a floating-point tensor was added to or removed from ``module`` since :meth:`bind`."""
        now = [n for n, t in module.state_dict().items() if t.is_floating_point()]
        if now != self.float_names:
            added = [n for n in now if n not in self.float_names]
            removed = [n for n in self.float_names if n not in now]
            raise ConfigError(
                f"The model's floating-point tensors changed {when} (added {added[:5]}, removed {removed[:5]}); "
                "nothing was folded. A task vector needs the tensors θ₀ was taken from: create every parameter and "
                "buffer before training (e.g. in `__init__` or `configure_model`), and keep them for the whole stream."
            )

    def capture_theta0(self, module: nn.Module, what: str = "θ₀ (the weights when training starts)") -> None:
        """Take θ₀ from ``module`` (this rank's part, on :attr:`device`); raise NonFiniteError if it is not finite."""
        theta0 = self.snapshot(module)
        self._agree(_first_not_finite(theta0), lambda n: _theta0_error(what, n))
        self.theta0 = theta0

    def _agree(self, bad: str | None, error: Callable[[str | None], Exception]) -> None:
        """Raise ``error(name)`` on every rank when any rank found a bad tensor (``bad``), so no rank goes on alone."""
        if self._any_rank(bad is not None):
            raise error(bad)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (``flag`` itself when unsharded)."""
        return flag if self.layout is None else self.layout.any_rank(flag)

    def _live(self, module: nn.Module) -> dict[str, Tensor]:
        """This rank's part of each of the module's tensors that θ₀ holds, read in place; checked against θ₀."""
        state = module.state_dict()
        live = {n: self.local(state[n], n) for n in self.all_names}
        check_same_layout(self.theta0, live, "The model against θ₀")
        return live

    # -- boundaries ------------------------------------------------------------------------------------
    def task_vector(self, module: nn.Module, *, trusted: bool = False) -> TaskVector:
        """τ = θ − θ₀ over the merged and averaged tensors, on :attr:`device`.

        τ is checked finite as it is formed. ``trusted=True`` marks it so, and
        a merger folding it skips its own second pass over τ: only for a
        caller that folds τ before any other code can reach it (the
        callbacks, :meth:`fold` given the module). A τ handed to user code
        must not be trusted, since a write through ``.data`` or NumPy goes
        unseen.

        Raises:
            NonFiniteError: the module's weights hold NaN/inf (the message names them).
        """
        live = self._live(module)
        # Packed (one buffer per dtype), so the merger folds it in one pass; the
        # live weights are read in place, not copied first.
        tau = packed_like(self.theta0, fill=None)
        with torch.no_grad():
            for n, t in live.items():
                torch.sub(t.to(self.theta0[n].device), self.theta0[n], out=tau[n])
        # θ₀ is finite, so τ is finite exactly when the weights are and θ − θ₀
        # does not overflow: one check of τ (a reduction per packed run) covers both.
        bad = None
        if not all(is_finite(flat) for (flat,) in aligned_runs(list(tau.values()))):
            bad = _first_not_finite(live) or _first_not_finite(tau)
        self._agree(bad, lambda n: _task_vector_error(n, live))
        tv = TaskVector(tau, check_finite=False)
        if trusted:
            tv._stamp_finite()
        return tv

    def fold(self, module: nn.Module | TaskVector, *, fisher: Mapping[str, Tensor] | None = None) -> TaskVector:
        """Fold ``module``'s task vector (or a given one) into the merge; return it.

        Args:
            module: the module (its task vector is taken) or a task vector of
                this rank's parts (what :meth:`task_vector` returns).
            fisher: for a method that weighs tasks by their Fisher
                (``"fisher"``): the task's diagonal Fisher as *whole* tensors,
                one per merged name (e.g. every rank's all-reduced estimate);
                each rank folds its slices of it (:meth:`local`).

        All or nothing: on any error the merge is as it was.
        """
        formed_here = not isinstance(module, TaskVector)
        tv = self.task_vector(module, trusted=True) if formed_here else module
        try:
            return self._fold(tv, fisher)
        finally:
            if formed_here:
                tv._forget_finite()  # handed to the caller now: no longer vouched for

    def _fold(self, tv: TaskVector, fisher: Mapping[str, Tensor] | None) -> TaskVector:
        weights = TaskVector({n: tv[n] for n in self.names}, check_finite=False)._with_stamp_of(tv)
        extras, weighted = self._fisher_extras(weights, fisher)

        def update() -> None:
            with weighted:
                self.merger.update(weights, **extras)

        statistics = TaskVector({n: tv[n] for n in self.statistic_names}, check_finite=False) if self.statistic_names else None
        self._with_statistics(statistics, update)
        return tv

    def _with_statistics(self, statistics: TaskVector | None, update: Callable[[], None]) -> None:
        """Fold the statistics' task vector, then run the merge's ``update``; on its failure undo the first."""
        if statistics is None:
            update()
            return
        saved = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._statistics_merger.state_dict().items()}
        self._statistics_merger.update(statistics)
        try:
            update()
        except BaseException:
            self._statistics_merger = get_merger("average")
            self._statistics_merger.layout = self.layout
            if saved["num_tasks"]:
                self._statistics_merger.load_state_dict(saved)
            raise

    @property
    def folds_in_place(self) -> bool:
        """True when :meth:`fold_in_place` applies: every method but DOP and Fisher merging, without DARE."""
        return self.merger.can_stream()

    def fold_in_place(self, module: nn.Module) -> float:
        """Fold ``module``'s task vector without forming it whole; return ‖τ‖ over the whole model.

        The same merge as :meth:`fold` bit for bit, in two passes over the
        weights and no buffer the size of τ (one chunk,
        :data:`cl_plugin._packed.STREAM_CHUNK_NUMEL` elements):

        1. the check: τ = θ − θ₀ is finite when θ is and max |θ| + max |θ₀|
           stays below the dtype's maximum, which one read of θ settles (max
           |θ₀| is taken once); only a tensor whose bound fails has its τ
           formed, to check it exactly;
        2. the fold: the merger forms τ chunk by chunk and folds each
           (:meth:`Merger.update_streamed`; TIES reads the chunks twice more
           first, for its threshold; OPCM forms τ one tensor at a time and
           writes in place). The averaged normalisation statistics are small
           and folded whole, as :meth:`fold` does.

        When a sum could overflow by the bound (near the dtype's maximum), it
        folds through :meth:`fold` instead, which decides that exactly. Under a
        sharded layout every rank must call it (the ranks agree on every check).
        An error inside the fold itself (e.g. out of memory) leaves a merger
        that refuses to be used or saved, on every rank.

        Raises:
            ConfigError: the method cannot fold in place (:attr:`folds_in_place`).
            DivergedError: the weights hold NaN/inf, or θ − θ₀ overflows
                (the tensor is named); nothing changed, on any rank.
            NonFiniteError: the fold would overflow the merger's state (nothing changed).
        """
        if not self.folds_in_place:
            raise ConfigError(
                f"The {self.method!r} merge cannot form its task vector chunk by chunk (DARE, a Fisher, or a rule "
                "that needs the whole task vector); use fold(module)."
            )
        live = self._live(module)
        largest, bad = self._difference_bounds(live)
        self._agree(bad, lambda n: _task_vector_error(n, live))
        bounds = self.merger.streamed_bounds({n: largest[n] for n in self.names})
        if self._any_rank(bounds is None):  # a sum near its dtype's maximum: decided exactly on the whole τ
            return self.norm(self.fold(module))
        squares = torch.zeros((), dtype=torch.float64, device=self.device)

        def observe(chunk: Tensor) -> None:
            squares.add_(torch.linalg.vector_norm(chunk, dtype=torch.float64).square())

        statistics = None
        if self.statistic_names:
            with torch.no_grad():
                statistics = TaskVector(
                    {n: torch.sub(live[n].to(self.theta0[n].device), self.theta0[n]) for n in self.statistic_names},
                    check_finite=False,
                )
            for t in statistics.values():
                observe(t.reshape(-1))

        def update() -> None:
            self.merger.update_streamed(
                {n: self.theta0[n] for n in self.names}, {n: live[n] for n in self.names}, largest, bounds, observe
            )

        try:
            self._with_statistics(statistics, update)
        except BaseException as exc:
            self._after_fold_on_every_rank(exc)
            raise
        self._after_fold_on_every_rank(None)
        return self._combined_norm(math.sqrt(float(squares)))

    def _after_fold_on_every_rank(self, error: BaseException | None) -> None:
        """In a sharded merge, raise on every rank when the fold itself failed on one (the others have folded).

        The checks before the fold are agreed, so this is for a failure inside
        it (e.g. out of memory): the ranks' merges now differ, and no rank may
        go on as if the boundary had passed.
        """
        if self._any_rank(error is not None) and error is None:
            raise ClPluginError(
                "The fold failed on another rank (see its error) after this rank had folded: the ranks' merges "
                "differ now. Resume every rank from the last checkpoint."
            )

    def _difference_bounds(self, live: Mapping[str, Tensor]) -> tuple[dict[str, float], str | None]:
        """An upper bound of |θ − θ₀| per name, and the first name whose θ − θ₀ is not finite (or None).

        max |θ| + max |θ₀| bounds the difference before rounding, and rounding
        is monotone, so below the dtype's maximum the difference is finite.
        Where that bound fails (or θ holds NaN/inf), τ of that one tensor is
        formed and checked exactly.
        """
        largest: dict[str, float] = {}
        for n in self.all_names:
            base = self.theta0[n]
            # Taken once per θ₀; again if θ₀ was written in place since (its version moved).
            version, base_largest = self._theta0_largest.get(n, (None, 0.0))
            if version != base._version:
                base_largest = max_abs(base)
                self._theta0_largest[n] = (base._version, base_largest)
            bound = max_abs(live[n]) + base_largest
            if bound < torch.finfo(base.dtype).max:
                largest[n] = bound
                continue
            with torch.no_grad():
                exact = max_abs(torch.sub(live[n].to(base.device), base))
            if not math.isfinite(exact):
                return largest, n
            largest[n] = exact
        return largest, None

    def _fisher_extras(
        self, weights: TaskVector, fisher: Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
        """``update``'s ``fisher=`` for this rank's slices, and the context to fold it in.

        Unsharded, the slices are the whole tensors. In a sharded merge a
        Fisher merger that normalises (w_t = 1 / (‖F_t‖ + min_fisher), the
        norm over *all* of task t's Fisher) would see only this rank's slices:
        each rank would weigh the task differently. So w_t is computed here
        from the whole tensors, exactly as the unsharded merger computes it,
        and each rank folds w_t · (F_t + min_fisher) of its slices with the
        merger's own normalisation and floor off for that one update: the
        same values, rounded the same way, as the unsharded fold.
        """
        if fisher is None:
            return {}, contextlib.nullcontext()
        if not getattr(self.merger, "requires_fisher", False):
            raise ConfigError(
                f"The {self.method!r} merger does not use a Fisher; pass `fisher` only to method 'fisher'."
            )
        if not isinstance(fisher, Mapping):
            raise ConfigError(f"`fisher` must map tensor names to tensors, got {type(fisher).__name__}.")
        missing = [n for n in self.names if n not in fisher]
        if missing:
            raise ConfigError(
                f"`fisher` lacks {len(missing)} merged tensor(s) ({preview(missing, 3)}): give one Fisher per "
                "merged name (a tensor without a gradient may get zeros)."
            )
        sharded = self.layout is not None and self.layout.distributed
        if not sharded or not getattr(self.merger, "normalize", False):
            return {"fisher": {n: self.local(fisher[n], n) for n in self.names}}, contextlib.nullcontext()
        from cl_plugin.merging.base import accumulate_dtype
        from cl_plugin.merging.fisher import fisher_task_weight

        floor = self.merger.min_fisher
        weight = fisher_task_weight({n: fisher[n] for n in self.names}, floor, True)
        local = {}
        for n in self.names:
            f = self.local(fisher[n], n).to(device=weights[n].device, dtype=accumulate_dtype(weights[n].dtype), copy=True)
            if floor:
                f.add_(floor)
            if weight != 1.0:
                f.mul_(weight)
            local[n] = f
        return {"fisher": local}, _prenormalised(self.merger)

    def write_merged(self, module: nn.Module, scale: float | None = None) -> None:
        """Write θ₀ + λ·merged into the module in place, one tensor at a time, without materialising the merge.

        Every value is known to be finite before the first is written: a bound
        (max |θ₀| + λ·max |merged| below the dtype's maximum) settles almost
        every tensor with two reads; only a tensor whose bound fails is
        computed in full to check it. Replicated tensors of a sharded merge are
        completed on every rank (all ranks must call it).

        Raises:
            ConfigError: nothing folded yet.
            NonFiniteError: a merged value overflows its dtype (nothing is written).
        """
        if self.theta0 is None or not self.num_tasks:
            raise ConfigError("No experience has been merged yet: train at least one experience first.")
        value = self.scale if scale is None else scale
        # One merged tensor at a time (a method that finalises tensor by tensor, such as
        # average, never holds the whole merge): once to check, once to write.
        merged_names = set(self.names)
        scales = {n: (value if n in merged_names else 1.0) for n in self.all_names}
        state = module.state_dict()
        bad, failure = None, None
        try:
            merger_source = self.merger.merged_source()
            statistics_source = self._statistics_merger.merged_source() if self.statistic_names else None

            def merged(n: str) -> Tensor:
                return merger_source(n) if n in merged_names else statistics_source(n)

            for n in self.all_names:
                m = merged(n)
                dtype = state[n].dtype
                if max_abs(self.theta0[n]) + scales[n] * max_abs(m) < torch.finfo(dtype).max:
                    continue
                if not is_finite(torch.add(self.theta0[n], m.to(dtype), alpha=scales[n])):
                    bad = n
                    break
        except NonFiniteError as exc:  # the merge itself overflows its input dtype (one rank may see it alone)
            failure = exc
            bad = "?"
        self._agree(
            bad,
            lambda n: failure
            if failure is not None
            else NonFiniteError(
                f"θ₀ + {value}·merged overflows its dtype in tensor {n!r} (on this or another rank). Use a smaller "
                "`scale`, or train in a wider dtype."
            ),
        )
        if self._module_statistics:
            _warn_invalid_statistics(
                {n: torch.add(self.theta0[n], merged(n), alpha=scales[n]) for n in self.all_names if n in self._module_statistics},
                self._module_statistics,
            )
        replicated = {}
        with torch.no_grad():
            for n in self.all_names:
                m = merged(n)
                dest = state[n]
                local = self.local(dest, n)
                local.copy_(self.theta0[n]).add_(m.to(device=local.device, dtype=local.dtype), alpha=scales[n])
                if self.layout is not None and not is_dtensor(dest):
                    replicated[n] = dest.view(-1)
            if replicated:
                self.layout.complete_in_place(replicated)

    def merged_tensors(self, scale: float | None = None) -> dict[str, Tensor]:
        """θ₀ + λ·merged over the merged names, and θ₀ + mean(τ) over the statistics; checked before returned.

        Raises:
            ConfigError: nothing folded yet.
            NonFiniteError: a merged value overflows its dtype (the tensor is named).
        """
        if self.theta0 is None or not self.num_tasks:
            raise ConfigError("No experience has been merged yet: train at least one experience first.")
        value = self.scale if scale is None else scale
        theta0 = self.theta0
        out = self.merger.merged().apply_to({n: theta0[n] for n in self.names}, value)
        if self.statistic_names:
            out.update(self._statistics_merger.merged().apply_to({n: theta0[n] for n in self.statistic_names}, 1.0))
        self._agree(
            _first_not_finite(out),
            lambda n: NonFiniteError(
                f"θ₀ + {value}·merged overflows its dtype in tensor {n!r} (on this or another rank). Use a smaller "
                "`scale`, or train in a wider dtype."
            ),
        )
        _warn_invalid_statistics(out, self._module_statistics)
        return out

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self, *, with_theta0: bool = True, keep_sharded: bool = False) -> dict[str, Any]:
        """``names``, ``statistic_names``, ``theta0`` (None without ``with_theta0``), ``merger`` and ``statistics_merger``.

        Unsharded: the live tensors. Sharded: every rank must call it, and each
        tensor is as :meth:`export` gives it: whole on rank 0 (None on the
        others), gathered one at a time, or with ``keep_sharded`` a ``DTensor``
        of this rank's rows wherever FSDP2 shards the tensor (for
        ``torch.distributed.checkpoint``).
        """
        theta0 = self.theta0 if with_theta0 else None
        merger = self.merger.state_dict()
        statistics = self._statistics_merger.state_dict() if self.statistic_names else None
        if self.layout is not None:
            theta0 = None if theta0 is None else self.export(theta0, keep_sharded=keep_sharded)
            merger = self._exported_state(merger, keep_sharded)
            statistics = None if statistics is None else self._exported_state(statistics, keep_sharded)
        return {
            "names": None if self.names is None else list(self.names),
            "statistic_names": list(self.statistic_names),
            "theta0": theta0,
            "merger": merger,
            "statistics_merger": statistics,
        }

    def _whole(self, name: str, local: Tensor) -> Tensor | None:
        whole = self.layout.gather_whole(name, local.reshape(-1), owner=0)
        if whole is None:
            return None
        if whole.data_ptr() == local.data_ptr():  # rank 0 holds it whole: a copy, not the live state
            whole = whole.clone()
        return whole.reshape(self.layout[name].shape)

    def export(self, tensors: Mapping[str, Tensor], *, keep_sharded: bool = False) -> dict[str, Tensor | None]:
        """This rank's slices ``tensors`` (name -> flat slice) as a checkpoint holds them; a collective when sharded.

        Unsharded: the tensors themselves. Sharded: each made whole on rank 0
        and None on the other ranks (the format of an unsharded state, so the
        checkpoint resumes on any number of ranks; one tensor at a time). With
        ``keep_sharded``, a tensor that FSDP2 shards is returned instead as a
        ``DTensor`` over this rank's slice, without a copy, for
        ``torch.distributed.checkpoint`` to write rank by rank
        (:mod:`cl_plugin._distributed_checkpoint`); :meth:`prepare_load` takes
        either form back.
        """
        if self.layout is None:
            return dict(tensors)
        if not self.layout.distributed:  # FSDP2 on one process: the slices are the whole tensors, flat
            return {n: t.reshape(self.layout[n].shape) for n, t in tensors.items()}
        mesh = self.layout.mesh if keep_sharded else None
        out: dict[str, Tensor | None] = {}
        for n, t in tensors.items():
            shard = self.layout[n]
            if mesh is not None and shard.sharded:
                out[n] = sharded_view(t, shard.shape, mesh, self.layout.mesh_dim)
            else:
                out[n] = self._whole(n, t)
        return out

    def _exported_state(self, state: Mapping[str, Any], keep_sharded: bool) -> dict[str, Any]:
        """A merger state with each sliced tensor (``"<role>.<name>"``) exported as :meth:`export` exports it."""
        out = {}
        for k, v in state.items():
            if isinstance(v, Tensor):
                name = k.split(".", 1)[1]
                v = self.export({name: v}, keep_sharded=keep_sharded)[name]
            out[k] = v
        return out

    def _sliced_state(self, state: Mapping[str, Any], owner: str) -> Mapping[str, Any]:
        """A saved merger state cut to this rank's slices (shapes checked against the model first)."""
        if not isinstance(state, Mapping):
            return state  # the merger's load names what is wrong
        out = {}
        for k, v in state.items():
            if isinstance(v, Tensor) and "." in k:
                out[k] = self.from_checkpoint(k.split(".", 1)[1], v, f"merger[{k!r}]", owner)
            else:
                out[k] = v
        return out

    def from_checkpoint(self, name: str, saved: Tensor, what: str, owner: str) -> Tensor:
        """What this rank keeps of a checkpoint's tensor: its flat slice under a layout, else the tensor itself."""
        if self.layout is not None and self.layout.distributed:
            return self._slice(name, saved, what, owner)
        if is_dtensor(saved):  # written sharded, resumed on one process: the whole tensor is local
            saved = saved.full_tensor().to(self.device)
        # Under a layout (FSDP2 on one process) the slices are the whole tensors, flat.
        return saved if self.layout is None else saved.reshape(-1)

    def _slice(self, name: str, whole: Tensor, what: str, owner: str) -> Tensor:
        """This rank's flat slice of a checkpoint's tensor: a whole tensor, or a ``DTensor`` read back rank by rank."""
        if name not in self.layout.shards:
            raise CheckpointError(f"The checkpoint's {owner} {what} names a tensor this model does not merge; it is damaged.")
        shard = self.layout[name]
        if tuple(whole.shape) != shard.shape:
            raise CheckpointError(
                f"The checkpoint's {owner} {what} is {tuple(whole.shape)}, the model's tensor is {shard.shape}. "
                "Resume with the model the checkpoint was written with."
            )
        if is_dtensor(whole):
            # Read for this rank alone (fresh memory, no copy needed); the rows FSDP2 gives it now.
            local = whole.to_local()
            if local.numel() != shard.local_numel:
                raise CheckpointError(
                    f"The checkpoint's {owner} {what} came back with {local.numel()} elements on this rank, where the "
                    f"model's shard holds {shard.local_numel}: the parameters are not sharded as torch.chunk shards "
                    "dim 0. Resume with FSDP2's default sharding (fully_shard without shard_placement_fn)."
                )
            return local.reshape(-1).to(self.device)
        return whole.reshape(-1)[shard.start : shard.stop].to(self.device, copy=True)

    def prepare_load(
        self,
        state: Mapping[str, Any],
        owner: str,
        *,
        layout: Mapping[str, tuple] | None = None,
        base_weights: Mapping[str, Tensor] | None = None,
        theta0_elsewhere: bool = False,
    ) -> Callable[[], None]:
        """Check a state written by :meth:`state_dict`; return a function that applies it.

        ``layout`` (name -> (shape, dtype)) is the model's, when known; θ₀ must
        match it, and equal ``base_weights`` when given. ``theta0_elsewhere``:
        the state holds no θ₀ because its owner keeps one θ₀ for several cores.
        Raises CheckpointError / ConfigError and changes nothing.
        """
        names = read(state, "names", owner)
        if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)):
            raise CheckpointError(f"The checkpoint's {owner} state has names={names!r}; expected a list of tensor names.")
        statistic_names = state.get("statistic_names", [])
        if not isinstance(statistic_names, (list, tuple)) or not all(isinstance(n, str) for n in statistic_names):
            raise CheckpointError(f"The checkpoint's {owner} state has statistic_names={statistic_names!r}; expected a list of names.")
        names = None if names is None else list(names)
        statistic_names = list(statistic_names)
        if names is not None and self.names is not None and (names, statistic_names) != (self.names, self.statistic_names):
            now = set(self.all_names)
            saved = set(names + statistic_names)
            moved = sorted(set(statistic_names) ^ set(self.statistic_names))
            raise CheckpointError(
                f"The checkpoint's {owner} merged other tensors than this model has (the model adds "
                f"{sorted(now - saved)[:5]}, lacks {sorted(saved - now)[:5]}"
                + (f"; averaged as normalisation statistics differently: {moved[:5]}" if moved and now == saved else "")
                + "). Resume with the model, `exclude` and `statistics` the checkpoint was written with."
            )
        theta0 = read(state, "theta0", owner)
        if theta0 is not None:
            expected = None if names is None else names + statistic_names
            theta0 = check_tensor_dict(theta0, "theta0", owner, layout, names=expected, device=self.device)
            theta0 = {n: self.from_checkpoint(n, t, f"theta0[{n!r}]", owner) for n, t in theta0.items()}
        merger = get_merger(self.method, **self.method_options)
        merger_state = read(state, "merger", owner)
        if merger_state is not None:
            # validates it completely; `merger` is a new object
            merger.load_state_dict(self._sliced_state(merger_state, owner))
        statistics_merger = get_merger("average")
        saved_statistics = state.get("statistics_merger")
        if saved_statistics is not None:
            statistics_merger.load_state_dict(self._sliced_state(saved_statistics, owner))
        for m in (merger, statistics_merger):
            m.layout = self.layout
        if merger.num_tasks:
            if theta0 is None and not theta0_elsewhere:
                raise CheckpointError(f"The checkpoint's {owner} state has a merge but no θ₀; it is damaged.")
            if sorted(merger.state_dict()["input_dtypes"]) != sorted(names or []):
                raise CheckpointError(f"The checkpoint's {owner} merger holds other tensors than its θ₀; it is damaged.")
            if statistic_names and (
                statistics_merger.num_tasks != merger.num_tasks
                or sorted(statistics_merger.state_dict()["input_dtypes"]) != sorted(statistic_names)
            ):
                raise CheckpointError(f"The checkpoint's {owner} statistics do not match its merge; it is damaged.")
        if theta0 is not None and base_weights is not None:
            mine = {n: self.local(base_weights[n], n) for n in theta0 if n in base_weights}
            differ = [n for n in theta0 if n not in mine or not torch.equal(mine[n].to(theta0[n]), theta0[n])]
            if differ:
                raise ConfigError(
                    f"`base_weights` differs from the checkpoint's θ₀ in {len(differ)} tensor(s) ({preview(differ, 3)}). "
                    "Resume without `base_weights` (the checkpoint holds θ₀), or start a new stream."
                )
        def apply() -> None:
            self.merger = merger
            self._statistics_merger = statistics_merger
            if not theta0_elsewhere:
                self.theta0 = theta0
            if names is not None:
                self.names, self.statistic_names = names, statistic_names

        return apply


@contextlib.contextmanager
def _prenormalised(merger: Any):
    """A Fisher merger that takes its ``fisher`` as already weighted (w_t · (F_t + min_fisher)) inside the block."""
    normalize, floor = merger.normalize, merger.min_fisher
    merger.normalize, merger.min_fisher = False, 0.0
    try:
        yield
    finally:
        merger.normalize, merger.min_fisher = normalize, floor


def _first_not_finite(tensors: Mapping[str, Tensor]) -> str | None:
    return next((n for n, t in tensors.items() if not is_finite(t)), None)


def _task_vector_error(name: str | None, live: Mapping[str, Tensor]) -> DivergedError:
    if name is None:
        return DivergedError(
            "The weights hold NaN or infinite values on another rank: training diverged, and there is no task vector "
            "to fold."
        )
    if not is_finite(live[name]):
        return DivergedError(
            f"The weights hold NaN or infinite values (in {name!r}): training diverged, and there is no task vector "
            "to fold."
        )
    return DivergedError(
        f"θ − θ₀ overflows its dtype in {name!r}: the weights are finite but moved too far from θ₀ to subtract. "
        "Train in a wider dtype, or with a smaller learning rate."
    )


def _theta0_error(what: str, name: str | None) -> NonFiniteError:
    where = f"tensor {name!r}" if name else "a tensor (on another rank)"
    return NonFiniteError(
        f"{what} {where} holds NaN or infinite values; every task vector would be NaN. Check the weights the "
        "stream starts from."
    )


def _warn_invalid_statistics(merged: Mapping[str, Tensor], statistics: frozenset[str]) -> None:
    bad = [n for n in merged if n in statistics and n.endswith("running_var") and bool((merged[n] < 0).any())]
    if bad:
        warnings.warn(
            f"The merged normalisation statistics hold negative variances in {preview(bad, 3)}: the merged model "
            "will give NaN. Use statistics='average' (the default), which keeps every statistic valid.",
            stacklevel=3,
        )
