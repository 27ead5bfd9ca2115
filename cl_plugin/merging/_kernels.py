"""Elementwise update rules, fused where a compiler is available.

A merge is memory bound: each update reads the incoming task vector and the
merged state and writes the state once. Written eagerly, ``torch.where`` on a
large tensor allocates several temporaries of the same size whose page faults
cost many times the copy itself. Two paths reach the floor instead:

* ``torch.compile`` (inductor) fuses the rule into one loop over the buffer;
  used for tensors of at least :data:`COMPILE_MIN_NUMEL` elements, where it
  pays for its one-off compilation;
* otherwise the rule runs in cache-sized chunks with preallocated scratch
  space, so no temporary is larger than :data:`CHUNK_NUMEL` elements.

A chunk is no larger than ATen's parallel grain size (32,768 elements), so
each eager op on a chunk runs on the calling thread. A larger op opens an
OpenMP parallel region, and when other processes share the cores every such
region waits at its barrier for a descheduled thread: on 2 shared cores,
chunks of 65,536 elements made the chunked loops 2 to 65 times slower than
chunks of 32,768 (benchmarks/merge_speed.py, docs/performance.md).

Both paths compute the same values bit for bit (the rules are selections, sums
and products with no reassociation). Set ``CL_PLUGIN_COMPILE=0`` to force the
eager path, e.g. where no C compiler is installed; a failed compilation falls
back to it with one warning.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

__all__ = [
    "CHUNK_NUMEL",
    "MagnitudeHistogram",
    "COMPILE_MIN_NUMEL",
    "magmax_fold_",
    "random_fold_",
    "disjoint_mean",
    "random_select_",
    "sign_balance",
    "splitmix_draws",
    "ties_fold_",
]

#: Elements per chunk of the eager loops: at most ATen's grain size
#: (``at::internal::GRAIN_SIZE``), so no chunk op starts an OpenMP region.
CHUNK_NUMEL = 1 << 15
#: Tensors of at least this many elements take the compiled path. The
#: compiled function is shape-generic (``dynamic=True``): it compiles once per
#: tensor rank it meets (dynamo guards the rank of the viewed tensor), and one
#: fused call is far cheaper than the chunked loop from about this size on
#: (e.g. ViT-B's 768x768 attention projections, 12 of its 152 tensors).
COMPILE_MIN_NUMEL = 1 << 17

_compile_state: dict[str, object] = {"failed": False}


def _compile_enabled() -> bool:
    return os.environ.get("CL_PLUGIN_COMPILE", "1") != "0" and not _compile_state["failed"]


def _magmax_rule_(acc: Tensor, incoming: Tensor) -> None:
    # ">=": a tie goes to the later task, as in the official MagMax code.
    acc.copy_(torch.where(incoming.abs() >= acc.abs(), incoming, acc))


def _compiled(name: str, fn):
    key = f"compiled_{name}"
    if key not in _compile_state:
        _compile_state[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compile_state[key]


#: What :func:`_run_compiled` returns when the caller must run its eager path.
_EAGER = object()


def _run_compiled(name: str, rule, numel: int, eager: str, *args):
    """``rule(*args)`` compiled, for an input of at least :data:`COMPILE_MIN_NUMEL` elements while the compiler is on.

    Returns :data:`_EAGER` otherwise, and the caller runs its eager path. A
    failed compilation turns the compiler off with one warning, ending with
    ``eager`` (what runs instead).
    """
    if numel < COMPILE_MIN_NUMEL or not _compile_enabled():
        return _EAGER
    try:
        return _compiled(name, rule)(*args)
    except Exception as exc:  # no compiler, unsupported device, ...
        _compile_state["failed"] = True
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); {eager}.", stacklevel=3)
        return _EAGER


def _chunks(*tensors: Tensor):
    """Yield matching flat chunks of equally sized tensors."""
    flats = [t.view(-1) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, CHUNK_NUMEL):
        stop = min(start + CHUNK_NUMEL, n)
        yield tuple(f[start:stop] for f in flats)


def magmax_fold_(acc: Tensor, incoming: Tensor) -> None:
    """In place: ``acc[i] = incoming[i] if |incoming[i]| >= |acc[i]| else acc[i]``.

    Args:
        acc: the merged tensor so far, contiguous, any shape; overwritten.
        incoming: the new task's tensor, same shape, dtype and device.
    """
    flats = (acc.view(-1), incoming.reshape(-1))
    if _run_compiled("magmax", _magmax_rule_, acc.numel(), "using the eager MagMax update", *flats) is not _EAGER:
        return
    mask = torch.empty(min(CHUNK_NUMEL, acc.numel()), dtype=torch.bool, device=acc.device)
    mag_a = torch.empty(mask.shape, dtype=acc.dtype, device=acc.device)
    mag_b = torch.empty_like(mag_a)
    for a, b in _chunks(acc, incoming.contiguous()):
        n = a.numel()
        torch.abs(a, out=mag_a[:n])
        torch.abs(b, out=mag_b[:n])
        torch.ge(mag_b[:n], mag_a[:n], out=mask[:n])
        torch.where(mask[:n], b, a, out=a)


def random_fold_(acc: Tensor, incoming: Tensor, keep_probability: float, generator: torch.Generator) -> None:
    """In place: each element of ``acc`` takes ``incoming``'s value with probability ``keep_probability``.

    Draws ``acc.numel()`` uniform numbers from ``generator`` in element order,
    in chunks of :data:`CHUNK_NUMEL`, so the result depends only on the
    generator's seed, not on the device's thread count.
    """
    u = torch.empty(min(CHUNK_NUMEL, acc.numel()), dtype=torch.float32, device=acc.device)
    mask = torch.empty(u.shape, dtype=torch.bool, device=acc.device)
    for a, b in _chunks(acc, incoming.contiguous()):
        n = a.numel()
        torch.rand(n, generator=generator, out=u[:n], device=acc.device)
        torch.lt(u[:n], keep_probability, out=mask[:n])
        torch.where(mask[:n], b, a, out=a)


def _ties_rule_(pos_sum: Tensor, neg_sum: Tensor, pos_count: Tensor, neg_count: Tensor, x: Tensor, threshold: float) -> None:
    v = x.to(pos_sum.dtype)
    keep = v.abs() >= threshold
    positive = keep & (v > 0)
    negative = keep & (v < 0)
    # Adding 0 where an entry is not kept: the sums never hold -0, so this equals the eager x*0.
    pos_sum.copy_(pos_sum + torch.where(positive, v, 0.0))
    neg_sum.copy_(neg_sum + torch.where(negative, v, 0.0))
    pos_count.copy_(pos_count + positive.to(pos_count.dtype))
    neg_count.copy_(neg_count + negative.to(neg_count.dtype))


def ties_fold_(
    pos_sum: Tensor, neg_sum: Tensor, pos_count: Tensor, neg_count: Tensor, incoming: Tensor, threshold: float
) -> None:
    """In place: add the entries of ``incoming`` with ``|x| >= threshold`` to the signed sums and counts.

    ``pos_sum``/``neg_sum`` accumulate the positive/negative kept values (in
    their own dtype); ``pos_count``/``neg_count`` count them.
    """
    flats = (pos_sum.view(-1), neg_sum.view(-1), pos_count.view(-1), neg_count.view(-1), incoming.reshape(-1))
    if _run_compiled("ties", _ties_rule_, pos_sum.numel(), "using the eager TIES update", *flats, float(threshold)) is not _EAGER:
        return
    inc = incoming.contiguous()
    scratch = torch.empty(min(CHUNK_NUMEL, inc.numel()), dtype=pos_sum.dtype, device=pos_sum.device)
    keep = torch.empty(scratch.shape, dtype=torch.bool, device=pos_sum.device)
    sign = torch.empty(scratch.shape, dtype=torch.bool, device=pos_sum.device)
    for ps, ns, pc, nc, x in _chunks(pos_sum, neg_sum, pos_count, neg_count, inc):
        n = x.numel()
        s, k, g = scratch[:n], keep[:n], sign[:n]
        s.copy_(x)
        torch.abs(s, out=s)
        torch.ge(s, threshold, out=k)
        # positive kept entries
        torch.gt(x, 0, out=g)
        g.logical_and_(k)
        pc.add_(g)
        s.copy_(x).mul_(g)
        ps.add_(s)
        # negative kept entries
        torch.lt(x, 0, out=g)
        g.logical_and_(k)
        nc.add_(g)
        s.copy_(x).mul_(g)
        ns.add_(s)


#: Elements per piece of the histogram and sign-count passes: large, so each compiled call pays its dispatch once.
SELECT_CHUNK_NUMEL = 1 << 24


def _disjoint_mean_rule(pos_sum: Tensor, neg_sum: Tensor, pos_count: Tensor, neg_count: Tensor, majority: Tensor) -> Tensor:
    sign = torch.sign(pos_sum + neg_sum)
    sign = torch.where(sign == 0, majority, sign)
    return torch.where(sign > 0, pos_sum / pos_count.clamp(min=1), neg_sum / neg_count.clamp(min=1))


def disjoint_mean(pos_sum: Tensor, neg_sum: Tensor, pos_count: Tensor, neg_count: Tensor, majority: float) -> Tensor:
    """TIES's merged entries: the mean of the kept values whose sign is the elected one.

    The elected sign of an entry is sign(pos_sum + neg_sum), or ``majority``
    (+1 or −1) where that sum is 0. Returns a new tensor shaped and typed as
    ``pos_sum`` (all four the same shape; counts integer). One fused pass
    where the compiler is on; the same values eagerly, a chunk at a time.
    """
    out = torch.empty_like(pos_sum)
    flats = [t.reshape(-1) for t in (pos_sum, neg_sum, pos_count, neg_count)]
    target = out.view(-1)
    sign = torch.tensor(float(majority), dtype=pos_sum.dtype, device=pos_sum.device)
    fused = _run_compiled("disjoint_mean", _disjoint_mean_rule, target.numel(), "using the eager TIES mean", *flats, sign)
    if fused is not _EAGER:
        target.copy_(fused)
        return out
    for start in range(0, target.numel(), CHUNK_NUMEL):
        pieces = [f[start : start + CHUNK_NUMEL] for f in flats]
        target[start : start + CHUNK_NUMEL] = _disjoint_mean_rule(*pieces, sign)
    return out


def _sign_balance_rule(pos_sum: Tensor, neg_sum: Tensor) -> Tensor:
    total = pos_sum + neg_sum
    return (total > 0).sum() - (total < 0).sum()


def sign_balance(pos_sum: Tensor, neg_sum: Tensor) -> int:
    """#(pos_sum + neg_sum > 0) − #(pos_sum + neg_sum < 0) over the flat tensors, in one read and no temporary of their size."""
    pos, neg = pos_sum.reshape(-1), neg_sum.reshape(-1)
    balance = 0
    for start in range(0, pos.numel(), SELECT_CHUNK_NUMEL):
        p, n = pos[start : start + SELECT_CHUNK_NUMEL], neg[start : start + SELECT_CHUNK_NUMEL]
        fused = _run_compiled("sign_balance", _sign_balance_rule, p.numel(), "counting eagerly", p, n)
        if fused is not _EAGER:
            balance += int(fused)
            continue
        for a, b in zip(p.split(CHUNK_NUMEL), n.split(CHUNK_NUMEL)):
            balance += int(_sign_balance_rule(a, b))
    return balance


