"""Helpers shared by the merger tests: copying a merger's state and comparing two states exactly."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from cl_plugin.merging import Merger


def snapshot(merger: Merger) -> dict:
    """A deep copy of the merger's state (its live tensors are cloned)."""
    return {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in merger.state_dict().items()}


def assert_same_state(actual: dict, expected: dict):
    """The same keys in the same order, tensors of the same dtype and bits, other values equal."""
    assert list(actual) == list(expected)
    for k, v in expected.items():
        if isinstance(v, Tensor):
            assert actual[k].dtype == v.dtype and torch.equal(actual[k], v), k
        else:
            assert actual[k] == v, k
