"""Run by test_sharded_merge.py: the boundary core sharded over W gloo processes against the unsharded merge.

``python sharded_merge_script.py OUT W MODE`` starts W processes. Each builds
the same seeded model and the same sequence of fine-tuned weights, merges them
with :class:`ContinualMerge` on its slice of every tensor (MODE ``split``: the
replicated weights split by the core, as under DDP; ``fsdp2``: parameters
sharded by FSDP2's ``fully_shard``), and rank 0 writes, per method, whether
the merged weights equal the unsharded merge of the same task vectors bit for
bit, and the same after a state saved by the sharded core is loaded into a
new one mid-stream. A negative control (TIES with a per-rank threshold) must
differ.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from cl_plugin._distributed_checkpoint import is_dtensor, shard_mesh_dim, sharded_view

from cl_plugin.merging.continual import ContinualMerge
from cl_plugin.merging.layout import ShardLayout

METHODS = {
    "magmax": {},
    "average": {},
    "task_arithmetic": {},
    "random": {"seed": 3},
    "ties": {"top_k": 0.3},
    "opcm": {"alpha": 0.5},
    "dop": {"num_steps": 3},
    "task_arithmetic+dare": {"dare": 0.3, "dare_seed": 1},
}
N_TASKS = 4


class Net(nn.Module):
    """Uneven shapes: rows not divisible by 2 or 3, a tensor smaller than the world (empty shards), a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 11)
        self.norm = nn.BatchNorm1d(11)
        self.b = nn.Linear(11, 5)
        self.tiny = nn.Parameter(torch.zeros(2))
        self.wide = nn.Parameter(torch.zeros(3, 13))


