"""TaskVector: construction, name selection, arithmetic, application, safetensors, and its errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cl_plugin import TaskVector
from cl_plugin.errors import (
    CheckpointError,
    ConfigError,
    DtypeMismatchError,
    NoMatchingModulesError,
    NonFiniteError,
    StateDictMismatchError,
)

FLOAT_NAMES = [
    "fc1.weight",
    "fc1.bias",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "fc2.weight",
    "fc2.bias",
]


# -- helpers ---------------------------------------------------------------------------------
def clone_state(state):
    return {n: t.clone() for n, t in state.items()}


def assert_state_equal(actual, expected):
    assert list(actual) == list(expected)
    for n in expected:
        assert actual[n].dtype == expected[n].dtype, n
        torch.testing.assert_close(actual[n], expected[n], atol=0, rtol=0, equal_nan=True, msg=n)


@pytest.fixture
def pair(make_tiny_net):
    """(finetuned, base) state dicts of two seeded TinyNets, cloned so tests may compare later."""
    return clone_state(make_tiny_net(1).state_dict()), clone_state(make_tiny_net(0).state_dict())


def small(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# -- between() -----------------------------------------------------------------------------------
def test_between_state_dicts_is_the_difference_of_float_tensors(pair):
    finetuned, base = pair
    tv = TaskVector.between(finetuned, base)
    assert list(tv) == FLOAT_NAMES
    for n in FLOAT_NAMES:
        assert torch.equal(tv[n], finetuned[n] - base[n])
    # BatchNorm's counter is an integer buffer: left out and reported.
    assert tv.skipped == ("bn.num_batches_tracked",)
    assert "bn.num_batches_tracked" not in tv


def test_between_modules_and_repr_reports_the_skipped_buffer(make_tiny_net):
    finetuned, base = make_tiny_net(1), make_tiny_net(0)
    tv = TaskVector.between(finetuned, base)
    assert list(tv) == FLOAT_NAMES
    assert torch.equal(tv["fc1.weight"], finetuned.fc1.weight.detach() - base.fc1.weight.detach())
    assert not tv["fc1.weight"].requires_grad
    numel = sum(t.numel() for t in base.state_dict().values() if t.is_floating_point())
    assert tv.numel() == numel
    assert repr(tv) == (
        f"TaskVector(8 tensors, {numel} elements, dtype=float32, device=cpu, skipped 1: 'bn.num_batches_tracked')"
    )


def test_a_task_vector_wraps_any_mapping_and_leaves_out_non_floats():
    tv = TaskVector({"w": small([1.0, 2.0]), "ids": torch.arange(3), "mask": torch.tensor([True])})
    assert list(tv) == ["w"]
    assert tv.skipped == ("ids", "mask")
    assert repr(TaskVector({})) == "TaskVector(0 tensors, 0 elements, dtype=-, device=-)"
    # Wrapping a TaskVector keeps its skipped names.
    assert TaskVector(tv, skipped=["extra"]).skipped == ("ids", "mask", "extra")


# -- include / exclude ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, FLOAT_NAMES),
        ("fc1.*", None, ["fc1.weight", "fc1.bias"]),
        (["fc1.*", "fc2.weight"], None, ["fc1.weight", "fc1.bias", "fc2.weight"]),
        (None, "*.bias", ["fc1.weight", "bn.weight", "bn.running_mean", "bn.running_var", "fc2.weight"]),
        (None, ("bn.*", "*.bias"), ["fc1.weight", "fc2.weight"]),
        ("*.weight", "bn.*", ["fc1.weight", "fc2.weight"]),
        ("bn.running_?ar", None, ["bn.running_var"]),
        ("fc[12].bias", None, ["fc1.bias", "fc2.bias"]),
    ],
)
def test_include_and_exclude_globs(pair, include, exclude, expected):
    finetuned, base = pair
    tv = TaskVector.between(finetuned, base, include=include, exclude=exclude)
    assert list(tv) == expected
    # Everything else of the base is reported as skipped, the integer counter included.
    assert set(tv.skipped) == set(base) - set(expected)


def test_include_matching_nothing_raises_and_lists_names(pair):
    finetuned, base = pair
    with pytest.raises(NoMatchingModulesError, match=r"`include` pattern 'head\.\*' matches no tensor name\. Some names that exist: 'fc1.weight'"):
        TaskVector.between(finetuned, base, include=["fc1.*", "head.*"])
    # Integer buffers are not candidates.
    with pytest.raises(NoMatchingModulesError, match=r"'bn.num_batches_tracked' matches no tensor name"):
        TaskVector.between(finetuned, base, include="bn.num_batches_tracked")


def test_patterns_that_leave_nothing_raise(pair):
    finetuned, base = pair
    with pytest.raises(NoMatchingModulesError, match=r"No tensor is left after include=\['fc1.\*'\] and exclude=\['fc1.\*'\]"):
        TaskVector.between(finetuned, base, include="fc1.*", exclude="fc1.*")


def test_exclude_matching_nothing_warns_at_the_callers_line(pair):
    finetuned, base = pair
    with pytest.warns(UserWarning, match=r"`exclude` pattern 'head\.\*' matches no tensor name; it has no effect") as record:
        tv = TaskVector.between(finetuned, base, exclude=["*.bias", "head.*"])
    assert record[0].filename == __file__
    assert "fc1.bias" not in tv and "fc1.weight" in tv


@pytest.mark.parametrize(("include", "exclude"), [(3, None), (["fc1.*", 3], None), (None, [None])])
def test_patterns_must_be_strings(pair, include, exclude):
    finetuned, base = pair
    with pytest.raises(ConfigError, match=r"`(include|exclude)` must (be a glob pattern|hold glob patterns)"):
        TaskVector.between(finetuned, base, include=include, exclude=exclude)


# -- arithmetic -------------------------------------------------------------------------------------
@pytest.fixture
def three():
    g = torch.Generator().manual_seed(0)
    return [
        TaskVector({"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}, skipped=["step"])
        for _ in range(3)
    ]


def test_add_sub_mul_div_neg_are_elementwise(three):
    a, b, _ = three
    for result, op in [
        (a + b, lambda x, y: x + y),
        (a - b, lambda x, y: x - y),
    ]:
        assert isinstance(result, TaskVector)
        for n in a:
            assert torch.equal(result[n], op(a[n], b[n]))
    for n in a:
        assert torch.equal((a * 2.5)[n], a[n] * 2.5)
        assert torch.equal((2.5 * a)[n], a[n] * 2.5)
        assert torch.equal((a * 3)[n], a[n] * 3.0)
        assert torch.equal((a / 4)[n], a[n] * 0.25)
        assert torch.equal((-a)[n], -a[n])
    assert (a + b).skipped == ("step",)
    # A plain mapping works as the other operand.
    assert torch.equal((a + {"w": torch.ones(3, 2), "b": torch.ones(3)})["w"], a["w"] + 1)


def test_sum_of_a_list(three):
    total = sum(three)
    for n in three[0]:
        assert torch.equal(total[n], three[0][n] + three[1][n] + three[2][n])


def test_arithmetic_does_not_modify_its_operands(three):
    a, b, _ = three
    before = [clone_state(a), clone_state(b)]
    _ = a + b, a - b, a * 3, a / 2, -a, sum([a, b])
    assert_state_equal(dict(a), before[0])
    assert_state_equal(dict(b), before[1])


def test_norm_equals_the_norm_of_the_concatenation(three):
    tv = three[0]
    expected = float(torch.cat([t.reshape(-1) for t in tv.values()]).double().norm())
    assert tv.norm() == pytest.approx(expected, rel=1e-6)
    assert (tv * -3).norm() == pytest.approx(3 * expected, rel=1e-6)


def test_norm_of_half_precision_is_accumulated_in_float32():
    # 300² = 90_000 overflows float16 (max 65_504); the norm of 100 entries of 300 is 3000.
    tv = TaskVector({"w": torch.full((100,), 300.0, dtype=torch.float16), "v": torch.full((4,), 0.0, dtype=torch.bfloat16)})
    assert tv.norm() == pytest.approx(3000.0, rel=1e-6)


@pytest.mark.parametrize(
    ("other", "error", "pattern"),
    [
        ({"w": torch.ones(3, 2)}, StateDictMismatchError, r"TaskVector \+ TaskVector: tensor names do not match \(missing 1: 'b'\)"),
        (
            {"w": torch.ones(3, 2), "b": torch.ones(3), "c": torch.ones(1)},
            StateDictMismatchError,
            r"unexpected 1: 'c'",
        ),
        ({"w": torch.ones(2, 3), "b": torch.ones(3)}, StateDictMismatchError, r"'w': expected \(3, 2\), got \(2, 3\)"),
        (
            {"w": torch.ones(3, 2, dtype=torch.float16), "b": torch.ones(3)},
            DtypeMismatchError,
            r"'w': expected torch.float32, got torch.float16.*task_vector.to\(dtype=torch.float32\)",
        ),
        ({"w": torch.full((3, 2), float("nan")), "b": torch.ones(3)}, NonFiniteError, r"tensor 'w' \(shape \(3, 2\)\) holds 6 NaN"),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "nan"],
)
def test_combining_mismatched_task_vectors_raises(three, other, error, pattern):
    a = three[0]
    a_before, other_before = clone_state(a), clone_state(other)
    with pytest.raises(error, match=pattern):
        a + other
    assert_state_equal(dict(a), a_before)
    assert_state_equal(other, other_before)


def test_bad_scalars_raise(three):
    a = three[0]
    with pytest.raises(ConfigError, match=r"Cannot scale a TaskVector by nan: the factor must be finite"):
        a * float("nan")
    with pytest.raises(ConfigError, match=r"Cannot divide a TaskVector by zero"):
        a / 0
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError):
        a * True
    with pytest.raises(TypeError):
        a + 1


# -- apply_to ------------------------------------------------------------------------------------
def test_apply_to_a_state_dict_returns_a_new_dict(pair):
    finetuned, base = pair
    base_before = clone_state(base)
    tv = TaskVector.between(finetuned, base, exclude="bn.running_*")
    out = tv.apply_to(base, scale=0.5)
    assert out is not base and list(out) == list(base)
    assert_state_equal(base, base_before)  # the base is untouched
    for n in tv:
        assert out[n] is not base[n]
        torch.testing.assert_close(out[n], base[n] + 0.5 * (finetuned[n] - base[n]))
    # Entries the task vector does not hold are the base's own objects.
    for n in ("bn.num_batches_tracked", "bn.running_mean", "bn.running_var"):
        assert out[n] is base[n]
    # scale 1 gives back the fine-tuned weights.
    for n in tv:
        torch.testing.assert_close(tv.apply_to(base)[n], finetuned[n])


def test_apply_to_casts_to_the_bases_dtype():
    base = {"w": torch.ones(2, dtype=torch.float64)}
    tv = TaskVector({"w": torch.tensor([0.5, -1.0], dtype=torch.float16)})
    out = tv.apply_to(base, scale=2)
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], torch.tensor([2.0, -1.0], dtype=torch.float64))


def test_apply_to_a_module_is_in_place(make_tiny_net):
    finetuned, base = make_tiny_net(1), make_tiny_net(0)
    tv = TaskVector.between(finetuned, base)
    target = make_tiny_net(0)
    weight = target.fc1.weight
    counter = target.bn.num_batches_tracked.clone()
    assert tv.apply_to(target, scale=1.0) is target
    assert target.fc1.weight is weight  # the same Parameter, updated in place
    for n, t in target.state_dict().items():
        if n in tv:
            torch.testing.assert_close(t, finetuned.state_dict()[n])
    assert torch.equal(target.bn.num_batches_tracked, counter)


def test_apply_to_with_a_name_missing_from_the_base_raises_and_changes_nothing(make_tiny_net, pair):
    finetuned, base = pair
    tv = TaskVector.between(finetuned, base)
    partial = {n: t for n, t in base.items() if n != "fc2.bias"}
    partial_before = clone_state(partial)
    with pytest.raises(StateDictMismatchError, match=r"1 name\(s\) of the task vector are not in the base: 'fc2.bias'"):
        tv.apply_to(partial)
    assert_state_equal(partial, partial_before)
    # A module whose shapes differ is left as it was.
    module = make_tiny_net(0)
    module.fc2 = torch.nn.Linear(3, 5)
    module_before = clone_state(module.state_dict())
    with pytest.raises(StateDictMismatchError, match=r"'fc2.weight': expected \(2, 3\), got \(5, 3\)"):
        tv.apply_to(module)
    assert_state_equal(module.state_dict(), module_before)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "1"])
def test_apply_to_rejects_a_bad_scale(pair, scale):
    finetuned, base = pair
    with pytest.raises(ConfigError, match=r"`scale` must be a finite real number"):
        TaskVector.between(finetuned, base).apply_to(base, scale=scale)


# -- to() ----------------------------------------------------------------------------------------------
def test_to_dtype_and_device(three):
    tv = three[0]
    half = tv.to(dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())
    assert half.skipped == tv.skipped
    torch.testing.assert_close(half["w"].float(), tv["w"], atol=1e-3, rtol=1e-3)
    moved = tv.to("cpu")
    assert all(t.device.type == "cpu" for t in moved.values())
    assert all(t.dtype == torch.float32 for t in moved.values())
    with pytest.raises(ConfigError, match=r"`dtype` must be a float dtype, got torch.int64"):
        tv.to(dtype=torch.int64)


# -- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "z.weight": torch.randn(3, 4, generator=g),
        "a.half": torch.randn(5, generator=g).half(),
        "m.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "b.double": torch.randn(1, 3, generator=g).double(),
    }
    tv = TaskVector(tensors, skipped=["pos_ids", "bn.num_batches_tracked"])
    path = tmp_path / "tv.safetensors"
    tv.save(path)
    loaded = TaskVector.load(path)
    assert list(loaded) == list(tv)  # names, in their order
    for n in tv:
        assert loaded[n].dtype == tv[n].dtype and loaded[n].shape == tv[n].shape
        assert torch.equal(loaded[n], tv[n])
    assert loaded.skipped == tv.skipped
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "cl_plugin.TaskVector"
    assert json.loads(metadata["skipped"]) == ["pos_ids", "bn.num_batches_tracked"]
    assert json.loads(metadata["names"]) == list(tv)


def test_save_tensors_that_share_memory(tmp_path):
    x = torch.arange(6.0)
    tv = TaskVector({"a": x, "b": x, "c": x[:3]})
    tv.save(tmp_path / "shared.safetensors")
    loaded = TaskVector.load(tmp_path / "shared.safetensors")
    assert torch.equal(loaded["a"], x) and torch.equal(loaded["b"], x) and torch.equal(loaded["c"], x[:3])


def test_load_a_plain_safetensors_file(tmp_path):
    save_file({"w": torch.ones(2), "step": torch.tensor([3])}, str(tmp_path / "plain.safetensors"))
    loaded = TaskVector.load(tmp_path / "plain.safetensors")
    assert list(loaded) == ["w"] and loaded.skipped == ("step",)


def test_load_a_missing_path_raises(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"No task vector file at '.*nope\.safetensors'"):
        TaskVector.load(path)


def test_load_rejects_a_file_with_non_finite_values(tmp_path):
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(NonFiniteError, match=r"tensor 'w'"):
        TaskVector.load(tmp_path / "inf.safetensors")


# -- construction errors, raised with nothing changed ---------------------------------------------------
def test_constructor_errors():
    with pytest.raises(ConfigError, match=r"A TaskVector wraps a mapping of name to tensor, got list"):
        TaskVector([torch.ones(2)])
    with pytest.raises(ConfigError, match=r"Entry 'w' is a float, not a tensor"):
        TaskVector({"w": 1.0})
    with pytest.raises(NonFiniteError, match=r"TaskVector: tensor 'b' \(shape \(2,\)\) holds 1 NaN or infinite value\(s\)"):
        TaskVector({"a": torch.ones(2), "b": torch.tensor([0.0, float("nan")])})
    # Opting out of the check is possible (the mergers check again).
    assert list(TaskVector({"b": torch.tensor([float("inf")])}, check_finite=False)) == ["b"]


def _between_cases():
    def drop(name):
        return lambda ft, base: ({n: t for n, t in ft.items() if n != name}, base)

    def extra(ft, base):
        return dict(ft, **{"head.weight": torch.ones(2)}), base

    def many_missing(ft, base):
        return {n: t for n, t in ft.items() if n.startswith("fc2") or n == "bn.num_batches_tracked"}, base

    def reshape(ft, base):
        return dict(ft, **{"fc1.weight": ft["fc1.weight"].T.contiguous()}), base

    def non_finite(ft, base):
        bad = ft["fc1.bias"].clone()
        bad[1] = float("inf")
        return dict(ft, **{"fc1.bias": bad}), base

    def nan_in_base(ft, base):
        bad = base["bn.running_var"].clone()
        bad[0] = float("nan")
        return ft, dict(base, **{"bn.running_var": bad})

    def dtype(ft, base):
        return dict(ft, **{"fc2.bias": ft["fc2.bias"].double()}), base

    return {
        "missing": (drop("fc2.bias"), StateDictMismatchError, r"tensor names do not match \(missing 1: 'fc2.bias'\)\. Build every task vector"),
        "unexpected": (extra, StateDictMismatchError, r"unexpected 1: 'head.weight'"),
        "many_missing": (
            many_missing,
            StateDictMismatchError,
            r"missing 6: 'fc1.weight', 'fc1.bias', 'bn.weight', 'bn.bias', 'bn.running_mean' and 1 more",
        ),
        "shape": (reshape, StateDictMismatchError, r"1 tensor\(s\) changed shape: 'fc1.weight': expected \(3, 4\), got \(4, 3\)"),
        "non_finite": (non_finite, NonFiniteError, r"tensor 'fc1.bias' \(shape \(3,\)\) holds 1 NaN or infinite"),
        "nan_in_base": (nan_in_base, NonFiniteError, r"tensor 'bn.running_var'"),
        "dtype": (dtype, DtypeMismatchError, r"'fc2.bias': expected torch.float32, got torch.float64"),
    }


BETWEEN_CASES = _between_cases()


@pytest.mark.parametrize("case", list(BETWEEN_CASES))
def test_between_errors_name_the_offenders_and_change_nothing(pair, case):
    make_bad, error, pattern = BETWEEN_CASES[case]
    finetuned, base = make_bad(*pair)
    finetuned_before, base_before = clone_state(finetuned), clone_state(base)
    with pytest.raises(error, match=pattern):
        TaskVector.between(finetuned, base)
    assert_state_equal(finetuned, finetuned_before)
    assert_state_equal(base, base_before)


def test_between_rejects_what_is_not_a_state_dict(pair):
    with pytest.raises(ConfigError, match=r"`finetuned` must be a state dict .* got int"):
        TaskVector.between(3, pair[1])
    with pytest.raises(ConfigError, match=r"`base` must be a state dict .* got str"):
        TaskVector.between(pair[0], "weights.pt")


def test_between_of_modules_leaves_both_modules_unchanged(make_tiny_net):
    finetuned, base = make_tiny_net(1), make_tiny_net(0)
    before = [copy.deepcopy(finetuned.state_dict()), copy.deepcopy(base.state_dict())]
    tv = TaskVector.between(finetuned, base)
    tv2 = tv * 2  # arithmetic never aliases the modules' tensors
    tv2["fc1.weight"].add_(1.0)
    assert_state_equal(finetuned.state_dict(), before[0])
    assert_state_equal(base.state_dict(), before[1])
    assert math.isfinite(tv.norm())


# -- tied tensors ------------------------------------------------------------------------------------------
class TiedNet(torch.nn.Module):
    """An embedding whose table is also the output layer's weight (as GPT-2, BERT and T5 tie them)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.mix = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def tied_net(seed: int) -> TiedNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TiedNet()


