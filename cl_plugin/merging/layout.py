"""Which part of every merged tensor this process holds: the sharded layout of the boundary core.

A merge over W processes works on *local slices with global offsets*: for each
tensor, the rank holds one contiguous range ``[start, stop)`` of the tensor
flattened in row-major order.

* Under FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) a
  parameter is a ``DTensor`` sharded on dim 0: the rank's local shard is a
  block of whole rows, which is a contiguous range of the flattened tensor.
* Under DDP (replicated weights) and for tensors FSDP2 does not shard
  (buffers), the merger splits each flattened tensor into W ranges itself,
  as ``torch.chunk`` splits a dimension: ``ceil(N / W)`` elements per rank,
  the last ranks shorter or empty.

θ₀ and the merger's state are held per rank as these slices, so each rank
keeps P/W of every model copy. Elementwise rules (MagMax, averages, sums,
random selection, DARE) fold their slice with no communication; rules that
need a global statistic or a whole tensor use the collectives below, and give
the same bits as the unsharded merge.

No Lightning import.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_plugin.merging._kernels import COUNT_THRESHOLDS, count_below, magnitudes_in
from cl_plugin._packed import aligned_runs

__all__ = [
    "Shard",
    "ShardLayout",
    "kth_smallest_magnitude",
    "split_range",
]


def takes_cpu_tensors(group=None) -> bool:
    """Whether the process group's backend runs collectives on CPU tensors (gloo, or e.g. ``"cpu:gloo,cuda:nccl"``).

    A group started with ``"nccl"`` alone (Lightning's default on GPUs) does not.
    """
    name = str(torch.distributed.get_backend(group)).lower()
    if ":" in name:
        return any(part.split(":", 1)[0].strip() == "cpu" for part in name.split(","))
    return name in ("gloo", "mpi", "undefined", "fake")


_CPU_GROUPS: dict[tuple, Any] = {}


def cpu_group(group=None):
    """``group`` (None: the default group) if it takes CPU tensors, else a gloo group over the same ranks.

    The core's collectives exchange CPU tensors (θ₀ and the merger's state
    live on the CPU by default, and its flags and counts always do), which a
    group started with NCCL alone refuses. The gloo group is created once;
    the first call is collective: every rank must make it, in the same order.
    Only the default group is supported here (:func:`cpu_mesh_group` for a
    device mesh's groups).
    """
    if takes_cpu_tensors(group):
        return group
    if group is not None and group is not torch.distributed.group.WORLD:
        raise ValueError("cpu_group supports the default group; use cpu_mesh_group for a device mesh's groups.")
    key = ("world",)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def cpu_mesh_group(mesh, dim: int):
    """The group of mesh dimension ``dim``, or the same group of a CPU (gloo) copy of ``mesh`` when the
    mesh's group does not take CPU tensors (:func:`cpu_group`). The first call is collective over every rank."""
    group = mesh.get_group(dim)
    if takes_cpu_tensors(group):
        return group
    key = ("mesh", tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), dim)
    if key not in _CPU_GROUPS:
        from torch.distributed.device_mesh import DeviceMesh

        _CPU_GROUPS[key] = DeviceMesh("cpu", mesh.mesh.clone(), mesh_dim_names=mesh.mesh_dim_names).get_group(dim)
    return _CPU_GROUPS[key]


