"""DOP, Fisher merging, DARE: worked examples, batch references, FusionBench's outputs, resume, bad input.

FusionBench's outputs are stored in ``tests/fusionbench_reference/`` (made by
``make_fixtures.py`` there with FusionBench 0.2.33), so this file does not need
FusionBench.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from cl_plugin import TaskVector
from cl_plugin.errors import CheckpointError, ConfigError, NoMatchingModulesError, NonFiniteError, StateDictMismatchError
from cl_plugin.merging import MERGERS, Merger, diagonal_fisher, get_merger, merge
from cl_plugin.merging import dare as dare_module
from cl_plugin.merging.dare import dare, dare_keep_mask, dare_task_vector, stream_key
from cl_plugin.merging.dop import DOPOptions, dop_merge_weights, dop_split_rank

from merger_helpers import assert_same_state, snapshot
from reference_merging import reference_dare, reference_dare_draw, reference_dop, reference_fisher

FIXTURES = Path(__file__).resolve().parent / "fusionbench_reference"


# -- helpers ---------------------------------------------------------------------------------
def as_dtype(tvs, dtype):
    return [{n: t.to(dtype) for n, t in tv.items()} for tv in tvs]


def small(tvs, factor=0.01):
    """Task vectors at the scale of fine-tuning deltas (DOP's Adam moves by about lr per step)."""
    return [{n: t * factor for n, t in tv.items()} for tv in tvs]


def fishers_for(tvs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.rand(t.shape, generator=g) ** 2 * (t_index + 1) for n, t in tv.items()} for t_index, tv in enumerate(tvs)]


def max_diff(a, b) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in b)


def feed(merger: Merger, tvs, fishers=None) -> Merger:
    for t, tv in enumerate(tvs):
        if merger.requires_fisher:
            merger.update(tv, fisher=(fishers or fishers_for(tvs))[t])
        else:
            merger.update(tv)
    return merger


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- registry ----------------------------------------------------------------------------------
def test_new_methods_are_registered_with_their_defaults():
    assert {"dop", "fisher"} <= set(MERGERS)
    assert MERGERS["dop"].default_scale == 1.0 and MERGERS["fisher"].default_scale == 1.0
    assert get_merger("dop").options() == {
        "alpha": 0.8, "num_steps": 200, "lr": 1e-4, "mgda": True, "ema": True, "ema_beta": 0.999,
        "svd_epsilon": 0.99999, "proj_space": "uv",
    }
    assert get_merger("fisher").options() == {"normalize": True, "min_fisher": 1e-6}
    assert MERGERS["fisher"].requires_fisher and not MERGERS["dop"].requires_fisher


# == DOP ===========================================================================================
def load_dop_fixture():
    d = load_file(str(FIXTURES / "dop.safetensors"))
    names = [k.split(".", 1)[1] for k in d if k.startswith("theta0.")]
    theta0 = {n: d[f"theta0.{n}"] for n in names}
    taus = [{n: d[f"tau{t}.{n}"] for n in names} for t in range(4)]

    def fusionbench(tag, count):  # FusionBench's merged weights minus θ₀, exactly (in float64)
        return {n: d[f"{tag}.T{count}.{n}"].double() - theta0[n].double() for n in names}

    return taus, fusionbench


@pytest.mark.parametrize("count", [2, 4])
def test_dop_equals_fusionbench_in_float64(count):
    # FusionBench's DOPMerging run in float64 on θ₀ + τ_t; ours on τ_t. Measured: 3.3e-16 (4 tasks);
    # 1e-12 is far below any difference a change of rule would make (the steps move X by ~1e-2).
    taus, fusionbench = load_dop_fixture()
    ours = merge("dop", as_dtype(taus[:count], torch.float64))
    assert max_diff(ours, fusionbench("fb64", count)) < 1e-12


