"""ModelMerging("fisher"): each experience's diagonal Fisher estimated at its boundary from its own training data.

Checked against a Fisher computed by hand (a linear model with a squared loss
and one example per batch, whose gradient is 2(w·x − y)x), against a batch
reference that reads the experience's own loader, against FusionBench's
batch Fisher merging through the boundary core (the fixture of
tests/fusionbench_reference), sharded over two gloo processes, and through a
crash and resume.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cl_plugin import TaskVector
from cl_plugin.benchmarks import ContinualDataModule, rotated_digits
from cl_plugin.callbacks import ContinualEvaluation, ModelMerging
from cl_plugin.errors import ConfigError
from cl_plugin.merging import diagonal_fisher
from cl_plugin.merging.continual import ContinualMerge

from reference_merging import reference_fisher
from stream_helpers import DigitsMLP, trainer_kwargs

FIXTURES = Path(__file__).resolve().parent / "fusionbench_reference"


# -- a model whose Fisher is computed by hand ------------------------------------------------------------


class LinearRegression(L.LightningModule):
    """y ≈ w·x with a squared loss; it logs in training_step, as Lightning modules do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -0.25, 1.0]]))

    def forward(self, x):
        return self.lin(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self(x) - y) ** 2).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_data(experience: int) -> TensorDataset:
    g = torch.Generator().manual_seed(10 + experience)
    x = torch.randn(4, 3, generator=g)
    y = x @ torch.tensor([1.0, 2.0, -1.0]) * (1 + experience)
    return TensorDataset(x, y)


class RecordAtFitEnd(Callback):
    """The trained weights of each fit, read before ModelMerging (after it in the list) writes the merge."""

    def __init__(self):
        self.weights = []

    def on_train_end(self, trainer, pl_module):
        self.weights.append(pl_module.lin.weight.detach().clone())


def hand_fisher(w: torch.Tensor, data: TensorDataset) -> torch.Tensor:
    """Mean over the examples of (2 (w·x − y) x)²: the empirical Fisher of (w·x − y)² with one example per batch."""
    x, y = data.tensors
    residual = x @ w.reshape(-1) - y
    return ((2 * residual[:, None] * x) ** 2).mean(0).reshape(w.shape)


@pytest.mark.parametrize("options", [{"normalize": False, "min_fisher": 0.0}, {}], ids=["plain", "default"])
def test_one_fit_per_experience_folds_the_hand_computed_fisher(options):
    model = LinearRegression()
    theta0 = model.lin.weight.detach().clone()
    merging = ModelMerging("fisher", fisher_batches=4, **options)
    record = RecordAtFitEnd()
    for experience in range(3):
        loader = DataLoader(regression_data(experience), batch_size=1, shuffle=False)
        trainer = L.Trainer(max_epochs=2, callbacks=[record, merging], **trainer_kwargs())
        trainer.fit(model, train_dataloaders=loader)
    taus = [{"lin.weight": w - theta0} for w in record.weights]
    fishers = [{"lin.weight": hand_fisher(w, regression_data(k))} for k, w in enumerate(record.weights)]
    expected = reference_fisher(taus, fishers, **{"normalize": True, "min_fisher": 1e-6, **options})["lin.weight"]
    got = model.lin.weight.detach() - theta0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert merging.merger.num_tasks == 3


def test_fisher_batches_limits_the_estimate_to_the_first_batches():
    model = LinearRegression()
    theta0 = model.lin.weight.detach().clone()
    record = RecordAtFitEnd()
    merging = ModelMerging("fisher", fisher_batches=2, normalize=False, min_fisher=0.0)
    for experience in range(2):
        loader = DataLoader(regression_data(experience), batch_size=1, shuffle=False)
        L.Trainer(max_epochs=1, callbacks=[record, merging], **trainer_kwargs()).fit(model, train_dataloaders=loader)
    first_two = [TensorDataset(*(t[:2] for t in regression_data(k).tensors)) for k in range(2)]
    fishers = [{"lin.weight": hand_fisher(w, d)} for w, d in zip(record.weights, first_two)]
    taus = [{"lin.weight": w - theta0} for w in record.weights]
    expected = reference_fisher(taus, fishers, normalize=False, min_fisher=0.0)["lin.weight"]
    torch.testing.assert_close((model.lin.weight.detach() - theta0).double(), expected, rtol=1e-5, atol=1e-7)