def split_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s part of ``numel`` elements split as ``torch.chunk`` splits."""
    if world <= 1:
        return 0, numel
    size = math.ceil(numel / world) if numel else 0
    start = min(rank * size, numel)
    return start, min(start + size, numel)


@dataclass(frozen=True)
class Shard:
    """One tensor's place in the layout: its global shape and this rank's flat range."""

    shape: tuple[int, ...]
    start: int
    stop: int
    #: True when the range is the local shard of a DTensor (it lives in that rank only).
    sharded: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.numel


#: The largest bucket (elements) that :meth:`ShardLayout.complete_in_place` packs small slices into.
#: 1M elements (4 MiB of float32): on ViT-S under DDP (gloo, 2 processes) a boundary took the
#: same time as with 4M-element buckets, and its resident peak fell from about 1 P/W to near 0
#: (benchmarks/scale.py).
BROADCAST_BUCKET_NUMEL = 1 << 20


class ShardLayout:
    """Each merged tensor's :class:`Shard` on this rank, with the process group the rank merges in.

    Args:
        shards: name -> :class:`Shard`, in the merge order.
        rank: this process's index in ``group`` (0 without one).
        world: the number of processes that share the merge (1: unsharded).
        group: the ``torch.distributed`` process group of those processes
            (None: the default group, or no communication when ``world == 1``).
    """

    def __init__(self, shards: Mapping[str, Shard], rank: int = 0, world: int = 1, group=None) -> None:
        self.shards = dict(shards)
        self.rank = int(rank)
        self.world = int(world)
        self.group = group
        self._sizes: dict[str, list[int]] = {}  # per rank, for tensors not split as split_range splits them
        #: FSDP2: the device mesh and mesh dimension of the DTensor shards (None: no DTensors).
        self.mesh = None
        self.mesh_dim: int | None = None

    @classmethod
    def unsharded(cls, shapes: Mapping[str, Sequence[int]]) -> ShardLayout:
        """Every tensor whole, on one process."""
        return cls({n: Shard(tuple(s), 0, math.prod(s)) for n, s in shapes.items()})

    @classmethod
    def split(
        cls,
        shapes: Mapping[str, Sequence[int]],
        rank: int,
        world: int,
        group=None,
        *,
        whole_on: Mapping[str, int] | None = None,
    ) -> ShardLayout:
        """Every tensor split into ``world`` contiguous ranges (replicated weights, e.g. under DDP).

        ``whole_on`` (name -> rank) places those tensors whole on one rank
        instead (empty elsewhere): for a rule that works on whole matrices
        (OPCM), whose owner then needs no gather and no scatter.
        """
        whole_on = dict(whole_on or {})
        shards, sizes = {}, {}
        for n, s in shapes.items():
            numel = math.prod(s)
            if n in whole_on:
                owner = whole_on[n]
                column = [numel if r == owner else 0 for r in range(world)]
                start = sum(column[:rank])
                shards[n] = Shard(tuple(s), start, start + column[rank])
                sizes[n] = column
            else:
                shards[n] = Shard(tuple(s), *split_range(numel, rank, world))
        layout = cls(shards, rank, world, group)
        layout._sizes = sizes
        return layout

    @classmethod
    def from_local_sizes(
        cls, shapes: Mapping[str, Sequence[int]], local_numel: Mapping[str, int | None], rank: int, world: int, group
    ) -> ShardLayout:
        """A layout where some tensors are already sharded (FSDP2's dim-0 shards, ``local_numel`` given) and the
        others (``None``) are split as :meth:`split` splits them.

        One ``all_gather`` of the local sizes gives every shard's offset: shard
        ``r`` follows the shards of ranks ``0 .. r-1``, as ``torch.chunk`` orders them.
        """
        names = [n for n, size in local_numel.items() if size is not None]
        mine = torch.tensor([local_numel[n] for n in names], dtype=torch.int64)
        parts = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(parts, mine, group=group)
        sizes = torch.stack(parts)  # (world, tensors)
        shards, all_sizes = {}, {}
        for n, shape in shapes.items():
            numel = math.prod(shape)
            if local_numel[n] is None:
                shards[n] = Shard(tuple(shape), *split_range(numel, rank, world))
                continue
            column = sizes[:, names.index(n)].tolist()
            if sum(column) != numel:
                raise ValueError(f"The shards of {n!r} hold {sum(column)} elements, the tensor {numel}.")
            start = sum(column[:rank])
            shards[n] = Shard(tuple(shape), start, start + column[rank], sharded=True)
            all_sizes[n] = column
        layout = cls(shards, rank, world, group)
        layout._sizes = all_sizes
        return layout

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shards)

    def __getitem__(self, name: str) -> Shard:
        return self.shards[name]

    def __repr__(self) -> str:
        local = sum(s.local_numel for s in self.shards.values())
        total = sum(s.numel for s in self.shards.values())
        return f"ShardLayout({len(self)} tensors, rank {self.rank} of {self.world}, {local:,} of {total:,} elements)"

    # -- collectives (no-ops on one process) ------------------------------------------------------------
    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (one ``all_reduce`` of one integer; ``flag`` on one process)."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_(torch.tensor([int(flag)])))

    def holds_whole(self, name: str, rank: int) -> bool:
        """Whether rank ``rank`` holds all of tensor ``name`` (the same answer on every rank)."""
        return self._slice_sizes(name)[rank] == self.shards[name].numel

    def gather_whole(self, name: str, local: Tensor, owner: int) -> Tensor | None:
        """The whole tensor ``name`` (global shape) on rank ``owner`` from every rank's slice; None elsewhere.

        ``local`` is this rank's flat slice. Slices are padded to one size for
        the collective and the padding is dropped, so the result is exact.
        """
        shard = self.shards[name]
        if not self.distributed:
            return local.reshape(shard.shape)
        if self.holds_whole(name, owner):  # nothing to send (every rank knows the sizes)
            return local.reshape(shard.shape) if self.rank == owner else None
        sizes = self._slice_sizes(name)
        width = max(sizes) or 1
        padded = local.new_zeros(width)
        padded[: local.numel()] = local.reshape(-1)
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        torch.distributed.gather(padded, parts, dst=self._global_rank(owner), group=self.group)
        if self.rank != owner:
            return None
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).reshape(shard.shape)

    def scatter_slices(self, name: str, whole: Tensor | None, owner: int, out: Tensor) -> None:
        """Copy each rank's slice of ``whole`` (given on ``owner``) into that rank's flat ``out``."""
        shard = self.shards[name]
        if not self.distributed:
            out.copy_(whole.reshape(-1))
            return
        if self.holds_whole(name, owner):  # the owner's own slice is everything
            if self.rank == owner:
                out.copy_(whole.reshape(-1))
            return
        sizes = self._slice_sizes(name)
        width = max(sizes) or 1
        received = out.new_zeros(width)
        parts = None
        if self.rank == owner:
            flat = whole.reshape(-1)
            parts, offset = [], 0
            for n in sizes:
                part = flat.new_zeros(width)
                part[:n] = flat[offset : offset + n]
                parts.append(part)
                offset += n
        torch.distributed.scatter(received, parts, src=self._global_rank(owner), group=self.group)
        out.copy_(received[: shard.local_numel])

    def complete_in_place(self, wholes: Mapping[str, Tensor]) -> None:
        """Fill every rank's range of each flat whole tensor in ``wholes`` (name -> tensor of the global numel,
        on every rank) from the rank that holds it; each rank has written its own range already.

        Each rank in turn broadcasts its ranges, several small ones packed into
        one bucket of at most :data:`BROADCAST_BUCKET_NUMEL` elements: a few
        large broadcasts instead of one ``all_gather`` per tensor (measured on
        gloo: an ``all_gather`` moves data several times slower than a
        broadcast, and each call has a fixed cost). Extra memory: one bucket.
        All ranks must call it with the same names.
        """
        sizes = {n: self._slice_sizes(n) for n in wholes}
        self._broadcast_ranges(wholes, lambda n, r: (sum(sizes[n][:r]), sum(sizes[n][: r + 1])))

    def made_whole(self, slices: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Flat whole tensors (global numel) on every rank from every rank's ``slices`` (bucketed broadcasts)."""
        wholes = {}
        for n, t in slices.items():
            wholes[n] = t.new_empty(self.shards[n].numel)
            wholes[n][self.shards[n].start : self.shards[n].stop].copy_(t.reshape(-1))
        self.complete_in_place(wholes)
        return wholes

    def share_from_owners(self, wholes: Mapping[str, Tensor], owners: Mapping[str, int]) -> None:
        """Copy each flat tensor ``wholes[n]`` from rank ``owners[n]`` (which holds it whole) to every rank,
        in buckets as :meth:`complete_in_place` does. All ranks must call it with the same names and owners."""
        self._broadcast_ranges(wholes, lambda n, r: (0, wholes[n].numel()) if r == owners[n] else (0, 0))

    def _broadcast_ranges(self, wholes: Mapping[str, Tensor], range_of: Callable[[str, int], tuple[int, int]]) -> None:
        """For each rank in turn, broadcast the range ``range_of(name, rank)`` of every flat tensor in ``wholes``."""
        if not self.distributed:
            return
        for source in range(self.world):
            pending: list[tuple[Tensor, int, int]] = []  # (whole, start, stop) packed into the next bucket
            pending_numel = 0

            def flush() -> None:
                nonlocal pending, pending_numel
                if not pending:
                    return
                bucket = pending[0][0].new_empty(pending_numel)
                if self.rank == source:
                    torch.cat([w[a:b] for w, a, b in pending], out=bucket)
                torch.distributed.broadcast(bucket, src=self._global_rank(source), group=self.group)
                if self.rank != source:
                    offset = 0
                    for w, a, b in pending:
                        w[a:b].copy_(bucket[offset : offset + b - a])
                        offset += b - a
                pending, pending_numel = [], 0

            for name, whole in wholes.items():
                start, stop = range_of(name, source)
                if stop == start:
                    continue
                if stop - start >= BROADCAST_BUCKET_NUMEL:  # large enough alone: broadcast in place, no packing
                    torch.distributed.broadcast(whole[start:stop], src=self._global_rank(source), group=self.group)
                    continue
                if pending and (
                    pending[0][0].dtype != whole.dtype
                    or pending[0][0].device != whole.device
                    or pending_numel + stop - start > BROADCAST_BUCKET_NUMEL
                ):
                    flush()
                pending.append((whole, start, stop))
                pending_numel += stop - start
            flush()

    def _slice_sizes(self, name: str) -> list[int]:
        """The number of elements of ``name`` on each rank, in rank order."""
        shard = self.shards[name]
        if name in self._sizes:
            return self._sizes[name]
        ranges = [split_range(shard.numel, r, self.world) for r in range(self.world)]
        return [stop - start for start, stop in ranges]

    def _global_rank(self, rank: int) -> int:
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)

    def owners(self, cost: Mapping[str, float]) -> dict[str, int]:
        """A rank per item, balancing ``cost`` (largest first, to the least-loaded rank; ties to the lower rank).

        A pure function of the items (in ``cost``'s order) and their costs, so every rank computes the same owners.
        """
        load = [0.0] * self.world
        owner = {}
        order = {n: i for i, n in enumerate(cost)}
        for name in sorted(cost, key=lambda n: (-cost[n], order[n])):
            r = min(range(self.world), key=lambda i: (load[i], i))
            owner[name] = r
            load[r] += cost[name]
        return owner

    def rounds(self, owners: Mapping[str, int], cost: Mapping[str, float]) -> list[list[str]]:
        """The items in rounds of at most one per owner rank, for work the owners do at the same time.

        A loop that gathers an item to its owner, lets the owner compute and
        scatters the result before the next item keeps every other rank
        waiting: the work runs one rank at a time. In round k each rank works
        on its k-th item (its items largest ``cost`` first, so a round holds
        items of similar cost), and each rank holds one item whole at a time.
        Items within a round keep ``owners``' order; a pure function of
        ``owners`` and ``cost``, so every rank issues the same collectives.
        """
        order = {n: i for i, n in enumerate(owners)}
        per_rank: dict[int, list[str]] = {}
        for name in sorted(owners, key=lambda n: (-cost[n], order[n])):
            per_rank.setdefault(owners[name], []).append(name)
        depth = max((len(v) for v in per_rank.values()), default=0)
        return [
            sorted((items[k] for items in per_rank.values() if k < len(items)), key=order.__getitem__)
            for k in range(depth)
        ]


