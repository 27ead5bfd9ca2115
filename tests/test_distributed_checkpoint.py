"""The distributed-checkpoint route of the callbacks' sharded state: what runs without a process group.

The route itself (DTensors written rank by rank, read back, resharded) runs in
2-process Trainers in tests/test_sharded_merge.py; here, the references left
in a callback's state and the errors of a checkpoint that cannot be read back.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_plugin._distributed_checkpoint import PLACEHOLDER, extract_dtensors, has_placeholders, restore_placeholders
from cl_plugin.callbacks import ModelMerging
from cl_plugin.errors import CheckpointError


def reference(key="k", shape=(3, 2), dtype="float32"):
    return {PLACEHOLDER: key, "shape": list(shape), "dtype": dtype}


def test_plain_tensors_stay_in_the_state_and_nothing_is_moved():
    state = {"theta0": {"w": torch.ones(2)}, "log": [{"scale": 0.5}], "n": 3}
    store = {}
    assert extract_dtensors(state, store, "_cl_plugin.X.") == 0
    assert store == {} and torch.equal(state["theta0"]["w"], torch.ones(2))
    assert not has_placeholders(state)


def test_a_reference_is_found_at_any_depth():
    assert has_placeholders({"merger": {"sum.w": reference()}})
    assert has_placeholders({"log": [{"a": reference()}]})
    assert not has_placeholders({"merger": {"sum.w": {"shape": [1]}}})
    assert not has_placeholders(None)


@pytest.mark.parametrize(
    "entry",
    [
        reference(shape="x"),
        reference(shape=()),
        reference(dtype="Linear"),
        reference(dtype="not_a_dtype"),
        {PLACEHOLDER: "k", "shape": [2]},
    ],
)
def test_a_malformed_reference_is_refused_before_anything_is_read(tmp_path, entry):
    with pytest.raises(CheckpointError, match="malformed reference"):
        restore_placeholders({"theta0": {"w": entry}}, tmp_path, mesh=None, dim=0, owner="ModelMerging")


def test_a_state_kept_in_a_distributed_checkpoint_needs_a_sharded_model_to_come_back(tmp_path):
    # e.g. a checkpoint written under ModelParallelStrategy, resumed under DDP or on one process without fully_shard
    callback = ModelMerging("magmax")
    checkpoint = {"callbacks": {"ModelMerging": {"theta0": {"weight": reference(shape=(2, 2))}}}}
    trainer = SimpleNamespace(ckpt_path=str(tmp_path))
    with pytest.raises(CheckpointError, match="ModelParallelStrategy.*fully_shard"):
        callback.on_load_checkpoint(trainer, nn.Linear(2, 2), checkpoint)
