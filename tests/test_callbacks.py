"""ModelMerging: boundaries in both stream styles, start_from, resume, DDP, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from cl_plugin import TaskVector
from cl_plugin.callbacks import ModelMerging
from cl_plugin.errors import ConfigError, NoMatchingModulesError, StateDictMismatchError
from cl_plugin.merging import get_merger

from stream_helpers import TinyClassifier, ToyStream, trainer_kwargs

N_EXP, EPE = 3, 2


def float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class RecordingMerging(ModelMerging):
    """Records the weights at every experience start and end, and checks invariants inside the hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts, self.ends, self.optimizer_state_sizes = [], [], []

    def on_experience_start(self, trainer, pl_module, experience):
        super().on_experience_start(trainer, pl_module, experience)
        self.starts.append((experience, float_state(pl_module)))
        self.optimizer_state_sizes.append(sum(len(o.state) for o in trainer.optimizers))

    def on_experience_end(self, trainer, pl_module, experience, at_fit_end):
        self.ends.append((experience, float_state(pl_module)))
        super().on_experience_end(trainer, pl_module, experience, at_fit_end)


def run_one_fit(method="magmax", seed=0, **cb_kwargs):
    L.seed_everything(seed, verbose=False)
    model = TinyClassifier()
    theta0 = float_state(model)
    cb = RecordingMerging(method, **cb_kwargs)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
    return model, cb, theta0


def run_fit_per_experience(method="magmax", reuse_trainer=False, seed=0, **cb_kwargs):
    L.seed_everything(seed, verbose=False)
    model = TinyClassifier()
    theta0 = float_state(model)
    cb = RecordingMerging(method, **cb_kwargs)
    dm = ToyStream(N_EXP, EPE)
    trainer = None
    for e in range(N_EXP):
        dm.set_experience(e)
        if trainer is None or not reuse_trainer:
            trainer = L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs())
        else:
            trainer.fit_loop.max_epochs += EPE
        # The sampler's epoch must match the one-fit run for the comparison to be exact.
        dm.epoch_offset = 0 if reuse_trainer else e * EPE
        trainer.fit(model, datamodule=dm)
    return model, cb, theta0


# -- boundaries and the merged result -------------------------------------------------------
STATISTICS = ("net.1.running_mean", "net.1.running_var")  # TinyClassifier's BatchNorm


def expected_merge(method, ends, theta0, scale, statistics="average", **options):
    """θ₀ + scale·merge(τ₁..τ_k) from the recorded fine-tuned weights; BatchNorm statistics averaged (the default)."""
    names = [n for n, t in theta0.items() if t.is_floating_point() and (statistics == "merge" or n not in STATISTICS)]
    reference = get_merger(method, **options)
    averaged = get_merger("average")
    for weights in ends:
        reference.update(TaskVector.between({n: weights[n] for n in names}, {n: theta0[n] for n in names}))
        if statistics == "average":
            averaged.update(TaskVector.between({n: weights[n] for n in STATISTICS}, {n: theta0[n] for n in STATISTICS}))
    expected = reference.merged().apply_to({n: theta0[n] for n in names}, scale)
    if statistics == "average":
        expected.update(averaged.merged().apply_to({n: theta0[n] for n in STATISTICS}, 1.0))
    return expected



@pytest.mark.parametrize("method", ["magmax", "average", "opcm"])
def test_one_fit_merges_every_experience_and_ends_with_merged_weights(method):
    model, cb, theta0 = run_one_fit(method)
    assert [e for e, _ in cb.starts] == [0, 1, 2]
    assert [e for e, _ in cb.ends] == [0, 1, 2]
    assert cb.merger.num_tasks == N_EXP
    # Independently: fold the recorded task vectors and apply to θ₀.
    expected = expected_merge(method, [w for _, w in cb.ends], theta0, cb.scale)
    final = model.state_dict()
    for n in expected:
        assert torch.equal(final[n], expected[n]), n
    # integer buffers pass through with their trained values
    assert int(final["net.1.num_batches_tracked"]) == N_EXP * EPE * 4


