"""The streaming mergers: worked examples, batch references, defining properties, resume, bad input."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import Tensor

from cl_plugin import TaskVector
from cl_plugin.errors import CheckpointError, ConfigError, DtypeMismatchError, NonFiniteError, StateDictMismatchError
from cl_plugin.merging import MERGERS, Merger, get_merger, merge, register_merger
from cl_plugin.merging import _kernels
from cl_plugin.merging.opcm import project_out_merged_directions, split_rank
from cl_plugin.merging.registry import _REGISTRY

from merger_helpers import assert_same_state, snapshot
from reference_merging import (
    reference,
    reference_opcm,
    reference_opcm_added,
    reference_random_sources,
    reference_ties,
    split_rank_reference,
)

#: Every registered method with non-default options where it has some.
METHOD_OPTIONS = {
    "average": {},
    "magmax": {},
    "opcm": {"alpha": 0.5},
    "random": {"seed": 3},
    "task_arithmetic": {},
    "ties": {"top_k": 0.3},
}
METHODS = sorted(METHOD_OPTIONS)
#: Methods whose streaming result must equal the batch reference bit for bit
#: (selections, and TIES whose sums run in the same order).
EXACT = {"magmax", "random", "ties"}


# -- helpers ---------------------------------------------------------------------------------
def stream(name: str, task_vectors, **options) -> Merger:
    merger = get_merger(name, **options)
    for tv in task_vectors:
        merger.update(tv)
    return merger


def clone_tvs(task_vectors):
    return [{n: t.clone() for n, t in tv.items()} for tv in task_vectors]


def assert_tensors_equal(actual, expected):
    """Same names, dtypes and values, bit for bit."""
    assert list(actual) == list(expected)
    for n in expected:
        assert actual[n].dtype == expected[n].dtype, n
        assert torch.equal(actual[n], expected[n]), n


def assert_close(actual, expected, *, atol, rtol):
    assert list(actual) == list(expected)
    for n in expected:
        torch.testing.assert_close(actual[n].double(), expected[n].double(), atol=atol, rtol=rtol, msg=n)


def state_numel(merger: Merger) -> int:
    return sum(v.numel() for v in merger.state_dict().values() if isinstance(v, Tensor))


# -- the registry ----------------------------------------------------------------------------
def test_registry_lists_every_method_sorted_and_read_only():
    assert set(METHODS) <= set(MERGERS)
    assert list(MERGERS) == sorted(MERGERS)
    for name, cls in MERGERS.items():
        assert cls.name == name
    with pytest.raises(TypeError):
        MERGERS["magmax"] = object  # type: ignore[index]


def test_register_merger_refuses_a_duplicate_unless_override():
    class First(Merger):
        pass

    class Second(Merger):
        pass

    name = "aaa_test_duplicate"
    try:
        register_merger(name)(First)
        assert MERGERS[name] is First
        assert list(MERGERS) == sorted(MERGERS)
        with pytest.raises(ConfigError, match=r"'aaa_test_duplicate' is already registered .*override=True"):
            register_merger(name)(Second)
        assert MERGERS[name] is First
        register_merger(name, override=True)(Second)
        assert MERGERS[name] is Second and Second.name == name
    finally:
        _REGISTRY.pop(name, None)
    assert name not in MERGERS


def test_default_scales_follow_the_papers():
    expected = {"magmax": 0.5, "random": 1.0, "average": 1.0, "task_arithmetic": 0.3, "ties": 0.55, "opcm": 1.0}
    for name, scale in expected.items():
        assert MERGERS[name].default_scale == scale
        assert get_merger(name).scale == scale
    assert get_merger("magmax", scale=0.8).scale == 0.8


# -- (a) worked examples by hand -----------------------------------------------------------------
def test_magmax_by_hand():
    # entry 0: |1| < |-2| > |1.5|          -> -2   (task 2)
    # entry 1: |-3| > |1|, |-3| > |2.5|     -> -3   (task 1, sign kept)
    # entry 2: |2| == |-2| > |1|            -> -2   (tie: the later task, 2)
    # entry 3: |0.5| > |0.25|, == |-0.5|    -> -0.5 (tie: the later task, 3)
    tvs = [
        {"w": torch.tensor([1.0, -3.0, 2.0, 0.5])},
        {"w": torch.tensor([-2.0, 1.0, -2.0, 0.25])},
        {"w": torch.tensor([1.5, 2.5, 1.0, -0.5])},
    ]
    assert torch.equal(merge("magmax", tvs)["w"], torch.tensor([-2.0, -3.0, -2.0, -0.5]))


def test_task_arithmetic_and_average_by_hand():
    # sums: 1+3+2 = 6, -3+1+5 = 3, 2-2+3 = 3; means: 2, 1, 1.
    tvs = [
        {"w": torch.tensor([1.0, -3.0, 2.0])},
        {"w": torch.tensor([3.0, 1.0, -2.0])},
        {"w": torch.tensor([2.0, 5.0, 3.0])},
    ]
    assert torch.equal(merge("task_arithmetic", tvs)["w"], torch.tensor([6.0, 3.0, 3.0]))
    assert torch.equal(merge("average", tvs)["w"], torch.tensor([2.0, 1.0, 1.0]))


def test_random_by_hand():
    # With one task there is nothing to choose from; where all tasks agree the
    # choice cannot matter. (The per-entry probabilities are worked out in
    # test_random_is_uniform_over_tasks.)
    one = {"w": torch.tensor([1.0, -2.0, 3.0])}
    assert torch.equal(merge("random", [one])["w"], one["w"])
    same = [{"w": torch.tensor([4.0, -4.0])} for _ in range(4)]
    assert torch.equal(merge("random", same, seed=5)["w"], torch.tensor([4.0, -4.0]))


def test_ties_by_hand():
    # d = 4, top_k = 0.5: k = 4 - floor(2) = 2, the threshold is each task's
    # 2nd smallest |x| and entries with |x| >= threshold are kept.
    #   τ1 = [ 3, -1, 0.5, -2]  |.| sorted .5 1 2 3 -> thr 1 -> [ 3, -1, 0, -2]
    #   τ2 = [-1,  2, 4,  0.5]  |.| sorted .5 1 2 4 -> thr 1 -> [-1,  2, 4,  0]
    #   τ3 = [-2, -3, 1,  1  ]  |.| sorted 1 1 2 3  -> thr 1 -> [-2, -3, 1,  1] (ties kept)
    # sums of trimmed: [0, -2, 5, -1] -> signs [0, -, +, -]; the majority sign
    # over the vector is sign(-1 + 1 - 1) = -, so entry 0 takes -.
    # disjoint means: entry 0 over {-1, -2} = -1.5; entry 1 over {-1, -3} = -2;
    # entry 2 over {4, 1} = 2.5; entry 3 over {-2} = -2.
    tvs = [
        {"w": torch.tensor([3.0, -1.0, 0.5, -2.0])},
        {"w": torch.tensor([-1.0, 2.0, 4.0, 0.5])},
        {"w": torch.tensor([-2.0, -3.0, 1.0, 1.0])},
    ]
    expected = torch.tensor([-1.5, -2.0, 2.5, -2.0])
    assert torch.equal(merge("ties", tvs, top_k=0.5)["w"], expected)
    assert torch.equal(reference_ties(tvs, top_k=0.5)["w"], expected)


def test_ties_trims_over_the_whole_vector_by_hand():
    # One task, two tensors, d = 5, top_k = 0.4: k = 5 - 2 = 3, threshold = the
    # 3rd smallest of |.| = {0.1, 5, 0.2, 3, 0.3} -> 0.3; kept: 5, 3, 0.3.
    # The trim is global: "a" keeps only one entry, "b" two.
    tv = {"a": torch.tensor([0.1, 5.0]), "b": torch.tensor([-0.2, -3.0, 0.3])}
    out = merge("ties", [tv], top_k=0.4)
    assert torch.equal(out["a"], torch.tensor([0.0, 5.0]))
    assert torch.equal(out["b"], torch.tensor([0.0, -3.0, 0.3]))


def test_opcm_by_hand_2d():
    # τ1 = M = diag(4, 2, 1): U = V = I (up to paired signs), σ = (4, 2, 1),
    # cumulative shares 4/7 = .57, 6/7 = .86, 1; with alpha = 0.9 the first
    # share above alpha is at index 2, so r = 2.
    # τ2 = ones(3, 3): P = Uᵀ τ V = ones; zero its diagonal and P[:2, :2]:
    #   added = [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    # M' = 1·M + added = [[4, 0, 1], [0, 2, 1], [1, 1, 1]], ‖M'‖² = 16+4+1+4·1 = 25.
    # n̄ = (‖τ1‖ + ‖τ2‖)/2 = (√21 + 3)/2; merged = M'·n̄/5, λ2 = 5/n̄.
    m = get_merger("opcm", alpha=0.9)
    m.update({"w": torch.diag(torch.tensor([4.0, 2.0, 1.0]))})
    assert m.lambda_t == 1.0
    m.update({"w": torch.ones(3, 3)})
    mean_norm = (math.sqrt(21) + 3) / 2
    expected = torch.tensor([[4.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]) * (mean_norm / 5)
    torch.testing.assert_close(m.merged()["w"], expected, atol=1e-6, rtol=1e-6)
    assert m.lambda_t == pytest.approx(5 / mean_norm, rel=1e-6)


def test_opcm_by_hand_1d_uses_the_previous_lambda():
    # Non-2-D tensors are added whole: M' = λ_{t-1}·M + τ.
    # τ1 = [3, 4] (norm 5).
    # τ2 = [-3, 4] (norm 5): M' = [0, 8], ‖M'‖ = 8, n̄ = 5 -> merged [0, 5], λ2 = 8/5.
    # τ3 = [5, 0] (norm 5): M' = 1.6·[0, 5] + [5, 0] = [5, 8], ‖M'‖ = √89, n̄ = 5
    #   -> merged = [5, 8]·5/√89, λ3 = √89/5.
    m = get_merger("opcm")
    m.update({"b": torch.tensor([3.0, 4.0])})
    m.update({"b": torch.tensor([-3.0, 4.0])})
    torch.testing.assert_close(m.merged()["b"], torch.tensor([0.0, 5.0]))
    assert m.lambda_t == pytest.approx(8 / 5, rel=1e-6)
    m.update({"b": torch.tensor([5.0, 0.0])})
    torch.testing.assert_close(m.merged()["b"], torch.tensor([5.0, 8.0]) * (5 / math.sqrt(89)))
    assert m.lambda_t == pytest.approx(math.sqrt(89) / 5, rel=1e-6)


# -- (b) streaming == batch reference ------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_streaming_equals_batch_reference(name, make_task_vectors):
    tvs = make_task_vectors(5, seed=11)
    options = METHOD_OPTIONS[name]
    expected = reference(name, tvs, **options)
    actual = stream(name, tvs, **options).merged()
    if name in EXACT:
        assert_tensors_equal(actual, expected)
    elif name == "opcm":
        assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:
        assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("top_k", [0.05, 0.2, 0.5, 1.0])
def test_streaming_ties_equals_batch_ties(top_k, make_task_vectors):
    tvs = make_task_vectors(5, seed=int(top_k * 100))
    assert_tensors_equal(merge("ties", tvs, top_k=top_k), reference_ties(tvs, top_k=top_k))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_opcm_equals_full_svd_reference_with_lambdas(alpha, make_task_vectors):
    tvs = make_task_vectors(5, seed=21)
    expected, lambdas = reference_opcm(tvs, alpha=alpha)
    m = get_merger("opcm", alpha=alpha)
    for t, tv in enumerate(tvs):
        m.update(tv)
        if t == 0:
            assert m.lambda_t == 1.0
    assert_close(m.merged(), expected, atol=1e-5, rtol=1e-5)
    assert m.lambda_t == pytest.approx(lambdas[-1], rel=1e-5)


@pytest.mark.parametrize("name", ["magmax", "random", "ties"])
def test_chunked_kernels_equal_reference_across_chunk_boundaries(name, make_task_vectors):
    # One tensor spans three chunks of the eager kernels, one is smaller than a chunk.
    shapes = {"big": (2 * _kernels.CHUNK_NUMEL + 77,), "small": (5, 3)}
    tvs = make_task_vectors(4, seed=5, shapes=shapes)
    options = METHOD_OPTIONS[name]
    assert_tensors_equal(stream(name, tvs, **options).merged(), reference(name, tvs, **options))


@pytest.mark.parametrize("name", METHODS)
def test_name_order_of_later_tasks_does_not_change_the_result(name, make_task_vectors):
    # A TaskVector loaded from safetensors, for one, lists its names in another order.
    tvs = make_task_vectors(4, seed=8)
    options = METHOD_OPTIONS[name]
    expected = stream(name, tvs, **options).merged()
    reordered = [tvs[0]] + [{n: tv[n] for n in reversed(list(tv))} for tv in tvs[1:]]
    assert_tensors_equal(stream(name, reordered, **options).merged(), expected)


@pytest.mark.parametrize("name", METHODS)
def test_non_contiguous_inputs_give_the_same_result(name, make_task_vectors):
    tvs = make_task_vectors(4, seed=9)
    options = METHOD_OPTIONS[name]
    expected = stream(name, tvs, **options).merged()
    strided = [{n: t.mT.contiguous().mT if t.dim() >= 2 else t for n, t in tv.items()} for tv in tvs]
    assert not strided[1]["fc1.weight"].is_contiguous()
    actual = stream(name, strided, **options).merged()
    if name == "opcm":  # BLAS takes another path for a transposed layout: equal to rounding
        assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:
        assert_tensors_equal(actual, expected)


# -- (c) defining properties ---------------------------------------------------------------------
def test_magmax_picks_the_largest_magnitude_and_ties_go_to_the_later_task():
    g = torch.Generator().manual_seed(0)
    # Small integers, so magnitudes often tie, with both signs.
    tvs = [{"w": torch.randint(-3, 4, (2000,), generator=g).float()} for _ in range(5)]
    out = merge("magmax", tvs)["w"]
    stacked = torch.stack([tv["w"] for tv in tvs])
    assert torch.equal(out.abs(), stacked.abs().amax(dim=0))
    last_winner = torch.stack([(stacked[t].abs() == out.abs()) for t in range(5)]).float()
    last_winner = 4 - torch.argmax(torch.flip(last_winner, dims=[0]), dim=0)
    assert torch.equal(out, stacked[last_winner, torch.arange(2000)])
    # Opposite signs with equal magnitude: the later sign wins, so the result depends on the order.
    a, b = {"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([-2.0, 1.0])}
    assert torch.equal(merge("magmax", [a, b])["w"], b["w"])
    assert torch.equal(merge("magmax", [b, a])["w"], a["w"])


def test_random_picks_only_values_present_in_some_task(make_task_vectors):
    tvs = make_task_vectors(5, seed=2)
    out = merge("random", tvs, seed=9)
    for n, t in out.items():
        stacked = torch.stack([tv[n] for tv in tvs])
        assert bool((stacked == t.unsqueeze(0)).any(dim=0).all()), n
    sources = reference_random_sources(tvs, seed=9)
    assert len(set(torch.cat([s.reshape(-1) for s in sources.values()]).tolist())) == 5


@pytest.mark.parametrize("n_tasks", [3, 5])
def test_random_is_uniform_over_tasks(n_tasks):
    # Reservoir sampling: task t (1-based) is kept with probability
    # (1/t)·Π_{s>t}(1 − 1/s) = (1/t)·(t/T) = 1/T. For 3 tasks: task 1 survives
    # two draws, 1·(1/2)·(2/3) = 1/3; task 2 is drawn with 1/2 and survives with 2/3,
    # 1/3; task 3 is drawn with 1/3.
    # With N = 200_000 independent entries the share of each task has standard
    # deviation sqrt(p(1−p)/N) <= 0.0011; the bound 0.006 is over 5 standard
    # deviations (a chance failure below 1e-6 per task), yet half of the
    # smallest bias a wrong rule would give here (e.g. keeping each new task
    # with probability 1/2 makes the last task's share 1/2, not 1/T).
    n = 200_000
    tvs = [{"w": torch.full((n,), float(t))} for t in range(n_tasks)]
    out = merge("random", tvs, seed=1)["w"]
    counts = torch.bincount(out.long(), minlength=n_tasks)
    assert counts.sum() == n
    shares = counts.double() / n
    assert torch.all((shares - 1 / n_tasks).abs() < 0.006), shares
    # The entries are independent: the source of an entry says nothing about its neighbour's.
    same_as_next = (out[1:] == out[:-1]).double().mean()
    assert abs(float(same_as_next) - 1 / n_tasks) < 0.006


def test_random_same_seed_same_result_other_seed_differs(make_task_vectors):
    tvs = make_task_vectors(5, seed=3)
    a = merge("random", tvs, seed=42)
    b = merge("random", tvs, seed=42)
    c = merge("random", tvs, seed=43)
    assert_tensors_equal(a, b)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_ties_entry_trimmed_everywhere_is_zero():
    # top_k = 0.25 on d = 4 keeps 2 entries per task (k = 3: the 3rd smallest |x| and above);
    # entry 0 is the smallest in both tasks, so both trim it and it merges to 0.
    tvs = [{"w": torch.tensor([0.1, 4.0, -3.0, 2.0])}, {"w": torch.tensor([-0.1, 1.0, -5.0, 6.0])}]
    out = merge("ties", tvs, top_k=0.25)["w"]
    assert out[0] == 0.0
    assert torch.equal(out, reference_ties(tvs, top_k=0.25)["w"])


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_project_out_merged_directions_matches_full_svd_and_removes_kept_directions(shape, alpha):
    g = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    merged = torch.randn(shape, generator=g, dtype=torch.float64)
    task = torch.randn(shape, generator=g, dtype=torch.float64)
    added = project_out_merged_directions(merged, task, alpha)
    torch.testing.assert_close(added, reference_opcm_added(merged, task, alpha), atol=1e-10, rtol=1e-10)

    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    r = split_rank_reference(s, alpha)
    assert split_rank(s, alpha) == r
    k = min(shape)
    mask = torch.eye(*shape, dtype=torch.bool)
    mask[:r, :r] = True
    p_added = u.mT @ added @ vh.mT
    p_task = u.mT @ task @ vh.mT
    # No weight on the protected entries: the diagonal and the top-left r×r block ...
    assert p_added[mask].abs().max() < 1e-10
    # ... and everything else of τ is kept as it was.
    torch.testing.assert_close(p_added[~mask], p_task[~mask], atol=1e-10, rtol=1e-10)
    assert int(mask.sum()) == k + max(r * r - r, 0)


def test_opcm_added_component_has_no_weight_on_kept_directions(make_task_vectors):
    # Inside a stream: M' = λ_{t−1}·M_{t−1} + added and M_t = M'/λ_t, so
    # added = λ_t·M_t − λ_{t−1}·M_{t−1}.
    alpha = 0.8
    tvs = make_task_vectors(5, seed=13)
    m = get_merger("opcm", alpha=alpha)
    m.update(tvs[0])
    ranks = []
    for tv in tvs[1:]:
        before = {n: t.double() for n, t in m.merged().items()}
        lambda_before = m.lambda_t
        m.update(tv)
        after = m.merged()
        for n, tau in tv.items():
            added = m.lambda_t * after[n].double() - lambda_before * before[n]
            if before[n].dim() != 2:
                torch.testing.assert_close(added, tau.double(), atol=1e-5, rtol=1e-5)
                continue
            u, s, vh = torch.linalg.svd(before[n], full_matrices=True)
            r = split_rank_reference(s, alpha)
            ranks.append(r)
            p = u.mT @ added @ vh.mT
            assert p.diagonal().abs().max() < 1e-5, n
            if r:
                assert p[:r, :r].abs().max() < 1e-5, n
    assert max(ranks) >= 2  # the r×r block was exercised, not only the diagonal


def test_opcm_merged_norm_is_the_mean_task_vector_norm(make_task_vectors):
    tvs = make_task_vectors(5, seed=17)
    m = get_merger("opcm")
    norms = []
    for tv in tvs:
        m.update(tv)
        norms.append(TaskVector(tv).norm())
        assert m.merged().norm() == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_opcm_all_zero_2d_tensor_takes_the_task_vector_whole():
    # A layer that the first task did not change has no direction to protect.
    m = get_merger("opcm")
    m.update({"w": torch.zeros(2, 3), "b": torch.tensor([3.0, 4.0])})
    m.update({"w": torch.tensor([[1.0, 0.0, 2.0], [0.0, 2.0, 0.0]]), "b": torch.tensor([0.0, 0.0])})
    # M' = {w: τ_w, b: [3, 4]}: ‖M'‖² = 9 + 25 = 34; norms 5 and 3, n̄ = 4.
    factor = 4 / math.sqrt(34)
    merged = m.merged()
    torch.testing.assert_close(merged["w"], torch.tensor([[1.0, 0.0, 2.0], [0.0, 2.0, 0.0]]) * factor)
    torch.testing.assert_close(merged["b"], torch.tensor([3.0, 4.0]) * factor)


def test_opcm_state_lives_in_one_flat_buffer_per_dtype_and_continues_exactly(make_task_vectors):
    tvs = make_task_vectors(4, seed=23)
    tvs = [dict(tv) | {"extra": torch.full((3, 2), float(i + 1), dtype=torch.float64)} for i, tv in enumerate(tvs)]
    m = get_merger("opcm")
    for tv in tvs[:3]:
        m.update(tv)
    state = {k: t for k, t in m.state_dict().items() if isinstance(t, Tensor)}
    storages = {(t.dtype, t.untyped_storage().data_ptr()) for t in state.values()}
    assert {dtype for dtype, _ in storages} == {torch.float32, torch.float64}
    assert len(storages) == 2  # one buffer per dtype, not one per tensor
    assert all(t.is_contiguous() for t in state.values())
    # The flat layout is internal: a loaded state continues exactly like the run it came from.
    reference = get_merger("opcm")
    for tv in tvs[:3]:
        reference.update(tv)
    fresh = get_merger("opcm")
    fresh.load_state_dict(copy.deepcopy(m.state_dict()))
    for merger in (m, fresh, reference):
        merger.update(tvs[3])
    for n, t in reference.merged().items():
        assert torch.equal(m.merged()[n], t) and torch.equal(fresh.merged()[n], t), n
    assert m.merged()["extra"].dtype == torch.float64


# -- (d) state_dict round trip in the middle of a stream --------------------------------------------
@pytest.mark.parametrize("through_bytes", [False, True], ids=["in_memory", "torch_save_weights_only"])
@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_mid_stream_is_bit_identical(name, through_bytes, make_task_vectors):
    tvs = make_task_vectors(5, seed=31)
    options = METHOD_OPTIONS[name]
    first = stream(name, tvs[:2], **options)
    state = first.state_dict()
    if through_bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    resumed = get_merger(name, **options)
    resumed.load_state_dict(state)
    assert resumed.num_tasks == 2
    for tv in tvs[2:]:
        first.update(tv)
        resumed.update(tv)
    assert resumed.num_tasks == first.num_tasks == 5
    assert_tensors_equal(resumed.merged(), first.merged())
    assert_same_state(snapshot(resumed), snapshot(first))


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_of_a_fresh_merger_loads(name, make_task_vectors):
    options = METHOD_OPTIONS[name]
    resumed = get_merger(name, **options)
    resumed.load_state_dict(get_merger(name, **options).state_dict())
    assert resumed.num_tasks == 0
    tvs = make_task_vectors(3, seed=1)
    for tv in tvs:
        resumed.update(tv)
    assert_tensors_equal(resumed.merged(), stream(name, tvs, **options).merged())


# -- (e) merge() ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_merge_equals_streaming_and_accepts_plain_mappings(name, make_task_vectors):
    tvs = make_task_vectors(5, seed=41)
    options = METHOD_OPTIONS[name]
    expected = stream(name, tvs, **options).merged()
    from_dicts = merge(name, tvs, **options)
    assert isinstance(from_dicts, TaskVector)
    assert_tensors_equal(from_dicts, expected)
    assert_tensors_equal(merge(name, (TaskVector(tv) for tv in tvs), **options), expected)


def test_merge_ignores_non_float_entries():
    tvs = [{"w": torch.tensor([1.0, -1.0]), "step": torch.tensor(t)} for t in range(3)]
    out = merge("average", tvs)
    assert list(out) == ["w"]


# -- (f) bad input ----------------------------------------------------------------------------------------
def test_unknown_method_lists_the_choices_and_a_close_match():
    with pytest.raises(ConfigError, match=r"Unknown merging method 'magmx'.*'average'.*'ties'.*Did you mean 'magmax'\?"):
        get_merger("magmx")
    with pytest.raises(ConfigError, match=r"Unknown merging method 'avrage'.*Did you mean 'average'\?"):
        merge("avrage", [{"w": torch.ones(2)}])
    with pytest.raises(ConfigError, match=r"Unknown merging method 3"):
        get_merger(3)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['topk'\] .*'ties'.*\['top_k', 'scale'\].*Did you mean 'top_k'\?"):
        get_merger("ties", topk=0.2)
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['alpha'\] for merging method 'magmax'"):
        merge("magmax", [{"w": torch.ones(2)}], alpha=0.5)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("scale", [0, -0.5, 10.5, float("nan"), float("inf"), True, "0.5"])
def test_scale_out_of_range_is_rejected(name, scale):
    with pytest.raises(ConfigError, match=r"`scale` must be a real number in \(0, 10\]"):
        get_merger(name, scale=scale)


def test_scale_bounds_are_inclusive_at_ten():
    assert get_merger("magmax", scale=10).scale == 10.0
    assert get_merger("magmax", scale=1e-6).scale == 1e-6
    with pytest.raises(ConfigError, match=r"`scale` must be a real number in \(0, 10\], got 0 "):
        get_merger("magmax").apply_to({"w": torch.ones(1)}, scale=0)


def test_merge_rejects_scale():
    tvs = [{"w": torch.ones(2)}]
    with pytest.raises(ConfigError, match=r"merge\(\) returns the unscaled merged task vector.*default scale is 0.5"):
        merge("magmax", tvs, scale=0.5)


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("ties", {"top_k": 0.0}, r"`top_k` must be a real number in \(0, 1\], got 0.0"),
        ("ties", {"top_k": 1.5}, r"`top_k` must be a real number in \(0, 1\], got 1.5"),
        ("opcm", {"alpha": 1.0}, r"`alpha` must be in \[0, 1\), got 1.0"),
        ("opcm", {"alpha": -0.1}, r"`alpha` must be a real number in \[0, 1\], got -0.1"),
        ("random", {"seed": -1}, r"`seed` must be a non-negative integer, got -1"),
        ("random", {"seed": 1.5}, r"`seed` must be a non-negative integer, got 1.5"),
    ],
)
def test_bad_method_options_are_rejected(name, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_merger(name, **options)


def test_merge_without_task_vectors_is_rejected():
    with pytest.raises(ConfigError, match=r"merge\(\) got no task vector"):
        merge("magmax", [])


@pytest.mark.parametrize("name", METHODS)
def test_merged_before_any_update_is_rejected(name):
    with pytest.raises(ConfigError, match=rf"The '{name}' merger has no task yet; call update"):
        get_merger(name, **METHOD_OPTIONS[name]).merged()


def _good_pair():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}


BAD_UPDATES = {
    # id: (task vector for the 3rd update, error class, message pattern)
    "missing_and_unexpected": (
        lambda: {"a": torch.ones(2, 3), "c": torch.ones(3)},
        StateDictMismatchError,
        r"task 3: tensor names do not match \(missing 1: 'b'; unexpected 1: 'c'\)",
    ),
    "shape": (
        lambda: {"a": torch.ones(3, 2), "b": torch.ones(3)},
        StateDictMismatchError,
        r"task 3: 1 tensor\(s\) changed shape: 'a': expected \(2, 3\), got \(3, 2\)",
    ),
    "dtype": (
        lambda: {"a": torch.ones(2, 3), "b": torch.ones(3, dtype=torch.float64)},
        DtypeMismatchError,
        r"'b': expected torch.float32, got torch.float64",
    ),
    "nan": (
        lambda: {"a": torch.ones(2, 3), "b": torch.tensor([1.0, float("nan"), 0.0])},
        NonFiniteError,
        r"tensor 'b' \(shape \(3,\)\) holds 1 NaN or infinite",
    ),
    "inf": (
        lambda: {"a": torch.full((2, 3), float("-inf")), "b": torch.ones(3)},
        NonFiniteError,
        r"tensor 'a' \(shape \(2, 3\)\) holds 6 NaN or infinite",
    ),
    "inf_in_unchecked_task_vector": (
        lambda: TaskVector({"a": torch.ones(2, 3), "b": torch.tensor([0.0, float("inf"), 0.0])}, check_finite=False),
        NonFiniteError,
        r"tensor 'b' .*holds 1 NaN or infinite",
    ),
    "overflow_from_arithmetic": (
        lambda: TaskVector({"a": torch.ones(2, 3), "b": torch.full((3,), 1e30)}) * 1e10,
        NonFiniteError,
        r"tensor 'b'",
    ),
    "empty": (lambda: {}, ConfigError, r"the task vector holds no floating-point tensor"),
    "only_integers": (
        lambda: {"step": torch.tensor(3)},
        ConfigError,
        r"the task vector holds no floating-point tensor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
@pytest.mark.parametrize("name", METHODS)
def test_bad_update_raises_and_changes_nothing(name, case):
    make_bad, error, pattern = BAD_UPDATES[case]
    merger = stream(name, [_good_pair(), _good_pair()], **METHOD_OPTIONS[name])
    before = snapshot(merger)
    bad = make_bad()
    bad_copy = {n: t.clone() for n, t in bad.items()}
    with pytest.raises(error, match=pattern):
        merger.update(bad)
    assert_same_state(snapshot(merger), before)
    assert list(bad) == list(bad_copy)
    for n in bad_copy:
        torch.testing.assert_close(bad[n], bad_copy[n], atol=0, rtol=0, equal_nan=True)
    # The stream goes on as if the bad task had never come.
    merger.update(_good_pair())
    assert merger.num_tasks == 3


@pytest.mark.parametrize("name", METHODS)
def test_first_update_with_non_finite_values_leaves_the_merger_empty(name):
    merger = get_merger(name, **METHOD_OPTIONS[name])
    with pytest.raises(NonFiniteError, match=r"tensor 'b'"):
        merger.update({"a": torch.ones(2), "b": torch.tensor([float("nan")])})
    assert merger.num_tasks == 0
    with pytest.raises(ConfigError, match="no task yet"):
        merger.merged()


def _load_cases():
    def other_method(state):
        return dict(state, method="magmax")

    def other_options(state):
        return dict(state, options={"top_k": 0.9})

    def missing_num_tasks(state):
        return {k: v for k, v in state.items() if k != "num_tasks"}

    def missing_tensor(state):
        return {k: v for k, v in state.items() if k != "pos_sum.b"}

    def missing_tensor_every_role(state):
        return {k: v for k, v in state.items() if not k.endswith(".b")}

    def unexpected_tensor(state):
        return dict(state, **{"bogus.b": torch.ones(3)})

    def newer_format(state):
        return dict(state, format_version=99)

    return {
        "other_method": (other_method, ConfigError, r"This state belongs to the merger 'magmax', not 'ties'"),
        "other_options": (other_options, ConfigError, r"used options \{'top_k': 0.9\}, this one has \{'top_k': 0.3\}"),
        "missing_num_tasks": (missing_num_tasks, CheckpointError, r"missing keys .*'num_tasks'"),
        "missing_tensor": (missing_tensor, CheckpointError, r"'pos_sum.b'"),
        "missing_tensor_every_role": (missing_tensor_every_role, CheckpointError, r"missing keys .*'neg_count.b'"),
        "unexpected_tensor": (unexpected_tensor, CheckpointError, r"unexpected keys \['bogus.b'\]"),
        "newer_format": (newer_format, CheckpointError, r"format_version 99, newer than this cl-plugin understands"),
        "not_a_mapping": (lambda state: [state], CheckpointError, r"load_state_dict expects a mapping, got list"),
    }


LOAD_CASES = _load_cases()


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_bad_load_state_dict_raises_and_changes_nothing(case):
    make_bad, error, pattern = LOAD_CASES[case]
    source = stream("ties", [_good_pair(), _good_pair()], top_k=0.3)
    bad_state = make_bad(snapshot(source))
    bad_state_copy = copy.deepcopy(bad_state)
    target = stream("ties", [_good_pair()], top_k=0.3)
    before = snapshot(target)
    with pytest.raises(error, match=pattern):
        target.load_state_dict(bad_state)
    assert_same_state(snapshot(target), before)
    if isinstance(bad_state, dict):
        assert_same_state(bad_state, bad_state_copy)


def test_load_state_dict_of_opcm_needs_its_scalars():
    state = snapshot(stream("opcm", [_good_pair(), _good_pair()]))
    del state["lambda_t"]
    with pytest.raises(CheckpointError, match=r"missing keys .*'lambda_t'"):
        get_merger("opcm").load_state_dict(state)


def test_load_state_dict_of_magmax_with_a_tensor_missing_is_rejected():
    # One role only: a dropped tensor must not go unnoticed until the next update.
    state = snapshot(stream("magmax", [_good_pair(), _good_pair()]))
    del state["merged.a"]
    with pytest.raises(CheckpointError, match=r"'merged.a'"):
        get_merger("magmax").load_state_dict(state)


# -- (g) memory does not grow with the number of tasks ---------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_state_size_is_independent_of_the_number_of_tasks(name, make_task_vectors):
    tvs = make_task_vectors(10, seed=51)
    options = METHOD_OPTIONS[name]
    merger = stream(name, tvs[:2], **options)
    after_two = state_numel(merger)
    for tv in tvs[2:]:
        merger.update(tv)
    assert state_numel(merger) == after_two
    model_numel = TaskVector(tvs[0]).numel()
    assert after_two == model_numel * len(MERGERS[name].tensor_states)
    assert len(MERGERS[name].tensor_states) <= 4


# -- (h) 16-bit inputs -----------------------------------------------------------------------------------
# The largest x with x + 1 == x in the format: 2048 in float16 (11-bit
# significand), 256 in bfloat16 (8 bits). Summing [x, 1, 1] in that format
# gives x; in float32 it gives x + 2, which both formats represent.
BIG = {torch.float16: 2048.0, torch.bfloat16: 256.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", METHODS)
def test_16_bit_inputs_keep_their_dtype(name, dtype, make_task_vectors):
    tvs = make_task_vectors(4, seed=61, dtype=dtype)
    options = METHOD_OPTIONS[name]
    merger = stream(name, tvs, **options)
    out = merger.merged()
    assert all(t.dtype == dtype for t in out.values())
    sums = {"average": ["sum"], "task_arithmetic": ["sum"], "ties": ["pos_sum", "neg_sum"], "opcm": ["merged"]}
    for key, value in merger.state_dict().items():
        if isinstance(value, Tensor) and key.split(".")[0] in sums.get(name, []):
            assert value.dtype == torch.float32, key
    assert merger.state_dict()["input_dtypes"]["fc1.weight"] == str(dtype).removeprefix("torch.")
    # Same values as the float32 merge of the same (16-bit) numbers, rounded once at the end.
    expected = stream(name, [{n: t.float() for n, t in tv.items()} for tv in tvs], **options).merged()
    # Every method but OPCM computes exactly what float32 does; OPCM's SVD and
    # norms see the same numbers in another order, so it is compared to 16-bit precision.
    for n in out:
        if name == "opcm":
            torch.testing.assert_close(out[n].float(), expected[n], atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(out[n], expected[n].to(dtype)), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_16_bit_sums_are_accumulated_in_float32(dtype):
    big = BIG[dtype]
    tvs = [{"w": torch.tensor([big], dtype=dtype)}, {"w": torch.tensor([1.0], dtype=dtype)}, {"w": torch.tensor([1.0], dtype=dtype)}]
    naive_sum = (tvs[0]["w"] + tvs[1]["w"]) + tvs[2]["w"]
    assert float(naive_sum) == big  # what 16-bit accumulation would give
    assert float(merge("task_arithmetic", tvs)["w"]) == big + 2
    assert merge("average", tvs)["w"].item() == torch.tensor((big + 2) / 3).to(dtype).item()
    assert merge("average", tvs)["w"].item() != (naive_sum / 3).item()
    # TIES keeping everything: all positive, so the disjoint mean is the mean.
    assert merge("ties", tvs, top_k=1.0)["w"].item() == torch.tensor((big + 2) / 3).to(dtype).item()


# -- (i) the fused and chunked kernels ------------------------------------------------------------------
def test_compiled_magmax_fold_equals_eager(monkeypatch):
    monkeypatch.setattr(_kernels, "COMPILE_MIN_NUMEL", 1000)
    monkeypatch.setattr(_kernels, "_compile_state", {"failed": False})
    g = torch.Generator().manual_seed(0)
    # Small integers: many ties in magnitude, with both signs.
    acc = torch.randint(-3, 4, (10_000,), generator=g).float()
    incoming = torch.randint(-3, 4, (10_000,), generator=g).float()

    monkeypatch.setenv("CL_PLUGIN_COMPILE", "0")
    eager = acc.clone()
    _kernels.magmax_fold_(eager, incoming)
    assert "compiled_magmax" not in _kernels._compile_state

    monkeypatch.setenv("CL_PLUGIN_COMPILE", "1")
    compiled = acc.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed compilation warns and falls back
        _kernels.magmax_fold_(compiled, incoming)
    assert _kernels._compile_state["failed"] is False
    assert "compiled_magmax" in _kernels._compile_state
    assert torch.equal(compiled, eager)
    assert torch.equal(eager, torch.where(incoming.abs() >= acc.abs(), incoming, acc))


def test_eager_magmax_fold_over_several_chunks(monkeypatch):
    monkeypatch.setenv("CL_PLUGIN_COMPILE", "0")
    n = 5 * 40_000  # over three chunks of CHUNK_NUMEL
    assert n > 3 * _kernels.CHUNK_NUMEL
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-4, 5, (n,), generator=g).float().reshape(-1, 5)
    incoming = torch.randint(-4, 5, (n,), generator=g).float().reshape(-1, 5)
    expected = torch.where(incoming.abs() >= acc.abs(), incoming, acc)
    _kernels.magmax_fold_(acc, incoming.mT.contiguous().mT)  # a non-contiguous incoming tensor
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_merged_norm_equals_the_norm_of_merged(method, make_task_vectors):
    merger = get_merger(method)
    with pytest.raises(ConfigError, match="no task yet"):
        merger.merged_norm()
    for tv in make_task_vectors(3, seed=5):
        merger.update(tv, **({"fisher": {n: t.abs() for n, t in tv.items()}} if merger.requires_fisher else {}))
    assert merger.merged_norm() == pytest.approx(merger.merged().norm(), rel=1e-6)
