"""A checkpoint written in the middle of an epoch resumes bit-identically with ContinualDataModule's loader.

The runs happen in subprocesses (this file is also the script they run), one
thread each, so that the uninterrupted, the crashed and the resumed run do the
same computation: the resumed one in a new process, as after a real crash.

Loaders compared (``KINDS``):

- ``resumable``: ContinualDataModule's own training loader (saves its position);
- ``sampler``: the same ``DistributedSampler`` order as a function of
  ``(seed, epoch)``, in a plain DataLoader (exact at epoch ends only);
- ``shuffle``: a plain ``DataLoader(shuffle=True)`` (exact nowhere).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cl_plugin.benchmarks import ContinualDataModule, resumes_mid_epoch, split_digits

KINDS = ("resumable", "sampler", "shuffle")
EVERY = 7  # ModelCheckpoint(every_n_train_steps=EVERY)
BATCH = 32
EPOCHS_PER_EXPERIENCE = 2
NOT_RESUMABLE = "dataloader is not resumable"  # from Lightning's warning on a mid-epoch restart


class DigitsMLP(L.LightningModule):
    """A small MLP on the 64 pixels, SGD with momentum (so the optimizer state matters too)."""

    def __init__(self, crash_at_step: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.crash_at_step = crash_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at_step:
            raise RuntimeError("simulated crash")
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class SamplerOnly(ContinualDataModule):
    """The (seed, epoch) order in a plain DataLoader: no position is saved."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        world, rank = self._world()
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