def test_fit_per_experience_gives_the_same_weights_as_one_fit():
    one, _, _ = run_one_fit()
    per, cb, _ = run_fit_per_experience()
    assert [e for e, _ in cb.ends] == [0, 1, 2]
    assert_same_weights(float_state(one), float_state(per))


def test_reused_trainer_per_experience_merges_every_experience():
    model, cb, theta0 = run_fit_per_experience(reuse_trainer=True)
    assert [e for e, _ in cb.ends] == [0, 1, 2]
    assert cb.merger.num_tasks == N_EXP


@pytest.mark.parametrize("runner", [run_one_fit, run_fit_per_experience])
def test_start_from_pretrained_resets_to_theta0(runner):
    _, cb, theta0 = runner(start_from="pretrained")
    for experience, weights in cb.starts:
        for n, t in theta0.items():
            if t.is_floating_point():
                assert torch.equal(weights[n], t), (experience, n)


@pytest.mark.parametrize("runner", [run_one_fit, run_fit_per_experience])
def test_start_from_finetuned_continues_from_the_last_weights(runner):
    _, cb, _ = runner(start_from="finetuned")
    for (_, end), (_, start) in zip(cb.ends[:-1], cb.starts[1:]):
        for n, t in end.items():
            if t.is_floating_point():
                assert torch.equal(start[n], t), n


@pytest.mark.parametrize("runner", [run_one_fit, run_fit_per_experience])
def test_start_from_merged_starts_from_theta0_plus_scaled_merge(runner):
    _, cb, theta0 = runner(start_from="merged", method="average")
    ends = [end for _, end in cb.ends]
    for k, (_, start) in enumerate(cb.starts[1:], start=1):
        expected = expected_merge("average", ends[:k], theta0, cb.scale)
        for n in expected:
            assert torch.allclose(start[n], expected[n], atol=1e-7), n


@pytest.mark.parametrize("statistics", ["average", "merge"])
def test_batchnorm_statistics_are_averaged_by_default_or_merged_like_weights(statistics):
    model, cb, theta0 = run_one_fit("task_arithmetic", statistics=statistics)
    expected = expected_merge("task_arithmetic", [w for _, w in cb.ends], theta0, cb.scale, statistics=statistics)
    final = model.state_dict()
    for n in STATISTICS:
        assert torch.equal(final[n], expected[n]), n
    assert set(cb.core.statistic_names) == (set(STATISTICS) if statistics == "average" else set())


def test_optimizer_state_is_reset_at_each_boundary_unless_kept():
    _, cb, _ = run_one_fit()
    assert cb.optimizer_state_sizes == [0, 0, 0]
    _, kept, _ = run_one_fit(reset_optimizer=False)
    assert kept.optimizer_state_sizes[0] == 0 and all(s > 0 for s in kept.optimizer_state_sizes[1:])


def test_merged_weights_context_restores_training_weights():
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    cb = ModelMerging("magmax", start_from="finetuned")
    dm = ToyStream(2, 1)
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs())
    trainer.fit(model, datamodule=dm)
    # After fit the module holds the merged weights; the training weights are kept aside.
    merged = cb.merged_state_dict(model)
    assert_same_weights({k: v for k, v in merged.items()}, float_state(model))
    before = float_state(model)
    with cb.merged_weights(model):
        assert_same_weights(float_state(model), before)
    assert_same_weights(float_state(model), before)


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))


def test_logs_merge_time_and_merged_norm():
    L.seed_everything(0, verbose=False)
    logger = RecordingLogger()
    cb = ModelMerging("magmax")
    kwargs = trainer_kwargs(logger=logger)
    trainer = L.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[cb], log_every_n_steps=1, **{k: v for k, v in kwargs.items()})
    trainer.fit(TinyClassifier(), datamodule=ToyStream(2, 2))
    logged = [m for m, _ in logger.metrics if "cl/magmax/merged_norm" in m]
    assert len(logged) == 2
    assert all(m["cl/magmax/merge_time_s"] >= 0 and m["cl/magmax/merged_norm"] > 0 for m in logged)