TIED_NAMES = ["embed.weight", "mix.weight", "mix.bias"]
TIE = {"head.weight": "embed.weight"}


def test_tied_aliases_finds_identical_views_only():
    from cl_plugin.task_vectors import tied_aliases

    x = torch.arange(12.0).reshape(3, 4)
    state = {
        "a": x,
        "slice": x[:2],  # same storage and offset, other shape
        "t": x.T,  # same storage, other stride
        "as_int": x.view(torch.int32),  # same memory, other dtype
        "b": x,
        "c": x.detach(),  # another tensor object, the same view
        "empty1": torch.empty(0),
        "empty2": torch.empty(0),  # both report address 0: never tied
        "step": 3,  # not a tensor
    }
    assert tied_aliases(state) == {"b": "a", "c": "a"}
    assert tied_aliases(tied_net(0).state_dict()) == TIE
    assert tied_aliases({}) == {}


def test_between_a_tied_module_holds_the_tensor_once(make_tiny_net):
    finetuned, base = tied_net(1), tied_net(0)
    tv = TaskVector.between(finetuned, base)
    assert list(tv) == TIED_NAMES and len(tv) == 3
    assert dict(tv.aliases) == TIE
    with pytest.raises(TypeError):
        tv.aliases["x"] = "y"  # read-only
    assert tv.numel() == 5 * 3 + 3 * 3 + 3
    assert tv["head.weight"] is tv["embed.weight"] and "head.weight" in tv
    expected = finetuned.embed.weight.detach() - base.embed.weight.detach()
    assert torch.equal(tv["embed.weight"], expected)
    assert tv.norm() == pytest.approx(float(torch.cat([t.reshape(-1) for t in tv.values()]).norm()), rel=1e-6)
    assert "tied 1: 'head.weight'" in repr(tv)
    # A snapshot that copied each name separately breaks the tie: both names are then listed.
    copies = {n: t.clone() for n, t in finetuned.state_dict().items()}
    assert dict(TaskVector.between(copies, base).aliases) == {}
    # Excluding one of the names leaves the other untied.
    assert dict(TaskVector.between(finetuned, base, exclude="head.*").aliases) == {}