# -- exact distributed order statistics ---------------------------------------------------------------------
_SAMPLE = 1 << 16


def _gather_varying(local: Tensor, layout: ShardLayout | None) -> Tensor:
    """The concatenation, in rank order, of every rank's 1-D ``local`` (sizes may differ)."""
    if layout is None or not layout.distributed:
        return local
    size = torch.tensor([local.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(layout.world)]
    torch.distributed.all_gather(sizes, size, group=layout.group)
    width = max(int(s) for s in sizes) or 1
    padded = local.new_zeros(width)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(layout.world)]
    torch.distributed.all_gather(parts, padded, group=layout.group)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])


def _float_of(bits: int) -> float:
    """The float32 whose bit pattern is the non-negative int32 ``bits``."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _bits_of(value: float) -> int:
    """The bit pattern of the non-negative float32 nearest ``value``."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


#: The bit pattern of float32 +inf: every finite magnitude's pattern is below it.
_INF_BITS = 0x7F800000
#: Counting passes narrow the bracket until it holds at most this many magnitudes (over all ranks) ...
_FEW = 1 << 10
#: ... or for at most this many passes; then the rows holding the bracket are copied and selected from.
_MAX_COUNT_PASSES = 6


def kth_smallest_magnitude(tensors: Iterable[Tensor], k: int, layout: ShardLayout | None = None) -> float:
    """The ``k``-th smallest ``|x|`` (1-based, as ``torch.kthvalue``) over every element of ``tensors`` on every rank.

    Exact, and with no temporary the size of the data: the answer's float32
    bit pattern is bracketed in ``[L, H]``, with ``#(|x| < f(L)) < k <=
    #(|x| < f(H + 1))``, and each pass counts the magnitudes below three
    thresholds inside the bracket in one fused read (:func:`count_below`,
    one ``all_reduce`` of three counts), keeping the sub-bracket that holds
    the answer. The first pass takes its thresholds from a strided sample
    (gathered from every rank); later ones interpolate the answer's position
    inside the bracket, plus ``L + 1`` (is the answer ``f(L)`` itself? this
    ends at once on a value many entries share, such as 0) and, when the last
    pass did not halve the bracket, its midpoint. Once the bracket holds at
    most :data:`_FEW` magnitudes (or after :data:`_MAX_COUNT_PASSES` passes),
    the rows that hold them are copied (:func:`magnitudes_in`), every rank
    gathers them, and ``torch.kthvalue`` picks the answer among them. The
    result equals ``torch.kthvalue(torch.cat([t.abs().float().flatten() ...]), k)``
    over every rank's tensors, whatever their split.

    Args:
        tensors: this rank's values (any shapes, floating point, finite).
            Tensors packed in one buffer (:mod:`cl_plugin._packed`) are read in one call.
        k: 1 <= k <= the total number of elements over all ranks.
        layout: the ranks to count over (None: this process only).
    """
    tensors = [t.detach() for t in tensors if t.numel()]
    flats = [run for (run,) in aligned_runs(tensors)] if tensors else []
    local_numel = sum(f.numel() for f in flats)
    stride = max(1, local_numel // _SAMPLE)
    empty = torch.zeros(0, dtype=torch.float32)
    sample = torch.cat([f[::stride].float().abs().cpu() for f in flats]) if flats else empty
    sample = _gather_varying(sample, layout).sort().values
    total = torch.tensor([local_numel], dtype=torch.int64)
    if layout is not None:
        layout.all_reduce_(total)
    total = int(total)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}].")

    def counts_below(bit_thresholds: list[int]) -> list[int]:
        values = [_float_of(b) for b in bit_thresholds]
        counts = torch.zeros(len(values), dtype=torch.int64)
        for f in flats:
            counts += torch.tensor(count_below(f, values))
        if layout is not None:
            layout.all_reduce_(counts)
        return [int(c) for c in counts]

    low, high, below_low, below_high = 0, _INF_BITS - 1, 0, total
    if any(f.dtype == torch.float64 for f in flats):
        # A float64 magnitude above float32's maximum is inf in float32, outside the bracket.
        below_high = counts_below([_INF_BITS] * COUNT_THRESHOLDS)[0]
        if k > below_high:
            return math.inf
    # First guesses: the sample's quantiles 3 standard errors either side of k / total.
    n = sample.numel()
    q = k / total
    margin = 3.0 * math.sqrt(max(q * (1 - q), 1.0 / max(n, 1)) / max(n, 1)) + 2.0 / max(n, 1)
    guesses = [float(sample[i]) for i in (math.floor((q - margin) * n), math.ceil((q + margin) * n)) if 0 <= i < n]
    halved = True
    for _ in range(_MAX_COUNT_PASSES):
        if low == high or below_high - below_low <= _FEW:
            break
        width = high - low
        if guesses is None:
            guesses = _interpolated(low, high, below_low, below_high, k)
        # By priority: is the answer f(low)? the midpoint (when the last pass did
        # not halve the bracket, or when it is unbounded above), the guesses.
        candidates = [low + 1]
        if not halved or not guesses:
            candidates.append(low + (width + 1) // 2)
        candidates += [_bits_of(min(v, _float_of(high))) for v in guesses]
        chosen = list(dict.fromkeys(b for b in candidates if low < b <= high))[:COUNT_THRESHOLDS]
        thresholds = sorted(chosen + [low + 1] * (COUNT_THRESHOLDS - len(chosen)))
        for bits, below in sorted(zip(thresholds, counts_below(thresholds))):
            if low < bits <= high:
                if below < k:
                    low, below_low = bits, below
                else:
                    high, below_high = bits - 1, below
        halved = (high - low) * 2 <= width
        guesses = None
    if low == high:
        return _float_of(low)
    lo_value, hi_value = _float_of(low), _float_of(high + 1)
    kept = [magnitudes_in(f, lo_value, hi_value).cpu() for f in flats]
    candidates = _gather_varying(torch.cat(kept) if kept else empty, layout)
    return float(torch.kthvalue(candidates, k - below_low).values)


def _interpolated(low: int, high: int, below_low: int, below_high: int, k: int) -> list[float]:
    """Two values around where the k-th magnitude lies, if the magnitudes in the bracket were evenly spread.

    The bracket holds ``below_high - below_low`` magnitudes in ``[f(low), f(high + 1))``;
    the two values sit a few standard deviations of that guess either side of it
    (none when the bracket is unbounded above).
    """
    if high + 1 >= _INF_BITS:  # unbounded above: no position to interpolate (the caller bisects)
        return []
    inside = below_high - below_low
    rank = k - below_low
    spread = 3.0 * math.sqrt(inside) + inside / 256
    lo_value = _float_of(low)
    span = _float_of(high + 1) - lo_value
    return [lo_value + span * min(max(r, 0.0), inside) / inside for r in (rank - spread, rank + spread)]
