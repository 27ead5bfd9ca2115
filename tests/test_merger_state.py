"""Merger state: complete validation of a loaded state, atomic updates (overflow included), tied tensors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn

from cl_plugin import TaskVector
from cl_plugin.errors import CheckpointError, ConfigError, NonFiniteError, StateDictMismatchError
from cl_plugin.merging import MERGERS, Merger, get_merger, merge

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
BIG = 3.0e38  # float32 holds at most 3.4028e38: two of these overflow a float32 sum


# -- helpers ---------------------------------------------------------------------------------
def stream(name: str, task_vectors, **options) -> Merger:
    merger = get_merger(name, **options)
    for tv in task_vectors:
        merger.update(tv)
    return merger


def good(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}


def snapshot(merger: Merger) -> dict:
    """A deep copy of everything the merger holds: its state dict and its private bounds."""
    state = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in merger.state_dict().items()}
    state["<bounds>"] = copy.deepcopy(merger._bounds)
    state["<layout>"] = copy.deepcopy(merger._layout)
    return state


def deep_equal(actual, expected) -> bool:
    """Equal keys, types and values; tensors bit for bit (NaN equal to NaN), with dtype, strides and device."""
    if isinstance(expected, Tensor):
        meta = ("dtype", "shape", "device", "layout")
        if not isinstance(actual, Tensor) or any(getattr(actual, k) != getattr(expected, k) for k in meta):
            return False
        if expected.device.type == "meta":
            return True
        if expected.layout != torch.strided:
            actual, expected = actual.to_dense(), expected.to_dense()
        elif actual.stride() != expected.stride():
            return False
        nan = actual.isnan()
        same_nan = torch.equal(nan, expected.isnan())
        return same_nan and torch.equal(actual.masked_fill(nan, 0), expected.masked_fill(nan, 0))
    if isinstance(expected, dict):
        same_keys = isinstance(actual, dict) and list(actual) == list(expected)
        return same_keys and all(deep_equal(actual[k], expected[k]) for k in expected)
    if isinstance(expected, (list, tuple)):
        same_length = type(actual) is type(expected) and len(actual) == len(expected)
        return same_length and all(map(deep_equal, actual, expected))
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return type(actual) is type(expected) and actual == expected


def deep_copy_state(state):
    if isinstance(state, dict):
        return {k: deep_copy_state(v) for k, v in state.items()}
    if isinstance(state, Tensor):
        return state.clone()
    return copy.deepcopy(state)


def assert_tensors_equal(actual, expected):
    assert list(actual) == list(expected)
    for n in expected:
        assert actual[n].dtype == expected[n].dtype, n
        assert torch.equal(actual[n], expected[n]), n


# -- corrupt states ------------------------------------------------------------------------------
def _set(key, value):
    def make(state):
        state[key] = value() if callable(value) else value
        return state

    return make


def _drop(*keys):
    def make(state):
        for k in keys:
            del state[k]
        return state

    return make


def _poke(key, index, value):
    """Set one entry of the tensor under ``key`` (in a copy)."""

    def make(state):
        t = state[key].clone()
        t.view(-1)[index] = value
        state[key] = t
        return state

    return make


def _retype(key, dtype):
    return lambda state: dict(state, **{key: state[key].to(dtype)})


def _rename_in_role(role, old, new):
    def make(state):
        state[f"{role}.{new}"] = state.pop(f"{role}.{old}")
        return state

    return make


def _only_meta(state):
    return {k: v for k, v in state.items() if not isinstance(v, Tensor)}


def _no_tensors(state):
    state = _only_meta(state)
    state["input_dtypes"] = {}
    return state


def _half_input_with_half_sum(state):
    state["input_dtypes"] = dict(state["input_dtypes"], a="float16")
    state["sum.a"] = state["sum.a"].half()
    return state


def _tensors_without_tasks(state):
    state["num_tasks"] = 0
    return state


def _alias_of_saved_name(state):
    state["aliases"] = {"b": "a"}
    return state


#: id -> (method, corrupt(state) -> state, error, message pattern). The source
#: state is the method's state after two good tasks.
CORRUPT = {
    # non-finite tensors
    "nan_magmax": (
        "magmax",
        _poke("merged.a", 4, float("nan")),
        CheckpointError,
        r"'merged.a' holds 1 NaN or infinite value\(s\)",
    ),
    "inf_sum": (
        "task_arithmetic",
        _poke("sum.b", 0, float("inf")),
        CheckpointError,
        r"'sum.b' holds 1 NaN or infinite",
    ),
    "nan_ties_sum": ("ties", _poke("neg_sum.a", 1, float("nan")), CheckpointError, r"'neg_sum.a' holds 1 NaN"),
    "neg_inf_opcm": (
        "opcm",
        _poke("merged.b", 2, float("-inf")),
        CheckpointError,
        r"'merged.b' holds 1 NaN or infinite",
    ),
    "inf_random": ("random", _poke("merged.a", 0, float("inf")), CheckpointError, r"'merged.a' holds 1"),
    # num_tasks
    "negative_num_tasks": (
        "average",
        _set("num_tasks", -1),
        CheckpointError,
        r"'num_tasks' must be an integer >= 0, got -1",
    ),
    "bool_num_tasks": (
        "magmax",
        _set("num_tasks", True),
        CheckpointError,
        r"'num_tasks' must be an integer >= 0, got True",
    ),
    "string_num_tasks": (
        "ties",
        _set("num_tasks", "2"),
        CheckpointError,
        r"'num_tasks' must be an integer >= 0, got '2'",
    ),
    "float_num_tasks": (
        "random",
        _set("num_tasks", 2.0),
        CheckpointError,
        r"'num_tasks' must be an integer >= 0, got 2.0",
    ),
    "tensors_but_no_task": (
        "magmax",
        _tensors_without_tasks,
        CheckpointError,
        r"'num_tasks' is 0 but the state holds 2 tensor name\(s\)",
    ),
    "tasks_but_no_tensors": (
        "task_arithmetic",
        _no_tensors,
        CheckpointError,
        r"'num_tasks' is 2 but the state holds 0 tensor name\(s\)",
    ),
    # dtypes by role
    "same_role_dtype": (
        "magmax",
        _retype("merged.a", torch.float64),
        CheckpointError,
        r"'merged.a' must be torch.float32 \(role 'merged' is 'same'.*got torch.float64",
    ),
    "accumulate_role_dtype": (
        "task_arithmetic",
        _half_input_with_half_sum,
        CheckpointError,
        r"'sum.a' must be torch.float32 \(role 'sum' is 'accumulate' and the input was torch.float16\), got torch.float16",
    ),
    "count_role_int64": (
        "ties",
        _retype("pos_count.a", torch.int64),
        CheckpointError,
        r"'pos_count.a' must be torch.int32 .*got torch.int64",
    ),
    "float_counts": (
        "ties",
        _retype("neg_count.b", torch.float32),
        CheckpointError,
        r"'neg_count.b' must be torch.int32 .*got torch.float32",
    ),
    "count_wrong_shape": (
        "ties",
        _set("pos_count.a", lambda: torch.zeros(3, 2, dtype=torch.int32)),
        CheckpointError,
        r"'pos_count.a' has shape \(3, 2\), but pos_sum.a has \(2, 3\)",
    ),
    "not_a_tensor": (
        "magmax",
        _set("merged.a", [[0.0] * 3] * 2),
        CheckpointError,
        r"'merged.a' must be a dense tensor, got list",
    ),
    "sparse_tensor": (
        "average",
        lambda s: dict(s, **{"sum.b": s["sum.b"].to_sparse()}),
        CheckpointError,
        r"'sum.b' must be a dense tensor, got torch.sparse_coo",
    ),
    "meta_tensor": (
        "magmax",
        _set("merged.b", lambda: torch.empty(3, device="meta")),
        CheckpointError,
        r"'merged.b' is on the meta device",
    ),
    # TIES consistency
    "ties_count_above_num_tasks": (
        "ties",
        _poke("pos_count.a", 0, 5),
        CheckpointError,
        r"'pos_count.a' holds counts in \[0, 5\]; they must lie in \[0, num_tasks=2\]",
    ),
    "ties_negative_count": (
        "ties",
        _poke("neg_count.b", 1, -1),
        CheckpointError,
        r"'neg_count.b' holds counts in \[-1, ",
    ),
    "ties_counts_sum_above_num_tasks": (
        "ties",
        lambda s: _poke("neg_count.a", 0, 2)(_poke("pos_count.a", 0, 2)(s)),
        CheckpointError,
        r"'pos_count.a' \+ 'neg_count.a' exceed num_tasks=2",
    ),
    "ties_positive_sum_negative": (
        "ties",
        _poke("pos_sum.b", 0, -1.0),
        CheckpointError,
        r"'pos_sum.b' holds values of the wrong sign",
    ),
    # OPCM scalars
    "opcm_norm_sum_string": (
        "opcm",
        _set("norm_sum", "x"),
        CheckpointError,
        r"'norm_sum' must be a finite real number, got 'x'",
    ),
    "opcm_lambda_nan": (
        "opcm",
        _set("lambda_t", float("nan")),
        CheckpointError,
        r"'lambda_t' must be a finite real number, got nan",
    ),
    "opcm_lambda_inf": (
        "opcm",
        _set("lambda_t", float("inf")),
        CheckpointError,
        r"'lambda_t' must be a finite real number, got inf",
    ),
    "opcm_lambda_negative": ("opcm", _set("lambda_t", -0.5), CheckpointError, r"'lambda_t' must be >= 0, got -0.5"),
    "opcm_lambda_bool": (
        "opcm",
        _set("lambda_t", True),
        CheckpointError,
        r"'lambda_t' must be a finite real number, got True",
    ),
    "opcm_norm_sum_negative": ("opcm", _set("norm_sum", -1.0), CheckpointError, r"'norm_sum' must be >= 0, got -1.0"),
    "opcm_norm_sum_zero_with_tasks": (
        "opcm",
        _set("norm_sum", 0.0),
        CheckpointError,
        r"'norm_sum' is 0, so every folded task vector was zero, but the merged tensors are not",
    ),
    # keys
    "missing_input_dtypes": (
        "random",
        _drop("input_dtypes"),
        CheckpointError,
        r"missing keys \['input_dtypes'\], unexpected keys \[\]",
    ),
    "missing_scalar": ("opcm", _drop("norm_sum"), CheckpointError, r"missing keys \['norm_sum'\]"),
    "unexpected_key": ("magmax", _set("extra", 1), CheckpointError, r"unexpected keys \['extra'\]"),
    "unexpected_role": (
        "average",
        _set("merged.a", lambda: torch.zeros(2, 3)),
        CheckpointError,
        r"unexpected keys \['merged.a'\]",
    ),
    "non_string_key": ("magmax", _set(3, 1), CheckpointError, r"unexpected keys \[3\]"),
    "names_differ_per_role": (
        "ties",
        _rename_in_role("pos_sum", "b", "c"),
        CheckpointError,
        r"missing keys \['pos_sum.b', 'neg_sum.c', 'pos_count.c', 'neg_count.c'\]",
    ),
    "method_missing": (
        "magmax",
        _drop("method"),
        CheckpointError,
        r"`method` must name a merging method, got '<missing>'",
    ),
    "method_not_a_string": (
        "magmax",
        _set("method", 3),
        CheckpointError,
        r"`method` must name a merging method, got 3",
    ),
    "options_not_a_mapping": (
        "ties",
        _set("options", [0.3]),
        CheckpointError,
        r"`options` must be a mapping .*got \[0.3\]",
    ),
    # input_dtypes
    "input_dtype_unknown": (
        "magmax",
        _set("input_dtypes", {"a": "float33", "b": "float32"}),
        CheckpointError,
        r"'input_dtypes' names 'float33' for 'a'; expected a floating-point dtype",
    ),
    "input_dtype_integer": (
        "average",
        _set("input_dtypes", {"a": "float32", "b": "int64"}),
        CheckpointError,
        r"'input_dtypes' names 'int64' for 'b'",
    ),
    "input_dtype_not_a_string": (
        "random",
        _set("input_dtypes", {"a": torch.float32, "b": "float32"}),
        CheckpointError,
        r"'input_dtypes' names torch.float32 for 'a'",
    ),
    "input_dtypes_not_a_mapping": (
        "magmax",
        _set("input_dtypes", ["float32", "float32"]),
        CheckpointError,
        r"'input_dtypes' must map tensor names to dtype names, got list",
    ),
    "input_dtypes_lack_a_name": (
        "task_arithmetic",
        lambda s: dict(s, input_dtypes={"a": "float32"}),
        CheckpointError,
        r"'input_dtypes' lacks 'b'",
    ),
    "input_dtypes_extra_name": (
        "magmax",
        lambda s: dict(s, input_dtypes={**s["input_dtypes"], "c": "float32"}),
        CheckpointError,
        r"missing keys \['merged.c'\]",
    ),
    # format_version, scale
    "format_version_newer": (
        "ties",
        _set("format_version", 99),
        CheckpointError,
        r"format_version 99, newer than this cl-plugin understands \(1\); upgrade cl-plugin",
    ),
    "format_version_string": (
        "magmax",
        _set("format_version", "1"),
        CheckpointError,
        r"`format_version` must be a positive integer, got '1'",
    ),
    "format_version_zero": (
        "opcm",
        _set("format_version", 0),
        CheckpointError,
        r"`format_version` must be a positive integer, got 0",
    ),
    "scale_out_of_range": (
        "magmax",
        _set("scale", -1.0),
        CheckpointError,
        r"'scale' must be None or a real number in \(0, 10\]",
    ),
    "scale_string": (
        "average",
        _set("scale", "0.5"),
        CheckpointError,
        r"'scale' must be None or a real number in \(0, 10\]",
    ),
    # aliases
    "alias_has_tensors": (
        "magmax",
        _alias_of_saved_name,
        CheckpointError,
        r"'aliases' ties 'b' to 'a', but the state holds tensors for 'b'",
    ),
    "alias_of_unknown_name": (
        "ties",
        _set("aliases", {"head": "embed"}),
        CheckpointError,
        r"'aliases' ties 'head' to 'embed', but the state has no tensor 'embed'",
    ),
    "aliases_not_a_mapping": (
        "random",
        _set("aliases", ["head"]),
        CheckpointError,
        r"'aliases' must map tied names to canonical names, got list",
    ),
    "alias_not_a_string": (
        "opcm",
        _set("aliases", {"head": 3}),
        CheckpointError,
        r"'aliases' must map names to names, got 'head': 3",
    ),
    # sound states written with other settings
    "other_method": (
        "ties",
        _set("method", "magmax"),
        ConfigError,
        r"This state belongs to the merger 'magmax', not 'ties'",
    ),
    "other_options": (
        "opcm",
        _set("options", {"alpha": 0.3}),
        ConfigError,
        r"used options \{'alpha': 0.3\}, this one has \{'alpha': 0.5\} \(`alpha`: saved 0.3, here 0.5\)",
    ),
    "unknown_option": (
        "ties",
        _set("options", {"top_k": 0.3, "topk": 1}),
        ConfigError,
        r"`topk`: saved 1, here '<not set>'",
    ),
}


def test_the_corrupt_state_table_covers_every_method():
    assert len(CORRUPT) >= 25
    assert {method for method, *_ in CORRUPT.values()} == set(METHODS)


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_state_raises_and_changes_nothing(case):
    method, corrupt, error, pattern = CORRUPT[case]
    options = METHOD_OPTIONS[method]
    source = stream(method, [good(0), good(1)], **options)
    bad = corrupt(deep_copy_state(source.state_dict()))
    bad_before = deep_copy_state(bad)
    target = stream(method, [good(2)], **options)
    before = snapshot(target)
    with pytest.raises(error, match=pattern):
        target.load_state_dict(bad)
    assert deep_equal(snapshot(target), before)
    assert deep_equal(bad, bad_before)  # the state handed in is not modified either
    # A good update still works, exactly as if the load had never been tried.
    target.update(good(3))
    assert target.num_tasks == 2
    assert_tensors_equal(target.merged(), stream(method, [good(2), good(3)], **options).merged())


@pytest.mark.parametrize("name", METHODS)
def test_corrupt_state_into_a_fresh_merger_leaves_it_fresh(name):
    options = METHOD_OPTIONS[name]
    state = deep_copy_state(stream(name, [good(0), good(1)], **options).state_dict())
    state["num_tasks"] = -3
    fresh = get_merger(name, **options)
    with pytest.raises(CheckpointError, match="'num_tasks' must be an integer >= 0"):
        fresh.load_state_dict(state)
    assert fresh.num_tasks == 0 and fresh.device is None
    with pytest.raises(ConfigError, match="no task yet"):
        fresh.merged()


# -- good states ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("stop", [1, 3])
def test_loaded_state_continues_bit_identically(name, stop, make_task_vectors):
    tvs = make_task_vectors(6, seed=71)
    options = METHOD_OPTIONS[name]
    uninterrupted = stream(name, tvs, **options)

    buffer = io.BytesIO()
    torch.save(stream(name, tvs[:stop], **options).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # Loaded into a merger that already holds another stream (and after a refused load).
    resumed = stream(name, make_task_vectors(2, seed=5), **options)
    with pytest.raises(CheckpointError):
        resumed.load_state_dict(dict(state, num_tasks="x"))
    resumed.load_state_dict(state)
    for tv in tvs[stop:]:
        resumed.update(tv)
    assert resumed.num_tasks == uninterrupted.num_tasks == 6
    assert_tensors_equal(resumed.merged(), uninterrupted.merged())
    for key, value in uninterrupted.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(resumed.state_dict()[key], value), key
        else:
            assert resumed.state_dict()[key] == value, key


@pytest.mark.parametrize("name", METHODS)
def test_non_contiguous_state_tensors_are_accepted_and_made_contiguous(name):
    options = METHOD_OPTIONS[name]
    tvs = [good(0), good(1), good(2)]
    state = deep_copy_state(stream(name, tvs[:2], **options).state_dict())
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.dim() == 2:
            state[key] = value.mT.contiguous().mT
            assert not state[key].is_contiguous()
    resumed = get_merger(name, **options)
    resumed.load_state_dict(state)
    assert all(t.is_contiguous() for t in resumed.state_dict().values() if isinstance(t, Tensor))
    resumed.update(tvs[2])
    assert_tensors_equal(resumed.merged(), stream(name, tvs, **options).merged())


def test_optional_keys_take_their_defaults():
    # format_version: 1; aliases: none; scale: the loading merger's own.
    state = deep_copy_state(stream("ties", [good(0), good(1)], top_k=0.3).state_dict())
    del state["format_version"], state["aliases"], state["scale"]
    resumed = get_merger("ties", top_k=0.3, scale=0.8)
    resumed.load_state_dict(state)
    assert resumed.num_tasks == 2 and resumed.merged().aliases == {} and resumed.scale == 0.8
    # A saved scale is restored.
    resumed.load_state_dict(stream("ties", [good(0)], top_k=0.3, scale=0.25).state_dict())
    assert resumed.scale == 0.25


def test_opcm_state_of_zero_task_vectors_loads():
    # Zero task vectors are legal input: norm_sum 0 with tasks is sound when the merged vector is 0 too.
    merger = stream("opcm", [{"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 2)}])
    state = merger.state_dict()
    assert state["norm_sum"] == 0.0 and state["num_tasks"] == 2
    get_merger("opcm").load_state_dict(state)


# -- atomic updates: overflow ------------------------------------------------------------------------
def _assert_update_refused(merger: Merger, bad, pattern: str):
    before = snapshot(merger)
    with pytest.raises(NonFiniteError, match=pattern):
        merger.update(bad)
    assert deep_equal(snapshot(merger), before)


@pytest.mark.parametrize("name", ["task_arithmetic", "average"])
def test_a_sum_that_would_overflow_is_refused_and_changes_nothing(name):
    tvs = [
        {"a": torch.ones(2), "w": torch.tensor([BIG, 1.0, -2.0])},
        {"a": torch.ones(2), "w": torch.tensor([1.0, 2.0, -BIG])},
    ]
    merger = stream(name, tvs)
    _assert_update_refused(
        merger,
        {"a": torch.ones(2), "w": torch.tensor([BIG, 0.0, 0.0])},
        r"task 3: folding tensor 'w' would overflow float32 in the 'sum' state: the task vector is finite",
    )
    bad = {"a": torch.ones(2), "w": torch.tensor([0.0, 0.0, -BIG])}
    _assert_update_refused(merger, bad, r"tensor 'w' would overflow")
    # Entries that stay in range still fold: the check is exact once the bound is passed.
    merger.update({"a": torch.ones(2), "w": torch.tensor([-BIG, 3.0, BIG])})
    assert merger.num_tasks == 3
    # BIG + 1 rounds to BIG and -2 - BIG to -BIG, so the large entries cancel exactly.
    expected = {"task_arithmetic": [0.0, 6.0, 0.0], "average": [0.0, 2.0, 0.0]}[name]
    torch.testing.assert_close(merger.merged()["w"], torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos_sum", "neg_sum"])
def test_ties_sum_that_would_overflow_is_refused(sign):
    merger = stream("ties", [{"w": torch.tensor([sign * BIG, 1.0])}], top_k=1.0)
    role = "pos_sum" if sign > 0 else "neg_sum"
    pattern = rf"folding tensor 'w' would overflow float32 in the '{role}' state"
    _assert_update_refused(merger, {"w": torch.tensor([sign * BIG, 1.0])}, pattern)
    merger.update({"w": torch.tensor([-sign * BIG, 1.0])})  # the other sign goes to the other sum
    assert merger.num_tasks == 2


def test_ties_does_not_count_a_large_entry_it_trims():
    # top_k = 0.5 on d = 4 keeps |x| >= the 2nd smallest magnitude. Task 2's 1e38
    # is trimmed, so pos_sum[0] = 3e38 stays in range although 3e38 + 1e38 would not.
    tvs = [{"w": torch.tensor([BIG, 1.0, 2.0, 3.0])}, {"w": torch.tensor([1.0e38, BIG, 2.0e38, 2.5e38])}]
    out = merge("ties", tvs, top_k=0.5)["w"]
    assert torch.equal(out, torch.tensor([BIG, BIG, 1.0e38 + 1.0, 1.25e38 + 1.5]))


def test_opcm_update_that_would_overflow_is_refused():
    merger = stream("opcm", [{"b": torch.tensor([BIG, 0.0]), "w": torch.eye(2)}])
    pattern = r"'opcm' merger, task 2: the update of tensor 'b' overflows float32"
    _assert_update_refused(merger, {"b": torch.tensor([BIG, 0.0]), "w": torch.eye(2)}, pattern)
    merger.update({"b": torch.tensor([0.0, 1.0]), "w": torch.eye(2)})
    assert merger.num_tasks == 2 and all(torch.isfinite(t).all() for t in merger.merged().values())


@pytest.mark.parametrize("name", ["magmax", "random"])
def test_selections_of_large_values_never_overflow(name):
    tvs = [{"w": torch.tensor([BIG, -BIG])}, {"w": torch.tensor([-3.4e38, BIG])}, {"w": torch.tensor([BIG, 3.4e38])}]
    out = merge(name, tvs)["w"]
    assert bool(torch.isfinite(out).all())


def test_the_overflow_bound_is_recomputed_on_load():
    state = stream("task_arithmetic", [{"w": torch.tensor([BIG])}]).state_dict()
    resumed = get_merger("task_arithmetic")
    resumed.load_state_dict(state)
    assert resumed._bounds == {"sum": {"w": BIG_F32}}
    _assert_update_refused(resumed, {"w": torch.tensor([BIG])}, r"tensor 'w' would overflow float32")


BIG_F32 = float(torch.tensor(BIG))


@pytest.mark.parametrize("name", ["task_arithmetic", "average", "ties"])
def test_ordinary_updates_never_pay_for_the_exact_check(name, monkeypatch, make_task_vectors):
    cls = MERGERS[name]

    def fail(self, tv, keys):
        raise AssertionError(f"exact overflow check run for {keys}")

    monkeypatch.setattr(cls, "_fold_max_abs", fail)
    merger = stream(name, make_task_vectors(20, seed=3), **METHOD_OPTIONS[name])
    assert merger.num_tasks == 20
    # The bound is an upper bound of the state's magnitudes.
    for role in cls.summed_roles:
        for n, bound in merger._bounds[role].items():
            assert float(merger._state[role][n].abs().max()) <= bound, (role, n)


def test_merged_16_bit_result_that_overflows_raises_and_keeps_the_state():
    tvs = [{"w": torch.tensor([40000.0, 1.0], dtype=torch.float16)}] * 2
    merger = stream("task_arithmetic", tvs)
    before = snapshot(merger)
    pattern = r"tensor 'w': the merged value overflows float16; its largest magnitude is 80000"
    with pytest.raises(NonFiniteError, match=pattern):
        merger.merged()
    with pytest.raises(NonFiniteError, match="overflows float16"):
        merger.apply_to({"w": torch.zeros(2, dtype=torch.float16)})
    assert deep_equal(snapshot(merger), before)
    assert float(merger.state_dict()["sum.w"][0]) == 80000.0  # kept in float32
    # The mean stays in range.
    assert torch.equal(merge("average", tvs)["w"], torch.tensor([40000.0, 1.0], dtype=torch.float16))
    merger.update({"w": torch.tensor([-48000.0, 0.0], dtype=torch.float16)})
    assert torch.equal(merger.merged()["w"], torch.tensor([32000.0, 2.0], dtype=torch.float16))


@pytest.mark.parametrize("name", METHODS)
def test_a_failed_first_update_leaves_the_merger_empty(name, monkeypatch):
    cls = MERGERS[name]

    def broken(self, tv):
        for tensors in self._state.values():
            for t in tensors.values():
                t.fill_(1)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cls, "_fold", broken)
    merger = get_merger(name, **METHOD_OPTIONS[name])
    before = snapshot(merger)
    with pytest.raises(RuntimeError, match="out of memory"):
        merger.update(good(0))
    assert deep_equal(snapshot(merger), before) and merger.device is None


# -- tied tensors ------------------------------------------------------------------------------------
class TiedNet(nn.Module):
    """An embedding whose table is also the output layer's weight (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def tied_net(seed: int) -> TiedNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TiedNet()