def test_between_refuses_a_base_whose_tied_names_differ():
    finetuned = tied_net(1)
    base = {n: t.clone() for n, t in tied_net(0).state_dict().items()}
    base["head.weight"] += 1.0
    with pytest.raises(StateDictMismatchError, match=r"'head.weight' is tied to 'embed.weight' in `finetuned`.*`base` holds different values"):
        TaskVector.between(finetuned, base)


def test_apply_to_a_tied_module_moves_the_tensor_once_by_scale_times_tau():
    tv = TaskVector.between(tied_net(1), tied_net(0))
    target = tied_net(0)
    before = target.embed.weight.detach().clone()
    tv.apply_to(target, scale=0.5)
    assert target.head.weight is target.embed.weight
    assert torch.equal(target.embed.weight.detach(), torch.add(before, tv["embed.weight"], alpha=0.5))


def test_apply_to_a_state_dict_puts_one_tensor_under_both_names():
    base = tied_net(0).state_dict()
    tv = TaskVector.between(tied_net(1), tied_net(0))
    out = tv.apply_to(base, scale=0.5)
    assert out["head.weight"] is out["embed.weight"]
    assert torch.equal(out["embed.weight"], torch.add(base["embed.weight"], tv["embed.weight"], alpha=0.5))
    # A base that lacks the alias gets no entry for it.
    partial = {n: t for n, t in base.items() if n != "head.weight"}
    assert "head.weight" not in tv.apply_to(partial)