def test_fisher_loss_replaces_the_training_step_loss():
    model = LinearRegression()
    theta0 = model.lin.weight.detach().clone()
    record = RecordAtFitEnd()
    # Half the squared loss: its Fisher is a quarter of the hand one, which the normalised weights cancel.
    merging = ModelMerging(
        "fisher", fisher_batches=4, fisher_loss=lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).mean(), normalize=False, min_fisher=0.0
    )
    for experience in range(2):
        loader = DataLoader(regression_data(experience), batch_size=1, shuffle=False)
        L.Trainer(max_epochs=1, callbacks=[record, merging], **trainer_kwargs()).fit(model, train_dataloaders=loader)
    fishers = [{"lin.weight": hand_fisher(w, regression_data(k)) / 4} for k, w in enumerate(record.weights)]
    taus = [{"lin.weight": w - theta0} for w in record.weights]
    expected = reference_fisher(taus, fishers, normalize=False, min_fisher=0.0)["lin.weight"]
    torch.testing.assert_close((model.lin.weight.detach() - theta0).double(), expected, rtol=1e-5, atol=1e-7)


# -- one fit over a ContinualDataModule: the boundary comes after the next loader is built -------------------------


N_EXP, EPE = 3, 2


def digits_datamodule() -> ContinualDataModule:
    return ContinualDataModule(rotated_digits(n_experiences=N_EXP, validation_stream=True), batch_size=128, epochs_per_experience=EPE)


