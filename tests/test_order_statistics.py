"""The exact k-th smallest magnitude (TIES's trim threshold) and the packed tensors the folds run on.

`kth_smallest_magnitude` must equal `torch.kthvalue` over the concatenated
magnitudes for every distribution a task vector can have (smooth, mostly
zeros, many ties, heavy tails, values spanning many decades), for every k,
on packed and on separate tensors, compiled and eager; its sharded form is
tested against the unsharded merge in tests/test_sharded_merge.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugin.merging import _kernels, get_merger, layout
from cl_plugin._packed import aligned_runs, packed_like
from cl_plugin.merging.continual import ContinualMerge
from cl_plugin.errors import NonFiniteError
from cl_plugin.task_vectors import TaskVector


def _cases() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n = 300_000
    return {
        "gaussian, three tensors": [torch.randn(400, 500, generator=g) * 0.01, torch.randn(700, generator=g), torch.randn(90, 90, generator=g)],
        "85% exact zeros": [torch.where(torch.rand(n, generator=g) < 0.85, 0.0, torch.randn(n, generator=g))],
        "bfloat16 (many ties)": [torch.randn(n, generator=g).to(torch.bfloat16)],
        "heavy tail": [torch.randn(n, generator=g) / torch.randn(n, generator=g).clamp(min=1e-3)],
        "one value": [torch.full((n,), 0.5)],
        "seven values": [torch.randn(7, generator=g)],
        "sixty decades": [torch.randn(n // 2, generator=g) * 1e-30, torch.randn(n // 2, generator=g) * 1e30],
        "float64": [torch.randn(n, generator=g, dtype=torch.float64)],
        "two scales": [torch.cat([torch.randn(n // 2, generator=g) * 1e-6, torch.randn(n // 2, generator=g)])],
        "subnormals and signed zeros": [torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e-42, -1e-39, 1e-38, 2.0])],
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8, 0.85, 0.999, 1.0])
def test_kth_smallest_magnitude_equals_kthvalue(case, fraction):
    tensors = CASES[case]
    magnitudes = torch.cat([t.abs().float().flatten() for t in tensors])
    k = min(magnitudes.numel(), max(1, int(magnitudes.numel() * fraction)))
    assert layout.kth_smallest_magnitude(tensors, k) == float(torch.kthvalue(magnitudes, k).values)


@pytest.mark.parametrize("case", ["gaussian, three tensors", "bfloat16 (many ties)", "two scales", "float64"])
def test_every_path_of_the_selection_gives_the_same_value(case, monkeypatch):
    tensors = CASES[case]
    magnitudes = torch.cat([t.abs().float().flatten() for t in tensors])
    k = int(magnitudes.numel() * 0.8)
    expected = float(torch.kthvalue(magnitudes, k).values)
    # Packed into one buffer: one call per pass instead of one per tensor.
    packed = packed_like(dict(enumerate(tensors)), fill=None)
    for i, t in enumerate(tensors):
        packed[i].copy_(t)
    assert len(aligned_runs(list(packed.values()))) == len({t.dtype for t in tensors})
    assert layout.kth_smallest_magnitude(packed.values(), k) == expected
    # Chunks of any size, as a task vector formed on the fly arrives.
    for size in (7, 1000, 1 << 18):
        chunks = [piece for t in tensors for piece in t.reshape(-1).split(size)]
        assert layout.kth_smallest_magnitude_of(lambda: chunks, k) == expected
    # Pieces that mix the compiled and the eager rule, and int32 counts flushed often.
    monkeypatch.setattr(_kernels, "SELECT_CHUNK_NUMEL", _kernels.COMPILE_MIN_NUMEL + 3)
    monkeypatch.setattr(_kernels, "_INT32_ROOM", 3 * _kernels.COMPILE_MIN_NUMEL)
    assert layout.kth_smallest_magnitude(tensors, k) == expected
    # The eager rules, as where no compiler is installed.
    monkeypatch.setitem(_kernels._compile_state, "failed", True)
    assert layout.kth_smallest_magnitude(tensors, k) == expected


@pytest.mark.parametrize("high", [None, 0x3C23, 0])
def test_the_histograms_count_the_magnitude_bit_patterns(high, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(300_000, generator=g) * 0.01, torch.tensor([0.0, -0.0, 1e-45, -1e-40, float("inf")])])
    bits = x.abs().view(torch.int32).long()
    if high is None:
        expected = torch.bincount(bits >> 16, minlength=_kernels.HIGH_BINS)
    else:
        expected = torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=_kernels.LOW_BINS)
    for compiled in (True, False):
        monkeypatch.setitem(_kernels._compile_state, "failed", not compiled)
        histogram = _kernels.MagnitudeHistogram(high)
        for piece in x.split(100_003):
            histogram.add(piece)
        assert torch.equal(histogram.counts(), expected)


def test_the_selection_reads_the_data_twice():
    x = torch.randn(4_000_000, generator=torch.Generator().manual_seed(1))
    k = int(x.numel() * 0.8)
    reads = []
    assert layout.kth_smallest_magnitude_of(lambda: reads.append(1) or [x], k) == float(torch.kthvalue(x.abs(), k).values)
    assert len(reads) == 2


def test_k_outside_the_data_is_refused():
    with pytest.raises(ValueError, match="outside"):
        layout.kth_smallest_magnitude([torch.ones(3)], 4)


# -- packed tensors ---------------------------------------------------------------------------------------
def test_packed_like_shares_one_buffer_per_dtype_in_order():
    src = {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.float64), "c": torch.ones(5)}
    out = packed_like(src)
    assert list(out) == ["a", "b", "c"]
    assert all(out[n].shape == src[n].shape and out[n].dtype == src[n].dtype and not out[n].any() for n in src)
    assert out["a"].untyped_storage().data_ptr() == out["c"].untyped_storage().data_ptr()
    assert out["c"].storage_offset() == 6
    runs = aligned_runs(list(out.values()))
    assert [r[0].numel() for r in runs] == [6, 4, 5]  # a float64 tensor in between breaks the float32 run


def test_aligned_runs_join_only_what_is_consecutive_in_every_list():
    state = packed_like({"a": torch.zeros(3), "b": torch.zeros(2)})
    separate = [torch.arange(3.0), torch.arange(2.0)]
    runs = aligned_runs(list(state.values()), separate)
    assert [r[0].numel() for r in runs] == [3, 2]
    for (s, x) in runs:
        s.copy_(x)  # writes through to the state
    assert state["a"].tolist() == [0.0, 1.0, 2.0] and state["b"].tolist() == [0.0, 1.0]
    packed = packed_like({"a": torch.zeros(3), "b": torch.zeros(2)})
    (run,) = aligned_runs(list(state.values()), list(packed.values()))
    assert run[0].numel() == 5


def test_a_transposed_task_vector_is_folded_per_tensor_with_the_same_result():
    from cl_plugin.merging import get_merger

    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    packed, transposed = get_merger("magmax"), get_merger("magmax")
    for tv in tvs:
        packed.update(tv)
        transposed.update({"w": tv["w"].t().contiguous().t(), "b": tv["b"]})
    assert all(torch.equal(packed.merged()[n], transposed.merged()[n]) for n in ("w", "b"))


# -- a task vector checked once -----------------------------------------------------------------------------
def _core_with_task(method: str = "magmax"):
    net = torch.nn.Linear(4, 3)
    core = ContinualMerge(method)
    core.bind(net)
    core.capture_theta0(net)
    with torch.no_grad():
        net.weight.add_(0.5)
    return core, net


def test_the_core_checks_its_task_vector_once_and_the_merger_trusts_it(monkeypatch):
    from cl_plugin.merging import base

    core, net = _core_with_task()
    monkeypatch.setattr(base, "_check_finite_in_runs", lambda tv, what: pytest.fail("checked twice"))
    returned = core.fold(net)  # formed, checked and folded inside the core: one check
    assert core.num_tasks == 1
    assert not returned._known_finite()  # handed to the caller now: checked again if folded
    with torch.no_grad():
        net.weight.add_(0.5)
    tv = core.task_vector(net, trusted=True)  # what the callbacks fold right away
    assert tv._known_finite()
    core.fold(tv)
    assert core.num_tasks == 2


def test_a_task_vector_handed_out_is_not_trusted():
    # A user may write into it in ways no version counter sees (.data, NumPy, DLPack).
    core, net = _core_with_task()
    tv = core.task_vector(net)
    assert not tv._known_finite()
    tv["weight"].data[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'weight'"):
        core.fold(tv)
    assert core.num_tasks == 0
    w = torch.ones(3, 3)
    user_tv = TaskVector({"w": w})  # checked on construction, but the user keeps `w`
    w.data[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        get_merger("magmax").update(user_tv)


def test_a_stamped_task_vector_written_in_place_is_checked_again():
    core, net = _core_with_task()
    tv = core.task_vector(net)
    tv._stamp_finite()
    assert tv._known_finite()
    tv["weight"][0, 0] = float("nan")  # in place: advances the version counter
    assert not tv._known_finite()
    with pytest.raises(NonFiniteError, match="'weight'"):
        core.fold(tv)
    assert core.num_tasks == 0


def test_task_vectors_under_inference_mode():
    net = torch.nn.Linear(3, 2)
    base_weights = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.inference_mode():
        tv = TaskVector.between(net.state_dict(), base_weights)
        tv._stamp_finite()  # inference tensors keep no version counter: never stamped
        assert not tv._known_finite()
        core = ContinualMerge("magmax")
        core.bind(net)
        core.capture_theta0(net)
        core.fold(net)
    assert core.num_tasks == 1


def test_between_keeps_sparse_tensors_sparse():
    finetuned, base_weights = torch.eye(3).to_sparse(), (2 * torch.eye(3)).to_sparse()
    tv = TaskVector.between({"w": finetuned}, {"w": base_weights})
    assert tv["w"].layout == torch.sparse_coo
    assert torch.equal(tv["w"].to_dense(), -torch.eye(3))


def test_float64_magnitudes_beyond_float32_are_infinite_in_the_selection():
    # The contract is kthvalue over float32 magnitudes, where 1e39 is inf.
    values = torch.tensor([1.0, 2.0, 1e39], dtype=torch.float64)
    for k in (1, 2, 3):
        assert layout.kth_smallest_magnitude([values], k) == float(torch.kthvalue(values.abs().float(), k).values)


def test_a_gathered_state_is_a_copy_when_rank_0_holds_the_tensor_whole():
    core = ContinualMerge("magmax")
    core.layout = layout.ShardLayout.split({"w": (1,)}, rank=0, world=2)  # 1 element: all on rank 0, no collective
    local = torch.ones(1)
    gathered = core._whole("w", local)
    gathered.add_(1.0)
    assert torch.equal(local, torch.ones(1))


def test_diverged_weights_and_an_overflowing_difference_are_told_apart():
    core, net = _core_with_task()
    with torch.no_grad():
        net.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="training diverged"):
        core.task_vector(net)
    core, net = _core_with_task()
    core.theta0["bias"].fill_(-3e38)
    with torch.no_grad():
        net.bias.fill_(3e38)
    with pytest.raises(NonFiniteError, match="overflows its dtype in 'bias'"):
        core.task_vector(net)


# -- whole matrices on their owners (OPCM under DDP) ------------------------------------------------------
def _vit_like_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"patch.weight": (384, 3, 16, 16), "pos": (1, 197, 384)}
    for b in range(blocks):
        shapes |= {
            f"{b}.qkv.weight": (1152, 384), f"{b}.qkv.bias": (1152,), f"{b}.proj.weight": (384, 384),
            f"{b}.fc1.weight": (1536, 384), f"{b}.fc2.weight": (384, 1536), f"{b}.norm.weight": (384,),
        }
    return shapes


@pytest.mark.parametrize("blocks, world, placed", [(12, 2, True), (2, 8, False)])
def test_matrices_are_placed_whole_only_within_the_balance_limit(blocks, world, placed):
    shapes = _vit_like_shapes(blocks)
    core = ContinualMerge("opcm")
    core.names = list(shapes)
    owners = core._matrix_owners(shapes, 0, world, None)
    assert bool(owners) == placed  # 8 matrices of 3 sizes over 8 ranks cannot be balanced within 1%
    if placed:
        assert set(owners) == {n for n, s in shapes.items() if len(s) == 2}
        held = [0] * world
        for n, s in shapes.items():
            numel = math.prod(s)
            for r in range(world):
                held[r] += (numel if owners[n] == r else 0) if n in owners else len(range(*layout.split_range(numel, r, world)))
        assert max(held) <= 1.01 * -(-sum(math.prod(s) for s in shapes.values()) // world) + world * len(shapes)
    assert ContinualMerge("magmax")._matrix_owners(shapes, 0, world, None) == {}  # elementwise rules: even split
    no_placement = ContinualMerge("opcm", whole_matrices=False)
    no_placement.names = list(shapes)
    assert no_placement._matrix_owners(shapes, 0, world, None) == {}


class _OtherRank:
    """A stand-in layout whose all_reduce_ adds another rank's tensor, recording every call."""

    def __init__(self, other_fails: bool = False):
        self.other_fails, self.calls = other_fails, []

    def all_reduce_(self, t):
        self.calls.append(t.numel())
        if self.other_fails:
            t[-1] += 1
        return t


def test_a_failed_count_on_one_rank_still_meets_the_others_collective():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))

    def failing():
        yield x
        raise MemoryError("simulated")

    mine = _OtherRank()
    with pytest.raises(MemoryError, match="simulated"):
        layout.kth_smallest_magnitude_of(failing, 10, mine)
    assert mine.calls == [_kernels.HIGH_BINS + 1]  # the collective was reached, with the failure flag
    theirs = _OtherRank(other_fails=True)
    with pytest.raises(RuntimeError, match="failed on another rank"):
        layout.kth_smallest_magnitude_of(lambda: [x], 10, theirs)
    assert theirs.calls == [_kernels.HIGH_BINS + 1]
