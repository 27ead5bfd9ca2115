"""Run by test_fisher_callback.py: ModelMerging("fisher", scale="validate") under a 2-process DDP (gloo) stream.

Each rank estimates the Fisher on its own shard of the experience's batches;
the script checks that every rank folded the same (all-reduced) Fisher, chose
the same λ and ends with the same weights, and that the Fisher is the mean of
the ranks' own estimates.
"""

import sys

import lightning as L
import torch
import torch.distributed as dist

from cl_plugin.benchmarks import ContinualDataModule, rotated_digits
from cl_plugin.callbacks import ModelMerging
from cl_plugin.callbacks import _boundary_data
from stream_helpers import DigitsMLP, trainer_kwargs


if __name__ == "__main__":
    local_sums = []
    original = _boundary_data.diagonal_fisher

    def spy(*args, **kwargs):  # the rank's own estimate, before the all-reduce
        out = original(*args, **kwargs)
        local_sums.append(sum(float(f.double().sum()) for f in out.values()))
        return out

    _boundary_data.diagonal_fisher = spy
    L.seed_everything(0, verbose=False)
    model = DigitsMLP()
    merging = ModelMerging("fisher", fisher_batches=2, scale="validate", scale_grid=[0.5, 1.0], check_ranks=True)
    folded_sums = []
    fold = merging.core.fold

    def recording_fold(tv, *, fisher=None):
        folded_sums.append(sum(float(f.double().sum()) for f in fisher.values()))
        return fold(tv, fisher=fisher)

    merging.core.fold = recording_fold
    dm = ContinualDataModule(rotated_digits(n_experiences=2, validation_stream=True), batch_size=64)
    trainer = L.Trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[merging],
        default_root_dir=sys.argv[1],
        **trainer_kwargs(devices=2, strategy="ddp"),
    )
    trainer.fit(model, datamodule=dm)
    flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
    summary = torch.tensor([*local_sums, *folded_sums, *[r["scale"] for r in merging.scale_log]], dtype=torch.float64)
    weights = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(weights, flat)
    summaries = [torch.zeros_like(summary) for _ in range(dist.get_world_size())]
    dist.all_gather(summaries, summary)
    n = len(local_sums)
    identical = all(torch.equal(w, weights[0]) for w in weights)
    same_fisher = all(torch.equal(s[n:], summaries[0][n:]) for s in summaries)
    local = torch.stack([s[:n] for s in summaries])
    differ = bool((local[0] != local[1]).any())  # each rank estimated on its own batches
    mean = torch.allclose(local.mean(0), summaries[0][n : 2 * n], rtol=1e-5)
    if trainer.global_rank == 0:
        print(
            f"RANKS IDENTICAL: {identical} SAME FISHER: {same_fisher} LOCAL DIFFER: {differ} MEAN: {mean} "
            f"world={dist.get_world_size()} merged={merging.merger.num_tasks} boundaries={n}"
        )
    dist.barrier()
    dist.destroy_process_group()