class RecordExperienceEnds(Callback):
    """The weights at the end of each experience's last epoch (before any boundary acts)."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % EPE == 0:
            self.weights.append({n: t.detach().clone() for n, t in pl_module.state_dict().items()})


def _reference_fisher_of(weights, dm, experience, n_batches):
    model = DigitsMLP(batchnorm=True)
    model.load_state_dict(weights)
    model.train()  # as training left it: BatchNorm on the batch's statistics
    loader = dm.experience_train_dataloader(experience)
    names = [n for n, p in model.named_parameters()]
    return diagonal_fisher(
        model, loader, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), names=names, max_batches=n_batches
    )


def test_one_fit_estimates_each_fisher_on_the_experience_own_training_data():
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(batchnorm=True)
    theta0 = {n: t.detach().clone() for n, t in model.state_dict().items()}
    record = RecordExperienceEnds()
    merging = ModelMerging("fisher", fisher_batches=3)
    dm = digits_datamodule()
    L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[record, merging], **trainer_kwargs()
    ).fit(model, datamodule=dm)
    names = merging.core.names
    fishers = []
    for k, weights in enumerate(record.weights):
        f = _reference_fisher_of(weights, dm, k, 3)
        fishers.append({n: f.get(n, torch.zeros_like(theta0[n])) for n in names})
    # The next experience's data gives another Fisher: the estimate really reads experience k's own loader.
    other = _reference_fisher_of(record.weights[0], dm, 1, 3)
    assert not torch.allclose(other["net.1.weight"], fishers[0]["net.1.weight"])
    taus = [{n: w[n] - theta0[n] for n in names} for w in record.weights]
    expected = reference_fisher(taus, fishers)
    state = model.state_dict()
    for n in names:
        torch.testing.assert_close((state[n] - theta0[n]).double(), expected[n], rtol=1e-4, atol=1e-6)
    # buffers (BatchNorm's running statistics) are averaged as usual; no Fisher is asked of them
    assert "net.2.running_mean" not in names


def test_the_estimate_leaves_statistics_rng_and_grad_as_they_were():
    from cl_plugin.callbacks._boundary_data import experience_fisher

    L.seed_everything(0, verbose=False)
    model = DigitsMLP(batchnorm=True)
    dm = digits_datamodule()
    dm.set_experience(0)
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs())
    trainer.fit(model, datamodule=dm)  # attaches the trainer; trains experience 0
    core = ContinualMerge("fisher")
    core.bind(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model.net[1].weight.grad = torch.ones_like(model.net[1].weight)
    rng = torch.get_rng_state()
    fisher = experience_fisher(trainer, model, core, 0, at_fit_end=True, n_batches=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # BatchNorm statistics included
    assert torch.equal(model.net[1].weight.grad, torch.ones_like(model.net[1].weight))
    assert set(fisher) == set(core.names) and all(bool((f >= 0).all()) for f in fisher.values())
    again = experience_fisher(trainer, model, core, 0, at_fit_end=True, n_batches=2)
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)


def test_experience_train_dataloader_gives_the_last_epoch_order():
    dm = digits_datamodule()
    loader = dm.experience_train_dataloader(1)
    assert loader.sampler.epoch == 2 * EPE - 1
    assert len(loader.dataset) == 1005
    first = next(iter(loader))[0]
    again = next(iter(dm.experience_train_dataloader(1)))[0]
    assert torch.equal(first, again)
    with pytest.raises(ConfigError, match=r"`experience` must be an int in \[0, 2\]"):
        dm.experience_train_dataloader(3)


# -- resume ------------------------------------------------------------------------------------------------------


def _fit(tmp_path, crash_at_step=None, ckpt_path=None):
    L.seed_everything(0 if ckpt_path is None else 123, verbose=False)
    model = DigitsMLP(batchnorm=True, crash_at_step=crash_at_step)
    merging = ModelMerging("fisher", scale="validate", fisher_batches=2, scale_grid=[0.5, 1.0, 1.5])
    evaluation = ContinualEvaluation(compare=["average"], scales={"average": "validate"})
    callbacks = [merging, evaluation, ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)]
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=digits_datamodule(), ckpt_path=ckpt_path)
    return model, merging, evaluation


# 8 batches per epoch, 2 epochs per experience. Step 26: inside experience 1 (the checkpoint is
# the end of its first epoch); step 32: the first step of experience 2 (the checkpoint is the end
# of experience 1, whose boundary, Fisher and λ the resumed run computes).
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("crash_at_step", [26, 32])
def test_fisher_and_validated_scale_resume_bit_identical(tmp_path, crash_at_step, uninterrupted):
    reference, ref_merging, ref_evaluation = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", crash_at_step=crash_at_step)
    resumed, merging, evaluation = _fit(tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    for (n, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert merging.scale_log == ref_merging.scale_log
    assert evaluation.results["average"]["scale"] == ref_evaluation.results["average"]["scale"]
    assert evaluation.results["fisher"]["accuracy_matrix"] == ref_evaluation.results["fisher"]["accuracy_matrix"]


# -- errors ------------------------------------------------------------------------------------------------------


def test_fisher_options_belong_to_the_fisher_method():
    with pytest.raises(ConfigError, match="`fisher_batches` applies to method='fisher'"):
        ModelMerging("magmax", fisher_batches=4)
    with pytest.raises(ConfigError, match="`fisher_loss` applies to method='fisher'"):
        ModelMerging("average", fisher_loss=lambda m, b: m(b[0]).sum())
    with pytest.raises(ConfigError, match=r"`fisher_batches` must be an int >= 1, got 0"):
        ModelMerging("fisher", fisher_batches=0)
    with pytest.raises(ConfigError, match="`fisher_loss` must be a function"):
        ModelMerging("fisher", fisher_loss="cross_entropy")


class ManualRegression(LinearRegression):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_needs_a_fisher_loss():
    loader = DataLoader(regression_data(0), batch_size=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[ModelMerging("fisher")], **trainer_kwargs())
    with pytest.raises(ConfigError, match="uses manual optimization.*fisher_loss="):
        trainer.fit(ManualRegression(), train_dataloaders=loader)
    merging = ModelMerging("fisher", fisher_loss=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    L.Trainer(max_epochs=1, callbacks=[merging], **trainer_kwargs()).fit(ManualRegression(), train_dataloaders=loader)
    assert merging.merger.num_tasks == 1


def test_training_step_without_a_loss_is_refused_with_the_fix():
    class NoLoss(LinearRegression):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return {"loss": loss} if self.global_step == 0 else None  # the Fisher's call comes after a step

    loader = DataLoader(regression_data(0), batch_size=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[ModelMerging("fisher")], **trainer_kwargs())
    with pytest.raises(ConfigError, match="returned NoneType.*fisher_loss="):
        trainer.fit(NoLoss(), train_dataloaders=loader)


# -- the boundary core: FusionBench's batch Fisher merging, unsharded and sharded ---------------------------------


class FixtureModule(nn.Module):
    def __init__(self, shapes, dtype):
        super().__init__()
        for n, shape in shapes.items():
            self.register_parameter(n, nn.Parameter(torch.zeros(shape, dtype=dtype)))


def _fixture():
    d = load_file(str(FIXTURES / "fisher.safetensors"))
    names = ["a", "b", "c"]
    taus = [{n: d[f"tau{t}.{n}"] for n in names} for t in range(3)]
    fishers = [{n: d[f"fisher{t}.{n}"] for n in names} for t in range(3)]
    return d, names, taus, fishers


@pytest.mark.parametrize("normalize", [True, False])
def test_core_fold_with_fisher_equals_fusionbench(normalize):
    # Tolerances as in test_merging_new_methods.py::test_fisher_equals_fusionbench (measured there).
    d, names, taus, fishers = _fixture()
    for dtype, tag, tolerance in ((torch.float64, "fb64", 1e-12), (torch.float32, "fb32", 2e-6)):
        module = FixtureModule({n: taus[0][n].shape for n in names}, dtype)
        core = ContinualMerge("fisher", method_options={"normalize": normalize})
        core.bind(module)
        core.capture_theta0(module)
        for tau, fisher in zip(taus, fishers):
            core.fold(TaskVector({n: t.to(dtype) for n, t in tau.items()}), fisher={n: f.to(dtype) for n, f in fisher.items()})
        merged = core.merger.merged()
        for n in names:
            assert (merged[n] - d[f"{tag}.normalize_{normalize}.{n}"]).abs().max() < tolerance


def test_core_fold_refuses_a_fisher_it_cannot_use():
    module = FixtureModule({"a": (2,)}, torch.float32)
    core = ContinualMerge("average")
    core.bind(module)
    core.capture_theta0(module)
    with pytest.raises(ConfigError, match="does not use a Fisher"):
        core.fold(TaskVector({"a": torch.ones(2)}), fisher={"a": torch.ones(2)})
    fisher_core = ContinualMerge("fisher")
    fisher_core.bind(module)
    fisher_core.capture_theta0(module)
    with pytest.raises(ConfigError, match="`fisher` lacks 1 merged tensor"):
        fisher_core.fold(TaskVector({"a": torch.ones(2)}), fisher={})
    assert fisher_core.num_tasks == 0


def _sharded_worker(rank, world, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _, names, taus, fishers = _fixture()
        results = {}
        for normalize in (True, False):
            for dtype in (torch.float32, torch.float64):
                merged = {}
                for shard in (None, (rank, world, None)):
                    module = FixtureModule({n: taus[0][n].shape for n in names}, dtype)
                    core = ContinualMerge("fisher", method_options={"normalize": normalize})
                    core.bind(module, shard=shard)
                    core.capture_theta0(module)
                    for tau, fisher in zip(taus, fishers):
                        with torch.no_grad():
                            for n in names:
                                getattr(module, n).copy_(tau[n].to(dtype))
                        core.fold(module, fisher={n: f.to(dtype) for n, f in fisher.items()})
                    merged[shard is None] = core.whole(core.merged_tensors())
                results[f"{normalize}-{dtype}"] = all(torch.equal(merged[True][n], merged[False][n]) for n in names)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_sharded_fisher_fold_equals_the_unsharded_one_bit_for_bit(tmp_path):
    # Each rank folds its slices; the task weight 1/‖F‖ is taken over the whole Fisher, as unsharded.
    import torch.multiprocessing as mp

    out = tmp_path / "results.pt"
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert results and all(results.values()), results


@pytest.mark.ddp
def test_ddp_ranks_fold_the_same_averaged_fisher(tmp_path):
    """strategy="ddp": each rank estimates on its own batches; every rank folds their mean and ends identical."""
    import subprocess
    import sys

    script = Path(__file__).with_name("ddp_fisher_script.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = "RANKS IDENTICAL: True SAME FISHER: True LOCAL DIFFER: True MEAN: True world=2 merged=2 boundaries=2"
    assert expected in result.stdout, result.stdout[-3000:]
