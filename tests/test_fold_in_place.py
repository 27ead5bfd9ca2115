"""ContinualMerge.fold_in_place: τ formed chunk by chunk inside the fold, the same merge as fold(module) bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cl_plugin._packed as packed
from cl_plugin.errors import ConfigError, DivergedError, NonFiniteError
from cl_plugin.merging import get_merger
from cl_plugin.merging.continual import ContinualMerge


class Net(nn.Module):
    """Tensors of several sizes (a chunk spans tensor boundaries), a BatchNorm, optionally a bfloat16 part."""

    def __init__(self, mixed: bool = False):
        super().__init__()
        self.a = nn.Linear(9, 13)
        self.norm = nn.BatchNorm1d(13)
        self.b = nn.Linear(13, 5)
        if mixed:
            self.b.to(torch.bfloat16)


def trained(model: nn.Module, task: int) -> None:
    """Move every float tensor as a training run would (statistics too), deterministically per task."""
    g = torch.Generator().manual_seed(100 + task)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_((torch.randn(t.shape, generator=g) * 0.1).to(t.dtype))


def states_equal(a: ContinualMerge, b: ContinualMerge) -> bool:
    sa, sb = a.merger.state_dict(), b.merger.state_dict()
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            if not (sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k])):
                return False
        elif sa[k] != sb[k]:
            return False
    ma, mb = a.merged_tensors(), b.merged_tensors()
    return all(torch.equal(ma[n], mb[n]) for n in ma)


def two_cores(method: str, model: nn.Module) -> tuple[ContinualMerge, ContinualMerge]:
    cores = (ContinualMerge(method), ContinualMerge(method))
    for core in cores:
        core.bind(model)
        core.capture_theta0(model)
    return cores


def folded_once(method: str, first_way: str, second_way: str) -> tuple[nn.Module, ContinualMerge, ContinualMerge]:
    """A model trained on one task, and two cores that folded it, each by ``fold`` or ``fold_in_place``."""
    torch.manual_seed(0)
    model = Net()
    first, second = two_cores(method, model)
    trained(model, 0)
    getattr(first, first_way)(model)
    getattr(second, second_way)(model)
    return model, first, second


@pytest.mark.parametrize("method", ["magmax", "task_arithmetic", "average", "ties", "random", "opcm"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, None])
def test_the_same_merge_as_fold_bit_for_bit(monkeypatch, method, mixed, chunk):
    if chunk is not None:
        monkeypatch.setattr(packed, "STREAM_CHUNK_NUMEL", chunk)
    torch.manual_seed(0)
    model = Net(mixed)
    whole, streamed = two_cores(method, model)
    assert streamed.folds_in_place
    for task in range(3):
        trained(model, task)
        tv = whole.fold(model)
        norm = streamed.fold_in_place(model)
        assert states_equal(whole, streamed), task
        assert math.isclose(norm, tv.norm(), rel_tol=1e-6)
    assert streamed.num_tasks == 3 and streamed.statistic_names == ["norm.running_mean", "norm.running_var"]


@pytest.mark.parametrize("top_k", [1.0, 0.5, 1e-3])
def test_ties_streamed_trims_at_the_whole_task_vector_threshold(top_k):
    # top_k=1 keeps everything (no selection pass at all).
    torch.manual_seed(0)
    model = Net(mixed=True)
    whole, streamed = (ContinualMerge("ties", method_options={"top_k": top_k}) for _ in range(2))
    for core in (whole, streamed):
        core.bind(model)
        core.capture_theta0(model)
    numel = sum(whole.theta0[n].numel() for n in whole.names)
    for task in range(3):
        trained(model, task)
        whole.fold(model)
        streamed.fold_in_place(model)
        assert states_equal(whole, streamed), task
        if task == 0:  # the defining property: the top ⌊d·top_k⌋ magnitudes of the whole τ are kept (no ties here)
            state = streamed.merger.state_dict()
            kept = sum(int(state[k].sum()) for k in state if k.startswith(("pos_count.", "neg_count.")))
            assert kept == int(numel * top_k) + (top_k < 1)


@pytest.mark.parametrize("in_place_after", [False, True])
def test_a_checkpoint_of_the_streamed_merge_resumes(in_place_after):
    model, whole, streamed = folded_once("magmax", "fold", "fold_in_place")
    state = streamed.state_dict()
    # a checkpoint may list the tensors in another order (e.g. safetensors sorts them)
    state["merger"] = dict(state["merger"], input_dtypes=dict(reversed(list(state["merger"]["input_dtypes"].items()))))
    resumed = ContinualMerge("magmax")
    resumed.bind(model)
    resumed.prepare_load(state, "test")()
    for task in (1, 2):
        trained(model, task)
        whole.fold(model)
        resumed.fold_in_place(model) if in_place_after else resumed.fold(model)
        assert states_equal(whole, resumed)


def test_diverged_weights_raise_before_anything_changes():
    model, core, reference = folded_once("task_arithmetic", "fold_in_place", "fold_in_place")
    trained(model, 1)
    with torch.no_grad():
        model.b.weight[2, 3] = float("nan")
    with pytest.raises(DivergedError, match="'b.weight'"):
        core.fold_in_place(model)
    assert states_equal(core, reference) and core.num_tasks == 1


def test_a_difference_that_overflows_is_found_although_the_weights_are_finite():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(3e38)
    core = ContinualMerge("magmax")
    core.bind(model)
    core.capture_theta0(model)
    with torch.no_grad():
        model.weight.fill_(-3e38)  # finite, but θ − θ₀ = -6e38 is not
    with pytest.raises(DivergedError, match="overflows its dtype in 'weight'"):
        core.fold_in_place(model)
    assert core.num_tasks == 0


def test_a_sum_near_the_dtype_maximum_is_decided_exactly():
    # |θ₀| is near float32's maximum, so the bound |θ| + |θ₀| says little about τ (tiny here):
    # the second task's sum bound passes the maximum, and the fold is checked on the whole τ instead.
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.5e38)
    whole, streamed = two_cores("task_arithmetic", model)
    for task in range(2):
        with torch.no_grad():
            model.weight.add_(1e32 * (task + 1))
            model.bias.add_(0.5)
        whole.fold(model)
        streamed.fold_in_place(model)
        assert states_equal(whole, streamed)


def test_a_sum_that_overflows_is_refused_as_fold_refuses_it():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    whole, streamed = two_cores("task_arithmetic", model)
    with torch.no_grad():
        model.weight.fill_(2e38)
    whole.fold(model)
    streamed.fold_in_place(model)
    before = {k: v.clone() for k, v in streamed.merger.state_dict().items() if isinstance(v, torch.Tensor)}
    # τ = 2e38 again: finite, but the running sum 4e38 is not
    with pytest.raises(NonFiniteError, match="would overflow"):
        whole.fold(model)
    with pytest.raises(NonFiniteError, match="would overflow") as raised:
        streamed.fold_in_place(model)
    assert not isinstance(raised.value, DivergedError)  # the weights are fine; the merge cannot take them
    after = streamed.merger.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and streamed.num_tasks == 1


@pytest.mark.parametrize("method, options", [("ties", {"dare": 0.3}), ("opcm", {"dare": 0.3}), ("dop", {}), ("random", {"dare": 0.5})])
def test_methods_that_need_the_whole_task_vector_say_so(method, options):
    core = ContinualMerge(method, method_options=options)
    model = nn.Linear(3, 2)
    core.bind(model)
    core.capture_theta0(model)
    assert not core.folds_in_place
    with pytest.raises(ConfigError, match="use fold\\(module\\)"):
        core.fold_in_place(model)


def test_the_merger_refuses_a_streamed_update_it_cannot_do():
    with pytest.raises(ConfigError, match="call update\\(task_vector\\)"):
        get_merger("dop").update_streamed({}, {}, {}, {})


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "magmax", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merge_read_one_tensor_at_a_time_is_the_whole_merge(method, dtype):
    # average and task arithmetic finalise tensor by tensor (write_merged never holds the whole
    # merge); the other methods read theirs from one view; the values are merged()'s either way.
    merger = get_merger(method)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        merger.update({"w": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)})
    whole = merger.merged()
    source = merger.merged_source()
    for n in whole:
        assert merger.merged_one(n).dtype == dtype
        assert torch.equal(merger.merged_one(n), whole[n]) and torch.equal(source(n), whole[n])
    if dtype == torch.float32:
        assert merger.merged_norm() == whole.norm()
    else:  # the norm is taken before the cast to bfloat16 (the state is float32)
        assert math.isclose(merger.merged_norm(), whole.norm(), rel_tol=1e-2)


def test_ties_finalises_one_tensor_at_a_time_only_while_it_knows_the_majority_sign(monkeypatch):
    from cl_plugin.merging import _kernels

    def tied_sign_merger() -> object:
        merger = get_merger("ties", top_k=1.0)
        # Entries whose sums cancel (sign 0) take the whole vector's majority sign: here negative,
        # decided by "b" alone, so a tensor finalised alone must know the other tensors.
        merger.update({"w": torch.tensor([1.0, -1.0, 2.0]), "b": torch.tensor([-1.0, -1.0, -1.0, -1.0])})
        merger.update({"w": torch.tensor([-1.0, 1.0, 1.0]), "b": torch.tensor([-2.0, 1.0, -1.0, 1.0])})
        return merger

    merger = tied_sign_merger()
    assert merger._finalizes_by_tensor_now()
    # γ: w (0, 0, +), b (−, 0, −, 0): majority −1, so w's cancelled entries take their negative mean.
    expected_w = torch.tensor([-1.0, -1.0, 1.5])
    assert torch.equal(merger.merged_one("w"), merger.merged()["w"])
    assert torch.allclose(merger.merged_one("w"), expected_w)
    # A loaded state counts the sign afresh on first use: the same values.
    loaded = get_merger("ties", top_k=1.0)
    loaded.load_state_dict(merger.state_dict())
    assert torch.equal(loaded.merged_one("w"), merger.merged()["w"])
    # A write into the state counts it again: flipping b's sums flips the majority to +1.
    for role in ("pos_sum", "neg_sum"):
        merger._state[role]["b"].neg_()
    merger._state["pos_sum"]["b"], merger._state["neg_sum"]["b"] = merger._state["neg_sum"]["b"], merger._state["pos_sum"]["b"]
    assert torch.equal(merger.merged_one("w"), merger.merged()["w"])
    assert merger.merged_one("w")[:2].tolist() == [1.0, 1.0]  # the cancelled entries take their positive mean now
    # Inference tensors keep no version counter: the merge is finalised whole, with the same values.
    with torch.inference_mode():
        frozen = tied_sign_merger()
        assert not frozen._finalizes_by_tensor_now()
        assert torch.equal(frozen.merged_one("w"), loaded.merged_one("w"))
    # The count is the same compiled and eager, on pieces of any size.
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.rand(300_001, generator=g), -torch.rand(300_001, generator=g)
    neg[:1000] = -pos[:1000]
    expected = int((pos + neg > 0).sum()) - int((pos + neg < 0).sum())
    assert _kernels.sign_balance(pos, neg) == expected
    monkeypatch.setattr(_kernels, "SELECT_CHUNK_NUMEL", _kernels.COMPILE_MIN_NUMEL + 5)
    assert _kernels.sign_balance(pos, neg) == expected
    monkeypatch.setitem(_kernels._compile_state, "failed", True)
    assert _kernels.sign_balance(pos, neg) == expected


def test_theta0_written_in_place_is_bounded_again():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    core = ContinualMerge("magmax")
    core.bind(model)
    core.capture_theta0(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    core.fold_in_place(model)  # max |θ₀| (0) is taken here
    core.theta0["weight"].fill_(3e38)  # in place: the bound taken before no longer holds
    with torch.no_grad():
        model.weight.fill_(-3e38)
    with pytest.raises(DivergedError, match="'weight'"):
        core.fold_in_place(model)
    assert core.num_tasks == 1


def test_a_subclass_that_changes_the_rule_does_not_inherit_the_chunked_fold():
    from cl_plugin.merging.task_arithmetic import TaskArithmeticMerger

    class HalfSum(TaskArithmeticMerger):
        def _fold(self, tv):
            for total, incoming in self._runs(tv, "sum"):
                total.add_(incoming / 2)

        def _finalize(self):
            return {n: t * 2 for n, t in self._state["sum"].items()}

    merger = HalfSum()
    assert not merger.can_stream() and not merger.finalizes_by_tensor
    merger.update({"w": torch.ones(3)})
    assert torch.equal(merger.merged_one("w"), torch.ones(3)) and merger.merged_norm() == merger.merged().norm()


def test_a_merge_of_nothing_but_statistics_is_refused_as_fold_refuses_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    core = ContinualMerge("magmax", exclude=["0.*", "1.weight", "1.bias"])
    core.bind(model)
    core.capture_theta0(model)
    assert core.names == [] and core.statistic_names
    trained(model, 0)
    with pytest.raises(ConfigError, match="holds no floating-point tensor"):
        core.fold(model)
    with pytest.raises(ConfigError, match="holds no floating-point tensor"):
        core.fold_in_place(model)
    assert core.num_tasks == 0 and core._statistics_merger.num_tasks == 0


def folded_in_place(method: str, tasks: int) -> tuple[nn.Module, ContinualMerge]:
    """A Net and a core that folded ``tasks`` trained tasks with fold_in_place."""
    torch.manual_seed(0)
    model = Net()
    core = ContinualMerge(method)
    core.bind(model)
    core.capture_theta0(model)
    for task in range(tasks):
        trained(model, task)
        core.fold_in_place(model)
    return model, core


def failing_at_call(n: int, function, error: BaseException):
    """``function`` that raises ``error`` at its ``n``-th call."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return function(*args, **kwargs)

    return wrapped


