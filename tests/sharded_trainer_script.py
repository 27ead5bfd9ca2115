"""Run by test_sharded_merge.py: ModelMerging in a real 2-process Trainer, under DDP or FSDP2 (ModelParallelStrategy).

``python sharded_trainer_script.py OUT_DIR MODE`` (MODE ``ddp`` or ``fsdp2``)
trains a 3-experience stream once per method on 2 gloo processes. A recording
callback keeps the whole fine-tuned weights at the end of every experience;
rank 0 then merges them without sharding (the same core, one process) and
checks that the Trainer's final whole weights equal it bit for bit. The final
weights of each method are saved to OUT_DIR/<mode>-<method>.pt for the test
to compare DDP with FSDP2. With ``fsdp2`` a run is also killed mid-stream and
resumed from its distributed checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import cl_plugin.merging.continual as continual_module
from cl_plugin._distributed_checkpoint import is_placeholder, sharded_view
from cl_plugin.errors import CheckpointError
from cl_plugin.callbacks import ContinualEvaluation, ModelMerging
from cl_plugin.merging.continual import ContinualMerge, is_dtensor
from cl_plugin.task_vectors import TaskVector

from stream_helpers import ToyStream, experience_data, trainer_kwargs

N_EXP, EPE = 3, 2
MOMENTUM = 0.9
METHODS = {"magmax": {}, "ties": {"top_k": 0.3}, "opcm": {}}


class Classifier(L.LightningModule):
    """Two blocks (each its own FSDP2 unit under ModelParallelStrategy) and a BatchNorm."""

    def __init__(self, crash_at_step: int | None = None):
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(8, 17), nn.BatchNorm1d(17), nn.ReLU())
        self.block2 = nn.Linear(17, 4)
        self.crash_at_step = crash_at_step

    def configure_model(self):
        if isinstance(self.trainer.strategy, L.pytorch.strategies.ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.block1, mesh=mesh)
            fully_shard(self.block2, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.block2(self.block1(x))

    def training_step(self, batch, batch_idx):
        if self.crash_at_step is not None and self.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=MOMENTUM)


def whole_state(module) -> dict[str, torch.Tensor]:
    """Every float entry whole, on every rank (DTensors gathered)."""
    out = {}
    for n, t in module.state_dict().items():
        if is_dtensor(t):
            t = t.full_tensor()
        if t.is_floating_point():
            out[n] = t.detach().clone()
    return out


class Recorder(L.Callback):
    """θ₀ and the whole fine-tuned weights at the end of every experience (before any merge is written)."""

    def __init__(self):
        self.theta0, self.ends = None, []

    def on_train_start(self, trainer, pl_module):
        if self.theta0 is None:
            self.theta0 = whole_state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % EPE == 0:
            self.ends.append(whole_state(pl_module))


class SavedState(L.Callback):
    """The ModelMerging state gathered whole on rank 0 each time a checkpoint is written (the last one kept)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        merging = next(cb for cb in trainer.callbacks if isinstance(cb, ModelMerging))
        self.state = merging.core.state_dict()  # every rank takes part; rank 0 gets whole tensors


class RestoredState(L.Callback):
    """The ModelMerging state as restored from a checkpoint (gathered whole on rank 0) when training starts."""

    def on_train_start(self, trainer, pl_module):
        merging = next(cb for cb in trainer.callbacks if isinstance(cb, ModelMerging))
        # every rank takes part; rank 0 gets whole tensors (on one process: the live state, so copied)
        self.state = cloned(merging.core.state_dict())


def cloned(state):
    """A copy of a nested state's tensors."""
    if isinstance(state, dict):
        return {k: cloned(v) for k, v in state.items()}
    return state.clone() if isinstance(state, torch.Tensor) else state