def test_experience_without_optimizer_step_is_skipped_with_a_warning():
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(skip_experience=1)
    cb = ModelMerging("magmax")
    trainer = L.Trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1, callbacks=[cb], **trainer_kwargs())
    with pytest.warns(UserWarning, match="ended before any optimizer step changed a weight"):
        trainer.fit(model, datamodule=ToyStream(3, 2))
    assert cb.merger.num_tasks == 2


def test_exclude_keeps_trained_values_for_excluded_names():
    model, cb, theta0 = run_one_fit(exclude=("net.3.*",))
    assert "net.3.weight" not in cb.base_weights
    last_end = cb.ends[-1][1]
    assert torch.equal(model.state_dict()["net.3.weight"], last_end["net.3.weight"])


# -- resume -------------------------------------------------------------------------------------


# 4 steps per epoch, 2 epochs per experience; a checkpoint at every epoch's end.
# Step 6: inside experience 0 (before the first boundary); step 9: just after
# the first boundary (the resume starts exactly at experience 1); step 17:
# inside experience 2.
@pytest.mark.parametrize("crash_at_step", [6, 9, 17])
@pytest.mark.parametrize("method", ["magmax", "random"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, crash_at_step, method):
    reference, _, _ = run_one_fit(method)

    L.seed_everything(0, verbose=False)
    model = TinyClassifier(crash_at_step=crash_at_step)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[ModelMerging(method), ckpt], **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))

    L.seed_everything(123, verbose=False)  # the resumed process starts from another RNG state
    resumed_model = TinyClassifier()
    cb = ModelMerging(method)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb, ModelCheckpoint(dirpath=tmp_path)], **kwargs)
    trainer.fit(resumed_model, datamodule=ToyStream(N_EXP, EPE), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb.merger.num_tasks == N_EXP
    assert_same_weights(float_state(reference), float_state(resumed_model))


def test_state_dict_round_trip_through_a_checkpoint_file(tmp_path):
    _, cb, _ = run_one_fit("ties")
    path = tmp_path / "cb.pt"
    torch.save(cb.state_dict(), path)
    fresh = ModelMerging("ties")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.merger.num_tasks == N_EXP
    for n, t in cb.merger.merged().items():
        assert torch.equal(fresh.merger.merged()[n], t)
    with pytest.raises(ConfigError, match="method: checkpoint 'ties', now 'magmax'"):
        ModelMerging("magmax").load_state_dict(torch.load(path, weights_only=True))


def test_the_state_key_names_the_callback_not_its_settings():
    # A resume with other settings must find its state (and be told what differs), never start over.
    keys = {ModelMerging("magmax").state_key, ModelMerging("opcm", scale=0.3, start_from="merged").state_key}
    assert keys == {"ModelMerging"}
    assert RecordingMerging("magmax").state_key == "ModelMerging"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="magmaks"), r"Unknown merging method 'magmaks'.*Did you mean 'magmax'"),
        (dict(method="ties", topk=0.2), r"Unknown option\(s\) \['topk'\].*top_k"),
        (dict(scale=0.0), r"`scale` must be a real number in \(0, 10\], got 0.0"),
        (dict(scale=11), r"got 11"),
        (dict(scale=float("nan")), r"got nan"),
        (dict(scale="0.5"), r"got '0.5'"),
        (dict(start_from="pretrain"), r"`start_from` must be one of.*Did you mean 'pretrained'"),
        (dict(exclude=[3]), r"`exclude` must be glob patterns"),
        (dict(snapshot_device="gpu7"), r"`snapshot_device` 'gpu7'"),
        (dict(base_weights="weights.pt"), r"not a .safetensors file"),
        (dict(base_weights="missing.safetensors"), r"does not exist"),
        (dict(reset_optimizer="yes"), r"`reset_optimizer` must be True or False"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelMerging(**kwargs)


def test_base_weights_file_must_match_the_model(tmp_path):
    from safetensors.torch import save_file

    model = TinyClassifier()
    state = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    wrong_shape = dict(state, **{"net.0.weight": torch.zeros(3, 3)})
    save_file(wrong_shape, tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.items() if k != "net.3.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    before = float_state(model)
    for name, error, match in [
        ("shape", StateDictMismatchError, r"'net.0.weight': expected \(16, 8\), got \(3, 3\)"),
        ("missing", StateDictMismatchError, r"lacks 1 tensor\(s\).*'net.3.bias'"),
    ]:
        cb = ModelMerging(base_weights=tmp_path / f"{name}.safetensors")
        trainer = L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs())
        with pytest.raises(error, match=match):
            trainer.fit(model, datamodule=ToyStream(1, 1))
        assert_same_weights(before, float_state(model))


def test_base_weights_file_is_used_as_theta0(tmp_path):
    from safetensors.torch import save_file

    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    base = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(base, tmp_path / "base.safetensors")
    cb = ModelMerging("magmax", base_weights=str(tmp_path / "base.safetensors"), start_from="pretrained")
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(1, 1))
    assert all(torch.equal(t, torch.zeros_like(t)) for t in cb.base_weights.values())