class PlainShuffle(ContinualDataModule):
    """``DataLoader(shuffle=True)``: the order comes from the global RNG."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        return DataLoader(loader.dataset, batch_size=self.batch_size, shuffle=True)


DATAMODULES = {"resumable": ContinualDataModule, "sampler": SamplerOnly, "shuffle": PlainShuffle}


def make_datamodule(kind: str) -> ContinualDataModule:
    return DATAMODULES[kind](split_digits(2, seed=0), batch_size=BATCH, epochs_per_experience=EPOCHS_PER_EXPERIENCE)


def batches_per_epoch(dm: ContinualDataModule, experience: int, world: int) -> int:
    shard = math.ceil(len(dm._train_sets[experience]) / world)  # DistributedSampler pads to equal shards
    return math.ceil(shard / dm.batch_size)


def plan(world: int) -> dict[str, int]:
    """Where to crash: inside the first epoch of experience 1, a few steps after a periodic checkpoint."""
    dm = make_datamodule("resumable")
    n0, n1 = batches_per_epoch(dm, 0, world), batches_per_epoch(dm, 1, world)
    start = EPOCHS_PER_EXPERIENCE * n0  # global step at the start of epoch 2
    crash = start + n1 // 2 + 3
    if crash % EVERY == 0:
        crash += 1  # the exception checkpoint is skipped at a step that already has one
    periodic = crash - crash % EVERY
    assert start < periodic < start + n1, (start, periodic, n1)  # a mid-epoch checkpoint
    return {"start": start, "crash": crash, "periodic": periodic, "per_epoch": n1}


def trainer(folder: Path | None, world: int = 1, **kwargs) -> L.Trainer:
    callbacks = []
    if folder is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=folder, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1,
                save_last=True, save_on_exception=True,
            )
        )
    return L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        max_epochs=2 * EPOCHS_PER_EXPERIENCE, reload_dataloaders_every_n_epochs=1,
        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=folder is not None,
        callbacks=callbacks, **kwargs,
    )  # fmt: skip


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def bit_identical(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------- the runs

RESUMES = {"resumable": ("periodic", "exception"), "sampler": ("periodic",), "shuffle": ("periodic",)}


def train_and_crash(out: Path, kinds=KINDS) -> None:
    """Per kind: the uninterrupted run, then a run killed at plan()['crash'] (periodic + exception checkpoints)."""
    steps = plan(world=1)
    for kind in kinds:
        L.seed_everything(0, verbose=False)
        model = DigitsMLP()
        trainer(out / kind / "full").fit(model, datamodule=make_datamodule(kind))
        save_weights(model, out / kind / "full.safetensors")
        L.seed_everything(0, verbose=False)
        crashing = trainer(out / kind / "crashed")
        with pytest.raises(RuntimeError, match="simulated crash"):
            crashing.fit(DigitsMLP(crash_at_step=steps["crash"]), datamodule=make_datamodule(kind))


def checkpoint_of(out: Path, kind: str, name: str) -> Path:
    """The periodic checkpoint before the crash, or the last.ckpt the exception wrote."""
    file = f"step={plan(world=1)['periodic']}.ckpt" if name == "periodic" else "last.ckpt"
    return out / kind / "crashed" / file


def _resume(out: Path) -> None:
    """Script, in a new process: resume every kind from its checkpoints; record what Lightning warned."""
    import warnings

    found = {}
    for kind, names in RESUMES.items():
        for name in names:
            L.seed_everything(1, verbose=False)  # a different global RNG state than the interrupted run's
            model, t = DigitsMLP(), trainer(None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t.fit(model, datamodule=make_datamodule(kind), ckpt_path=str(checkpoint_of(out, kind, name)))
            save_weights(model, out / kind / f"resumed_{name}.safetensors")
            found[f"{kind}/{name}"] = {
                "resumes_mid_epoch": resumes_mid_epoch(t.train_dataloader),
                "lightning_warned": any(NOT_RESUMABLE in str(w.message) for w in caught),
            }
    (out / "resumes.json").write_text(json.dumps(found))


def _ddp(out: Path) -> None:
    """Script, strategy="ddp" on 2 processes: the uninterrupted run, then a resume from its mid-epoch checkpoint."""
    import torch.distributed as dist

    steps = plan(world=2)
    L.seed_everything(0, verbose=False)
    full = DigitsMLP()
    t = trainer(out / "full", world=2)
    t.fit(full, datamodule=make_datamodule("resumable"))
    L.seed_everything(1, verbose=False)
    resumed = DigitsMLP()
    ckpt = out / "full" / f"step={steps['periodic']}.ckpt"
    trainer(None, world=2).fit(resumed, datamodule=make_datamodule("resumable"), ckpt_path=str(ckpt))
    flat = torch.cat([p.detach().flatten() for p in resumed.state_dict().values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    reference = torch.cat([p.detach().flatten() for p in full.state_dict().values()])
    same = torch.tensor([int(torch.equal(flat, reference))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if t.global_rank == 0:
        print(f"RANKS IDENTICAL: {all(torch.equal(g, gathered[0]) for g in gathered)} world={dist.get_world_size()}")
        print(f"RESUMED EQUALS FULL ON EVERY RANK: {bool(same.item())}")
        print(f"MAX ABS DIFF: {float((flat - reference).abs().max())}")
    dist.barrier()
    dist.destroy_process_group()  # before exit: gloo's threads can abort the interpreter otherwise


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=300, env=env,
        cwd=Path(__file__).parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted and crashed runs here (one thread, as the script), every resume in a new process."""
    out = tmp_path_factory.mktemp("midepoch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_and_crash(out)
    finally:
        torch.set_num_threads(threads)
    run_script("resume", str(out))
    return out, json.loads((out / "resumes.json").read_text())


def test_checkpoints_are_mid_epoch(runs):
    out, _ = runs
    steps = plan(world=1)
    for name in ("periodic", "exception"):
        state = torch.load(checkpoint_of(out, "resumable", name), map_location="cpu", weights_only=False)
        loops = state["loops"]["fit_loop"]
        batches = loops["epoch_loop.batch_progress"]["current"]["processed"]
        assert 0 < batches < steps["per_epoch"], (name, batches)
        (position,) = loops["state_dict"]["combined_loader"]
        assert position["epoch"] == 2 and position["experience"] == 1
        assert position["batches_done"] == batches  # the failed step's batch is not counted
        if name == "exception":
            assert state["global_step"] == steps["crash"]


def test_resumable_loader_resumes_bit_identically(runs):
    out, found = runs
    full = out / "resumable" / "full.safetensors"
    for name in RESUMES["resumable"]:
        resumed = out / "resumable" / f"resumed_{name}.safetensors"
        assert bit_identical(full, resumed), (name, max_abs_diff(full, resumed))
        assert found[f"resumable/{name}"] == {"resumes_mid_epoch": True, "lightning_warned": False}


@pytest.mark.parametrize("kind", ["sampler", "shuffle"])
def test_plain_dataloaders_do_not(runs, kind):
    """Controls: the same resume with a plain DataLoader trains on other batches (and Lightning warns)."""
    out, found = runs
    diff = max_abs_diff(out / kind / "full.safetensors", out / kind / "resumed_periodic.safetensors")
    print(f"{kind}: max |delta| after a mid-epoch resume = {diff:.3g}")
    assert diff > 1e-3, (kind, diff)
    assert found[f"{kind}/periodic"] == {"resumes_mid_epoch": False, "lightning_warned": True}


@pytest.mark.ddp
def test_ddp_resume_mid_epoch_is_bit_identical(tmp_path):
    """strategy="ddp", 2 processes: each rank resumes its own shard at the saved batch."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("DDP test skipped: torch.distributed with the gloo backend is not available here")
    result = run_script("ddp", str(tmp_path))
    assert "RANKS IDENTICAL: True world=2" in result.stdout, result.stdout[-2000:]
    assert "RESUMED EQUALS FULL ON EVERY RANK: True" in result.stdout, result.stdout[-2000:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    phase, folder = sys.argv[1:3]
    if phase == "resume":
        _resume(Path(folder))
    else:
        _ddp(Path(folder))
