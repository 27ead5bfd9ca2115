"""Run by test_adapter_callbacks.py: 2-process DDP (gloo), one fit per experience, merged LoRA, per-task LoRA and Share.

New adapters and Share coefficients are created in ``setup`` of each fit, before
DDP wraps the model; check_ranks all-gathers a checksum after every boundary,
and at the end every rank's full state (and Share's per-task head copies) is compared.
"""

import sys

import lightning as L
import torch
import torch.distributed as dist

from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters
from stream_helpers import TinyClassifier, ToyStream, trainer_kwargs


def run(name, callback, root):
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    dm = ToyStream(2, 1)
    for experience in range(2):
        dm.set_experience(experience)
        trainer = L.Trainer(max_epochs=1, callbacks=[callback], default_root_dir=root, **trainer_kwargs(devices=2, strategy="ddp"))
        trainer.fit(model, datamodule=dm)
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    tensors += [t for copy in callback.task_module_states.values() for t in copy.values()]  # trainable_per_task
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    if isinstance(callback, LoRAAdapters):
        tasks = callback.tasks if callback.mode == "per_task" else callback.merger.num_tasks
    else:
        tasks = callback.share.tasks
    if trainer.global_rank == 0:
        print(f"{name} RANKS IDENTICAL: {identical} tasks={tasks} world={dist.get_world_size()}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    root = sys.argv[1]
    lora = LoRAAdapters(["net.0"], r=2, trainable=["net.3"], trainable_per_task=True, mode="per_task", check_ranks=True)
    run("merge", LoRAAdapters(["net.0"], r=2, trainable=["net.3"], check_ranks=True), root)
    run("per_task", lora, root)
    assert sorted(lora.task_module_states) == ["0", "1"], lora.task_module_states
    share = SharedSubspaceAdapters(
        ["net.0"], k=8, r=2, trainable=["net.3"], trainable_per_task=True, temporary_directions=1, check_ranks=True
    )
    run("share", share, root)
    assert sorted(share.task_module_states) == ["0", "1"], share.task_module_states
    # Shut gloo down before the interpreter exits: left to exit-time destructors, its threads
    # sometimes abort the process ("terminate called without an active exception", exit 134).
    dist.barrier()
    dist.destroy_process_group()