class NoFloats(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.register_buffer("counter", torch.zeros(3, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


def test_model_without_float_parameters_is_rejected():
    trainer = L.Trainer(max_epochs=1, callbacks=[ModelMerging()], **trainer_kwargs())
    with pytest.raises(ConfigError, match="no floating-point parameters or buffers"):
        trainer.fit(NoFloats(), datamodule=ToyStream(1, 1))


def test_exclude_that_leaves_nothing_is_rejected():
    trainer = L.Trainer(max_epochs=1, callbacks=[ModelMerging(exclude=("net.*",))], **trainer_kwargs())
    with pytest.raises(NoMatchingModulesError, match="No tensor is left"):
        trainer.fit(TinyClassifier(), datamodule=ToyStream(1, 1))


def test_architecture_change_between_experiences_is_rejected():
    L.seed_everything(0, verbose=False)
    cb = ModelMerging()
    dm = ToyStream(2, 1)
    model = TinyClassifier()
    dm.set_experience(0)
    L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    model.extra = torch.nn.Linear(2, 2)
    dm.set_experience(1)
    with pytest.raises(ConfigError, match=r"changed since the first experience \(added \['extra.weight', 'extra.bias'\]"):
        L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    assert cb.merger.num_tasks == 1


def test_reshaped_parameter_between_experiences_is_rejected_before_training():
    L.seed_everything(0, verbose=False)
    cb = ModelMerging()
    dm = ToyStream(2, 1)
    model = TinyClassifier()
    dm.set_experience(0)
    L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    model.net[3] = torch.nn.Linear(16, 5)
    dm.set_experience(1)
    with pytest.raises(StateDictMismatchError, match=r"'net.3.weight': expected \(4, 16\), got \(5, 16\)"):
        L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    assert cb.merger.num_tasks == 1


# -- DDP -------------------------------------------------------------------------------------------


def _ddp_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.ddp
def test_ddp_script_ranks_end_bit_identical(tmp_path):
    """strategy="ddp" re-runs the script in a second process: compare all ranks' weights after fit."""
    script = Path(__file__).with_name("ddp_merging_script.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RANKS IDENTICAL: True" in result.stdout, result.stdout[-3000:]


def test_resuming_a_finished_run_still_merges_the_last_experience(tmp_path):
    """A checkpoint written after the last epoch (before fit's end) skips the training loop on resume."""
    reference, _, _ = run_one_fit()

    class StopBeforeFitEnds(L.Callback):
        def on_train_end(self, trainer, pl_module):
            raise RuntimeError("killed after the last checkpoint")

    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer = L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1,
        callbacks=[StopBeforeFitEnds(), ModelMerging("magmax"), ckpt], **kwargs,
    )
    with pytest.raises(RuntimeError, match="killed after the last checkpoint"):
        trainer.fit(TinyClassifier(), datamodule=ToyStream(N_EXP, EPE))

    resumed = TinyClassifier()
    cb = ModelMerging("magmax")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb, ckpt], **kwargs)
    trainer.fit(resumed, datamodule=ToyStream(N_EXP, EPE), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb.merger.num_tasks == N_EXP
    assert_same_weights(float_state(reference), float_state(resumed))