def test_a_fold_interrupted_part_way_leaves_a_merger_that_refuses_to_be_used(monkeypatch):
    model, core = folded_in_place("task_arithmetic", 1)
    monkeypatch.setattr(packed, "STREAM_CHUNK_NUMEL", 16)
    merger_type = type(core.merger)
    monkeypatch.setattr(merger_type, "_fold_chunk", failing_at_call(3, merger_type._fold_chunk, MemoryError("simulated")))
    trained(model, 1)
    with pytest.raises(MemoryError):
        core.fold_in_place(model)
    for use in (core.merger.state_dict, core.merger.merged, lambda: core.fold_in_place(model), lambda: core.write_merged(model)):
        with pytest.raises(ConfigError, match="interrupted part-way"):
            use()


def test_opcm_in_place_refuses_to_be_used_after_a_projection_fails_part_way(monkeypatch):
    import cl_plugin.merging.opcm as opcm

    model, core = folded_in_place("opcm", 2)
    # the second matrix fails: the first is already written in place
    error = torch.linalg.LinAlgError("simulated: the SVD did not converge")
    monkeypatch.setattr(opcm, "project_out_merged_directions", failing_at_call(2, opcm.project_out_merged_directions, error))
    trained(model, 2)
    with pytest.raises(torch.linalg.LinAlgError):
        core.fold_in_place(model)
    with pytest.raises(ConfigError, match="interrupted part-way"):
        core.merger.state_dict()