#: Bins of the first radix pass: bits 16 to 30 of a magnitude's float32 pattern (bit 31, the sign, is dropped).
HIGH_BINS = 1 << 15
#: Bins of the second radix pass: bits 0 to 15, among the magnitudes in one first-pass bin.
LOW_BINS = 1 << 16
# Counts are kept in int32 on the data's device and moved to an int64 total before they could overflow.
_INT32_ROOM = (1 << 31) - 1


def _magnitude_bits(x: Tensor) -> Tensor:
    """The float32 bit pattern of ``|x|`` as int32 (non-negative, ordered as the magnitudes are)."""
    single = x if x.dtype == torch.float32 else x.to(torch.float32)
    return single.view(torch.int32) & 0x7FFFFFFF


def _high_histogram_rule(counts: Tensor, x: Tensor) -> None:
    bits = _magnitude_bits(x)
    counts.index_add_(0, bits >> 16, torch.ones_like(bits))


def _low_histogram_rule(counts: Tensor, x: Tensor, high: Tensor) -> None:
    # Every element adds to a bin (0 where its high bits differ): no branch, no compaction.
    bits = _magnitude_bits(x)
    counts.index_add_(0, bits & 0xFFFF, ((bits >> 16) == high).to(torch.int32))


class MagnitudeHistogram:
    """Counts of float32 magnitude bit patterns, one radix pass of an exact selection.

    ``high=None``: the first pass, ``HIGH_BINS`` bins by bits 16-30 of the
    pattern of ``|x|`` (as float32: a float64 beyond float32's range counts as
    inf, a 16-bit value exactly). ``high=b``: the second pass, ``LOW_BINS``
    bins by bits 0-15, among the magnitudes whose first-pass bin is ``b``.
    The counts are integers, so they do not depend on how the data is split
    into calls, on the device, or on the compiled or eager path. Memory: the
    bins, no temporary the size of ``x`` beyond one piece of
    :data:`SELECT_CHUNK_NUMEL` elements.
    """

    def __init__(self, high: int | None = None) -> None:
        self.high = high
        self._bins = HIGH_BINS if high is None else LOW_BINS
        self._total = torch.zeros(self._bins, dtype=torch.int64)
        self._pending: Tensor | None = None
        self._pending_numel = 0

    def add(self, x: Tensor) -> None:
        """Count the elements of ``x`` (any shape, floating point, no NaN)."""
        flat = x.detach().reshape(-1)
        for start in range(0, flat.numel(), SELECT_CHUNK_NUMEL):
            piece = flat[start : start + SELECT_CHUNK_NUMEL]
            if self._pending is None or self._pending.device != piece.device or self._pending_numel + piece.numel() > _INT32_ROOM:
                self._flush()
                self._pending = torch.zeros(self._bins, dtype=torch.int32, device=piece.device)
            self._pending_numel += piece.numel()
            if self.high is None:
                rule, name, args = _high_histogram_rule, "high_histogram", ()
            else:
                rule, name = _low_histogram_rule, "low_histogram"
                args = (torch.tensor(self.high, dtype=torch.int32, device=piece.device),)
            if _run_compiled(name, rule, piece.numel(), "counting eagerly", self._pending, piece, *args) is not _EAGER:
                continue
            for sub in piece.split(CHUNK_NUMEL):  # no temporary larger than a cache-sized chunk
                rule(self._pending, sub, *args)

    def counts(self) -> Tensor:
        """The counts so far, int64 on the CPU (``HIGH_BINS`` or ``LOW_BINS`` of them)."""
        self._flush()
        return self._total

    def _flush(self) -> None:
        if self._pending is not None:
            self._total += self._pending.cpu()
            self._pending, self._pending_numel = None, 0