def tied_task_vectors(n: int) -> list[TaskVector]:
    base = tied_net(0)
    return [TaskVector.between(tied_net(seed), base) for seed in range(1, n + 1)]


TIE = {"head.weight": "embed.weight"}


@pytest.mark.parametrize("name", METHODS)
def test_a_tied_tensor_is_stored_and_folded_once(name):
    tvs = tied_task_vectors(3)
    assert dict(tvs[0].aliases) == TIE
    merger = stream(name, tvs, **METHOD_OPTIONS[name])
    state = merger.state_dict()
    assert state["aliases"] == TIE
    assert not any(k.endswith(".head.weight") for k in state)
    assert all(f"{role}.embed.weight" in state for role in MERGERS[name].tensor_states)
    merged = merger.merged()
    assert dict(merged.aliases) == TIE and list(merged) == ["embed.weight", "mix.weight", "mix.bias"]
    assert merged["head.weight"] is merged["embed.weight"]
    # The same result as merging the vectors without their tie, for the canonical name.
    untied = [TaskVector(dict(tv)) for tv in tvs]
    assert_tensors_equal(merged, stream(name, untied, **METHOD_OPTIONS[name]).merged())


def test_random_merge_gives_one_value_for_both_tied_names():
    base = tied_net(0)
    merged = merge("random", tied_task_vectors(4), seed=1)
    out = merged.apply_to(base.state_dict())
    assert out["head.weight"] is out["embed.weight"]
    module = tied_net(0)
    merged.apply_to(module)
    assert module.head.weight is module.embed.weight
    assert torch.equal(module.embed.weight, out["embed.weight"])


