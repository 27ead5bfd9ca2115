"""Runs that used to do the wrong thing without a word: each now works exactly or raises a named error.

(Resumes are in test_resume_safety.py, in a fresh process.)
"""

from __future__ import annotations


import lightning as L
import pytest
import torch
from torch import nn

from cl_plugin.callbacks import ContinualEvaluation, LoRAAdapters, ModelMerging
from cl_plugin.errors import ConfigError, DtypeMismatchError, NonFiniteError
from cl_plugin.merging import get_merger
from cl_plugin.task_vectors import TaskVector

from resume_cases import EvalStream
from stream_helpers import N_CLASSES, N_FEATURES, TinyClassifier, ToyStream, trainer_kwargs

N_EXP, EPE = 3, 2


def float_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def fit_stream(model, callbacks, n_exp=N_EXP, **kwargs):
    trainer = L.Trainer(max_epochs=n_exp * EPE, reload_dataloaders_every_n_epochs=1, callbacks=callbacks, **trainer_kwargs(**kwargs))
    trainer.fit(model, datamodule=EvalStream(n_exp, EPE))
    return trainer


# -- two ModelMerging, spawn strategies ------------------------------------------------------------------------
@pytest.mark.parametrize("second", [lambda: ModelMerging("average"), lambda: ContinualEvaluation()], ids=["merging", "evaluation"])
def test_a_second_instance_is_refused(second):
    first = ModelMerging("magmax") if isinstance(second(), ModelMerging) else ContinualEvaluation()
    # One state key per callback: Lightning refuses the pair when the Trainer is built.
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `(ModelMerging|ContinualEvaluation)`"):
        L.Trainer(callbacks=[first, second()], **trainer_kwargs())


def test_a_second_model_merging_added_after_the_trainer_is_built_is_refused_at_setup():
    trainer = L.Trainer(max_epochs=2, callbacks=[ModelMerging("magmax")], **trainer_kwargs())
    trainer.callbacks.append(ModelMerging("average"))
    with pytest.raises(ConfigError, match=r"2 ModelMerging callbacks.*ContinualEvaluation\(compare=\['average'\]\)"):
        trainer.fit(TinyClassifier(), datamodule=ToyStream(1, 2))


@pytest.mark.parametrize(
    "make", [lambda: ModelMerging(), lambda: ContinualEvaluation(), lambda: LoRAAdapters(["net.0"], r=2)], ids=["merging", "evaluation", "lora"]
)
def test_strategies_that_spawn_or_fork_are_refused(make):
    # ddp_fork and ddp_spawn share Lightning's launcher; fork with one device keeps the test fast.
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, callbacks=[make()], **trainer_kwargs(devices=1, strategy="ddp_fork"))
    with pytest.raises(Exception, match=r"does not run under a strategy that spawns or forks.*strategy='ddp'"):
        trainer.fit(TinyClassifier(), datamodule=ToyStream(1, 2))


# -- parameters added or removed during a fit ---------------------------------------------------------------------
class ChangingClassifier(TinyClassifier):
    """Adds (or removes) a parameter when experience 1 starts."""

    def __init__(self, change: str):
        super().__init__()
        self.change = change
        if change == "remove":
            self.extra = nn.Parameter(torch.zeros(3))

    def on_train_epoch_start(self):
        if self.current_epoch == EPE:
            if self.change == "add":
                self.extra = nn.Parameter(torch.zeros(3))
            else:
                del self.extra


@pytest.mark.parametrize("change, pattern", [("add", r"added \['extra'\], removed \[\]"), ("remove", r"added \[\], removed \['extra'\]")])
def test_a_parameter_added_or_removed_during_fit_is_caught_before_folding(change, pattern):
    cb = ModelMerging("magmax")
    with pytest.raises(ConfigError, match=r"changed during experience 1 \(" + pattern):
        fit_stream(ChangingClassifier(change), [cb])
    assert cb.merger.num_tasks == 1  # experience 0 folded, experience 1 not


