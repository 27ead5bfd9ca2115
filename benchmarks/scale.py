"""Memory per rank and time of the sharded boundary core, next to the unsharded design, in one run.

For each merging method, on a timm ``vit_small_patch16_224`` (P = one float32
copy of its weights), the boundary core (:class:`cl_plugin.merging.continual.ContinualMerge`,
what ``ModelMerging`` runs on) takes θ₀ and folds 5 synthetic task vectors
(θ₀ plus seeded noise per task) in these settings, each measured in fresh
processes:

* ``W=1``: one process, unsharded;
* ``replicated W=2``: 2 gloo processes, every rank merging whole tensors (the
  design before sharding: what each DDP rank did);
* ``DDP W=2``: 2 processes, each rank merging its 1/2 of every tensor;
* ``FSDP2 W=2``: 2 processes, the model sharded by ``fully_shard`` per block,
  each rank merging its DTensor shards.

Per rank it reports the bytes the core holds between boundaries (θ₀ and the
merger's state, exactly, as multiples of P/W), the peak resident memory during
a boundary above the memory before it (``VmHWM`` after resetting it, as
multiples of P/W), the time of a boundary (fold and write of the merged
weights), and, for TIES, MagMax and OPCM, the time of one update against one
``copy_`` of the same bytes (the memory-bandwidth floor) measured in turn in
the same process. It then projects the bytes per rank to a 7B-parameter model
on 8 ranks (bfloat16 weights), labelled as a projection.

Run from the repository root::

    .venv/bin/python benchmarks/scale.py            # about 10 min on 2 cores
    .venv/bin/python benchmarks/scale.py --quick    # vit_tiny, 2 methods: a smoke test

The table goes to docs/scale.md between the markers of the ``scale`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import write_section  # noqa: E402

METHODS = {"magmax": {}, "average": {}, "task_arithmetic": {}, "random": {}, "ties": {}, "opcm": {}}
SETTINGS = ("W=1", "W=1, τ whole", "replicated W=2", "DDP W=2", "FSDP2 W=2")
#: Methods whose boundary forms τ chunk by chunk inside the fold (ContinualMerge.fold_in_place);
#: "W=1, τ whole" measures them the way every method folded before, for comparison.
STREAMED = ("magmax", "average", "task_arithmetic", "ties", "random")
N_TASKS = 5


# -- one measuring process -----------------------------------------------------------------------------
def _worker(rank: int, world: int, spec: dict, out: str, store: str) -> None:
    import torch
    import torch.distributed as dist

    from _memory import reset_peak

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = _measure(rank, world, spec, reset_peak)
        if world > 1:
            # Memory is reported for the rank that holds the most (OPCM's matrices sit whole on
            # their owners under DDP, so the ranks' shares differ slightly); times are rank 0's.
            everyone = [None] * world
            dist.all_gather_object(everyone, result)
            for key in ("held_bytes", "boundary_peak_bytes"):
                values = [r[key] for r in everyone]
                result[key] = None if None in values else max(values)
        if rank == 0 or world == 1:
            Path(out).write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    if world > 1:
        # The result is written. Skip the interpreter's teardown, where a spawned FSDP2 worker was
        # seen to abort rarely ("terminate called without an active exception").
        os._exit(0)


def _measure(rank: int, world: int, spec: dict, reset_peak) -> dict:
    import timm
    import torch

    from cl_plugin.merging.continual import ContinualMerge

    torch.manual_seed(0)
    model = timm.create_model(spec["model"], pretrained=False, num_classes=10)
    if spec["setting"] == "FSDP2 W=2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    shard = (rank, world, None) if spec["setting"] == "DDP W=2" else None
    core = ContinualMerge(spec["method"], method_options=spec["options"])
    core.bind(model, shard=shard)
    core.capture_theta0(model)
    local = core.snapshot(model)
    p_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point()) if not spec["setting"].startswith("FSDP2") else spec["p_bytes"]
    boundary_times, fold_times, peaks = [], [], []
    for task in range(N_TASKS):
        g = torch.Generator().manual_seed(10 + task)
        with torch.no_grad():  # "fine-tuning": θ₀ plus seeded noise, the same on every rank
            core.write(model, {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in local.items()})
        before = reset_peak()
        start = time.perf_counter()
        if core.folds_in_place and not spec.get("whole_tau"):  # as ModelMerging does: τ chunk by chunk in the fold
            core.fold_in_place(model)
            fold_times.append(time.perf_counter() - start)
        else:
            tv = core.task_vector(model, trusted=True)  # as the callbacks do for the other methods
            fold_start = time.perf_counter()
            core.fold(tv)
            fold_times.append(time.perf_counter() - fold_start)
            del tv
        core.write_merged(model)
        boundary_times.append(time.perf_counter() - start)
        from _memory import proc_status

        peaks.append((proc_status("VmHWM") - before) if before is not None else None)
    held = sum(t.numel() * t.element_size() for t in core.theta0.values())
    state = core.merger._state
    held += sum(t.numel() * t.element_size() for role in state.values() for t in role.values())
    # The floor: one copy_ of this rank's bytes, timed in turn with one more update.
    src = {n: t.clone() for n, t in core.theta0.items()}
    dst = {n: torch.empty_like(t) for n, t in src.items()}
    copies = []
    for _ in range(3):
        start = time.perf_counter()
        for n in src:
            dst[n].copy_(src[n])
        copies.append(time.perf_counter() - start)
    return {
        "p_bytes": p_bytes,
        "world": world,
        "held_bytes": held,
        # The first two boundaries compile the fused kernels (torch.compile): left out.
        "boundary_peak_bytes": max(peaks[2:]) if peaks[2:] and None not in peaks[2:] else None,
        "boundary_s": statistics.median(boundary_times[1:]),
        "update_s": statistics.median(fold_times[1:]),
        "copy_s": min(copies),
    }


def run(spec: dict) -> dict:
    world = 1 if spec["setting"].startswith("W=1") else 2
    with tempfile.TemporaryDirectory() as tmp:
        out, store = os.path.join(tmp, "out.json"), os.path.join(tmp, "store")
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), out, store, str(world)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(Path(__file__).parent)]))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(Path(out).read_text())


def _p_bytes(model_name: str) -> int:
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=10)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())


def table(results: dict, model_name: str, p_bytes: int) -> str:
    mib = p_bytes / 2**20
    lines = [
        f"Model `{model_name}` (P = {mib:.0f} MiB of float32 weights), {N_TASKS} synthetic tasks, gloo on CPU, one thread per "
        "process. Held: θ₀ and the merger's state per rank between boundaries, in units of P/W (W = processes; the rank that "
        "holds the most). Peak: the rise of resident memory during a boundary (the largest after the first two, which compile "
        "the fused kernels; the rank with the largest), in P/W. MagMax, average, task arithmetic, TIES and random form the task "
        "vector τ chunk by chunk inside the fold (`ContinualMerge.fold_in_place`, as `ModelMerging` does); their row "
        "`W=1, τ whole` forms τ whole first (1 P/W), as the other methods do. Times: rank 0's median boundary (task vector, "
        "fold and write) and update (the fold, TIES's threshold selection included; for the methods that form τ inside it, "
        "the check pass and the fold, τ's subtraction in every pass included).",
        "",
        "| method | setting | held per rank (P/W) | boundary peak (P/W) | boundary s | update / copy floor |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for setting in SETTINGS:
            r = results.get(f"{method}|{setting}")
            if r is None:
                continue
            unit = r["p_bytes"] / r["world"] if setting != "replicated W=2" else r["p_bytes"] / 2
            # A rise below 0 is the high-water mark's reset noise: shown as 0.
            peak = "n/a" if r["boundary_peak_bytes"] is None else f"{max(r['boundary_peak_bytes'] / unit, 0.0):.2f}"
            lines.append(
                f"| {method} | {setting} | {r['held_bytes'] / unit:.2f} | {peak} | {r['boundary_s']:.3f} | "
                f"{r['update_s'] / r['copy_s']:.1f}x |"
            )
    opcm1, opcm2 = results.get("opcm|W=1"), results.get("opcm|DDP W=2")
    if opcm1 and opcm2:
        lines += ["", f"OPCM boundary at W=2 (DDP) / at W=1: **{opcm2['boundary_s'] / opcm1['boundary_s']:.2f}** (target ≤ 0.6)."]
    lines += ["", "Projection (arithmetic, not a measurement): a 7B-parameter model in bfloat16 (P = 14 GB) on 8 ranks.", ""]
    lines += ["| method | held per rank, replicated | held per rank, sharded |", "|---|---|---|"]
    p7 = 7e9 * 2
    for method in METHODS:
        r = results.get(f"{method}|DDP W=2")
        if r is None:
            continue
        copies = r["held_bytes"] / (r["p_bytes"] / 2)  # model copies held, at the merger's dtypes
        lines.append(f"| {method} | {copies * p7 / 1e9:.0f} GB | {copies * p7 / 8 / 1e9:.1f} GB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vit_tiny and two methods: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    model_name = "vit_tiny_patch16_224" if args.quick else "vit_small_patch16_224"
    methods = {k: METHODS[k] for k in ("magmax", "ties")} if args.quick else METHODS
    p_bytes = _p_bytes(model_name)
    results = {}
    for method, options in methods.items():
        for setting in SETTINGS:
            if setting == "W=1, τ whole" and method not in STREAMED:
                continue
            spec = {"model": model_name, "method": method, "options": options, "setting": setting, "p_bytes": p_bytes,
                    "whole_tau": setting == "W=1, τ whole"}
            print(f"{method:16s} {setting:16s} ...", flush=True)
            results[f"{method}|{setting}"] = run(spec)
    text = table(results, model_name, p_bytes)
    print(text)
    if not args.no_write and not args.quick:
        command = "Written by `.venv/bin/python benchmarks/scale.py`."
        write_section(ROOT / "docs" / "scale.md", "scale", f"{command}\n\n{text}\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec, out, store, world = json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
        if os.path.exists(store):
            os.remove(store)
        if world == 1:
            _worker(0, 1, spec, out, store)
        else:
            import torch.multiprocessing as mp

            mp.spawn(_worker, args=(world, spec, out, store), nprocs=world, join=True)
    else:
        main()