def test_apply_to_an_untied_module_copies_the_result_into_the_alias():
    class Untied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.mix = torch.nn.Linear(3, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)

    tv = TaskVector.between(tied_net(1), tied_net(0))
    target = Untied()
    with torch.no_grad():
        target.head.weight.copy_(target.embed.weight)
    expected = torch.add(target.embed.weight.detach(), tv["embed.weight"], alpha=2.0)
    tv.apply_to(target, scale=2.0)
    assert torch.equal(target.embed.weight.detach(), expected)
    assert torch.equal(target.head.weight.detach(), expected)


def test_apply_to_a_module_that_ties_two_names_of_an_untied_vector():
    base, finetuned = tied_net(0), tied_net(1)
    deltas = {n: t.clone() for n, t in TaskVector.between(finetuned, base).items()}
    # Both names with the same values: the module's one tensor moves once.
    same = TaskVector({**deltas, "head.weight": deltas["embed.weight"].clone()})
    assert dict(same.aliases) == {} and len(same) == 4
    target = tied_net(0)
    before = target.embed.weight.detach().clone()
    same.apply_to(target)
    assert torch.equal(target.embed.weight.detach(), before + deltas["embed.weight"])
    # Different values for one tensor: refused, nothing written.
    other = TaskVector({**deltas, "head.weight": deltas["embed.weight"] + 1.0})
    target = tied_net(0)
    state_before = clone_state(target.state_dict())
    with pytest.raises(StateDictMismatchError, match=r"the module ties 'head.weight' to 'embed.weight'.*different values"):
        other.apply_to(target)
    assert_state_equal(target.state_dict(), state_before)


