"""Run by test_callbacks.py: a 2-process DDP (gloo) stream with ModelMerging, then compare ranks."""

import sys

import lightning as L
import torch
import torch.distributed as dist

from cl_plugin.callbacks import ModelMerging
from stream_helpers import TinyClassifier, ToyStream, trainer_kwargs

if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    cb = ModelMerging("magmax", check_ranks=True)
    trainer = L.Trainer(
        max_epochs=4,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[cb],
        default_root_dir=sys.argv[1],
        **trainer_kwargs(devices=2, strategy="ddp"),
    )
    trainer.fit(model, datamodule=ToyStream(2, 2))
    flat = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    if trainer.global_rank == 0:
        print(f"RANKS IDENTICAL: {identical} world={dist.get_world_size()} merged={cb.merger.num_tasks}")
    # Shut gloo down before the interpreter exits: left to exit-time destructors, its threads
    # sometimes abort the process ("terminate called without an active exception", exit 134).
    dist.barrier()
    dist.destroy_process_group()