@pytest.mark.parametrize("count", [2, 4])
def test_dop_equals_fusionbench_in_float32(count):
    # Measured (4 tasks, |merged| <= 0.031): ours against the float64 run 1.7e-8, FusionBench's float32
    # run against it 1.2e-7 (it rounds through θ₀ + τ, with |θ₀| up to 0.4), ours against FusionBench
    # 1.2e-7 (2.0e-7 after 2 tasks). 200 Adam steps amplify rounding, so the tolerance is 1e-6: 5x the
    # largest measured gap, room for another CPU's matmul kernels, and still 10^4 below how far the
    # optimisation moves the merged weights from the plain mean (checked below).
    taus, fusionbench = load_dop_fixture()
    reference = fusionbench("fb32", count)
    ours = merge("dop", taus[:count])
    assert all(t.dtype == torch.float32 for t in ours.values())
    assert max_diff(ours, reference) < 1e-6
    assert max_diff(ours, merge("dop", as_dtype(taus[:count], torch.float64))) < 1e-7
    if count == 2:
        mean = merge("average", taus[:2])
        moved = max(float((ours[n] - mean[n]).abs().max()) for n in ours if ours[n].dim() == 2)
        assert moved > 1e-2


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mgda": False},
        {"ema": False},
        {"proj_space": "u"},
        {"proj_space": "v", "alpha": 0.3},
        {"svd_epsilon": 0.5, "lr": 1e-3},
    ],
    ids=["default", "no_mgda", "no_ema", "u", "v", "eps_lr"],
)
def test_dop_equals_the_autograd_reference(options, make_task_vectors):
    # The reference differentiates the paper's loss with autograd and steps torch.optim.Adam;
    # ours uses the closed-form gradient and its own Adam update. In float64 they agree to rounding.
    tvs = as_dtype(small(make_task_vectors(3, seed=4)), torch.float64)
    options = dict(options, num_steps=30)
    assert max_diff(merge("dop", tvs, **options), reference_dop(tvs, **options)) < 1e-12


def test_dop_by_hand_without_steps_is_the_pairwise_mean():
    # num_steps=0: X stays at its start (M + τ)/2; every update halves the weight of the past.
    tvs = [{"w": torch.full((2, 2), 4.0), "b": torch.tensor([4.0])}, {"w": torch.zeros(2, 2), "b": torch.tensor([0.0])},
           {"w": torch.full((2, 2), 2.0), "b": torch.tensor([2.0])}]
    out = merge("dop", tvs, num_steps=0)
    # ((4 + 0)/2 + 2)/2 = 2
    assert torch.equal(out["w"], torch.full((2, 2), 2.0)) and torch.equal(out["b"], torch.tensor([2.0]))
    # Non-2-D tensors are averaged pairwise whatever the steps.
    assert torch.equal(merge("dop", tvs)["b"], torch.tensor([2.0]))