def same_state(a, b) -> bool:
    """Equal nested states: tensors bit for bit, the rest by value."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() <= b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def unsharded_merge(method, options, theta0, ends, statistics):
    """The merged weights, and the norms ModelMerging logs at the last boundary (merge, task vector), unsharded."""
    core = ContinualMerge(method, method_options=options)
    core.names = [n for n in theta0 if n not in statistics]
    core.statistic_names = [n for n in theta0 if n in statistics]
    core.theta0 = dict(theta0)
    for weights in ends:
        tv = core.fold(TaskVector.between({n: weights[n] for n in core.all_names}, core.theta0))
    return core.merged_tensors(), (core.merged_norm(), tv.norm())


class EvaluatedToyStream(ToyStream):
    """The toy stream with one test loader per experience, for ContinualEvaluation."""

    def test_dataloader(self):
        return [torch.utils.data.DataLoader(experience_data(i), batch_size=self.batch_size) for i in range(self.n_experiences)]


def strategy(mode):
    if mode == "ddp":
        return "ddp"
    return L.pytorch.strategies.ModelParallelStrategy(data_parallel_size=processes(mode), tensor_parallel_size=1)


def processes(mode):
    return 1 if mode == "fsdp2-w1" else 2


def fit(mode, method, options, root, model, ckpt_path=None, callbacks=(), stream=ToyStream):
    L.seed_everything(0, verbose=False)
    cb = ModelMerging(method, **options)
    trainer = L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[*callbacks, cb],
        default_root_dir=root, **trainer_kwargs(devices=processes(mode), strategy=strategy(mode), enable_checkpointing=bool(callbacks)),
    )
    trainer.fit(model, datamodule=stream(N_EXP, EPE), ckpt_path=ckpt_path)
    return trainer, cb


def continual_module_groups():
    import cl_plugin.merging.layout as layout_module

    return list(layout_module._CPU_GROUPS.values())


def resume_on_one_process(out):
    """Resume the 2-process FSDP2 run's distributed checkpoint on one process: DCP reshards the state."""
    restored = RestoredState()
    _, cb = fit("fsdp2-w1", "ties", METHODS["ties"], out, Classifier(), ckpt_path=str(out / "ckpt" / "last.ckpt"),
                callbacks=[restored])
    saved = torch.load(out / "saved-state.pt", weights_only=True)
    result = {"restored_equals_saved": same_state(restored.state, saved), "num_tasks": cb.merger.num_tasks,
              "sharded": cb.core.layout is not None and cb.core.layout.distributed}
    (out / "fsdp2-w1.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "fsdp2-w1":
        resume_on_one_process(out)
        sys.exit(0)
    if mode == "fsdp2":
        # As if the process group were NCCL alone (Lightning's default on GPUs), which refuses CPU tensors:
        # the core and the callbacks run their collectives over gloo copies of the groups.
        import cl_plugin.merging.layout as layout_module

        layout_module.takes_cpu_tensors = lambda group=None: False
    results = {}
    statistics = ["block1.1.running_mean", "block1.1.running_var"]
    # Under DDP, ModelMerging("opcm") alone places this small model's matrices whole on their
    # owners (allowed beyond the 1% balance limit here); beside ContinualEvaluation, whose compared
    # methods share its θ₀ slices and one task vector, it keeps the even split they use.
    continual_module.WHOLE_MATRIX_EXCESS = float("inf")
    runs = [(method, options, False) for method, options in METHODS.items()] + [("opcm", METHODS["opcm"], True)]
    for method, options, evaluated in runs:
        L.seed_everything(0, verbose=False)
        model = Classifier()
        recorder = Recorder()
        evaluation = ContinualEvaluation(compare=["magmax"]) if evaluated else None
        extra = [evaluation] if evaluated else []
        trainer, cb = fit(
            mode, method, options, out, model, callbacks=[recorder, *extra], stream=EvaluatedToyStream if extra else ToyStream
        )
        final = whole_state(model)
        layout = cb.core.layout
        placed = any(layout.holds_whole("block2.weight", r) and not layout["block2.weight"].sharded for r in range(2))
        if evaluated:  # collectives: every rank
            ours = cb.core.whole(cb.core.merger.merged_view())
            compared = evaluation._cores["opcm"]
            theirs = compared.whole(compared.merger.merged_view())
            evaluation_equal = all(torch.equal(ours[n], theirs[n]) for n in ours)
            last_row = evaluation.matrices["opcm"].matrix()[-1]  # trained on every experience, tested on all
            # The checkpoint fit refreshed at its end holds the evaluation's state (under FSDP2 its
            # mergers through the distributed checkpoint): a Trainer resuming it gets the same back.
            saved_evaluation = cloned(evaluation.state_dict())
            path = trainer.checkpoint_callback.best_model_path
            again = ContinualEvaluation(compare=["magmax"])
            fit(mode, method, options, out, Classifier(), ckpt_path=path, callbacks=[again], stream=EvaluatedToyStream)
            evaluation_restored = same_state(cloned(again.state_dict()), saved_evaluation)
        if trainer.global_rank == 0:
            expected, norms = unsharded_merge(method, options, recorder.theta0, recorder.ends, statistics)
            logged = cb.boundary_log[-1]
            outcome = {
                "own_gloo_group": any(g is layout.group for g in continual_module_groups()),
                "equals_unsharded_merge": all(torch.equal(final[n], expected[n]) for n in expected),
                # the logged norms are the whole model's, not rank 0's slices (equal up to rounding)
                "logged_norms": [
                    math.isclose(logged["merged_norm"], norms[0], rel_tol=1e-6),
                    math.isclose(logged["task_vector_norm"], norms[1], rel_tol=1e-6),
                ],
                "num_tasks": cb.merger.num_tasks,
                "sharded": layout is not None and layout.distributed,
                "matrices_whole": placed,
            }
            if evaluated:
                outcome |= {"equals_evaluation": evaluation_equal, "accuracies_finite": bool(torch.isfinite(last_row).all())}
                meta = torch.load(Path(path) / "meta.pt", weights_only=True) if Path(path).is_dir() else torch.load(path, weights_only=False)
                mergers = meta["callbacks"]["ContinualEvaluation"]["mergers"]
                outcome |= {
                    "evaluation_restored": evaluation_restored,
                    "evaluation_mergers_in_meta": sorted(
                        {"reference" if is_placeholder(v) else "tensor" for m in mergers.values() for k, v in m.items()
                         if "." in k and "running" not in k}
                    ),
                }
                results["opcm_beside_evaluation"] = outcome
            else:
                results[method] = outcome
                torch.save(final, out / f"{mode}-{method}.pt")
    # start_from="finetuned": at fit end the module holds the merge, and the checkpoint that
    # fit refreshes keeps the fine-tuned weights the next fit continues from (each rank's
    # slices, gathered whole or through the distributed checkpoint): a resumed run gets them back.
    L.seed_everything(0, verbose=False)
    recorder = Recorder()
    ckpt = ModelCheckpoint(dirpath=out / f"kept-{mode}", save_last=True)
    trainer, cb = fit(mode, "magmax", {"start_from": "finetuned"}, out, Classifier(), callbacks=[recorder, ckpt])
    kept = cb.core.export(cb._kept_weights)  # collective; whole on rank 0
    _, again = fit(mode, "magmax", {"start_from": "finetuned"}, out, Classifier(), ckpt_path=ckpt.last_model_path)
    restored_kept = again.core.export(again._kept_weights)
    if trainer.global_rank == 0:
        results["kept_weights"] = {
            "holds_merged": again._holds_merged,
            "restored_equals_kept": all(torch.equal(restored_kept[n], kept[n]) for n in kept),
            "kept_are_finetuned": all(torch.equal(kept[n].reshape(recorder.ends[-1][n].shape), recorder.ends[-1][n]) for n in kept),
        }
    if mode == "fsdp2":
        # Kill in experience 1, resume from the last distributed checkpoint: the same final weights.
        # θ₀ and the merger state go through torch.distributed.checkpoint, rank by rank: meta.pt
        # (written by rank 0 alone) keeps only a reference to each sharded tensor.
        ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1)
        saved = SavedState()
        L.seed_everything(0, verbose=False)
        model = Classifier(crash_at_step=9)
        try:
            fit(mode, "ties", METHODS["ties"], out, model, callbacks=[ckpt, saved])
        except RuntimeError:
            pass
        restored = RestoredState()
        resumed = Classifier()
        trainer, cb = fit(mode, "ties", METHODS["ties"], out, resumed, ckpt_path=str(out / "ckpt" / "last.ckpt"),
                          callbacks=[restored, ModelCheckpoint(dirpath=out / "ckpt2")])
        final = whole_state(resumed)
        # A damaged shard is seen by the rank that reads it alone: every rank refuses the load.
        state = cb.state_dict()  # the θ₀ and merge as a distributed checkpoint holds them: DTensors of each rank's rows
        damaged = state["theta0"]["block1.0.weight"]
        local = damaged.to_local().clone()
        if trainer.global_rank == 1:
            local.view(-1)[0] = float("nan")
        state["theta0"]["block1.0.weight"] = sharded_view(local, tuple(damaged.shape), cb.core.layout.mesh, cb.core.layout.mesh_dim)
        cb._restored_shards = True  # as after reading shards from a checkpoint
        try:
            cb.load_state_dict(state)
            refused = "loaded"
        except CheckpointError as exc:
            refused = "NaN" if "NaN" in str(exc) else "another process" if "Another process" in str(exc) else str(exc)
        refusals = [None, None]
        dist.all_gather_object(refusals, refused)
        if trainer.global_rank == 0:
            torch.save(saved.state, out / "saved-state.pt")  # for the resume on one process
            meta = torch.load(out / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)["callbacks"]["ModelMerging"]
            sharded_names = [n for n in meta["theta0"] if n not in statistics]
            uninterrupted = torch.load(out / "fsdp2-ties.pt", weights_only=True)
            merger_refs = [v for k, v in meta["merger"].items() if "." in k and k.split(".", 1)[1] in sharded_names]
            results["resumed_ties"] = {
                "restored_equals_saved": same_state(restored.state, saved.state),
                "folded_at_restore": restored.state["merger"]["num_tasks"],
                "num_tasks": cb.merger.num_tasks,
                # The parameters; not the BatchNorm statistics: under FSDP2 each rank keeps its own
                # (nothing syncs them between boundaries), and the model's distributed checkpoint
                # stores one rank's copy of such an unsharded buffer, the one DCP picks.
                "equals_uninterrupted": all(
                    torch.equal(final[n], uninterrupted[n]) for n in uninterrupted if n not in statistics
                ),
                "meta_holds_references": bool(sharded_names) and len(merger_refs) == 4 * len(sharded_names) and all(
                    is_placeholder(v) for v in [*merger_refs, *(meta["theta0"][n] for n in sharded_names)]
                ),
                "statistics_whole_in_meta": all(isinstance(meta["theta0"][n], torch.Tensor) for n in statistics),
                "damaged_shard_refused": refusals,
            }
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
