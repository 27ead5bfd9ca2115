"""Speed and peak memory of the streaming mergers, next to their floor and their peers.

For every method in :data:`cl_plugin.merging.MERGERS`, on synthetic task
vectors shaped like a timm ViT-B/16 (86.6 M float32 elements, 330 MiB), this
script measures:

* the time of one ``update`` (median over the updates after the first), next
  to the time of copying the same bytes once (``copy_`` of every tensor into a
  preallocated destination: the memory-bandwidth floor), the two measured in
  turn in the same process so that their ratio survives a noisy machine;
* the one-off warm-up (``torch.compile`` of the fused kernels), measured on a
  dummy before the stream and reported apart;
* the peak resident memory above the baseline (the process after the task
  vectors exist), for 2 and for 10 tasks, each in a fresh process;
* the same merge done by (a) the naive batch approach, which stacks all task
  vectors into a T x N matrix and reduces it, and (b) FusionBench 0.2.33's
  implementation, each timed next to ours in the same process.

Run it from the repository root::

    .venv/bin/python benchmarks/merge_speed.py            # ViT-B/16, 10 tasks: about 10-15 min on 2 cores
    .venv/bin/python benchmarks/merge_speed.py --quick    # ViT-Ti/16, 3 tasks: a smoke test, under a minute

FusionBench runs in a separate virtualenv (``--peer-python``, default
``.venv-bench/bin/python``), made once with::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-bench/bin/pip install -e '.[bench]'

Without it the peers are reported as "not installed" and everything else runs.
The table is printed and written to ``docs/performance.md`` between the
markers ``<!-- merge_speed:start -->`` and ``<!-- merge_speed:end -->``.

DOP optimises every 2-D weight with 200 Adam steps per update (an hour per
ViT-B update on one CPU thread), so it has its own section
(``<!-- merge_speed_dop:start -->``), written when ``dop`` is among the
methods: one update (2 tasks) of one ViT-B/16 block (``blocks.0``: its four
Linear weights, two LayerNorms and the biases), ours and FusionBench's
``DOPMerging._layer_wise_optimize`` timed at two step counts
(``--dop-steps``, default 2 and 10, the two sides in turn) and extrapolated
linearly to 200 steps
(the time is the SVDs plus a fixed cost per step), ours also measured at 200
steps (``--dop-full``, default 200; 0 skips it). ``--methods dop`` runs only
that section and leaves the other one as it is::

    .venv/bin/python benchmarks/merge_speed.py --methods dop   # about 10 min on 2 cores

Every measuring process runs torch on one thread by default (``--threads``):
on cores shared with other processes, a multi-threaded op waits at an OpenMP
barrier for a descheduled thread, which swamps the times.

Peak memory is read from Linux's ``VmHWM`` after resetting it through
``/proc/self/clear_refs``; elsewhere the memory columns read "n/a". A method
whose peak grows from 2 to 10 tasks is measured again with
``MALLOC_MMAP_THRESHOLD_=65536``, which tells memory the merger holds from
memory glibc keeps cached after a free.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import proc_status, reset_peak
from _sections import write_section

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
MB = 1 << 20

#: FusionBench's implementation of each method, where it has one.
PEER_FUNCTIONS = {
    "magmax": "fusion_bench.method.magmax.magmax._magmax_select",
    "task_arithmetic": "fusion_bench.utils.state_dict_arithmetic.state_dict_sum",
    "average": "fusion_bench.method.simple_average.simple_average",
    "ties": "fusion_bench.method.ties_merging.ties_merging_utils.ties_merging (on the stacked flat vectors)",
    "opcm": "fusion_bench.method.opcm.opcm.OPCMForCLIP.merge_linear_weights / merge_other_parameters, driven as run() does",
    "dop": "fusion_bench.method.dop.dop_general.DOPMerging._layer_wise_optimize",
}
#: FusionBench's DOP options (fusion_bench_config/method/dop/dop.yaml), which are also our defaults.
DOP_PEER_OPTIONS = dict(lr=1e-4, mgda=True, ema=True, ema_beta=0.999, alpha=0.8, svd_epsilon=0.99999, svd_proj_space="uv")
#: Methods measured in their own section (their updates are too slow for the full stream).
OWN_SECTION = ("dop",)
#: Options both sides use, so that the results can be compared.
METHOD_OPTIONS = {"ties": {"top_k": 0.2}, "opcm": {"alpha": 0.5}, "random": {"seed": 0}}
#: Peak of a peer's merge above its baseline, in model copies: (per task, fixed),
#: measured on ViT-B (FusionBench's TIES was killed by the kernel at 10 tasks
#: with 22 GiB resident). Used to skip a run that would not fit in the memory
#: left on the machine; the inputs (one copy per task) come on top.
FOOTPRINT = {
    ("naive", "ties"): (4.8, 3.5),
    ("fusionbench", "ties"): (6.8, 3.0),
    ("naive", "magmax"): (2.1, 2.0),
    ("naive", "random"): (2.1, 1.0),
    ("fusionbench", "opcm"): (0.0, 6.0),
}


# --------------------------------------------------------------------------- measuring
def peak_since(baseline: int | None) -> float | None:
    """Peak RSS above ``baseline`` since the last :func:`reset_peak`, in MiB."""
    if baseline is None:
        return None
    hwm = proc_status("VmHWM")
    return None if hwm is None else (hwm - baseline) / MB


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def copy_all(src, dst) -> None:
    for name, t in src.items():
        dst[name].copy_(t)


def write_task_vectors(layout, tasks: int, seed: int, std: float, folder: str) -> None:
    """Draw ``tasks`` task vectors, seeded N(0, std²) per element, and store each as raw float32 in ``folder``.

    Drawing 86 M normal numbers takes seconds, so it is done once here and every
    measuring process reads the same bytes.
    """
    import torch

    for t in range(tasks):
        g = torch.Generator().manual_seed(seed * 7919 + t)
        flat = torch.cat([torch.randn(math.prod(shape), generator=g).mul_(std) for _, shape in layout])
        flat.numpy().tofile(os.path.join(folder, f"task{t}.f32"))


def make_task_vectors(spec: dict):
    """The first ``spec["tasks"]`` stored task vectors, as dicts of separately allocated float32 tensors."""
    import torch

    out = []
    for t in range(spec["tasks"]):
        flat = torch.from_file(os.path.join(spec["data"], f"task{t}.f32"), shared=False, size=spec["numel"], dtype=torch.float32)
        tv, offset = {}, 0
        for name, shape in spec["layout"]:
            n = math.prod(shape)
            tv[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
        del flat
        out.append(tv)
    return out


def max_abs_diff(a, b) -> float:
    return max(diff_by_tensor(a, b).values())


def diff_by_tensor(a, b) -> dict:
    return {n: float((a[n].double() - b[n].double()).abs().max()) for n in a}


def max_abs(a) -> float:
    return max(float(t.abs().max()) for t in a.values())


def ours_merge(method: str, tvs):
    """Every update, then merged(): our whole merge of ``tvs``."""
    from cl_plugin.merging import get_merger

    merger = get_merger(method, **METHOD_OPTIONS.get(method, {}))
    for tv in tvs:
        merger.update(tv, **({"fisher": {n: t.abs() for n, t in tv.items()}} if merger.requires_fisher else {}))
    return merger.merged()


def warm_up(method: str, layout) -> float:
    """The one-off cost of the first updates in a process (torch.compile), in seconds.

    Runs a 2-task merge of a small dummy twice and returns the first run minus
    the second. The dummy holds, for each tensor rank of ``layout`` that takes
    the compiled path, its smallest such shape (the compiled rule is guarded on
    the rank of the tensor it views, so each rank compiles once), and a small
    2-D tensor (for OPCM's first SVD).
    """
    import torch

    from cl_plugin.merging import _kernels

    by_rank: dict[int, list[int]] = {}
    for _, shape in layout:
        if math.prod(shape) >= _kernels.COMPILE_MIN_NUMEL:
            best = by_rank.get(len(shape))
            if best is None or math.prod(shape) < math.prod(best):
                by_rank[len(shape)] = shape
    shapes = [*by_rank.values(), [48, 32]]

    def dummy(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}

    tvs = [dummy(1), dummy(2)]
    first, _ = timed(ours_merge, method, tvs)
    second, _ = timed(ours_merge, method, tvs)
    return max(first - second, 0.0)


def compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:  # a private counter: report nothing rather than fail
        return -1


# --------------------------------------------------------------------------- workers
def job_ours(spec: dict) -> dict:
    """Our streaming merger: per update, a copy of the same bytes then the update; peak memory."""
    import torch

    from cl_plugin.merging import _kernels, get_merger
    from cl_plugin.task_vectors import TaskVector

    method, tasks = spec["method"], spec["tasks"]
    # TaskVector checks finiteness once here, as TaskVector.between does when a callback builds it.
    tvs = [TaskVector(tv) for tv in make_task_vectors(spec)]
    dst = {n: torch.zeros_like(t) for n, t in tvs[0].items()}  # touched now: no page faults while timed
    copy_all(tvs[0], dst)
    warm = warm_up(method, spec["layout"])
    graphs_before = compiled_graphs()
    merger = get_merger(method, **METHOD_OPTIONS.get(method, {}))
    # The Fisher merger needs a Fisher per task: one stand-in (|τ_1|) for all, made before the baseline.
    extra = {"fisher": {n: t.abs() for n, t in tvs[0].items()}} if merger.requires_fisher else {}
    baseline = reset_peak()
    copies, updates, peaks = [], [], []
    for tv in tvs:
        c, _ = timed(copy_all, tv, dst)
        u, _ = timed(lambda: merger.update(tv, **extra))
        copies.append(c)
        updates.append(u)
        peaks.append(peak_since(baseline))
    merged_s, _ = timed(merger.merged)
    peak = peak_since(baseline)
    result = {
        "copies": copies,
        "updates": updates,
        "peaks_after_update": peaks,
        "merged_s": merged_s,
        "peak_mb": peak,
        "warm_up_s": warm,
        "recompiles": compiled_graphs() - graphs_before if graphs_before >= 0 else None,
        "compiled_fraction": sum(t.numel() for t in tvs[0].values() if t.numel() >= _kernels.COMPILE_MIN_NUMEL)
        / sum(t.numel() for t in tvs[0].values()),
    }
    if spec.get("dict_updates"):
        # update() with plain dicts: each is wrapped in a TaskVector, whose finiteness scan then runs.
        plain = [dict(tv) for tv in tvs[: spec["dict_updates"]]]
        pairs = []
        for tv in plain:
            c, _ = timed(copy_all, tv, dst)
            u, _ = timed(lambda: merger.update(tv, **extra))
            pairs.append(u / c)
        result["dict_update_ratio"] = statistics.median(pairs)
    return result


def naive_merge(method: str, tvs, seed: int):
    """The batch approach: stack the T flattened task vectors into a T x N matrix and reduce it."""
    import torch

    names = list(tvs[0])
    sizes = [tvs[0][n].numel() for n in names]
    flat = torch.stack([torch.cat([tv[n].reshape(-1) for n in names]) for tv in tvs])
    if method == "magmax":
        index = flat.abs().argmax(dim=0, keepdim=True)
        merged = flat.gather(0, index)[0]
    elif method == "task_arithmetic":
        merged = flat.sum(dim=0)
    elif method == "average":
        merged = flat.mean(dim=0)
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        index = torch.randint(len(tvs), (1, flat.shape[1]), generator=g)
        merged = flat.gather(0, index)[0]
    elif method == "ties":
        numel = flat.shape[1]
        k = numel - int(numel * METHOD_OPTIONS["ties"]["top_k"])
        threshold = flat.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= threshold)
        sign = trimmed.sum(dim=0).sign()
        sign[sign == 0] = sign.sum().sign()
        agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        merged = (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    else:
        raise ValueError(f"no batch version of {method!r}")
    return {n: t.view(tvs[0][n].shape) for n, t in zip(names, merged.split(sizes))}


def job_naive(spec: dict) -> dict:
    method = spec["method"]
    tvs = make_task_vectors(spec)
    warm_up(method, spec["layout"])  # our one-off compilation stays out of the comparison
    baseline = reset_peak()
    naive_s, naive = timed(naive_merge, method, tvs, spec["seed"])
    peak = peak_since(baseline)
    ours_s, ours = timed(ours_merge, method, tvs)
    diff = None if method == "random" else max_abs_diff(ours, naive)
    return {"time_s": naive_s, "ours_s": ours_s, "peak_mb": peak, "max_abs_diff": diff, "scale": max_abs(ours)}


def fusionbench_merge(method: str, tvs):
    """FusionBench 0.2.33's batch merge of ``tvs`` (dicts of tensors); returns a dict of tensors."""
    import torch

    if method == "magmax":
        from fusion_bench.method.magmax.magmax import _magmax_select

        return _magmax_select(tvs)
    if method == "task_arithmetic":
        from fusion_bench.utils.state_dict_arithmetic import state_dict_sum

        return state_dict_sum(tvs)
    if method == "average":
        from fusion_bench.method.simple_average import simple_average

        return simple_average(tvs)
    if method == "ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
        merged = ties_merging(flat, reset_thresh=METHOD_OPTIONS["ties"]["top_k"], merge_func="mean")
        return vector_to_state_dict(merged, tvs[0])
    raise ValueError(method)


def _quiet(fn, *args):
    """Call ``fn`` with its prints (FusionBench's progress lines) sent to /dev/null."""
    import contextlib

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        return fn(*args)


def job_fusionbench(spec: dict) -> dict:
    import fusion_bench  # noqa: F401  (fails early when it is missing)

    method = spec["method"]
    if method == "opcm":
        return job_fusionbench_opcm(spec)
    tvs = make_task_vectors(spec)
    warm_up(method, spec["layout"])
    _quiet(fusionbench_merge, method, [{n: t[:1] for n, t in tv.items()} for tv in tvs[:2]])  # imports, outside the timing
    baseline = reset_peak()
    peer_s, peer = timed(_quiet, fusionbench_merge, method, tvs)
    peak = peak_since(baseline)
    ours_s, ours = timed(ours_merge, method, tvs)
    return {
        "time_s": peer_s,
        "ours_s": ours_s,
        "peak_mb": peak,
        "max_abs_diff": max_abs_diff(ours, peer),
        "scale": max_abs(ours),
    }


def job_fusionbench_opcm(spec: dict) -> dict:
    """FusionBench's OPCM on the same task vectors, applied to the same timm model.

    ``OPCMForCLIP.run`` needs a CLIP model pool and task pool, so this harness
    drives its per-parameter methods over the models θ₀ + τ_t the way run()
    does: task-vector norms, λ_t = 1 while merging, ``merge_linear_weights``
    for every ``nn.Linear`` weight and ``merge_other_parameters`` for the other
    parameters, then the rescaling to the mean task-vector norm. One deviation:
    run() visits only leaf modules, so parameters held directly by a non-leaf
    module (timm's ``cls_token`` and ``pos_embed``, CLIP's ``class_embedding``)
    would keep the first task's value; here they go through
    ``merge_other_parameters`` like every other non-Linear parameter, which is
    the paper's rule. Each FusionBench step is timed next to our update of the
    same task vector, in turn.
    """
    import copy

    import numpy as np
    import timm
    import torch
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.method.opcm.utils import get_task_vector_norm
    from torch import nn

    from cl_plugin.merging import get_merger

    alpha = METHOD_OPTIONS["opcm"]["alpha"]
    torch.manual_seed(spec["seed"])
    pretrained = timm.create_model(spec["model"], pretrained=False).eval()
    layout = dict(spec["layout"])
    params = dict(pretrained.named_parameters())
    if set(params) != set(layout):
        raise RuntimeError("the model's parameters are not the benchmark's layout (it has float buffers?)")
    tvs = make_task_vectors(spec)
    try:
        peer = OPCMForCLIP(alpha=alpha, shuffle_order=False, save_on_every_step=False)
    except Exception:  # the constructor wants a program config: the two methods need only these fields
        peer = OPCMForCLIP.__new__(OPCMForCLIP)
        peer.alpha = alpha

    def model_for(tv):
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(tv[name])
        return model

    def fb_step(merged_model, task_model, norms):
        norms.append(float(get_task_vector_norm(task_model, pretrained)))
        mean_norm = float(np.mean(norms))
        peer.lambda_t = 1
        for module_name, module in merged_model.named_modules():
            pre, task = pretrained.get_submodule(module_name), task_model.get_submodule(module_name)
            for pname, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                if isinstance(module, nn.Linear) and pname == "weight":
                    p.data = peer.merge_linear_weights(p, pre.weight, task.weight, param_name=full, alpha=alpha, accelerator="cpu")
                else:
                    p.data = peer.merge_other_parameters(p, getattr(pre, pname), getattr(task, pname), param_name=full, accelerator="cpu")
        merged_norm = float(get_task_vector_norm(merged_model, pretrained))
        peer.lambda_t *= merged_norm / mean_norm
        for name, p in merged_model.named_parameters():
            base = pretrained.get_parameter(name)
            p.data = base + (p - base) * (mean_norm / merged_norm)
        peer.previous_lambda_t, peer.lambda_t = peer.lambda_t, None

    warm_up("opcm", spec["layout"])
    with torch.no_grad():
        baseline = reset_peak()
        merged_model = model_for(tvs[0])
        norms = [float(get_task_vector_norm(merged_model, pretrained))]
        peer.previous_lambda_t, peer.lambda_t = 1, None
        ours = get_merger("opcm", **METHOD_OPTIONS["opcm"])
        peer_steps, our_steps = [], []
        peak = None
        for t in range(1, len(tvs)):
            task_model = model_for(tvs[t])  # loading, not merging: outside the timed step, as in run()'s profile
            s, _ = timed(fb_step, merged_model, task_model, norms)
            peer_steps.append(s)
            del task_model
            if peak is None:  # FusionBench alone so far: our merger holds nothing yet
                peak = peak_since(baseline)
                ours.update(tvs[0])
            s, _ = timed(ours.update, tvs[t])
            our_steps.append(s)
        merged_peer = {n: p.detach() - params[n].detach() for n, p in merged_model.named_parameters()}
    result = {"peer_steps": peer_steps, "our_steps": our_steps, "peak_mb": peak}
    if our_steps:
        ours_tv = ours.merged()
        diffs = diff_by_tensor(ours_tv, merged_peer)
        worst = sorted(diffs, key=diffs.get, reverse=True)[:3]
        # Which side is closer to the exact result? Our merger again, in float64.
        exact = get_merger("opcm", **METHOD_OPTIONS["opcm"])
        for tv in tvs:
            exact.update({n: t.double() for n, t in tv.items()})
        exact_tv = exact.merged()
        result.update(
            max_abs_diff=max(diffs.values()),
            scale=max_abs(ours_tv),
            worst={n: [diffs[n], float(ours_tv[n].abs().max())] for n in worst},
            median_tensor_diff=statistics.median(diffs.values()),
            ours_vs_float64=max_abs_diff(ours_tv, exact_tv),
            peer_vs_float64=max_abs_diff(merged_peer, exact_tv),
        )
    return result


def job_dop(spec: dict) -> dict:
    """One DOP update of one ViT block: ours at each step count (and at ``full`` steps), FusionBench's if installed.

    The block is ``model.blocks[0]`` of the timm model; two seeded task
    vectors τ_0, τ_1 of its float parameters. Ours: ``get_merger("dop",
    num_steps=S)``, ``update(τ_0)``, then ``update(τ_1)`` timed. FusionBench:
    ``DOPMerging(num_steps=S, **dop.yaml's options)._layer_wise_optimize`` on
    the modules θ₀, θ₀ + τ_0 (the merged model) and θ₀ + τ_1, timed as its
    ``run()`` profiles it ("DOP merging"). Also our float64 run at the largest
    step count, the closest thing to the exact result.
    """
    import contextlib
    import copy

    import timm
    import torch

    from cl_plugin.merging import get_merger

    torch.manual_seed(spec["seed"])
    block = timm.create_model(spec["model"], pretrained=False).blocks[0].eval()
    params = {n: p.detach() for n, p in block.named_parameters()}
    g = torch.Generator().manual_seed(spec["seed"] * 7919 + 1)
    tvs = [{n: torch.randn(p.shape, generator=g).mul_(spec["std"]) for n, p in params.items()} for _ in range(2)]
    steps = spec["dop_steps"]

    def ours(num_steps, dtype=torch.float32):
        merger = get_merger("dop", num_steps=num_steps)
        merger.update({n: t.to(dtype) for n, t in tvs[0].items()})
        second = {n: t.to(dtype) for n, t in tvs[1].items()}
        s, _ = timed(merger.update, second)
        return s, merger.merged()

    result = {"numel": sum(p.numel() for p in params.values()), "steps": steps, "ours": {}, "peer": {},
              "matrices": {n: list(p.shape) for n, p in params.items() if p.dim() == 2}}
    try:
        from fusion_bench.method.dop.dop_general import DOPMerging
    except ImportError as exc:
        DOPMerging = None
        result["peer_error"] = f"not installed ({exc.name})"

    def module_with(tv):
        m = copy.deepcopy(block)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(tv[n])
        return m

    def peer(num_steps):
        algo = DOPMerging(num_steps=num_steps, shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False, **DOP_PEER_OPTIONS)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            _ = algo.fabric  # created on first use: outside the timing
            return timed(
                algo._layer_wise_optimize, ["merged", "task"], copy.deepcopy(block),
                {"merged": merged_block, "task": task_block}, 1,
            )

    merged_block, task_block = module_with(tvs[0]), module_with(tvs[1])
    merged = {}
    # Interleaved, so that a change in the machine's load falls on both sides alike.
    for num_steps in steps:
        result["ours"][num_steps], merged[num_steps] = ours(num_steps)
        if DOPMerging is not None:
            result["peer"][num_steps], out = peer(num_steps)
    exact = ours(steps[-1], torch.float64)[1]
    result["ours_vs_float64"] = max_abs_diff(merged[steps[-1]], exact)
    result["scale"] = max_abs(exact)
    result["moved"] = max_abs_diff(exact, {n: (a.double() + b.double()) / 2 for (n, a), b in zip(tvs[0].items(), tvs[1].values())})
    if DOPMerging is not None:
        peer_tv = {n: p.detach().double() - params[n].double() for n, p in out.named_parameters()}
        result["max_abs_diff"] = max_abs_diff(merged[steps[-1]], peer_tv)
        result["peer_vs_float64"] = max_abs_diff(peer_tv, exact)
    if spec.get("dop_full"):
        result["ours_full"], result["full_steps"] = ours(spec["dop_full"])[0], spec["dop_full"]
    return result


JOBS = {"ours": job_ours, "naive": job_naive, "fusionbench": job_fusionbench, "dop": job_dop}


def worker_main(path: str) -> None:
    with open(path) as f:
        specs = json.load(f)
    results = []
    for spec in specs:
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        start = time.perf_counter()
        try:
            results.append({"ok": True, **JOBS[spec["kind"]](spec)})
        except Exception as exc:  # reported in the table, with the worker's log
            import traceback

            traceback.print_exc()
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        results[-1]["wall_s"] = time.perf_counter() - start
        gc.collect()
    with open(path + ".out", "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------- orchestration
def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_jobs(python: str, specs: list[dict], timeout: float, log, extra_env: dict | None = None) -> list[dict]:
    """Run ``specs`` in one fresh process of ``python``; one result per spec."""
    with tempfile.TemporaryDirectory(prefix="merge_speed_") as tmp:
        path = os.path.join(tmp, "jobs.json")
        with open(path, "w") as f:
            json.dump(specs, f)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
        try:
            proc = subprocess.run(
                [python, str(Path(__file__).resolve()), "--worker", path],
                capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
            )
        except subprocess.TimeoutExpired:
            return [{"ok": False, "error": f"timed out after {timeout:.0f} s"} for _ in specs]
        if proc.returncode != 0 or not os.path.exists(path + ".out"):
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
            log(proc.stderr[-3000:])
            return [{"ok": False, "error": why} for _ in specs]
        if proc.stderr.strip() and any(not r.get("ok") for r in json.load(open(path + ".out"))):
            log(proc.stderr[-3000:])
        with open(path + ".out") as f:
            return json.load(f)


def peer_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter that has FusionBench, and its version (or why there is none)."""
    candidates = [requested] if requested else [str(REPO / ".venv-bench" / "bin" / "python"), sys.executable]
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        probe = subprocess.run(
            [python, "-c", "import importlib.metadata as m, importlib.util as u; assert u.find_spec('fusion_bench') and "
             "u.find_spec('cl_plugin'); print(m.version('fusion-bench'))"],
            capture_output=True, text=True, cwd=REPO,
        )
        if probe.returncode == 0:
            return python, probe.stdout.strip().splitlines()[-1]
    return None, "not installed"


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": None if total is None else round(total / (1 << 30), 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def layout_of(model_name: str) -> list:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    return [[n, list(t.shape)] for n, t in model.state_dict().items() if t.is_floating_point()]


def is_flat(peak_small, peak_large, model_mb) -> bool:
    """Flat: the peak grows by less than 10% of the smaller peak or of one model copy, whichever is larger."""
    if peak_small is None or peak_large is None:
        return False
    return peak_large - peak_small <= max(0.10 * peak_small, 0.10 * model_mb)


def median_ratio(num, den):
    return statistics.median(a / b for a, b in zip(num, den))


def fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: ViT-Ti/16, 3 tasks, no 2-task runs, all jobs of a kind in one process")
    parser.add_argument("--model", help="timm model whose state dict is the layout (default vit_base_patch16_224; --quick: vit_tiny_patch16_224)")
    parser.add_argument("--tasks", type=int, help="task vectors in the long run (default 10; --quick: 3)")
    parser.add_argument("--methods", nargs="+", help="a subset of cl_plugin.merging.MERGERS (default all)")
    parser.add_argument("--opcm-peer-tasks", type=int, help="tasks for FusionBench's OPCM, which is slow (default 3)")
    parser.add_argument("--dop-steps", type=int, nargs=2, default=[2, 10], metavar=("S1", "S2"),
                        help="DOP: the two step counts timed on both sides and extrapolated to 200 (default 2 10)")
    parser.add_argument("--dop-full", type=int, default=200, help="DOP: also time our update at this many steps (default 200; 0: skip)")
    parser.add_argument("--peer-python", help="interpreter with fusion-bench installed (default .venv-bench/bin/python if it has it)")
    parser.add_argument("--no-peers", action="store_true", help="skip the FusionBench columns")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads in every measuring process (default 1; 0: torch's default, one per core)",
    )
    parser.add_argument("--std", type=float, default=1e-3, help="standard deviation of the synthetic task vectors (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(DOC), help="markdown file to update (default docs/performance.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    from cl_plugin.merging import MERGERS

    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    model = args.model or ("vit_tiny_patch16_224" if args.quick else "vit_base_patch16_224")
    tasks = args.tasks or (3 if args.quick else 10)
    opcm_tasks = min(args.opcm_peer_tasks or 3, tasks)
    methods = args.methods or list(MERGERS)
    unknown = [m for m in methods if m not in MERGERS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(MERGERS)}")
    if tasks < 3:
        parser.error("--tasks must be at least 3 (the first update is excluded from the median, and 2 tasks are compared with it)")
    if not 1 <= args.dop_steps[0] < args.dop_steps[1]:
        parser.error("--dop-steps needs 1 <= S1 < S2")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    own_section = [m for m in methods if m in OWN_SECTION]
    methods = [m for m in methods if m not in OWN_SECTION]

    fb_python, fb_version = (None, "skipped (--no-peers)") if args.no_peers else peer_python(args.peer_python)
    if "dop" in own_section:
        dop_section(args, model, fb_python, fb_version, log, argv)
    if not methods:
        return 0
    layout = layout_of(model)
    numel = sum(math.prod(s) for _, s in layout)
    model_mb = numel * 4 / MB
    log(f"merge_speed: {model} ({numel / 1e6:.1f} M float32 = {model_mb:.0f} MiB), {tasks} tasks, "
        f"methods {methods}; FusionBench: {fb_version}{' via ' + fb_python if fb_python else ''}")
    data = tempfile.TemporaryDirectory(prefix="merge_speed_data_")
    t0 = time.perf_counter()
    write_task_vectors(layout, tasks, args.seed, args.std, data.name)
    log(f"  drew {tasks} task vectors in {time.perf_counter() - t0:.0f} s")
    base = {"layout": layout, "numel": numel, "data": data.name, "seed": args.seed, "model": model, "threads": args.threads}
    counts = (tasks,) if args.quick else (2, tasks)
    timeout = 600 if args.quick else 1500
    if load_start and load_start[0] > 0.5 and not args.threads and (os.cpu_count() or 1) <= 4:
        log(f"note: load average {load_start[0]:.1f} on {os.cpu_count()} cores. Multi-threaded torch ops wait at OpenMP "
            "barriers for descheduled threads, which swamps the times; --threads 1 gives steadier ratios.")

    # One job list per process: in the full run every job has a fresh process, so peaks do not mix.
    plan: list[tuple[str, list[dict]]] = []
    for method in methods:
        for t in counts:
            plan.append(("ours", [dict(base, kind="ours", method=method, tasks=t, dict_updates=3 if (method == "magmax" and t == tasks) else 0)]))
        if method not in ("opcm", "fisher"):
            for t in counts:
                plan.append(("naive", [dict(base, kind="naive", method=method, tasks=t)]))
        if fb_python and method in PEER_FUNCTIONS:
            # FusionBench at the full task count only (its growth with T is the batch approach's).
            t = opcm_tasks if method == "opcm" else tasks
            plan.append(("fusionbench", [dict(base, kind="fusionbench", method=method, tasks=t)]))
    if args.quick:  # smoke test: one process per kind
        grouped: dict[str, list[dict]] = {}
        for kind, specs in plan:
            grouped.setdefault(kind, []).extend(specs)
        plan = list(grouped.items())

    def need_mib(kind, method, t):
        per_task, fixed = FOOTPRINT.get((kind, method), (1.5, 2.0))
        return t * model_mb * (1 + per_task) + fixed * model_mb  # the inputs, then the merge

    def fits(kind, method, t):
        avail = mem_available()
        return kind == "ours" or avail is None or args.quick or need_mib(kind, method, t) * MB <= avail - (1 << 30)

    results: dict[tuple[str, str, int], dict] = {}

    def execute(kind, specs, extra_env=None, label=None):
        python = fb_python if kind == "fusionbench" else sys.executable
        t0 = time.perf_counter()
        out = run_jobs(python, specs, timeout, log, extra_env)
        for spec, res in zip(specs, out):
            res["tasks_run"] = spec["tasks"]
            results[(label or kind, spec["method"], spec.get("key_tasks", spec["tasks"]))] = res
            log(f"  {label or kind:<11} {spec['method']:<15} {spec['tasks']:>2} tasks: "
                + (f"{res['wall_s']:.0f} s" if res.get("ok") else res["error"]))
        if len(specs) > 1:
            log(f"  (one process: {time.perf_counter() - t0:.0f} s)")

    for kind, specs in plan:
        runnable = []
        for spec in specs:
            if fits(kind, spec["method"], spec["tasks"]):
                runnable.append(spec)
                continue
            avail = mem_available() or 0
            error = f"skipped: needs about {need_mib(kind, spec['method'], spec['tasks']) / 1024:.0f} GiB, {avail / (1 << 30):.0f} GiB available"
            fewer = [t for t in range(spec["tasks"] - 1, 1, -1) if fits(kind, spec["method"], t)]
            if kind == "fusionbench" and fewer:  # run the peer on as many tasks as fit, and say so
                runnable.append(dict(spec, tasks=fewer[0], key_tasks=spec["tasks"]))
                log(f"  {kind:<11} {spec['method']:<15} {spec['tasks']:>2} tasks: {error}; running {fewer[0]} tasks")
            else:
                results[(kind, spec["method"], spec["tasks"])] = {"ok": False, "error": error}
                log(f"  {kind:<11} {spec['method']:<15} {spec['tasks']:>2} tasks: {error}")
        if runnable:
            execute(kind, runnable)

    # A peak that grows from 2 to T tasks may be memory that glibc keeps cached after a free rather than
    # memory the merger holds: measure those methods again with every allocation of 64 KiB or more
    # mmap-ed, so that a free returns it to the system.
    if not args.quick:
        for method in methods:
            a, b = results.get(("ours", method, 2)), results.get(("ours", method, tasks))
            if a and b and a.get("ok") and b.get("ok") and not is_flat(a["peak_mb"], b["peak_mb"], model_mb):
                for t in counts:
                    execute("ours", [dict(base, kind="ours", method=method, tasks=t)], {"MALLOC_MMAP_THRESHOLD_": "65536"}, "ours_mmap")

    data.cleanup()
    elapsed = time.perf_counter() - started
    info = machine_info()
    if args.threads:
        info["torch_threads"] = args.threads
    info.update(fusion_bench=fb_version, load_start=load_start, load_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    command = _command(argv)
    section = render(results, methods, model, numel, tasks, opcm_tasks, info, command, elapsed, args.quick, args.std)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": {"|".join(map(str, k)): v for k, v in results.items()}}, indent=1))
    if not args.no_write:
        write_section(Path(args.output), "merge_speed", section, title="Performance")
        log(f"wrote {args.output}")
    return 0


def dop_section(args, model: str, fb_python: str | None, fb_version: str, log, argv) -> None:
    """Run :func:`job_dop` (in FusionBench's interpreter when there is one) and write its section."""
    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    spec = dict(kind="dop", method="dop", model=model, seed=args.seed, std=args.std, threads=args.threads,
                dop_steps=list(args.dop_steps), dop_full=args.dop_full, tasks=2)
    log(f"merge_speed: DOP, one block of {model}, steps {args.dop_steps} (+ {args.dop_full} ours); FusionBench: {fb_version}")
    (res,) = run_jobs(fb_python or sys.executable, [spec], 3000, log)
    log(f"  dop: {res['wall_s']:.0f} s" if res.get("ok") else f"  dop: {res['error']}")
    info = machine_info()
    if args.threads:
        info["torch_threads"] = args.threads
    info.update(fusion_bench=fb_version, load_start=load_start, load_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    section = render_dop(res, model, info, _command(argv), time.perf_counter() - started, args.std)
    print(section)
    if not args.no_write:
        write_section(Path(args.output), "merge_speed_dop", section, title="Performance")
        log(f"wrote {args.output}")


def render_dop(res: dict, model: str, info: dict, command: str, elapsed: float, std: float) -> str:
    lines = [
        "## DOP: one update, next to FusionBench's DOP (`benchmarks/merge_speed.py`)",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if not res.get("ok"):
        return "\n".join(lines + [f"Not measured: {res.get('error')}."])
    s1, s2 = res["steps"]
    full = 200
    ours_times = {int(k): v for k, v in res["ours"].items()}  # JSON made the step counts strings
    peer = {int(k): v for k, v in (res.get("peer") or {}).items()}

    def at(times, steps):  # linear in the step count: the SVDs, then a fixed cost per step
        per_step = (times[s2] - times[s1]) / (s2 - s1)
        return times[s1] + (steps - s1) * per_step, per_step

    ours_200, ours_step = at(ours_times, full)
    lines += [
        f"One DOP update (2 tasks) of `blocks.0` of timm `{model}` (pretrained=False): its {len(res['matrices'])} Linear "
        f"weights ({', '.join(f'`{n}` ' + 'x'.join(map(str, shape)) for n, shape in res['matrices'].items())}), "
        "its LayerNorms and biases, "
        f"{res['numel'] / 1e6:.1f} M float32 elements; task vectors seeded N(0, {std:g}²) per element; the options of "
        f"FusionBench's `dop.yaml` (our defaults: 200 Adam steps, lr 1e-4, MGDA with EMA 0.999 from alpha 0.8, "
        f"svd_epsilon 0.99999, both projections). Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} "
        f"({info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}); FusionBench {info['fusion_bench']}. "
        f"Load average at start {fmt_load(info['load_start'])}, at end {fmt_load(info['load_end'])}. "
        f"Run time {elapsed / 60:.1f} min, {datetime.date.today().isoformat()}.",
        "",
        f"Both sides are timed at {s1} and {s2} steps, in turn (ours, FusionBench, ours, FusionBench); the time of an "
        f"update is the SVDs plus a fixed cost per step, so the {full}-step time is extrapolated linearly from the two, "
        "and ours is also measured at 200 steps at the end of the run (on a shared machine the two differ by the "
        "change in load). A whole ViT-B/16 has 12 such blocks (and the "
        "1000x768 head): an update of the whole model takes about 12x the block's time.",
        "",
        "| | ours | FusionBench | FusionBench / ours |",
        "|---|---:|---:|---:|",
    ]
    ratio = None
    for steps in (s1, s2):
        p, o = peer.get(steps), ours_times[steps]
        lines.append(f"| {steps} steps (s) | {o:.1f} | {fmt(p, '.1f', 'n/a')} | {fmt(p and p / o, '.2f', '')} |")
    if peer:
        peer_200, peer_step = at(peer, full)
        ratio = peer_200 / ours_200
        lines.append(f"| per step (s) | {ours_step:.2f} | {peer_step:.2f} | {peer_step / ours_step:.2f} |")
        lines.append(f"| {full} steps, extrapolated (s) | {ours_200:.0f} | {peer_200:.0f} | {ratio:.2f} |")
    else:
        lines.append(f"| per step (s) | {ours_step:.2f} | {res.get('peer_error', 'n/a')} | |")
        lines.append(f"| {full} steps, extrapolated (s) | {ours_200:.0f} | | |")
    if res.get("ours_full"):
        lines.append(f"| {res['full_steps']} steps, measured (s) | {res['ours_full']:.0f} | | |")
    lines += [
        "",
        f"Accuracy after {s2} steps (|merged| <= {res['scale']:.1e}; the optimisation moved the 2-D weights by up to "
        f"{res['moved']:.1e} from the mean): max |ours − float64| = {res['ours_vs_float64']:.1e}"
        + (f", max |FusionBench − float64| = {res['peer_vs_float64']:.1e}, max |ours − FusionBench| = {res['max_abs_diff']:.1e}"
           if "max_abs_diff" in res else "")
        + ". *float64* is our merger run in float64 on the same task vectors (it equals FusionBench's DOP run in "
        "float64 to 3e-16 on the test fixture, `tests/test_merging_new_methods.py`). Adam's first steps move every "
        "entry by about lr (1e-4) whatever the size of its gradient, so an entry whose gradient is near zero takes the "
        "sign of its rounding error: on weights of this size a float32 run of either implementation ends a fraction "
        "of lr away from float64 in a few entries.",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    if ratio is not None:
        lines.append(f"| DOP at least 2x faster than FusionBench's DOP (per update, {full} steps) | {ratio:.2f}x | {'pass' if ratio >= 2 else 'FAIL'} |")
    else:
        lines.append(f"| DOP at least 2x faster than FusionBench's DOP | {res.get('peer_error', 'not measured')} | not measured |")
    return "\n".join(lines)


def _command(argv) -> str:
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(REPO)) if not exe.is_absolute() else str(Path(os.path.relpath(exe, REPO)))
    except ValueError:
        exe_text = str(exe)
    if exe_text.startswith(".."):
        exe_text = "python"
    script = os.path.relpath(Path(__file__).resolve(), REPO)
    return " ".join([exe_text, script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------- report
def render(results, methods, model, numel, tasks, opcm_tasks, info, command, elapsed, quick, std) -> str:
    def get(kind, method, t):
        r = results.get((kind, method, t))
        return r if r and r.get("ok") else None

    def why(kind, method, t, installed=True):
        r = results.get((kind, method, t))
        if r is None:
            return "not installed" if not installed else "—"
        return r.get("error", "—")

    peers_installed = info["fusion_bench"] not in ("not installed", "skipped (--no-peers)")
    model_mb = numel * 4 / MB
    lines = [
        "## Merge speed and memory (`benchmarks/merge_speed.py`)",
        "",
        "```",
        command,
        "```",
        "",
        f"{'Smoke test (`--quick`). ' if quick else ''}Layout: the float tensors of timm `{model}` (pretrained=False), "
        f"{numel / 1e6:.1f} M float32 elements ({model_mb:.0f} MiB per model copy); {tasks} synthetic task vectors, "
        f"seeded N(0, {std:g}²) per element. Each method's defaults, TIES `top_k=0.2`, OPCM `alpha=0.5`.",
    ]
    lines += [
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; torch {info['torch']} "
        f"({info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}), Python {info['python']}; FusionBench {info['fusion_bench']}. "
        f"Load average at start {fmt_load(info['load_start'])}, at end {fmt_load(info['load_end'])} "
        f"(other processes shared the cores: compare ratios, not absolute times). Run time {elapsed / 60:.1f} min, "
        f"{datetime.date.today().isoformat()}."
        + (" Every measuring process runs torch on one thread (`--threads 1`, the default): with two threads on cores "
           "that other processes also use, each parallel op waits at an OpenMP barrier for a descheduled thread, and "
           "the times measure the scheduler rather than the work (`--threads 0` gives torch's default)."
           if info["torch_threads"] == 1 else ""),
        "",
        f"### One update ({tasks} tasks, each method in its own process)",
        "",
        "The copy floor is one `copy_` of every tensor of the same task vector into a preallocated "
        "destination, measured just before each update; *update / copy* is the median of the per-update "
        "ratios, over updates 2 to T (the first only copies into fresh state). The warm-up is the one-off "
        "compilation of the fused kernels in a fresh process, excluded from the medians.",
        "",
        "| method | copy floor (ms) | update (ms) | update / copy | warm-up (s) | recompiles during the stream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for m in methods:
        r = get("ours", m, tasks)
        if not r:
            lines.append(f"| {m} | {why('ours', m, tasks)} | | | | |")
            continue
        upd, cop = r["updates"][1:], r["copies"][1:]
        ratios[m] = median_ratio(upd, cop)
        lines.append(
            f"| {m} | {statistics.median(cop) * 1e3:.0f} | {statistics.median(upd) * 1e3:.0f} | {ratios[m]:.2f} | "
            f"{r['warm_up_s']:.1f} | {fmt(r['recompiles'], 'd')} |"
        )
    mm = get("ours", "magmax", tasks)
    if mm:
        lines += [
            "",
            f"MagMax: {mm['compiled_fraction'] * 100:.1f}% of the elements take the fused compiled path. "
            + (f"Passing plain dicts instead of `TaskVector`s adds the finiteness scan of the wrapper: "
               f"{mm['dict_update_ratio']:.2f} x the copy floor." if "dict_update_ratio" in mm else ""),
        ]

    lines += [
        "",
        f"### The whole merge of {tasks} tasks, next to the batch approach and FusionBench",
        "",
        f"*ours* is {tasks} `update` calls and `merged()`. The naive batch approach stacks the {tasks} flattened task "
        "vectors into a T x N matrix and reduces it (`abs().argmax` and `gather` for MagMax, `sum`/`mean`, a random "
        "row index per element, batch TIES with `kthvalue`). Each ratio is peer time / our time, both measured in the "
        "same process one after the other; *max |Δ|* compares the merged task vectors (|merged| is at most about "
        f"{_scale(results, tasks):.1e}). The naive MagMax's `argmax` keeps the first of equal magnitudes where the "
        "reference (and ours) keeps the last: float32 normal draws do tie in magnitude now and then across 86 M x T "
        "entries, hence its Δ.",
        "",
        "| method | naive (s) | naive / ours | max \\|Δ\\| naive | FusionBench (s) | FusionBench / ours | max \\|Δ\\| FusionBench | FusionBench function |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in methods:
        n = get("naive", m, tasks)
        f = get("fusionbench", m, tasks)
        naive_cells = (
            f"{n['time_s']:.2f} | {n['time_s'] / n['ours_s']:.2f} | {fmt(n['max_abs_diff'], '.1e', 'n/a (random)')}"
            if n else (f"n/a (sequential) | | " if m == "opcm" else "n/a | | " if m == "fisher" else f"{why('naive', m, tasks)} | | ")
        )
        if m == "opcm":
            fb_cells = "see below | | "
        elif f:
            fewer = f" ({f['tasks_run']} tasks: {tasks} would not fit in memory)" if f.get("tasks_run", tasks) != tasks else ""
            fb_cells = f"{f['time_s']:.2f}{fewer} | {f['time_s'] / f['ours_s']:.2f} | {f['max_abs_diff']:.1e}"
        elif m == "fisher":
            fb_cells = "not timed (its merging_with_fisher_weights is checked in tests/test_merging_new_methods.py) | | "
        elif m not in PEER_FUNCTIONS:
            fb_cells = "none in FusionBench | | "
        else:
            fb_cells = f"{why('fusionbench', m, tasks, peers_installed)} | | "
        lines.append(f"| {m} | {naive_cells} | {fb_cells} | {PEER_FUNCTIONS.get(m, '—').split(' (')[0] if m != 'opcm' else 'OPCMForCLIP methods'} |")

    lines += [
        "",
        "### Peak resident memory above the baseline (MiB)",
        "",
        f"Each cell is a fresh process; the baseline is its RSS once the task vectors exist (so the {tasks} inputs "
        "of the batch approaches are not counted: they are needed only there, the streaming mergers take one task "
        f"vector at a time). One model copy is {model_mb:.0f} MiB. Ours includes the state, `merged()`'s output and "
        "the temporaries of every update; the compile warm-up runs before the baseline."
        + (" **In `--quick` all jobs of a kind share one process, so a later job reuses memory that an earlier one "
           "freed: these peaks are not comparable, and the flatness target is not judged.**" if quick else ""),
        "",
        f"| method | ours, 2 tasks | ours, {tasks} tasks | growth | naive, 2 | naive, {tasks} | FusionBench, {tasks} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    flat_ok = {}
    for m in methods:
        a, b = get("ours", m, 2), get("ours", m, tasks)
        cells = []
        if a and b and a["peak_mb"] is not None and b["peak_mb"] is not None:
            growth = b["peak_mb"] - a["peak_mb"]
            flat_ok[m] = is_flat(a["peak_mb"], b["peak_mb"], model_mb)
            cells += [f"{a['peak_mb']:.0f}", f"{b['peak_mb']:.0f}", f"{growth:+.0f}"]
        else:
            cells += [fmt(a and a["peak_mb"], ".0f", "n/a"), fmt(b and b["peak_mb"], ".0f", "n/a"), "—"]
        for kind, t in (("naive", 2), ("naive", tasks), ("fusionbench", opcm_tasks if m == "opcm" else tasks)):
            r = get(kind, m, t)
            if m in ("opcm", "fisher") and kind == "naive":
                cells.append("—")
            elif r:
                nominal = 2 if (kind, t) == ("naive", 2) else tasks
                ran = r.get("tasks_run", t)
                cells.append(fmt(r["peak_mb"], ".0f", "n/a") + (f" ({ran} tasks)" if ran != nominal else ""))
            elif kind == "fusionbench" and m not in PEER_FUNCTIONS:
                cells.append("not timed" if m == "fisher" else "none")
            else:
                cells.append(why(kind, m, t, installed=peers_installed or kind != "fusionbench"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    flat_mmap = {}
    for m in [m for m, ok in flat_ok.items() if not ok]:
        b = get("ours", m, tasks)
        trace = ", ".join(f"{x:.0f}" for x in b["peaks_after_update"])
        a2, b2 = get("ours_mmap", m, 2), get("ours_mmap", m, tasks)
        text = f"{m} grows: its peak after each of the {tasks} updates was {trace} MiB."
        if a2 and b2 and a2["peak_mb"] is not None and b2["peak_mb"] is not None:
            flat_mmap[m] = is_flat(a2["peak_mb"], b2["peak_mb"], model_mb)
            text += (
                f" Measured again with `MALLOC_MMAP_THRESHOLD_=65536` (glibc then maps every block of 64 KiB or more "
                f"on its own and returns it on free, so the peak counts what is held, not what the allocator keeps "
                f"cached): {a2['peak_mb']:.0f} MiB at 2 tasks, {b2['peak_mb']:.0f} MiB at {tasks} "
                f"({b2['peak_mb'] - a2['peak_mb']:+.0f}), after each update "
                + ", ".join(f"{x:.0f}" for x in b2["peaks_after_update"]) + "."
            )
        lines += ["", text]

    opcm_ratio = None
    o = get("fusionbench", "opcm", opcm_tasks)
    lines += ["", f"### OPCM against FusionBench's OPCM ({opcm_tasks} tasks)", ""]
    if o:
        opcm_ratio = median_ratio(o["peer_steps"], o["our_steps"])
        lines += [
            f"FusionBench's `merge_linear_weights` (full SVD) and `merge_other_parameters`, driven as `OPCMForCLIP.run()` "
            f"does, on the models θ₀ + τ_t of the same timm model and task vectors; each of its steps is timed next to our "
            f"`update` with the same task vector (loading the task model is outside its step, as in its own profiler). "
            f"The harness also merges the parameters that `run()` skips because they sit on a non-leaf module "
            f"(`cls_token`, `pos_embed`).",
            "",
            "| FusionBench step (s) | our update (s) | FusionBench / ours | max \\|ours − FusionBench\\| | max \\|ours − float64\\| | max \\|FusionBench − float64\\| | max \\|merged\\| |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {statistics.median(o['peer_steps']):.1f} | {statistics.median(o['our_steps']):.1f} | {opcm_ratio:.2f} | "
            f"{o['max_abs_diff']:.1e} | {o['ours_vs_float64']:.1e} | {o['peer_vs_float64']:.1e} | {o['scale']:.1e} |",
            "",
            "*float64* is our merger run in float64 on the same task vectors, the closest thing to the exact result. "
            + (f"FusionBench's result is {o['peer_vs_float64'] / o['ours_vs_float64']:.0f}x further from it than ours: "
               "most of the gap between the two is on FusionBench's side. "
               if o["peer_vs_float64"] > 3 * o["ours_vs_float64"] else
               "Both float32 results sit about as far from it as from each other: the gap is float32 rounding. ")
            + f"The largest differences are in {', '.join('`' + n + '`' for n in o['worst'])}; the median over tensors "
            f"of the largest per-tensor difference is {o['median_tensor_diff']:.1e}.",
        ]
    else:
        lines.append(f"FusionBench's OPCM: {why('fusionbench', 'opcm', opcm_tasks, peers_installed)}.")

    lines += ["", "### Targets (issue 2)" + (" — indicative only in `--quick` (a model 15x smaller)" if quick else ""),
              "", "| target | measured | result |", "|---|---|---|"]
    if "magmax" in ratios:
        lines.append(f"| MagMax update within 3x the copy floor | {ratios['magmax']:.2f}x | {'pass' if ratios['magmax'] <= 3 else 'FAIL'} |")
    if quick:
        lines.append(f"| peak memory flat from 2 to {tasks} tasks | not judged in `--quick` | not measured |")
    elif flat_ok:
        grown = [m for m, ok in flat_ok.items() if not ok]
        measured = "all flat" if not grown else "grows: " + ", ".join(
            m + (" (flat with the allocator's cache excluded)" if flat_mmap.get(m) else "") for m in grown
        )
        result = "pass" if not grown else ("FAIL with glibc's default; pass without its cache" if all(flat_mmap.get(m) for m in grown) else "FAIL")
        lines.append(
            f"| peak memory flat from 2 to {tasks} tasks (growth under 10% of the 2-task peak or of one model copy) | "
            f"{measured} | {result} |"
        )
    if opcm_ratio is not None:
        lines.append(f"| OPCM at least 2x faster than FusionBench's OPCM | {opcm_ratio:.2f}x | {'pass' if opcm_ratio >= 2 else 'FAIL'} |")
    elif "opcm" in methods:
        lines.append(f"| OPCM at least 2x faster than FusionBench's OPCM | {why('fusionbench', 'opcm', opcm_tasks, peers_installed)} | not measured |")
    return "\n".join(lines)


def _scale(results, tasks) -> float:
    vals = [r["scale"] for (k, m, t), r in results.items() if r.get("ok") and "scale" in r and t == tasks]
    return max(vals) if vals else float("nan")


def fmt_load(load) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
