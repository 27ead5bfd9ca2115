"""Write the FusionBench outputs that tests/test_merging_new_methods.py compares against.

Run once with the interpreter that has FusionBench 0.2.33 (see benchmarks/merge_speed.py)::

    .venv-bench/bin/python tests/fusionbench_reference/make_fixtures.py

It writes ``dop.safetensors`` and ``fisher.safetensors`` next to itself: the
inputs (θ₀, the task vectors, the Fishers, all float32) and FusionBench's
results for them, in float32 and in float64. The test suite reads these files
and does not need FusionBench.

* DOP: ``fusion_bench.method.dop.dop_general.DOPMerging.run`` with the options
  of ``fusion_bench_config/method/dop/dop.yaml`` (``shuffle_order`` off, no
  saving or evaluation), on a small module whose leaf modules are Linear (tall,
  wide and square weights, with and without bias) and a LayerNorm; the models
  are θ₀ + τ_t. Stored: the merged weights after 2 tasks and after 4.
* Fisher: ``fusion_bench.method.fisher_merging.fisher_merging.merging_with_fisher_weights``
  on the task vectors themselves (the rule is a weighted mean, so it merges
  task vectors as it merges weights), with equal scaling coefficients,
  ``minimal_fisher_weight=1e-6``, ``normalize_fisher_weight`` True and False.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
DOP_OPTIONS = dict(
    lr=1e-4, num_steps=200, mgda=True, ema=True, ema_beta=0.999, alpha=0.8, svd_epsilon=0.99999, svd_proj_space="uv"
)
TASK_STD = 0.01


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)  # weight 12 x 6 (tall)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 5)  # weight 5 x 12 (wide)
        self.mix = nn.Linear(7, 7, bias=False)  # square


def task_vectors(model: nn.Module, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) * TASK_STD for k, v in model.state_dict().items()} for _ in range(n)]


def run_dop(theta0: dict, taus: list[dict], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from fusion_bench.method.dop.dop_general import DOPMerging
    from fusion_bench.modelpool import BaseModelPool

    base = Tiny().to(dtype)
    base.load_state_dict({k: v.to(dtype) for k, v in theta0.items()})
    models = {"_pretrained_": base}
    for t, tau in enumerate(taus):
        m = copy.deepcopy(base)
        m.load_state_dict({k: theta0[k].to(dtype) + tau[k].to(dtype) for k in theta0})
        models[f"task{t}"] = m
    algo = DOPMerging(shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False, **DOP_OPTIONS)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        merged = algo.run(BaseModelPool(models))
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def main() -> None:
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    torch.manual_seed(0)
    model = Tiny()
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    taus = task_vectors(model, 4, seed=1)
    out = {f"theta0.{k}": v for k, v in theta0.items()}
    for t, tau in enumerate(taus):
        out.update({f"tau{t}.{k}": v for k, v in tau.items()})
    for dtype, tag in ((torch.float32, "fb32"), (torch.float64, "fb64")):
        for count in (2, 4):
            merged = run_dop(theta0, taus[:count], dtype)
            out.update({f"{tag}.T{count}.{k}": v for k, v in merged.items()})
    save_file(out, str(HERE / "dop.safetensors"), metadata={"fusion_bench": "0.2.33", "options": repr(DOP_OPTIONS)})

    # Fisher: 3 tasks, 3 tensors; Fishers with exact zeros and a wide range of scales.
    g = torch.Generator().manual_seed(2)
    shapes = {"a": (4, 5), "b": (5,), "c": (2, 3, 2)}
    taus = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    fishers = []
    for t in range(3):
        f = {}
        for k, s in shapes.items():
            x = torch.rand(s, generator=g) ** 4 * 10.0 ** (t - 1)
            x[torch.rand(s, generator=g) < 0.2] = 0.0
            f[k] = x
        fishers.append(f)
    out = {}
    for t in range(3):
        out.update({f"tau{t}.{k}": v for k, v in taus[t].items()})
        out.update({f"fisher{t}.{k}": v for k, v in fishers[t].items()})
    for dtype, tag in ((torch.float32, "fb32"), (torch.float64, "fb64")):
        for normalize in (True, False):
            merged = merging_with_fisher_weights(
                models_to_merge_param_dict={k: [tau[k].to(dtype) for tau in taus] for k in shapes},
                models_to_merge_fisher_weights_list=[{k: f[k].to(dtype) for k in shapes} for f in fishers],
                fisher_scaling_coefficients=torch.ones(3, dtype=dtype) / 3,
                normalize_fisher_weight=normalize,
                minimal_fisher_weight=1e-6,
            )
            out.update({f"{tag}.normalize_{normalize}.{k}": v for k, v in merged.items()})
    save_file(out, str(HERE / "fisher.safetensors"), metadata={"fusion_bench": "0.2.33", "minimal_fisher_weight": "1e-6"})


if __name__ == "__main__":
    main()