def test_tied_save_load_round_trip(tmp_path):
    tv = TaskVector.between(tied_net(1), tied_net(0))
    path = tmp_path / "tied.safetensors"
    tv.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(TIED_NAMES)  # the tied tensor is stored once
        assert json.loads(f.metadata()["aliases"]) == TIE
    loaded = TaskVector.load(path)
    assert list(loaded) == TIED_NAMES and dict(loaded.aliases) == TIE
    for n in TIED_NAMES:
        assert torch.equal(loaded[n], tv[n])
    out = loaded.apply_to(tied_net(0).state_dict())
    assert out["head.weight"] is out["embed.weight"]


def test_arithmetic_keeps_the_ties_and_refuses_other_ties():
    a = TaskVector.between(tied_net(1), tied_net(0))
    b = TaskVector.between(tied_net(2), tied_net(0))
    for result in (a + b, a - b, a * 2, 2 * a, a / 2, -a, sum([a, b]), a.to(dtype=torch.float64)):
        assert dict(result.aliases) == TIE and list(result) == TIED_NAMES
    # A plain mapping is read in the vector's terms; the alias may be left out.
    assert dict((a + {n: torch.ones_like(t) for n, t in b.items()}).aliases) == TIE
    untied = TaskVector({**dict(b), "head.weight": b["embed.weight"] + 1.0})
    with pytest.raises(StateDictMismatchError, match=r"tensor names do not match \(unexpected 1: 'head.weight'\)"):
        a + untied
    no_ties = TaskVector.between({n: t.clone() for n, t in tied_net(2).state_dict().items() if n != "head.weight"}, tied_net(0), exclude="head.*")
    with pytest.raises(StateDictMismatchError, match=r"TaskVector - TaskVector: the task vectors tie different names \('head.weight': tied to 'embed.weight' vs not tied\)"):
        a - no_ties


