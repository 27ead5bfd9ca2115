"""Merge fine-tuned copies of a timm model with every method in cl-plugin.

A user with several fine-tuned checkpoints of one pretrained model wants one
model. Here the "checkpoints" come from a few steps of SGD on three different
synthetic tasks, so the script runs anywhere in seconds; with real checkpoints,
replace ``finetune`` by ``safetensors.torch.load_file(path)``.

    python examples/merge_state_dicts.py [--steps 40]
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from torch import nn

from cl_plugin import TaskVector
from cl_plugin.merging import MERGERS, get_merger
from cl_plugin.merging.fisher import diagonal_fisher


def build_model() -> nn.Module:
    # pretrained=True loads timm's weights; this example must run offline.
    return timm.create_model("resnet10t", pretrained=False, num_classes=4)


QUADRANTS = [(slice(0, 16), slice(0, 16)), (slice(0, 16), slice(16, 32)),
             (slice(16, 32), slice(0, 16)), (slice(16, 32), slice(16, 32))]


def task_batch(task: int, generator: torch.Generator, size: int = 32):
    """Task ``task``: the label says which quadrant of channel ``task`` is bright."""
    x = torch.randn(size, 3, 32, 32, generator=generator)
    y = torch.randint(0, 4, (size,), generator=generator)
    for i, label in enumerate(y.tolist()):
        rows, cols = QUADRANTS[(label + task) % 4]
        x[i, task, rows, cols] += 2.0
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, task: int) -> float:
    x, y = task_batch(task, torch.Generator().manual_seed(1000 + task), size=256)
    return float((model.eval()(x).argmax(1) == y).float().mean())


def finetune(model: nn.Module, task: int, steps: int = 40) -> dict[str, torch.Tensor]:
    """A few SGD steps on one synthetic task, starting from ``model``."""
    model = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x, y = task_batch(task, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="SGD steps of each fine-tuning")
    args = parser.parse_args()
    torch.manual_seed(0)
    pretrained = build_model()
    base = pretrained.state_dict()
    finetuned = [finetune(pretrained, task, steps=args.steps) for task in range(3)]
    task_vectors = [TaskVector.between(ft, base) for ft in finetuned]
    print(task_vectors[0])
    for task, weights in enumerate(finetuned):
        model = build_model()
        model.load_state_dict(weights)
        print(f"fine-tuned on task {task}: accuracy on it {accuracy(model, task):.2f}")
    print(f"pretrained: accuracy per task {' '.join(f'{accuracy(pretrained, t):.2f}' for t in range(3))}")

    # Fisher merging weighs each task by its diagonal Fisher, estimated on the task's own data
    # (buffers such as BatchNorm statistics have no gradient: they are weighed uniformly).
    fishers = []
    for task, weights in enumerate(finetuned):
        model = build_model()
        model.load_state_dict(weights)
        generator = torch.Generator().manual_seed(500 + task)
        batches = [task_batch(task, generator) for _ in range(4)]
        fisher = diagonal_fisher(model.eval(), batches, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
        fishers.append({n: fisher[n] if n in fisher else torch.ones_like(t) for n, t in task_vectors[task].items()})

    for name, cls in MERGERS.items():
        merger = get_merger(name)
        for tv, fisher in zip(task_vectors, fishers):
            # streaming: one task at a time, constant memory
            merger.update(tv, **({"fisher": fisher} if cls.requires_fisher else {}))
        merged_weights = merger.apply_to(base)  # base + default scale * merged
        model = build_model()
        model.load_state_dict(merged_weights)
        accs = [accuracy(model, task) for task in range(3)]
        print(
            f"{name:16s} scale {merger.scale:<5g} |merged| {merger.merged().norm():6.3f}  "
            f"accuracy per task {' '.join(f'{a:.2f}' for a in accs)}  mean {sum(accs) / 3:.3f}"
        )


if __name__ == "__main__":
    main()