def test_dop_split_rank_by_hand():
    # σ = (4, 2, 1, 1): cumulative shares .5, .75, .875, 1.
    s = torch.tensor([[4.0, 2.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert dop_split_rank(s, 0.8).tolist() == [2, 0, 3]  # shares below .8: .5, .75; zeros: none; .25 .5 .75
    assert dop_split_rank(s, 0.5).tolist() == [0, 0, 1]  # strictly below: the share .5 itself is not
    assert dop_split_rank(s, 1.0).tolist() == [3, 0, 3]


def test_dop_keeps_the_protected_directions_of_the_merged_vector():
    # M = diag(0.02, 0.01): σ = (.02, .01), shares 2/3 and 1, so M protects its first direction
    # (e1 on both sides, weight σ² = 4e-4): its loss is 4e-4·(‖row 0 of X − M‖² + ‖column 0 of X − M‖²).
    # τ = [[0, .01], [.01, 0]] protects one of its two equal directions. X starts at the mean,
    # [[.01, .005], [.005, .005]]; with weight .8 on M's loss, row 0 and column 0 return to M's values.
    m = get_merger("dop")
    m.update({"w": torch.tensor([[0.02, 0.0], [0.0, 0.01]])})
    m.update({"w": torch.tensor([[0.0, 0.01], [0.01, 0.0]])})
    w = m.merged()["w"]
    assert float(w[0, 0]) > 0.018 and abs(float(w[0, 1])) < 1e-4
    # A rank-1 source protects nothing: its first share is already 1 >= svd_epsilon (the reference's rule).
    assert dop_split_rank(torch.tensor([[0.02, 0.0]]), 0.99999).tolist() == [0]


def test_dop_layer_that_a_task_left_at_zero_stays_finite():
    # FusionBench divides 0 by 0 here (its loss of the all-zero source is 0); we give that source no weight.
    m = get_merger("dop")
    m.update({"w": torch.zeros(3, 2)})
    tau = torch.tensor([[0.01, -0.02], [0.0, 0.01], [0.03, 0.0]])
    m.update({"w": tau})
    w = m.merged()["w"]
    assert bool(torch.isfinite(w).all())
    assert float((w - tau).norm()) < float((tau / 2 - tau).norm())  # moved from the mean toward τ


def test_dop_batched_equals_one_weight_at_a_time():
    # The accelerator path optimises same-shape weights as one batch; ranks differ (one is rank 1).
    g = torch.Generator().manual_seed(0)
    merged = torch.randn(3, 9, 4, generator=g, dtype=torch.float64) * 0.01
    task = torch.randn(3, 9, 4, generator=g, dtype=torch.float64) * 0.01
    merged[1] = torch.outer(torch.randn(9, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)) * 0.01
    options = DOPOptions(num_steps=25)
    together = dop_merge_weights(merged, task, options)
    for i in range(3):
        torch.testing.assert_close(together[i], dop_merge_weights(merged[i], task[i], options), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_dop_16_bit_inputs_keep_a_float32_state(dtype, make_task_vectors):
    tvs = as_dtype(small(make_task_vectors(3, seed=6)), dtype)
    m = feed(get_merger("dop", num_steps=20), tvs)
    assert all(v.dtype == torch.float32 for k, v in m.state_dict().items() if isinstance(v, Tensor))
    out = m.merged()
    assert all(t.dtype == dtype for t in out.values())
    expected = merge("dop", as_dtype(tvs, torch.float32), num_steps=20)
    assert all(torch.equal(out[n], expected[n].to(dtype)) for n in out)


def test_dop_update_that_overflows_changes_nothing():
    m = get_merger("dop", num_steps=5)
    m.update({"w": torch.full((2, 2), 3e38)})
    before = snapshot(m)
    with pytest.raises(NonFiniteError, match=r"'dop' merger, task 2: the update of tensor 'w' is not finite"):
        m.update({"w": torch.full((2, 2), -3e38)})
    assert_same_state(snapshot(m), before)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"alpha": 1.5}, r"`alpha` must be a real number in \[0, 1\], got 1.5"),
        ({"num_steps": -1}, r"`num_steps` must be an integer >= 0, got -1"),
        ({"num_steps": 2.5}, r"`num_steps` must be an integer >= 0, got 2.5"),
        ({"lr": 0}, r"`lr` must be a positive real number, got 0"),
        ({"mgda": 1}, r"`mgda` must be True or False, got 1"),
        ({"ema_beta": -0.1}, r"`ema_beta` must be a real number in \[0, 1\]"),
        ({"svd_epsilon": 2}, r"`svd_epsilon` must be a real number in \[0, 1\]"),
        ({"proj_space": "w"}, r"`proj_space` must be one of \['uv', 'u', 'v'\], got 'w'"),
    ],
)
def test_dop_bad_options_are_rejected(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_merger("dop", **options)


# == Fisher merging ===================================================================================
def test_fisher_by_hand_two_tasks():
    # Without normalisation or floor: merged = (F1 τ1 + F2 τ2) / (F1 + F2).
    #   entry 0: (3·1 + 1·3)/(3 + 1) = 1.5;  entry 1: (0·4 + 1·2)/(0 + 1) = 2;  entry 2: (2·(−2) + 2·4)/4 = 1
    tvs = [{"w": torch.tensor([1.0, 4.0, -2.0])}, {"w": torch.tensor([3.0, 2.0, 4.0])}]
    fishers = [{"w": torch.tensor([3.0, 0.0, 2.0])}, {"w": torch.tensor([1.0, 1.0, 2.0])}]
    out = merge("fisher", tvs, fishers=fishers, normalize=False, min_fisher=0.0)
    assert torch.equal(out["w"], torch.tensor([1.5, 2.0, 1.0]))
    # Normalised: w1 = 1/‖F1‖ = 1/√13, w2 = 1/‖F2‖ = 1/√6; entry 0: (3w1·1 + w2·3)/(3w1 + w2).
    w1, w2 = 1 / math.sqrt(13), 1 / math.sqrt(6)
    expected = torch.tensor([(3 * w1 + 3 * w2) / (3 * w1 + w2), 2.0, (-4 * w1 + 8 * w2) / (2 * w1 + 2 * w2)])
    out = merge("fisher", tvs, fishers=fishers, min_fisher=0.0)
    torch.testing.assert_close(out["w"], expected, atol=1e-6, rtol=1e-6)


def test_fisher_entry_without_information_keeps_theta0_or_takes_the_mean():
    tvs = [{"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([4.0, 3.0])}]
    fishers = [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([0.0, 1.0])}]
    # min_fisher=0: no task weighs entry 0, so it stays at θ₀ (0).
    assert torch.equal(merge("fisher", tvs, fishers=fishers, min_fisher=0.0)["w"], torch.tensor([0.0, 2.0]))
    # FusionBench's floor (1e-6 added to every entry): entry 0 becomes the plain mean, 3.
    torch.testing.assert_close(merge("fisher", tvs, fishers=fishers)["w"], torch.tensor([3.0, 2.0]))


@pytest.mark.parametrize("options", [{}, {"normalize": False}, {"min_fisher": 0.0}], ids=["default", "unnormalised", "no_floor"])
def test_fisher_streaming_equals_batch_reference(options, make_task_vectors):
    tvs = make_task_vectors(5, seed=12)
    fishers = fishers_for(tvs, seed=3)
    expected = reference_fisher(tvs, fishers, **{"normalize": True, "min_fisher": 1e-6, **options})
    out = merge("fisher", tvs, fishers=fishers, **options)
    torch.testing.assert_close({n: t.double() for n, t in out.items()}, expected, atol=1e-6, rtol=1e-5)
    out64 = merge("fisher", as_dtype(tvs, torch.float64), fishers=as_dtype(fishers, torch.float64), **options)
    torch.testing.assert_close(out64, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_equals_fusionbench(normalize):
    # FusionBench's merging_with_fisher_weights on the same task vectors and Fishers (3 tasks, Fishers
    # spread over three orders of magnitude, with exact zeros). Measured: 3.3e-16 / 4.4e-16 in float64;
    # 2.4e-7 / 4.8e-7 in float32 with |merged| <= 2.1 (its sums run over the stacked tasks, ours one task
    # after the other): tolerance 2e-6, 4x the float32 gap.
    d = load_file(str(FIXTURES / "fisher.safetensors"))
    names = ["a", "b", "c"]
    tvs = [{n: d[f"tau{t}.{n}"] for n in names} for t in range(3)]
    fishers = [{n: d[f"fisher{t}.{n}"] for n in names} for t in range(3)]
    for dtype, tag, tolerance in ((torch.float64, "fb64", 1e-12), (torch.float32, "fb32", 2e-6)):
        ours = merge("fisher", as_dtype(tvs, dtype), fishers=as_dtype(fishers, dtype), normalize=normalize)
        assert max_diff(ours, {n: d[f"{tag}.normalize_{normalize}.{n}"] for n in names}) < tolerance


def test_fisher_16_bit_inputs_are_summed_in_float32(make_task_vectors):
    tvs = as_dtype(make_task_vectors(3, seed=2), torch.bfloat16)
    fishers = fishers_for(tvs)
    m = feed(get_merger("fisher"), tvs, fishers)
    assert all(v.dtype == torch.float32 for k, v in m.state_dict().items() if isinstance(v, Tensor))
    out = m.merged()
    expected = merge("fisher", as_dtype(tvs, torch.float32), fishers=fishers)
    assert all(out[n].dtype == torch.bfloat16 and torch.equal(out[n], expected[n].to(torch.bfloat16)) for n in out)


def test_fisher_missing_or_unwanted_is_a_config_error():
    m = get_merger("fisher")
    with pytest.raises(ConfigError, match=r"call update\(task_vector, fisher=\{name: F\}\).*diagonal_fisher\(model, batches, loss_fn\)"):
        m.update({"w": torch.ones(2)})
    assert m.num_tasks == 0
    with pytest.raises(ConfigError, match=r"The 'magmax' merger does not use a Fisher; drop `fisher`"):
        get_merger("magmax").update({"w": torch.ones(2)}, fisher={"w": torch.ones(2)})
    with pytest.raises(ConfigError, match=r"fewer entries than `task_vectors`"):
        merge("fisher", [{"w": torch.ones(2)}] * 2, fishers=[{"w": torch.ones(2)}])
    with pytest.raises(ConfigError, match=r"more entries than `task_vectors`"):
        merge("fisher", [{"w": torch.ones(2)}], fishers=[{"w": torch.ones(2)}] * 2)


BAD_FISHERS = {
    "missing": (lambda: {"a": torch.ones(2, 3)}, StateDictMismatchError, r"its `fisher`: tensor names do not match \(missing 1: 'b'"),
    "unexpected": (
        lambda: {"a": torch.ones(2, 3), "b": torch.ones(3), "c": torch.ones(1)},
        StateDictMismatchError,
        r"unexpected 1: 'c'",
    ),
    "shape": (lambda: {"a": torch.ones(3, 2), "b": torch.ones(3)}, StateDictMismatchError, r"'a': expected \(2, 3\), got \(3, 2\)"),
    "negative": (lambda: {"a": torch.ones(2, 3), "b": torch.tensor([1.0, -0.5, 0.0])}, ConfigError, r"`fisher\['b'\]` holds negative values \(down to -0.5\)"),
    "nan": (lambda: {"a": torch.ones(2, 3), "b": torch.tensor([1.0, float("nan"), 0.0])}, NonFiniteError, r"`fisher\['b'\]` holds 1 NaN or infinite"),
    "integer": (lambda: {"a": torch.ones(2, 3, dtype=torch.int64), "b": torch.ones(3)}, ConfigError, r"`fisher\['a'\]` must be a floating-point tensor, got torch.int64"),
    "not_a_mapping": (lambda: [torch.ones(2, 3)], ConfigError, r"`fisher` must map tensor names to tensors, got list"),
}


@pytest.mark.parametrize("case", list(BAD_FISHERS))
def test_bad_fisher_raises_and_changes_nothing(case):
    make_bad, error, pattern = BAD_FISHERS[case]
    pair = {"a": torch.randn(2, 3), "b": torch.randn(3)}
    good = {"a": torch.rand(2, 3), "b": torch.rand(3)}
    m = get_merger("fisher")
    m.update(pair, fisher=good)
    before = snapshot(m)
    with pytest.raises(error, match=pattern):
        m.update(pair, fisher=make_bad())
    assert_same_state(snapshot(m), before)
    m.update(pair, fisher=good)
    assert m.num_tasks == 2


def test_fisher_fold_that_would_overflow_changes_nothing():
    m = get_merger("fisher", normalize=False)
    m.update({"w": torch.tensor([1.0])}, fisher={"w": torch.tensor([3e38])})
    before = snapshot(m)
    with pytest.raises(NonFiniteError, match=r"folding tensor 'w' would overflow float32 in the '(den|num)' state"):
        m.update({"w": torch.tensor([1.0])}, fisher={"w": torch.tensor([3e38])})
    assert_same_state(snapshot(m), before)


def test_fisher_load_state_dict_refuses_a_negative_denominator():
    state = snapshot(feed(get_merger("fisher"), [{"w": torch.ones(2)}]))
    state["den.w"] = torch.tensor([1.0, -1.0])
    with pytest.raises(CheckpointError, match=r"'den.w' holds negative values"):
        get_merger("fisher").load_state_dict(state)


# -- diagonal_fisher ---------------------------------------------------------------------------------
class Line(nn.Module):
    """y = w·x + b with w = (1, 2), b = 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor(0.5))
        self.frozen = nn.Parameter(torch.tensor(1.0), requires_grad=False)

    def forward(self, x):
        return x @ self.w + self.b


def squared_error(model, batch):
    x, y = batch["x"], batch["y"]
    return 0.5 * ((model(x) - y) ** 2).mean()


def test_diagonal_fisher_by_hand():
    # L = ½(w·x + b − y)²: ∂L/∂w = r·x, ∂L/∂b = r with r = w·x + b − y.
    #   batch 1: x = (1, 0), y = 0.5: r = 1 + 0.5 − 0.5 = 1  -> g_w = (1, 0),  g_b = 1
    #   batch 2: x = (0, 1), y = 0.5: r = 2 + 0.5 − 0.5 = 2  -> g_w = (0, 2),  g_b = 2
    # F = mean of squares: F_w = ((1 + 0)/2, (0 + 4)/2) = (0.5, 2), F_b = (1 + 4)/2 = 2.5.
    model = Line()
    batches = [{"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0.5])}, {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([0.5])}]
    fisher = diagonal_fisher(model, batches, squared_error)
    assert list(fisher) == ["w", "b"]  # requires_grad only, named_parameters order
    assert torch.equal(fisher["w"], torch.tensor([0.5, 2.0])) and torch.equal(fisher["b"], torch.tensor(2.5))
    # max_batches and names
    first = diagonal_fisher(model, iter(batches), squared_error, names=["b"], max_batches=1)
    assert list(first) == ["b"] and torch.equal(first["b"], torch.tensor(1.0))
    # The parameters' .grad and the mode are left alone.
    assert model.w.grad is None and model.training
    # It plugs into the Fisher merger directly.
    merger = get_merger("fisher")
    merger.update({"w": torch.ones(2), "b": torch.tensor(1.0)}, fisher=fisher)


def test_diagonal_fisher_bad_input():
    model = Line()
    batch = {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0.5])}
    with pytest.raises(ConfigError, match=r"`batches` yielded no batch"):
        diagonal_fisher(model, [], squared_error)
    with pytest.raises(ConfigError, match=r"`max_batches` must be a positive integer or None, got 0"):
        diagonal_fisher(model, [batch], squared_error, max_batches=0)
    with pytest.raises(NoMatchingModulesError, match=r"'v' is not a floating-point parameter of the model.*'w', 'b'"):
        diagonal_fisher(model, [batch], squared_error, names=["v"])
    with pytest.raises(ConfigError, match=r"must return a scalar tensor \(the batch's loss\), got a tensor of shape \(2,\)"):
        diagonal_fisher(model, [batch], lambda m, b: torch.cat([m(b["x"]), m(b["x"])]))
    with pytest.raises(ConfigError, match=r"does not depend on any parameter that requires grad"):
        diagonal_fisher(model, [batch], lambda m, b: torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match=r"the loss of batch 0 is nan"):
        diagonal_fisher(model, [batch], lambda m, b: squared_error(m, b) * float("nan"))


# == DARE ===========================================================================================
def test_dare_draws_are_the_documented_hash():
    # The int64 arithmetic (wrapping multiplication, logical shifts) against Python's exact integers,
    # at offsets near 0 and far beyond 2^32.
    key = stream_key(7, 3, "blocks.0.attn.qkv.weight")
    for offset in (0, 1000, 2**40 + 5):
        mask = dare_keep_mask(64, 0.5, seed=7, task=3, name="blocks.0.attn.qkv.weight", offset=offset)
        threshold = math.floor(0.5 * 2**53)
        assert mask.tolist() == [reference_dare_draw(key, offset + i) >= threshold for i in range(64)]
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dare(x, 0.3, seed=1, task=2, name="w"), reference_dare(x, 0.3, stream_key(1, 2, "w")))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drop_rate_and_rescale_preserve_the_expectation(p):
    # n = 400,000 independent draws: the kept share has standard deviation sqrt(p(1-p)/n) <= 7.9e-4;
    # the bound 5e-3 is over 6 standard deviations. The mean of DARE(1) = kept share / (1 - p) has
    # standard deviation sqrt(p/((1-p) n)) <= 4.8e-3 (p = 0.9); the bound 0.03 is over 6.
    n = 400_000
    x = torch.ones(n)
    out = dare(x, p, seed=0, task=0, name="w")
    kept = out != 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 5e-3
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1.0 / (1 - p)))
    assert abs(float(out.mean()) - 1.0) < 0.03
    # Neighbouring entries are independent.
    assert abs(float((kept[1:] == kept[:-1]).float().mean()) - (p * p + (1 - p) ** 2)) < 5e-3


@pytest.mark.parametrize("chunk", [97, 1000, 1 << 16, 1 << 20])
def test_dare_draws_do_not_depend_on_chunking_or_sharding(chunk, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50_000, generator=g)
    whole = dare(x, 0.4, seed=5, task=2, name="fc.weight")
    monkeypatch.setattr(dare_module, "CHUNK_NUMEL", chunk)
    assert torch.equal(dare(x, 0.4, seed=5, task=2, name="fc.weight"), whole)
    # Two shards split at an arbitrary offset, each told where it starts (as a sharded run does).
    flat = x.reshape(-1)
    cut = 12_345 + chunk % 97
    left = dare(flat[:cut], 0.4, seed=5, task=2, name="fc.weight")
    right = dare(flat[cut:], 0.4, seed=5, task=2, name="fc.weight", offset=cut)
    assert torch.equal(torch.cat([left, right]), whole.reshape(-1))
    # Nor on the thread count (integer arithmetic; chunks above ATen's grain size run in parallel).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(dare(x, 0.4, seed=5, task=2, name="fc.weight"), whole)
    finally:
        torch.set_num_threads(threads)


def test_dare_draws_differ_by_seed_task_and_name_only():
    args = dict(seed=0, task=1, name="w")
    base = dare_keep_mask(5000, 0.5, **args)
    assert torch.equal(dare_keep_mask(5000, 0.5, **args), base)
    for change in ({"seed": 1}, {"task": 2}, {"name": "v"}):
        assert not torch.equal(dare_keep_mask(5000, 0.5, **dict(args, **change)), base), change


def test_dare_keep_mask_agrees_with_dare():
    x = torch.randn(3000)
    mask = dare_keep_mask(3000, 0.7, seed=3, task=4, name="x")
    assert torch.equal(dare(x, 0.7, seed=3, task=4, name="x") != 0, mask & (x != 0))


def _options(name):
    return {"dop": {"num_steps": 10}, "ties": {"top_k": 0.5}, "random": {"seed": 2}}.get(name, {})


@pytest.mark.parametrize("name", sorted(MERGERS))
def test_every_method_accepts_dare_and_folds_the_dropped_vectors(name, make_task_vectors):
    # merge(name, tvs, dare=p) is the method applied to the DARE'd task vectors, task t drawing with index t.
    tvs = make_task_vectors(3, seed=9)
    fishers = fishers_for(tvs) if MERGERS[name].requires_fisher else None
    options = _options(name)
    out = merge(name, tvs, fishers=fishers, dare=0.3, dare_seed=4, **options)
    dared = [dare_task_vector(TaskVector(tv), 0.3, seed=4, task=t) for t, tv in enumerate(tvs)]
    expected = merge(name, dared, fishers=fishers, **options)
    assert list(out) == list(expected) and all(torch.equal(out[n], expected[n]) for n in out)
    assert not all(torch.equal(out[n], merge(name, tvs, fishers=fishers, **options)[n]) for n in out)
    m = get_merger(name, dare=0.3, dare_seed=4, **options)
    assert m.options() == {**get_merger(name, **options).options(), "dare": 0.3, "dare_seed": 4}
    assert "dare=0.3" in repr(m)


@pytest.mark.parametrize("name", sorted(MERGERS))
def test_dare_resumes_bit_exactly_and_checkpoints_compare_it(name, make_task_vectors):
    tvs = make_task_vectors(4, seed=10)
    fishers = fishers_for(tvs)
    options = dict(_options(name), dare=0.5, dare_seed=1)
    first = get_merger(name, **options)
    for t in range(2):
        first.update(tvs[t], **({"fisher": fishers[t]} if first.requires_fisher else {}))
    state = round_trip(first.state_dict())
    assert state["options"]["dare"] == 0.5 and state["options"]["dare_seed"] == 1
    resumed = get_merger(name, **state["options"])
    resumed.load_state_dict(state)
    for t in range(2, 4):
        for m in (first, resumed):
            m.update(tvs[t], **({"fisher": fishers[t]} if m.requires_fisher else {}))
    assert_same_state(snapshot(resumed), snapshot(first))
    # Another drop rate, another seed, or none: refused, naming the option.
    for other, pattern in (({"dare": 0.4, "dare_seed": 1}, r"`dare`: saved 0.5, here 0.4"),
                           ({"dare_seed": 2, "dare": 0.5}, r"`dare_seed`: saved 1, here 2"),
                           ({}, r"`dare`: saved 0.5, here '<not set>'")):
        with pytest.raises(ConfigError, match=pattern):
            get_merger(name, **_options(name), **other).load_state_dict(state)


@pytest.mark.parametrize("name", ["dop", "fisher"])
def test_new_methods_resume_bit_exactly(name, make_task_vectors):
    tvs = small(make_task_vectors(4, seed=13))
    fishers = fishers_for(tvs)
    options = _options(name)
    first = get_merger(name, **options)
    kwargs = [({"fisher": f} if name == "fisher" else {}) for f in fishers]
    for t in range(2):
        first.update(tvs[t], **kwargs[t])
    resumed = get_merger(name, **options)
    resumed.load_state_dict(round_trip(first.state_dict()))
    for t in range(2, 4):
        first.update(tvs[t], **kwargs[t])
        resumed.update(tvs[t], **kwargs[t])
    assert_same_state(snapshot(resumed), snapshot(first))


def test_dare_off_records_nothing():
    for p in (None, 0, 0.0):
        m = get_merger("magmax", dare=p, dare_seed=3)
        assert m.options() == {} and m.state_dict()["options"] == {}


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"dare": 1.0}, r"`dare` is the drop rate and must be a real number in \[0, 1\), got 1.0"),
        ({"dare": -0.1}, r"`dare` is the drop rate .* got -0.1"),
        ({"dare": "0.5"}, r"`dare` is the drop rate .* got '0.5'"),
        ({"dare": True}, r"`dare` is the drop rate .* got True"),
        ({"dare": 0.5, "dare_seed": -1}, r"`dare_seed` must be a non-negative integer, got -1"),
        ({"dare_sed": 1}, r"Unknown option\(s\) \['dare_sed'\].*Did you mean 'dare_seed'\?"),
    ],
)
def test_bad_dare_options_are_rejected(options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_merger("average", **options)


def test_dare_rescale_that_overflows_changes_nothing():
    m = get_merger("average", dare=0.5)
    m.update({"w": torch.ones(64, dtype=torch.float16)})
    before = snapshot(m)
    big = {"w": torch.full((64,), 60000.0, dtype=torch.float16)}  # 60000 / 0.5 > 65504
    with pytest.raises(NonFiniteError, match=r"after DARE's rescaling by 1/\(1 - 0.5\): tensor 'w'"):
        m.update(big)
    assert_same_state(snapshot(m), before)
    assert torch.equal(big["w"], torch.full((64,), 60000.0, dtype=torch.float16))


def test_dare_leaves_the_callers_task_vector_unchanged(make_task_vectors):
    tvs = make_task_vectors(2, seed=3)
    copies = [{n: t.clone() for n, t in tv.items()} for tv in tvs]
    merge("magmax", tvs, dare=0.9)
    assert all(torch.equal(tv[n], c[n]) for tv, c in zip(tvs, copies) for n in tv)


# == generic checks for the new methods ====================================================================
@pytest.mark.parametrize("name", ["dop", "fisher"])
def test_new_methods_bad_update_changes_nothing_and_state_stays_constant(name, make_task_vectors):
    tvs = small(make_task_vectors(6, seed=14))
    fishers = fishers_for(tvs)
    m = get_merger(name, **_options(name))
    kwargs = [({"fisher": f} if name == "fisher" else {}) for f in fishers]
    m.update(tvs[0], **kwargs[0])
    m.update(tvs[1], **kwargs[1])
    size = sum(v.numel() for v in m.state_dict().values() if isinstance(v, Tensor))
    before = snapshot(m)
    bad = dict(tvs[2], **{"fc1.bias": torch.full((7,), float("nan"))})
    with pytest.raises(NonFiniteError, match=r"tensor 'fc1.bias'"):
        m.update(bad, **kwargs[2])
    with pytest.raises(StateDictMismatchError, match=r"missing 1: 'fc1.bias'"):
        m.update({n: t for n, t in tvs[2].items() if n != "fc1.bias"}, **kwargs[2])
    assert_same_state(snapshot(m), before)
    for t in range(2, 6):
        m.update(tvs[t], **kwargs[t])
    assert sum(v.numel() for v in m.state_dict().values() if isinstance(v, Tensor)) == size
    assert m.merged_norm() == pytest.approx(m.merged().norm(), rel=1e-6)