def test_opcm_folds_a_task_that_could_overflow_on_the_whole_task_vector(monkeypatch):
    # √numel · max|τ| past half float32's maximum: the update cannot be bounded, so it runs on
    # the whole τ (new buffers, checked before the swap), as fold does.
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    whole, streamed = two_cores("opcm", model)
    with torch.no_grad():
        model.weight.copy_(torch.eye(4))
    whole.fold(model)
    streamed.fold_in_place(model)
    updates = []
    update = type(streamed.merger).update
    monkeypatch.setattr(type(streamed.merger), "update", lambda self, *a, **k: updates.append(self) or update(self, *a, **k))
    with torch.no_grad():
        model.weight.copy_(torch.arange(16.0).view(4, 4))
    whole.fold(model)
    streamed.fold_in_place(model)
    assert streamed.merger not in updates and states_equal(whole, streamed)  # bounded: in place
    with torch.no_grad():
        model.weight.fill_(3e38)
    before = {k: v.clone() for k, v in streamed.merger.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(NonFiniteError, match="overflows"):
        whole.fold(model)
    with pytest.raises(NonFiniteError, match="overflows"):
        streamed.fold_in_place(model)
    assert streamed.merger in updates  # unbounded: on the whole τ, refused before the swap
    after = streamed.merger.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and streamed.num_tasks == 2


def test_opcm_streams_only_when_the_rescaled_merge_cannot_overflow_either():
    # Each tensor's own bound holds (5e37 ≪ max/2), but the mean task-vector norm over 400 of
    # them passes float32's maximum: the rescale could overflow, so the update runs whole.
    from cl_plugin.merging.opcm import OPCMMerger

    names = [f"p{i}" for i in range(400)]
    merger = OPCMMerger()
    merger.update({n: torch.full((1,), 5e37) for n in names})
    assert merger.streamed_bounds({n: 5e37 for n in names}) is None
    small = OPCMMerger()
    small.update({n: torch.full((1,), 1.0) for n in names})
    assert small.streamed_bounds({n: 1.0 for n in names}) == {}
    assert small.streamed_bounds({n: 2e37 for n in names}) is None  # (20 + √400 · 2e37) / 2 tasks: past max/2


@pytest.mark.parametrize("streamed", [False, True])
def test_opcm_refuses_a_rescale_its_dtype_cannot_hold_instead_of_writing_nan(streamed):
    # The second task nearly cancels the first: the merged norm is ~1e-15 against a mean
    # task-vector norm of 1e25, and the factor 1e40 is inf in float32 (0 · inf = NaN).
    from cl_plugin.merging.opcm import OPCMMerger

    merger = OPCMMerger()
    merger.update({"b": torch.tensor([1e25, 1e-15])})
    second = {"b": torch.tensor([-1e25, 0.0])}
    before = merger.state_dict()["merged.b"].clone()
    with pytest.raises(NonFiniteError, match="too small against the mean task-vector norm"):
        if streamed:
            largest = {"b": 1e25}
            merger.update_streamed({"b": torch.zeros(2)}, second, largest, merger.streamed_bounds(largest))
        else:
            merger.update(second)
    if streamed:  # written in place: unusable, never NaN
        with pytest.raises(ConfigError, match="interrupted part-way"):
            merger.state_dict()
    else:
        assert torch.equal(merger.state_dict()["merged.b"], before) and merger.num_tasks == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_ties_disjoint_mean_is_the_same_fused_and_eager(monkeypatch, dtype, majority):
    from cl_plugin.merging import _kernels

    g = torch.Generator().manual_seed(5)
    n = _kernels.COMPILE_MIN_NUMEL + 77
    pos = torch.rand(n, generator=g, dtype=dtype) * (torch.rand(n, generator=g) < 0.7)
    neg = -torch.rand(n, generator=g, dtype=dtype) * (torch.rand(n, generator=g) < 0.7)
    neg[:500] = -pos[:500]  # sums that cancel: the majority sign decides
    pos_count = (pos > 0).to(torch.int32) * torch.randint(1, 5, (n,), generator=g, dtype=torch.int32)
    neg_count = (neg < 0).to(torch.int32) * torch.randint(1, 5, (n,), generator=g, dtype=torch.int32)
    # the rule as written before it was fused: sign, majority where 0, the agreeing mean
    sign = torch.sign(pos + neg)
    sign = torch.where(sign == 0, torch.tensor(majority, dtype=dtype), sign)
    expected = torch.where(sign > 0, pos / pos_count.clamp(min=1), neg / neg_count.clamp(min=1))
    assert torch.equal(_kernels.disjoint_mean(pos, neg, pos_count, neg_count, majority), expected)
    monkeypatch.setitem(_kernels._compile_state, "failed", True)
    assert torch.equal(_kernels.disjoint_mean(pos, neg, pos_count, neg_count, majority), expected)