@pytest.mark.parametrize("name", METHODS)
def test_tied_state_round_trip(name):
    tvs = tied_task_vectors(3)
    options = METHOD_OPTIONS[name]
    buffer = io.BytesIO()
    torch.save(stream(name, tvs[:2], **options).state_dict(), buffer)
    buffer.seek(0)
    resumed = get_merger(name, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert dict(resumed.merged().aliases) == TIE
    resumed.update(tvs[2])
    assert_tensors_equal(resumed.merged(), stream(name, tvs, **options).merged())
    assert dict(resumed.merged().aliases) == TIE


def test_a_later_task_vector_with_other_ties_is_refused():
    tvs = tied_task_vectors(2)
    merger = stream("magmax", tvs[:1])
    before = snapshot(merger)
    untied = dict(tvs[1]) | {"head.weight": tvs[1]["embed.weight"] + 1.0}
    with pytest.raises(StateDictMismatchError, match=r"tensors under the two names differ"):
        merger.update(untied)
    pattern = r"task 2: the task vectors tie different names \('head.weight': tied to 'embed.weight' vs not tied\)"
    with pytest.raises(StateDictMismatchError, match=pattern):
        merger.update(TaskVector(untied))
    assert deep_equal(snapshot(merger), before)
    # A plain mapping that lists the tied name with the same values is read in the first task's terms.
    merger.update(dict(tvs[1]) | {"head.weight": tvs[1]["embed.weight"].clone()})
    assert merger.num_tasks == 2