def test_the_constructor_detects_ties_and_checks_given_aliases():
    x = torch.ones(2, 3)
    tv = TaskVector({"a": x, "b": torch.zeros(3), "a2": x})
    assert list(tv) == ["a", "b"] and dict(tv.aliases) == {"a2": "a"}
    # Given aliases: the alias may be listed with the same values, and is dropped.
    tv = TaskVector({"a": x, "a2": x.clone()}, aliases={"a2": "a"})
    assert list(tv) == ["a"] and dict(tv.aliases) == {"a2": "a"}
    assert dict(TaskVector(tv).aliases) == {"a2": "a"}  # wrapping keeps them
    with pytest.raises(StateDictMismatchError, match=r"`aliases` ties 'a2' to 'a', but the tensors under the two names differ"):
        TaskVector({"a": x, "a2": x + 1}, aliases={"a2": "a"})
    with pytest.raises(StateDictMismatchError, match=r"`aliases` ties 'a2' to 'z', which is not a floating-point tensor"):
        TaskVector({"a": x}, aliases={"a2": "z"})
    with pytest.raises(ConfigError, match=r"`aliases` ties 'c' to 'a2', which is itself an alias of 'a'; tie it to 'a'"):
        TaskVector({"a": x}, aliases={"a2": "a", "c": "a2"})
    with pytest.raises(ConfigError, match=r"`aliases` must be a mapping of alias name to canonical name, got list"):
        TaskVector({"a": x}, aliases=["a"])
    with pytest.raises(ConfigError, match=r"`aliases` must map names \(strings\) to names, got 'a2': 3"):
        TaskVector({"a": x}, aliases={"a2": 3})
    with pytest.raises(ConfigError, match=r"`aliases` ties 'a' to itself"):
        TaskVector({"a": x}, aliases={"a": "a"})