# -- counter-based draws: a pure function of (key, element index) -------------------------------------------
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (the golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: Bits of each draw (the top bits of SplitMix64's output).
DRAW_BITS = 53


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix_draws(key: int, start: int, count: int, device: torch.device | str | None = None) -> Tensor:
    """The 53-bit draws (int64 in [0, 2⁵³)) of elements ``start .. start + count - 1`` of the stream ``key``.

    SplitMix64's finaliser over z = key + (i + 1)·γ, in int64 arithmetic
    (which wraps modulo 2⁶⁴ on every device alike): element i's draw is a pure
    function of ``(key, i)``, so a tensor drawn whole, in chunks, or as shards
    at any offset gets the same values.
    """
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GAMMA)).add_(_signed(key & _MASK64))
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_signed(_MIX1))
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_signed(_MIX2))
    z.bitwise_xor_(_shift_right(z, 31))
    return _shift_right(z, 64 - DRAW_BITS)


def random_select_(acc: Tensor, incoming: Tensor, threshold: int, key: int, offset: int = 0) -> None:
    """In place: element i of ``acc`` takes ``incoming[i]`` when its draw is below ``threshold``.

    The draw of element i is ``splitmix_draws(key, offset + i, 1)``: with
    ``threshold = ⌊2⁵³·p⌋`` each element is taken with probability p (to within
    2⁻⁵³), independently, whatever the split of the tensor.
    """
    flat_acc, flat_in = acc.view(-1), incoming.reshape(-1)
    for start in range(0, flat_acc.numel(), CHUNK_NUMEL):
        stop = min(start + CHUNK_NUMEL, flat_acc.numel())
        take = splitmix_draws(key, offset + start, stop - start, acc.device) < threshold
        torch.where(take, flat_in[start:stop], flat_acc[start:stop], out=flat_acc[start:stop])