def fine_tuned(model: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """The weights after task ``task``: θ₀ plus a seeded, per-tensor-scaled change (the same on every rank)."""
    g = torch.Generator().manual_seed(100 + task)
    out = {}
    for i, (n, t) in enumerate(model.state_dict().items()):
        if not t.is_floating_point():
            out[n] = t.clone()
            continue
        delta = torch.randn(t.shape, generator=g) * (0.1 + 0.05 * i)
        if n.endswith("running_var"):
            delta = delta.abs()
        out[n] = t + delta
    return out


def write_full(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set every rank's part of the model to ``weights`` (whole tensors)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    with torch.no_grad():
        for n, t in state.items():
            if isinstance(t, DTensor):
                local = t.to_local()
                rows = local.shape[0]
                start = _row_offset(t)
                local.copy_(weights[n][start : start + rows])
            else:
                t.copy_(weights[n])


def _row_offset(t) -> int:
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(t.device_mesh.size(0))]
    dist.all_gather(sizes, torch.tensor([t.to_local().shape[0]]), group=t.device_mesh.get_group(0))
    return int(sum(s for s in sizes[: t.device_mesh.get_local_rank(0)]))


def whole(core: ContinualMerge, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on every rank from this rank's slices."""
    # Independent of the core's own gathering (ShardLayout.complete_in_place): a padded all_gather of
    # every rank's slice with its offset, concatenated in offset order.
    layout = core.layout
    out = {}
    for n, t in tensors.items():
        shard = layout[n]
        local = t.reshape(-1)
        meta = torch.tensor([shard.start, local.numel()])
        metas = [torch.zeros_like(meta) for _ in range(layout.world)]
        dist.all_gather(metas, meta, group=layout.group)
        width = max(int(m[1]) for m in metas) or 1
        padded = torch.zeros(width, dtype=t.dtype)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(layout.world)]
        dist.all_gather(parts, padded, group=layout.group)
        buf = torch.empty(shard.numel, dtype=t.dtype)
        for (start, size), part in zip((m.tolist() for m in metas), parts):
            buf[start : start + size] = part[:size]
        out[n] = buf.reshape(shard.shape)
    return out


def reference(method: str, options: dict, theta0: dict, tasks: list[dict], statistics: list[str]) -> dict:
    core = ContinualMerge(method.split("+")[0], method_options=options)
    weights = {n: t for n, t in theta0.items() if t.is_floating_point()}
    core.names = [n for n in weights if n not in statistics]
    core.statistic_names = [n for n in weights if n in statistics]
    core.theta0 = {n: weights[n].clone() for n in core.all_names}
    from cl_plugin.task_vectors import TaskVector

    for t in tasks:
        core.fold(TaskVector.between({n: t[n] for n in core.all_names}, core.theta0))
    return core.merged_tensors()


def make_model(mode: str, world: int):
    torch.manual_seed(0)
    model = Net()
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for sub in (model.a, model.b):
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def check_collectives(rank: int, world: int) -> dict[str, bool]:
    """ShardLayout's bucketed broadcasts on mixed dtypes, empty ranges and whole placements, against known values."""
    import cl_plugin.merging.layout as layout_module

    shapes = {"a": (5,), "b": (37,), "c": (2, 3), "d": (1,), "e": (4, 4)}
    dtypes = {"a": torch.float32, "b": torch.bfloat16, "c": torch.bfloat16, "d": torch.float64, "e": torch.float32}
    layout = ShardLayout.split(shapes, rank, world, whole_on={"e": world - 1})
    expected = {n: torch.arange(math.prod(s), dtype=dtypes[n]) + 100 * i for i, (n, s) in enumerate(shapes.items())}
    complete = {n: torch.full((e.numel(),), -1.0, dtype=e.dtype) for n, e in expected.items()}
    for n, t in complete.items():  # each rank knows only its own range
        t[layout[n].start : layout[n].stop] = expected[n][layout[n].start : layout[n].stop]
    owners = {n: i % world for i, n in enumerate(shapes)}
    shared = {n: (e.clone() if owners[n] == rank else torch.zeros_like(e)) for n, e in expected.items()}
    saved = layout_module.BROADCAST_BUCKET_NUMEL
    try:
        layout_module.BROADCAST_BUCKET_NUMEL = 8  # "b" alone, the others packed, flushed on dtype changes
        layout.complete_in_place(complete)
        layout.share_from_owners(shared, owners)
    finally:
        layout_module.BROADCAST_BUCKET_NUMEL = saved
    return {
        "complete_in_place": all(torch.equal(complete[n], expected[n]) for n in expected),
        "share_from_owners": all(torch.equal(shared[n], expected[n]) for n in expected),
        "whole_on_owner": layout.holds_whole("e", world - 1) and (layout["e"].local_numel == 16) == (rank == world - 1),
    }


def frozen(state):
    """A copy of a nested state; a DTensor is copied as a DTensor of the same rows."""
    if isinstance(state, dict):
        return {k: frozen(v) for k, v in state.items()}
    if is_dtensor(state):
        return sharded_view(state.to_local().clone(), tuple(state.shape), state.device_mesh, shard_mesh_dim(state))
    return state.clone() if isinstance(state, torch.Tensor) else state


def as_a_distributed_checkpoint_holds(state):
    """Each rank's own DTensors, and rank 0's other entries (meta.pt, which rank 0 writes and every rank reads)."""

    def without_dtensors(value):
        if isinstance(value, dict):
            return {k: without_dtensors(v) for k, v in value.items()}
        return "<rows>" if is_dtensor(value) else value

    def merged(mine, rank0):
        if isinstance(mine, dict):
            return {k: merged(mine[k], rank0[k]) for k in mine}
        return mine if is_dtensor(mine) else rank0

    shared = [without_dtensors(state)]
    dist.broadcast_object_list(shared, src=0)
    return merged(state, shared[0])


def run(rank: int, world: int, out: str, mode: str, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import cl_plugin.merging.layout as layout_module

    if world == 2:
        # As if the process group were NCCL alone (Lightning's default on GPUs), which refuses CPU
        # tensors: the core then runs its collectives over a gloo group of the same ranks it creates.
        layout_module.takes_cpu_tensors = lambda group=None: False
    if world == 3:
        # Small buckets, so completing replicated tensors takes every path: slices broadcast alone
        # (>= one bucket), buckets flushed when full, and several slices packed into one.
        import cl_plugin.merging.layout as layout_module

        layout_module.BROADCAST_BUCKET_NUMEL = 16
    # OPCM exchanges small tensors in batches and larger ones one per round: thresholds that send
    # this model's tensors down both paths (under FSDP2 the 3x13 matrix batched, the others by rounds).
    import cl_plugin.merging.opcm as opcm_module

    opcm_module._BATCHED_NUMEL = 8 if world == 3 else 40
    # This small model's few matrices cannot be placed whole within 1% of an even split:
    # allow any excess, so that OPCM's whole-matrix placement is exercised here.
    import cl_plugin.merging.continual as continual_module

    continual_module.WHOLE_MATRIX_EXCESS = float("inf")
    results = {}
    try:
        plain = Net.__new__(Net)
        torch.manual_seed(0)
        plain = Net()
        theta0 = {n: t.clone() for n, t in plain.state_dict().items()}
        tasks = [fine_tuned(plain, k) for k in range(N_TASKS)]
        statistics = ["norm.running_mean", "norm.running_var"]
        for method, options in METHODS.items():
            expected = reference(method, options, theta0, tasks, statistics)
            model = make_model(mode, world)
            write_full(model, theta0)
            core = ContinualMerge(method.split("+")[0], method_options=options)
            core.bind(model, shard=(rank, world, None))
            core.capture_theta0(model)
            saved = None
            for k, weights in enumerate(tasks):
                write_full(model, weights)
                # τ chunk by chunk where the rule allows (elementwise); the resumed core below folds whole τ
                core.fold_in_place(model) if core.folds_in_place else core.fold(model)
                if k == 1:
                    saved = core.state_dict()  # whole on rank 0
                    saved = [saved]
                    dist.broadcast_object_list(saved, src=0)
                    saved = saved[0]
                    # as a distributed checkpoint holds it: each rank's rows of every FSDP2-sharded tensor
                    saved_sharded = as_a_distributed_checkpoint_holds(frozen(core.state_dict(keep_sharded=True)))
            got = whole(core, core.merged_tensors())
            same = all(torch.equal(got[n], expected[n]) for n in expected)
            # θ₀ + λ·merged written into the module in place (replicated tensors completed from every rank)
            core.write_merged(model)
            written = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in model.state_dict().items()}
            written_equal = all(torch.equal(written[n], expected[n]) for n in expected)
            # A rule on whole matrices (OPCM) under a split it chooses: each matrix whole on one rank.
            matrices = [n for n in core.names if len(core.layout[n].shape) == 2 and not core.layout[n].sharded]
            counts = torch.tensor([int(core.layout[n].whole) for n in matrices], dtype=torch.int64)
            dist.all_reduce(counts)
            matrices_whole = bool(matrices) and bool((counts == 1).all())
            # resume from the state saved after task 2, in a new core on the same ranks
            resumed = ContinualMerge(method.split("+")[0], method_options=options)
            resumed.bind(model, shard=(rank, world, None))
            layout = {n: (core.layout[n].shape, theta0[n].dtype) for n in core.all_names}
            resumed.prepare_load(saved, "test", layout=layout)()
            for weights in tasks[2:]:
                write_full(model, weights)
                resumed.fold(model)
            got_resumed = whole(resumed, resumed.merged_tensors())
            same_resumed = all(torch.equal(got_resumed[n], expected[n]) for n in expected)
            if mode == "fsdp2":
                # resume from the same state kept sharded (DTensors of each rank's rows)
                again = ContinualMerge(method.split("+")[0], method_options=options)
                again.bind(model, shard=(rank, world, None))
                again.prepare_load(saved_sharded, "test", layout=layout)()
                for weights in tasks[2:]:
                    write_full(model, weights)
                    again.fold(model)
                got_again = whole(again, again.merged_tensors())
                sharded_in_state = any(is_dtensor(t) for t in saved_sharded["theta0"].values())
                results.setdefault("resumed_from_shards", {})[method] = sharded_in_state and all(
                    torch.equal(got_again[n], expected[n]) for n in expected
                )
            # the merged weights written back into the module
            resumed.write(model, resumed.merged_tensors())
            own_group = any(g is core.layout.group for g in layout_module._CPU_GROUPS.values())
            results[method] = {
                "own_gloo_group": own_group,
                "equal": same,
                "resumed_equal": same_resumed,
                "written_equal": written_equal,
                "sharded": core.layout is not None,
                "matrices_whole": matrices_whole,
            }
        # Negative control: TIES thresholds taken per rank (each on its own slices) are not the exact ones.
        layout = ShardLayout.split({"w": (1000,)}, rank, world)
        g = torch.Generator().manual_seed(rank)
        local = torch.randn(layout["w"].local_numel, generator=g) * (1 + 3 * rank)
        from cl_plugin.merging.ties import trim_threshold
        from cl_plugin.task_vectors import TaskVector

        exact = trim_threshold(TaskVector({"w": local}), 0.2, layout)
        per_rank = trim_threshold(TaskVector({"w": local}), 0.2, None)
        values = torch.tensor([exact, per_rank])
        gathered = [torch.zeros(2, dtype=values.dtype) for _ in range(world)]
        dist.all_gather(gathered, values)
        results["negative_control"] = {
            "exact_same_on_ranks": len({float(v[0]) for v in gathered}) == 1,
            "per_rank_differs": len({float(v[1]) for v in gathered}) > 1,
        }
        results["collectives"] = check_collectives(rank, world)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    # Everything is checked and written. Skip the interpreter's teardown: a spawned FSDP2 worker
    # was seen to abort there, rarely ("terminate called without an active exception", after
    # destroy_process_group), which would fail a run whose results are complete.
    os._exit(0)


if __name__ == "__main__":
    out, world, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = out + ".store"
    if os.path.exists(store):
        os.remove(store)
    torch.multiprocessing.spawn(run, args=(world, out, mode, store), nprocs=world, join=True)
