"""Small seeded fixtures shared by the test files."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

#: A state dict's worth of shapes: non-square 2-D weights, 1-D biases, a 4-D
#: convolution weight and a 3-D tensor.
TASK_VECTOR_SHAPES = {
    "conv.weight": (4, 3, 3, 3),
    "conv.bias": (4,),
    "attn.in_proj": (3, 5, 2),
    "fc1.weight": (7, 5),
    "fc1.bias": (7,),
    "fc2.weight": (3, 7),
}


def random_task_vectors(
    n_tasks: int,
    *,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """``n_tasks`` seeded task vectors (plain dicts); each tensor has its own magnitude."""
    shapes = TASK_VECTOR_SHAPES if shapes is None else shapes
    g = torch.Generator().manual_seed(seed)
    scales = {name: 0.5 + i / 2 for i, name in enumerate(shapes)}
    return [
        {name: (torch.randn(shape, generator=g) * scales[name]).to(dtype) for name, shape in shapes.items()}
        for _ in range(n_tasks)
    ]


@pytest.fixture
def make_task_vectors():
    """The factory :func:`random_task_vectors`."""
    return random_task_vectors


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> Linear: float parameters, float buffers and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture
def make_tiny_net():
    """Factory: ``make_tiny_net(seed)`` builds a :class:`TinyNet` with seeded weights."""

    def make(seed: int = 0) -> TinyNet:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = TinyNet()
            with torch.no_grad():
                net.bn.running_mean.normal_()
                net.bn.running_var.uniform_(0.5, 2.0)
        return net

    return make


# The test models are tiny: one intra-op thread is faster than two on the 2-core
# machines, and processes spawned for DDP would otherwise oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