# -- file format and writing ---------------------------------------------------------------------------
def _rewrite_metadata(path, **changes):
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**metadata, **changes})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"format_version": "99"}, r"format_version 99, newer than this cl-plugin understands \(1\); upgrade cl-plugin"),
        ({"format_version": "x"}, r"metadata `format_version` must be a positive integer, got 'x'"),
        ({"format_version": "0"}, r"metadata `format_version` must be a positive integer, got '0'"),
        ({"aliases": "{not json"}, r"metadata `aliases` is not valid JSON"),
        ({"aliases": '["w"]'}, r"metadata `aliases` must map names to names"),
        ({"aliases": '{"v": "nope"}'}, r"`aliases` ties 'v' to 'nope', but the file has no float tensor 'nope'"),
        ({"aliases": '{"w": "b"}'}, r"`aliases` ties 'w' to 'b', but the file holds a tensor named 'w'"),
        ({"skipped": '"step"'}, r"metadata `skipped` must be a list of names"),
        ({"names": "[oops"}, r"metadata `names` is not valid JSON"),
    ],
    ids=["newer", "not_int", "zero", "aliases_json", "aliases_type", "alias_target", "alias_is_tensor", "skipped", "names"],
)
def test_load_refuses_a_newer_or_corrupt_file(tmp_path, changes, pattern):
    path = tmp_path / "tv.safetensors"
    TaskVector({"w": torch.ones(2), "b": torch.zeros(3)}).save(path)
    _rewrite_metadata(path, **changes)
    with pytest.raises(CheckpointError, match=pattern):
        TaskVector.load(path)


def test_load_ignores_format_version_of_other_formats(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "hf.safetensors"), metadata={"format": "pt", "format_version": "7"})
    assert list(TaskVector.load(tmp_path / "hf.safetensors")) == ["w"]


def test_save_is_atomic_and_logs_an_overwrite(tmp_path, caplog):
    path = tmp_path / "tv.safetensors"
    TaskVector({"w": torch.ones(2)}).save(path)
    with caplog.at_level("WARNING", logger="cl_plugin"):
        TaskVector({"w": torch.zeros(2)}).save(path)
    assert "overwriting existing file" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["tv.safetensors"]  # no temporary file left
    assert torch.equal(TaskVector.load(path)["w"], torch.zeros(2))


def test_norm_is_finite_when_it_exceeds_the_dtype():
    # Four float32 entries of 3e38: the norm, 6e38, is beyond float32 but finite as a Python float.
    tv = TaskVector({"w": torch.full((4,), 3.0e38), "v": torch.full((2,), 1.0e300, dtype=torch.float64)})
    expected = math.hypot(2 * float(torch.tensor(3.0e38)), math.sqrt(2) * 1.0e300)
    assert tv.norm() == pytest.approx(expected, rel=1e-6)