# -- tied weights ----------------------------------------------------------------------------------------------
class TiedClassifier(L.LightningModule):
    """Embeds a class index and predicts it back with the transposed embedding (tied, as GPT-2's head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(N_CLASSES, N_FEATURES)
        self.body = nn.Linear(N_FEATURES, N_FEATURES)
        self.head = nn.Linear(N_FEATURES, N_CLASSES, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y) + 0.01 * self.embed(y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("method", ["magmax", "random", "task_arithmetic"])
def test_a_tied_weight_is_merged_once_and_stays_tied(method):
    L.seed_everything(0, verbose=False)
    model = TiedClassifier()
    theta0 = float_state(model)
    cb = ModelMerging(method)
    ends = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if (trainer.current_epoch + 1) % EPE == 0:
                ends.append(float_state(pl_module))

    fit_stream(model, [Record(), cb])
    assert model.head.weight is model.embed.weight  # still one tensor
    assert "head.weight" not in cb.base_weights and len(cb.merger.merged()) == 3  # stored and folded once
    # Independently: fold the recorded fine-tuned weights over the distinct tensors only.
    names = ["embed.weight", "body.weight", "body.bias"]
    reference = get_merger(method)
    for weights in ends:
        reference.update(TaskVector.between({n: weights[n] for n in names}, {n: theta0[n] for n in names}))
    expected = reference.merged().apply_to({n: theta0[n] for n in names}, cb.scale)
    for n in names:
        assert torch.equal(model.state_dict()[n], expected[n]), n
    merged = cb.merged_state_dict(model)
    assert merged["head.weight"] is merged["embed.weight"]


# -- overflow ----------------------------------------------------------------------------------------------------
class Overflowing(TinyClassifier):
    """Sets a buffer to 3e38 (finite in float32) at the end of every experience."""

    def __init__(self):
        super().__init__()
        self.register_buffer("big", torch.zeros(2))

    def on_train_epoch_end(self):
        self.big.fill_(3e38)


def test_a_merge_that_overflows_names_the_tensor_and_leaves_the_merge_as_it_was():
    cb = ModelMerging("task_arithmetic")
    with pytest.raises(NonFiniteError, match=r"'big'"):
        fit_stream(Overflowing(), [cb])
    assert cb.merger.num_tasks == 1
    assert torch.equal(cb.merger.merged()["big"], torch.full((2,), 3e38))


# -- snapshot_device, θ₀ checked at setup ------------------------------------------------------------------
def test_snapshot_device_meta_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"snapshot_device='meta'` holds no values"):
        ModelMerging(snapshot_device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_snapshot_device_cuda_without_a_gpu_is_refused_at_setup():
    cb = ModelMerging(snapshot_device="cuda")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **trainer_kwargs())
    with pytest.raises(ConfigError, match=r"`snapshot_device` is 'cuda', but this machine has no CUDA device"):
        trainer.fit(TinyClassifier(), datamodule=ToyStream(1, 2))
    assert trainer.global_step == 0


def _theta0_of(model, transform):
    return {n: transform(t) for n, t in model.state_dict().items()}


@pytest.mark.parametrize(
    "transform, error, pattern",
    [
        (lambda t: t.half() if t.is_floating_point() else t, DtypeMismatchError, r"θ₀ \(`base_weights`\).*θ₀ must be in the model's dtypes"),
        (lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t, NonFiniteError, r"θ₀ \(`base_weights`\) tensor 'net.0.weight' holds NaN"),
    ],
    ids=["float16", "nan"],
)
def test_bad_base_weights_are_caught_before_the_first_step(transform, error, pattern):
    model = TinyClassifier()
    cb = ModelMerging(base_weights=_theta0_of(TinyClassifier(), transform))
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **trainer_kwargs())
    before = float_state(model)
    with pytest.raises(error, match=pattern):
        trainer.fit(model, datamodule=ToyStream(1, 2))
    assert trainer.global_step == 0
    assert all(torch.equal(before[n], t) for n, t in float_state(model).items())


def test_a_model_whose_dtype_changed_between_fits_is_caught_before_the_first_step():
    model = TinyClassifier()
    cb = ModelMerging()
    dm = ToyStream(2, 1)
    dm.set_experience(0)
    L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    model.double()
    dm.set_experience(1)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs())
    with pytest.raises(DtypeMismatchError, match=r"the model against θ₀ \(from the earlier experiences\)"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0 and cb.merger.num_tasks == 1


# -- a diverged fit in the user's loop can be retried -------------------------------------------------------------
class Poisonable(TinyClassifier):
    """Its loss becomes NaN while ``poison`` is set."""

    poison = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.poison else loss


def _loop(model, cb, poison_fit=None):
    dm = ToyStream(N_EXP, EPE)
    for e in range(N_EXP):
        dm.set_experience(e)
        dm.epoch_offset = e * EPE
        model.poison = e == poison_fit
        trainer = L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs())
        if e == poison_fit:
            held = float_state(model)
            with pytest.raises(NonFiniteError, match=r"training diverged in experience 1.*Call `trainer.fit` again"):
                trainer.fit(model, datamodule=dm)
            # The merge is as it was and the module holds what it held before the failed fit.
            assert cb.merger.num_tasks == 1
            assert all(torch.equal(held[n], t) for n, t in float_state(model).items() if n in cb.base_weights)
            model.poison = False
            trainer = L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs())
        trainer.fit(model, datamodule=dm)


@pytest.mark.parametrize("start_from", ["finetuned", "pretrained", "merged"])
def test_a_fit_that_diverges_can_be_retried_and_ends_as_if_it_had_not(start_from):
    L.seed_everything(0, verbose=False)
    reference = Poisonable()
    _loop(reference, ModelMerging("magmax", start_from=start_from))
    L.seed_everything(0, verbose=False)
    retried = Poisonable()
    cb = ModelMerging("magmax", start_from=start_from)
    _loop(retried, cb, poison_fit=1)
    assert cb.merger.num_tasks == N_EXP
    ref = float_state(reference)
    assert all(torch.equal(ref[n], t) for n, t in float_state(retried).items()), "a retried fit must end bit-identical"


def test_divergence_with_evaluation_records_nothing_for_the_experience():
    model = Poisonable()
    evaluation = ContinualEvaluation(compare=["average"])
    cb = ModelMerging("magmax")
    dm = EvalStream(N_EXP, EPE)
    dm.set_experience(0)
    L.Trainer(max_epochs=EPE, callbacks=[evaluation, cb], **trainer_kwargs()).fit(model, datamodule=dm)
    model.poison = True
    dm.set_experience(1)
    with pytest.raises(NonFiniteError, match=r"ModelMerging: training diverged in experience 1"):
        L.Trainer(max_epochs=EPE, callbacks=[evaluation, cb], **trainer_kwargs()).fit(model, datamodule=dm)
    matrix = evaluation.matrices["sequential_finetuning"].compute()
    assert not torch.isnan(matrix[0]).all() and torch.isnan(matrix[1]).all()
    assert evaluation._mergers["average"].num_tasks == 1


def test_divergence_without_a_merging_callback_is_reported_by_the_evaluation():
    model = Poisonable()
    model.poison = True
    with pytest.raises(NonFiniteError, match=r"ContinualEvaluation: training diverged in experience 0"):
        fit_stream(model, [ContinualEvaluation()], n_exp=1)


# -- writers ------------------------------------------------------------------------------------------------------
def test_results_written_twice_are_overwritten_with_a_log_line(tmp_path, caplog):
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        fit_stream(TinyClassifier(), [ContinualEvaluation(output_dir=tmp_path)], n_exp=1)
    assert (tmp_path / "results.json").exists()
    assert any("overwriting existing file" in r.getMessage() and "results.json" in r.getMessage() for r in caplog.records)


# -- mid-epoch checkpoints -----------------------------------------------------------------------------------------
def test_a_mid_epoch_resume_with_a_loader_that_cannot_continue_the_epoch_warns(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer = L.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[ModelMerging(), ckpt], **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(TinyClassifier(crash_at_step=5), datamodule=ToyStream(2, 2))
    resumed = L.Trainer(max_epochs=4, reload_dataloaders_every_n_epochs=1, callbacks=[ModelMerging()], **kwargs)
    with pytest.warns(UserWarning, match=r"written in the middle of an epoch \(3 batches done\).*not end bit-identical"):
        resumed.fit(TinyClassifier(), datamodule=ToyStream(2, 2), ckpt_path=str(tmp_path / "step=3.ckpt"))


# -- a new callback per fit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: ModelMerging("magmax"), lambda: ContinualEvaluation()], ids=["merging", "evaluation"])
def test_a_new_callback_in_a_later_fit_of_the_same_module_is_refused(make):
    model = TinyClassifier()
    dm = EvalStream(2, 1)
    dm.set_experience(0)
    L.Trainer(max_epochs=1, callbacks=[make()], **trainer_kwargs()).fit(model, datamodule=dm)
    dm.set_experience(1)
    second = make()
    trainer = L.Trainer(max_epochs=1, callbacks=[second], **trainer_kwargs())
    with pytest.raises(ConfigError, match=r"trained in an earlier `fit` under another .* Pass the same"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0

def test_a_new_model_merging_with_base_weights_starts_a_new_stream_on_purpose():
    model = TinyClassifier()
    dm = EvalStream(2, 1)
    dm.set_experience(0)
    L.Trainer(max_epochs=1, callbacks=[ModelMerging("magmax")], **trainer_kwargs()).fit(model, datamodule=dm)
    start = {k: v.clone() for k, v in model.state_dict().items()}  # the first stream's merged weights
    dm.set_experience(1)
    second = ModelMerging("magmax", base_weights=start)
    L.Trainer(max_epochs=1, callbacks=[second], **trainer_kwargs()).fit(model, datamodule=dm)
    assert second.merger.num_tasks == 1
    for name, value in second.core.theta0.items():  # θ₀ of the new stream is what the user gave
        assert torch.equal(value, start[name]), name



def test_adapter_callbacks_refuse_fsdp2_until_it_is_tested():
    import types

    from lightning.pytorch.strategies import ModelParallelStrategy

    cb = LoRAAdapters(["net.0"], r=2)
    stub = types.SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), callbacks=[cb], world_size=1)
    with pytest.raises(ConfigError, match=r"does not run under ModelParallelStrategy \(FSDP2\) yet"):
        cb.setup(stub, TinyClassifier(), "fit")


@pytest.mark.parametrize("strategy", ["fsdp1", "deepspeed"])
def test_fsdp1_and_deepspeed_are_refused_with_the_strategy_to_use(strategy):
    import types

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    cls = FSDPStrategy if strategy == "fsdp1" else DeepSpeedStrategy
    stub = types.SimpleNamespace(strategy=cls.__new__(cls), callbacks=[], world_size=2)
    cb = ModelMerging()
    stub.callbacks.append(cb)
    with pytest.raises(ConfigError, match=r"does not run under .*ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)"):
        cb.setup(stub, TinyClassifier(), "fit")
