"""LoRAAdapters and SharedSubspaceAdapters: both stream styles, results against the algorithms, resume, DDP, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cl_plugin import TaskVector
from cl_plugin.adapters import SharedLinear, SharedSubspace, inject_lora, lora_delta, lora_layers
from cl_plugin.callbacks import ContinualEvaluation, ModelMerging
from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters
from cl_plugin.errors import ConfigError, NoMatchingModulesError
from cl_plugin.merging import get_merger

from stream_helpers import TinyClassifier, ToyStream, experience_data, trainer_kwargs

N_EXP, EPE = 3, 2
TARGETS = ["net.0"]  # TinyClassifier: net.0 Linear(8, 16), net.1 BatchNorm, net.3 Linear(16, 4)
HEAD = ["net.3"]
HEAD_STATE = ("net.3.weight", "net.3.bias")
WEIGHT = "net.0.weight"


def lora_kwargs(**overrides):
    kwargs = dict(target_modules=TARGETS, r=2, alpha=4.0, trainable=HEAD)
    kwargs.update(overrides)
    return kwargs


def share_kwargs(**overrides):
    kwargs = dict(target_modules=TARGETS, k=8, r=2, alpha=4.0, trainable=HEAD)
    kwargs.update(overrides)
    return kwargs


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b, names=None):
    if names is None:
        assert a.keys() == b.keys()
        names = a.keys()
    for k in names:
        assert torch.equal(a[k], b[k]), k


def trainable_names(module):
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


def plain_model_with(module, deltas):
    """An un-adapted TinyClassifier holding ``module``'s base weights plus ``deltas`` (name -> ΔW)."""
    plain = TinyClassifier()
    adapter_parts = (".lora_", ".coef_", ".basis_", ".tmp_")
    state = {k: v for k, v in module.state_dict().items() if not any(part in k for part in adapter_parts)}
    plain.load_state_dict(state)
    with torch.no_grad():
        for n, d in deltas.items():
            plain.state_dict()[n].add_(d)
    return plain.eval()


# -- recording subclasses (module level, so they pickle for ddp_spawn) ------------------------------


class RecordingLoRA(LoRAAdapters):
    """Records the weights at every experience start and end and checks invariants inside the hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts, self.ends, self.optimizer_info, self.optimizers = [], [], [], []

    def on_experience_start(self, trainer, pl_module, experience):
        super().on_experience_start(trainer, pl_module, experience)
        names = trainable_names(pl_module)
        if self.mode == "per_task":
            # exactly this experience's adapter and the head train; every other adapter is frozen
            assert names == sorted([f"net.0.lora_A.{experience}", f"net.0.lora_B.{experience}", "net.3.bias", "net.3.weight"])
        else:
            assert names == sorted(["net.0.lora_A.default", "net.0.lora_B.default", "net.3.bias", "net.3.weight"])
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable_ids = {id(p) for p in pl_module.parameters() if p.requires_grad}
        assert trainable_ids <= in_optimizer, "the optimizer must know every trainable parameter"
        self.optimizer_info.append(len(optimizer.state))
        self.optimizers.append(optimizer)  # kept alive, so that identity comparisons mean something
        self.starts.append((experience, state_of(pl_module)))

    def on_experience_end(self, trainer, pl_module, experience, at_fit_end):
        self.ends.append((experience, state_of(pl_module), lora_delta(pl_module)))
        super().on_experience_end(trainer, pl_module, experience, at_fit_end)


class RecordingShare(SharedSubspaceAdapters):
    """Records each task's ΔW when its experience ends (before the basis update) and checks trainable sets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_deltas, self.trained_factors, self.optimizers, self.head_ends = {}, {}, [], {}

    def on_experience_start(self, trainer, pl_module, experience):
        super().on_experience_start(trainer, pl_module, experience)
        names = trainable_names(pl_module)
        if self.share is None:
            assert names == sorted(["net.0.lora_A.default", "net.0.lora_B.default", "net.3.bias", "net.3.weight"])
        else:
            expected = [f"net.0.coef_a.{experience}", f"net.0.coef_b.{experience}", "net.3.bias", "net.3.weight"]
            if self.temporary_directions:
                expected += ["net.0.tmp_basis_a", "net.0.tmp_coef_a", "net.0.tmp_basis_b", "net.0.tmp_coef_b"]
            assert names == sorted(expected)
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert {id(p) for p in pl_module.parameters() if p.requires_grad} <= in_optimizer
        self.optimizers.append(optimizer)

    def on_experience_end(self, trainer, pl_module, experience, at_fit_end):
        key = str(experience)
        self.head_ends[key] = {n: t for n, t in state_of(pl_module).items() if n in HEAD_STATE}
        if self.share is None:
            self.trained_deltas[key] = dict(lora_delta(pl_module))
            layer = lora_layers(pl_module)["net.0"]
            self.trained_factors[key] = {f"lora_{s}": getattr(layer, f"lora_{s}")["default"].detach().clone() for s in "AB"}
        else:
            self.trained_deltas[key] = dict(self.share.task_delta(experience))
            layer = self.share.layers["net.0"]
            factors = {"coef_a": layer.coef_a[key], "coef_b": layer.coef_b[key]}
            if layer.has_temporary:
                factors.update({n: getattr(layer, n) for n in ("tmp_basis_a", "tmp_coef_a", "tmp_basis_b", "tmp_coef_b")})
            self.trained_factors[key] = {n: t.detach().clone() for n, t in factors.items()}
        super().on_experience_end(trainer, pl_module, experience, at_fit_end)


# -- runners ---------------------------------------------------------------------------------------


def run_one_fit(callback, seed=0, n_exp=N_EXP, **model_kwargs):
    L.seed_everything(seed, verbose=False)
    model = TinyClassifier(**model_kwargs)
    theta = state_of(model)
    trainer = L.Trainer(max_epochs=n_exp * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[callback], **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(n_exp, EPE))
    return model, theta


def run_fit_per_experience(callback, seed=0, n_exp=N_EXP):
    L.seed_everything(seed, verbose=False)
    model = TinyClassifier()
    theta = state_of(model)
    dm = ToyStream(n_exp, EPE)
    for e in range(n_exp):
        dm.set_experience(e)
        trainer = L.Trainer(max_epochs=EPE, callbacks=[callback], **trainer_kwargs())
        dm.epoch_offset = e * EPE
        trainer.fit(model, datamodule=dm)
    return model, theta


RUNNERS = [run_one_fit, run_fit_per_experience]


# -- LoRAAdapters, mode="merge" -----------------------------------------------------------------------


def expected_merge(cb, theta0):
    """Fold the recorded task vectors with the library's merger, independently of the callback."""
    merger = get_merger(cb.method, **cb.method_options)
    names = [WEIGHT, "net.3.weight", "net.3.bias"]
    for _, state, delta in cb.ends:
        tv = {WEIGHT: (state[WEIGHT] - theta0[WEIGHT]) + delta[WEIGHT]}
        tv.update({n: state[n] - theta0[n] for n in names[1:]})
        merger.update(TaskVector(tv))
    return merger.merged().apply_to({n: theta0[n] for n in names}, cb.scale), names


@pytest.mark.parametrize("method", ["magmax", "average"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_merge_mode_ends_with_theta0_plus_scaled_merge(runner, method):
    cb = RecordingLoRA(**lora_kwargs(method=method))
    model, theta0 = runner(cb)
    assert [e for e, *_ in cb.ends] == list(range(N_EXP))
    assert cb.merger.num_tasks == N_EXP
    expected, names = expected_merge(cb, theta0)
    final = model.state_dict()
    assert_same(final, expected, names)
    # The adapter contributes nothing: the module is the merged model as it stands.
    assert torch.count_nonzero(final["net.0.lora_B.default"]) == 0
    x = experience_data(0).tensors[0][:8]
    plain = TinyClassifier()
    plain.load_state_dict({k: v for k, v in final.items() if ".lora_" not in k})
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), plain.eval()(x), atol=1e-6)
        assert torch.equal(model(x), cb.forward_by_task(model, x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])))


def test_merge_mode_gives_the_same_weights_in_both_stream_styles():
    one, _ = run_one_fit(LoRAAdapters(**lora_kwargs()))
    per, _ = run_fit_per_experience(LoRAAdapters(**lora_kwargs()))
    assert_same(state_of(one), state_of(per))


@pytest.mark.parametrize("runner", RUNNERS)
def test_merge_start_from_pretrained_restarts_adapter_and_head_at_theta0(runner):
    cb = RecordingLoRA(**lora_kwargs(start_from="pretrained"))
    _, theta0 = runner(cb)
    for experience, start in cb.starts:
        assert torch.count_nonzero(start["net.0.lora_B.default"]) == 0, experience
        assert_same(start, theta0, [WEIGHT, "net.3.weight", "net.3.bias"])
    # each experience draws a new A (seeded by the number of folded tasks)
    a = [start["net.0.lora_A.default"] for _, start in cb.starts]
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


@pytest.mark.parametrize("runner", RUNNERS)
def test_merge_start_from_finetuned_continues_the_same_adapter(runner):
    cb = RecordingLoRA(**lora_kwargs(start_from="finetuned"))
    _, theta0 = runner(cb)
    for (_, end, _), (_, start) in zip(cb.ends[:-1], cb.starts[1:]):
        assert_same(start, end, ["net.0.lora_A.default", "net.0.lora_B.default", "net.3.weight", "net.3.bias"])
        assert_same(start, theta0, [WEIGHT])  # the base weight stays θ₀; the adapter carries the update


@pytest.mark.parametrize("runner", RUNNERS)
def test_merge_start_from_merged_writes_the_merge_into_the_base_weights(runner):
    cb = RecordingLoRA(**lora_kwargs(start_from="merged", method="average"))
    _, theta0 = runner(cb)
    merger = get_merger("average")
    names = [WEIGHT, "net.3.weight", "net.3.bias"]
    for (_, end, delta), (_, start) in zip(cb.ends[:-1], cb.starts[1:]):
        tv = {WEIGHT: (end[WEIGHT] - theta0[WEIGHT]) + delta[WEIGHT]}
        tv.update({n: end[n] - theta0[n] for n in names[1:]})
        merger.update(TaskVector(tv))
        expected = merger.merged().apply_to({n: theta0[n] for n in names}, cb.scale)
        assert_same(start, expected, names)
        assert torch.count_nonzero(start["net.0.lora_B.default"]) == 0


def test_merge_mode_resets_optimizer_state_at_boundaries_unless_told_not_to():
    cb = RecordingLoRA(**lora_kwargs())
    run_one_fit(cb)
    assert cb.optimizer_info == [0, 0, 0]
    assert all(opt is cb.optimizers[0] for opt in cb.optimizers)  # no new Parameters: the same optimizer
    kept = RecordingLoRA(**lora_kwargs(reset_optimizer=False))
    run_one_fit(kept)
    assert kept.optimizer_info[1:] == [4, 4]


def test_merged_weights_context_and_merged_state_dict():
    cb = LoRAAdapters(**lora_kwargs(start_from="finetuned"))
    model, _ = run_one_fit(cb, n_exp=2)
    before = state_of(model)
    assert_same(cb.merged_state_dict(model), before)  # after fit the module holds the merge
    with cb.merged_weights(model):
        assert_same(state_of(model), before)
    assert_same(state_of(model), before)


# -- LoRAAdapters, mode="per_task" ---------------------------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
def test_per_task_keeps_one_adapter_per_experience_and_selects_it_by_label(runner):
    cb = RecordingLoRA(**lora_kwargs(mode="per_task"))
    model, _ = runner(cb)
    assert cb.tasks == ("0", "1", "2")
    layer = lora_layers(model)["net.0"]
    assert layer.adapters == ("0", "1", "2")
    final = model.state_dict()
    # every adapter is exactly what its experience trained (later experiences leave it alone)
    for experience, end, _ in cb.ends:
        for side in "AB":
            key = f"net.0.lora_{side}.{experience}"
            assert torch.equal(final[key], end[key]), key
    model.eval()
    x = experience_data(0).tensors[0][:6]
    with torch.no_grad():
        outputs = {}
        for experience, end, delta in cb.ends:
            # the selected output equals the un-adapted network with that adapter's ΔW added
            expected = plain_model_with(model, {WEIGHT: delta[WEIGHT]})(x)
            got = cb.forward_by_task(model, x, experience)
            assert torch.allclose(got, expected, atol=1e-5), experience
            outputs[experience] = got
        labels = torch.tensor([2, 0, 1, 1, 0, 2])
        mixed = cb.forward_by_task(model, x, labels)
        for i, label in enumerate(labels.tolist()):
            assert torch.allclose(mixed[i], outputs[label][i], atol=1e-6)
        # predict reads the labels from the batch (x, y, task_labels)
        assert torch.equal(cb.predict(model, (x, None, labels)), mixed)
        # a task without an adapter, and no labels at all, use the base model
        base = plain_model_with(model, {})(x)
        assert torch.allclose(cb.forward_by_task(model, x, 7), base, atol=1e-6)
        assert torch.allclose(cb.forward_by_task(model, x), base, atol=1e-6)


def test_per_task_one_fit_rebuilds_the_optimizer_for_each_new_adapter():
    cb = RecordingLoRA(**lora_kwargs(mode="per_task"))
    run_one_fit(cb)
    assert len({id(opt) for opt in cb.optimizers}) == N_EXP  # a new optimizer per experience
    assert cb.optimizer_info == [0, 0, 0]


def test_per_task_gives_the_same_adapters_in_both_stream_styles():
    one, _ = run_one_fit(LoRAAdapters(**lora_kwargs(mode="per_task")))
    per, _ = run_fit_per_experience(LoRAAdapters(**lora_kwargs(mode="per_task")))
    assert_same(state_of(one), state_of(per))


def test_per_task_finetuned_starts_each_adapter_from_the_previous_one():
    cb = RecordingLoRA(**lora_kwargs(mode="per_task", start_from="finetuned"))
    run_one_fit(cb)
    for (previous, end, _), (experience, start) in zip(cb.ends[:-1], cb.starts[1:]):
        for side in "AB":
            assert torch.equal(start[f"net.0.lora_{side}.{experience}"], end[f"net.0.lora_{side}.{previous}"])


def test_per_task_experience_without_a_step_leaves_no_adapter():
    cb = LoRAAdapters(**lora_kwargs(mode="per_task"))
    with pytest.warns(UserWarning, match="ended before any optimizer step"):
        model, _ = run_one_fit(cb, skip_experience=1)
    assert cb.tasks == ("0", "2")
    assert lora_layers(model)["net.0"].adapters == ("0", "2")


class LabelledToyStream(ToyStream):
    """ToyStream with test loaders whose batches are (x, y, task_label), as Avalanche's are."""

    def test_dataloader(self):
        loaders = []
        for e in range(self.n_experiences):
            x, y = experience_data(e, n=32).tensors
            loaders.append(DataLoader(TensorDataset(x, y, torch.full_like(y, e)), batch_size=16))
        return loaders


def test_predict_plugs_into_continual_evaluation():
    """ContinualEvaluation(predict=callback.predict), placed first, evaluates every task with its own adapter."""
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    cb = LoRAAdapters(**lora_kwargs(mode="per_task"))
    evaluation = ContinualEvaluation(predict=cb.predict)
    dm = LabelledToyStream(N_EXP, EPE)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[evaluation, cb], **trainer_kwargs())
    trainer.fit(model, datamodule=dm)
    final_row = evaluation.results["sequential_finetuning"]["accuracy_matrix"][-1]
    model.eval()
    with torch.no_grad():
        for j, loader in enumerate(dm.test_dataloader()):
            correct = sum(int((cb.predict(model, batch).argmax(1) == batch[1]).sum()) for batch in loader)
            assert final_row[j] == pytest.approx(correct / 32), j


# -- SharedSubspaceAdapters ----------------------------------------------------------------------------------


def check_share_run(cb, model):
    share = cb.share
    assert share.tasks == ("0", "1", "2") and share.training_task is None
    layer = share.layers["net.0"]
    for basis in (layer.basis_a, layer.basis_b):
        eye = torch.eye(basis.shape[1], dtype=torch.float64)
        assert torch.allclose(basis.double().T @ basis.double(), eye, atol=1e-5)
    # k is at least the number of stacked columns (3 tasks x p=2): every stored ΔW survives the basis updates
    for task, trained in cb.trained_deltas.items():
        assert torch.allclose(share.task_delta(task)[WEIGHT], trained[WEIGHT], atol=1e-5), task
    model.eval()
    x = experience_data(0).tensors[0][:6]
    with torch.no_grad():
        for task in share.tasks:
            expected = plain_model_with(model, {WEIGHT: share.task_delta(task)[WEIGHT]})(x)
            assert torch.allclose(cb.forward_by_task(model, x, int(task)), expected, atol=1e-5), task
        mean = plain_model_with(model, {WEIGHT: share.mean_delta()[WEIGHT]})(x)
        assert torch.allclose(cb.forward_by_task(model, x), mean, atol=1e-5)
        labels = [1, 1, 0, 2, 0, 2]
        mixed = cb.predict(model, (x, None, torch.tensor(labels)))
        for i, label in enumerate(labels):
            assert torch.allclose(mixed[i], cb.forward_by_task(model, x[i : i + 1], label)[0], atol=1e-6)
        assert torch.allclose(cb.forward_by_task(model, x, 9), plain_model_with(model, {})(x), atol=1e-6)


@pytest.mark.parametrize("temporary_directions", [0, 1])
@pytest.mark.parametrize("runner", RUNNERS)
def test_share_trains_a_lora_then_coefficients_and_selects_by_label(runner, temporary_directions):
    cb = RecordingShare(**share_kwargs(temporary_directions=temporary_directions))
    model, _ = runner(cb)
    assert isinstance(model.net[0], SharedLinear)
    check_share_run(cb, model)
    # the basis starts from the first task's LoRA with alpha/r folded in: task 0 is that LoRA's ΔW
    assert cb.share.bytes_per_task() == (8 + 8) * 2 * 4


def test_share_one_fit_rebuilds_the_optimizer_when_coefficients_appear():
    cb = RecordingShare(**share_kwargs())
    run_one_fit(cb)
    assert len({id(opt) for opt in cb.optimizers}) == N_EXP


def test_share_gives_the_same_result_in_both_stream_styles():
    one, _ = run_one_fit(SharedSubspaceAdapters(**share_kwargs(temporary_directions=1)))
    per, _ = run_fit_per_experience(SharedSubspaceAdapters(**share_kwargs(temporary_directions=1)))
    assert_same(state_of(one), state_of(per))


def test_share_equals_shared_subspace_driven_by_hand():
    """Replaying the trained factors through SharedSubspace by hand gives the callback's basis and coefficients."""
    cb = RecordingShare(**share_kwargs(temporary_directions=1, init="fresh"))
    run_one_fit(cb)
    replay_model = TinyClassifier()
    inject_lora(replay_model, TARGETS, r=2, alpha=4.0)
    lora = lora_layers(replay_model)["net.0"]
    with torch.no_grad():
        lora.lora_A["default"].copy_(cb.trained_factors["0"]["lora_A"])
        lora.lora_B["default"].copy_(cb.trained_factors["0"]["lora_B"])
    share = SharedSubspace(k=8, temporary_directions=1, init="fresh", seed=0)
    share.inject(replay_model, r"net\.0", lora_task="0")
    layer = share.layers["net.0"]
    for task in ("1", "2"):
        share.start_task(task)
        with torch.no_grad():
            for name, value in cb.trained_factors[task].items():
                target = getattr(layer, name)[task] if name.startswith("coef") else getattr(layer, name)
                target.copy_(value)
        share.finish_task()
    mine = cb.share.layers["net.0"]
    assert torch.equal(layer.basis_a, mine.basis_a) and torch.equal(layer.basis_b, mine.basis_b)
    for task in ("0", "1", "2"):
        assert torch.equal(layer.coef_a[task], mine.coef_a[task]) and torch.equal(layer.coef_b[task], mine.coef_b[task])
    mean = sum(cb.share.task_delta(t)[WEIGHT] for t in cb.share.tasks) / 3
    assert torch.allclose(cb.share.mean_delta()[WEIGHT], mean, atol=1e-6)


def test_share_experience_without_a_step_stores_no_task():
    cb = SharedSubspaceAdapters(**share_kwargs())
    with pytest.warns(UserWarning, match="ended before any optimizer step"):
        run_one_fit(cb, skip_experience=1)
    assert cb.share.tasks == ("0", "2")


def test_share_lora_phase_moves_to_the_next_experience_when_the_first_learns_nothing():
    cb = SharedSubspaceAdapters(**share_kwargs())
    with pytest.warns(UserWarning, match="ended before any optimizer step"):
        run_one_fit(cb, skip_experience=0)
    assert cb.share.tasks == ("1", "2")


def test_shared_subspace_cancel_task_drops_the_training_task():
    net = nn.Sequential(nn.Linear(4, 4))
    share = SharedSubspace(k=2, p=1, init="fresh")
    share.inject(net, ["0"])
    share.start_task("a")
    share.finish_task()
    basis = net[0].basis_a.clone()
    share.start_task("b")
    share.cancel_task()
    assert share.tasks == ("a",) and share.training_task is None and net[0].tasks == ("a",)
    assert net[0].active_adapter == "a" and torch.equal(net[0].basis_a, basis)
    with pytest.raises(ConfigError, match="No task is training"):
        share.cancel_task()


def test_shared_subspace_attach_manages_existing_layers():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    share = SharedSubspace(k=2, p=1, init="fresh")
    share.inject(net, ["0", "2"])
    share.start_task("a")
    share.finish_task()
    share.start_task("b")
    again = SharedSubspace(k=2, p=1, init="fresh")
    assert again.attach(net) == ("0", "2")
    assert again.tasks == ("a",) and again.training_task == "b"
    again.load_state_dict(share.state_dict())
    assert again.tasks == ("a",) and again.training_task == "b" and again.bytes_per_task() == share.bytes_per_task()
    with pytest.raises(ConfigError, match="already manages layers"):
        again.attach(net)
    with pytest.raises(NoMatchingModulesError, match="no SharedLinear layer"):
        SharedSubspace(k=2, p=1).attach(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"p=\[1\]; this SharedSubspace has p=2"):
        SharedSubspace(k=2, p=2).attach(net)


# -- trainable_per_task: one copy of the trainable modules per task ---------------------------------------


def _per_task_head_callback(kind, **overrides):
    if kind == "lora":
        return RecordingLoRA(**lora_kwargs(mode="per_task", trainable_per_task=True, **overrides))
    return RecordingShare(**share_kwargs(trainable_per_task=True, temporary_directions=1, **overrides))


def _head_ends(cb):
    if isinstance(cb, RecordingLoRA):
        return {str(e): {n: state[n] for n in HEAD_STATE} for e, state, _ in cb.ends}
    return cb.head_ends


def _task_delta(cb, model, task):
    if isinstance(cb, LoRAAdapters):
        return dict(lora_delta(model, task))
    return dict(cb.share.task_delta(task))


@pytest.mark.parametrize("kind", ["lora", "share"])
@pytest.mark.parametrize("runner", RUNNERS)
def test_trainable_per_task_stores_the_head_of_each_task_and_selects_it_by_label(runner, kind):
    cb = _per_task_head_callback(kind)
    model, _ = runner(cb)
    heads = _head_ends(cb)
    assert sorted(cb.task_module_states) == ["0", "1", "2"]
    for task, state in cb.task_module_states.items():
        assert sorted(state) == sorted(HEAD_STATE)
        assert_same(state, heads[task])  # exactly the head its experience ended with
    assert not torch.equal(heads["0"]["net.3.weight"], heads["2"]["net.3.weight"])  # the head did train on
    live = {n: model.state_dict()[n].clone() for n in HEAD_STATE}
    assert_same(live, heads["2"])  # after the stream the module holds the latest task's head
    model.eval()
    x = experience_data(0).tensors[0][:6]
    with torch.no_grad():
        outputs = {}
        for task in ("0", "1", "2"):
            expected = plain_model_with(model, _task_delta(cb, model, task))
            expected.load_state_dict({**expected.state_dict(), **heads[task]})
            got = cb.forward_by_task(model, x, int(task))
            assert torch.allclose(got, expected(x), atol=1e-5), task
            outputs[task] = got
        labels = torch.tensor([2, 0, 1, 1, 0, 2])
        mixed = cb.forward_by_task(model, x, labels)
        for i, label in enumerate(labels.tolist()):
            assert torch.allclose(mixed[i], outputs[str(label)][i], atol=1e-6)
    assert_same({n: model.state_dict()[n] for n in HEAD_STATE}, live)  # selection never leaves a copy behind


def test_without_trainable_per_task_the_head_is_shared_and_nothing_is_stored():
    cb = RecordingShare(**share_kwargs())
    model, _ = run_one_fit(cb)
    assert cb.task_module_states == {}
    x = experience_data(0).tensors[0][:4]
    model.eval()
    with torch.no_grad():
        expected = plain_model_with(model, dict(cb.share.task_delta("0")))(x)  # task 0 with the latest head
        assert torch.allclose(cb.forward_by_task(model, x, 0), expected, atol=1e-5)


def test_share_select_writes_the_task_head_and_the_next_experience_starts_from_the_latest():
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    dm = ToyStream(N_EXP, EPE)
    cb = _per_task_head_callback("share")
    starts = {}

    class HeadAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            starts[trainer.datamodule.current_experience] = {n: state_of(pl_module)[n] for n in HEAD_STATE}

    for e in range(N_EXP):
        dm.set_experience(e)
        dm.epoch_offset = e * EPE
        L.Trainer(max_epochs=EPE, callbacks=[cb, HeadAtStart()], **trainer_kwargs()).fit(model, datamodule=dm)
        if e == 1:
            with pytest.raises(ConfigError, match=r"pass the module as well, select\(task_label, module\)"):
                cb.select(0)
            cb.select(0, model)
            assert_same({n: model.state_dict()[n] for n in HEAD_STATE}, cb.head_ends["0"])
    assert_same(starts[2], cb.head_ends["1"])  # not task 0's copy, which select had written
    cb.select(None, model)
    assert_same({n: model.state_dict()[n] for n in HEAD_STATE}, cb.head_ends["2"])


@pytest.mark.parametrize("crash_at_step", [9, 13, 21])
@pytest.mark.parametrize("kind", ["lora", "share"])
def test_trainable_per_task_killed_and_resumed_ends_bit_identical(tmp_path, kind, crash_at_step):
    make = {
        "lora": lambda: LoRAAdapters(**lora_kwargs(mode="per_task", trainable_per_task=True)),
        "share": lambda: SharedSubspaceAdapters(**share_kwargs(trainable_per_task=True, temporary_directions=1)),
    }[kind]
    reference_cb = make()
    reference, _ = run_one_fit(reference_cb)
    resumed, cb = crash_and_resume(tmp_path, make, crash_at_step)
    assert_same(state_of(reference), state_of(resumed))
    assert sorted(cb.task_module_states) == ["0", "1", "2"]
    for task, state in reference_cb.task_module_states.items():
        assert_same(state, cb.task_module_states[task])


def test_trainable_per_task_bad_input_raises_clear_errors():
    with pytest.raises(ConfigError, match=r"`trainable_per_task=True` needs mode='per_task'"):
        LoRAAdapters(**lora_kwargs(trainable_per_task=True))
    with pytest.raises(ConfigError, match=r"`trainable_per_task` must be True or False, got 'yes'"):
        SharedSubspaceAdapters(**share_kwargs(trainable_per_task="yes"))
    with pytest.raises(ConfigError, match=r"but `trainable` names none.*trainable=\['head'\], trainable_per_task=True"):
        SharedSubspaceAdapters(**share_kwargs(trainable=(), trainable_per_task=True))
    # a trainable module that holds an adapted layer would be copied whole per task
    model = TinyClassifier()
    before = state_of(model)
    cb = LoRAAdapters(**lora_kwargs(mode="per_task", trainable=["net"], trainable_per_task=True))
    with pytest.raises(ConfigError, match=r"`trainable` module 'net' contains adapted layers \('net.0'\)"):
        L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=ToyStream(1, 1))
    assert not lora_layers(model)  # raised before anything was injected
    assert_same(state_of(model), before)


@pytest.mark.parametrize("kind", ["lora", "share"])
def test_forward_by_task_with_per_task_heads_is_differentiable_and_writes_nothing(kind):
    cb = _per_task_head_callback(kind)
    model, _ = run_one_fit(cb)
    model.eval()
    model.zero_grad(set_to_none=True)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.net[3].weight.requires_grad_(True)
    x = experience_data(0).tensors[0][:6].clone().requires_grad_(True)
    out = cb.forward_by_task(model, x, torch.tensor([0, 0, 1, 1, 2, 2]))
    out.sum().backward()  # no in-place write got in the way of autograd
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # every label was served by its stored copy, so the live head took part in no pass
    assert model.net[3].weight.grad is None
    assert_same({n: p.detach() for n, p in model.named_parameters()}, live)


def test_unlabelled_share_forward_uses_the_latest_head_whatever_select_wrote():
    cb = _per_task_head_callback("share")
    model, _ = run_one_fit(cb)
    model.eval()
    x = experience_data(0).tensors[0][:6]
    with torch.no_grad():
        before = cb.forward_by_task(model, x)
        cb.select(0, model)  # writes task 0's head into the module
        assert_same({n: model.state_dict()[n] for n in HEAD_STATE}, cb.head_ends["0"])
        assert torch.equal(cb.forward_by_task(model, x), before)
        assert torch.equal(cb.forward_by_task(model, x, 7), cb.forward_by_task(model, x, 7))  # no task 7: base + latest head


def test_a_state_without_per_task_copies_does_not_load_into_trainable_per_task(tmp_path):
    cb = LoRAAdapters(**lora_kwargs(mode="per_task"))
    run_one_fit(cb)
    state = cb.state_dict()
    for key in ("trainable_per_task", "task_module_names", "task_modules"):  # as written before the option existed
        state.pop(key)
    fresh = LoRAAdapters(**lora_kwargs(mode="per_task", trainable_per_task=True))
    with pytest.raises(ConfigError, match=r"trainable_per_task: checkpoint False, now True"):
        fresh.load_state_dict(state)
    LoRAAdapters(**lora_kwargs(mode="per_task")).load_state_dict(state)  # the run it came from loads it


def test_a_state_with_other_per_task_modules_raises_before_changing_anything():
    cb = LoRAAdapters(**lora_kwargs(mode="per_task", trainable_per_task=True))
    run_one_fit(cb)
    state = cb.state_dict()
    state["task_module_names"] = ["net.9.weight"]
    other = LoRAAdapters(**lora_kwargs(mode="per_task", trainable_per_task=True))
    run_one_fit(other, seed=1)
    before = (other.tasks, other.task_module_states)
    with pytest.raises(ConfigError, match=r"kept per-task copies of 'net.9.weight', this run's .*resume with the same `trainable`"):
        other.load_state_dict(state)
    assert other.tasks == before[0]
    for task, copy in before[1].items():
        assert_same(copy, other.task_module_states[task])


# -- resume ----------------------------------------------------------------------------------------------


def crash_and_resume(tmp_path, make_callback, crash_at_step):
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(crash_at_step=crash_at_step)
    kwargs = trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[make_callback(), ckpt], **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(model, datamodule=ToyStream(N_EXP, EPE))
    L.seed_everything(123, verbose=False)  # the resumed process starts from another RNG state and model
    resumed = TinyClassifier()
    cb = make_callback()
    trainer = L.Trainer(
        max_epochs=N_EXP * EPE, reload_dataloaders_every_n_epochs=1, callbacks=[cb, ModelCheckpoint(dirpath=tmp_path)], **kwargs
    )
    trainer.fit(resumed, datamodule=ToyStream(N_EXP, EPE), ckpt_path=str(tmp_path / "last.ckpt"))
    return resumed, cb


# 4 steps per epoch, 2 epochs per experience, a checkpoint at every epoch end; the run resumes from
# the checkpoint of the epoch before the crash. Crash at step 6: the resume starts in the middle of
# experience 0 (before the first boundary); 9: exactly at the start of experience 1; 13 and 21: in the
# middle of experiences 1 and 2 (after one and two boundaries).
@pytest.mark.parametrize("crash_at_step", [6, 9, 21])
@pytest.mark.parametrize("start_from", ["pretrained", "finetuned"])
def test_merge_mode_killed_and_resumed_ends_bit_identical(tmp_path, crash_at_step, start_from):
    reference, _ = run_one_fit(LoRAAdapters(**lora_kwargs(start_from=start_from)))
    resumed, cb = crash_and_resume(tmp_path, lambda: LoRAAdapters(**lora_kwargs(start_from=start_from)), crash_at_step)
    assert cb.merger.num_tasks == N_EXP
    assert_same(state_of(reference), state_of(resumed))


@pytest.mark.parametrize("crash_at_step", [9, 13, 21])
def test_per_task_killed_and_resumed_ends_bit_identical(tmp_path, crash_at_step):
    reference, _ = run_one_fit(LoRAAdapters(**lora_kwargs(mode="per_task")))
    resumed, cb = crash_and_resume(tmp_path, lambda: LoRAAdapters(**lora_kwargs(mode="per_task")), crash_at_step)
    assert cb.tasks == ("0", "1", "2")
    assert_same(state_of(reference), state_of(resumed))


@pytest.mark.parametrize(
    "crash_at_step, options",
    [(6, {}), (9, {}), (13, {}), (21, {}), (21, {"explained_variance": 0.9, "k": 6})],
)
def test_share_killed_and_resumed_ends_bit_identical(tmp_path, crash_at_step, options):
    make = lambda: SharedSubspaceAdapters(**share_kwargs(temporary_directions=1, **options))  # noqa: E731
    reference, _ = run_one_fit(make())
    resumed, cb = crash_and_resume(tmp_path, make, crash_at_step)
    assert cb.share.tasks == ("0", "1", "2")
    assert_same(state_of(reference), state_of(resumed))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoRAAdapters(**lora_kwargs(start_from="finetuned")),
        lambda: LoRAAdapters(**lora_kwargs(mode="per_task")),
        lambda: SharedSubspaceAdapters(**share_kwargs(temporary_directions=1)),
        lambda: LoRAAdapters(**lora_kwargs(mode="per_task", trainable_per_task=True)),
        lambda: SharedSubspaceAdapters(**share_kwargs(temporary_directions=1, trainable_per_task=True)),
    ],
)
def test_a_new_process_between_fits_continues_exactly(tmp_path, make):
    """One fit per experience, the callback saved and loaded into a fresh one between fits."""
    reference_cb = make()
    reference, _ = run_fit_per_experience(reference_cb)
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    dm = ToyStream(N_EXP, EPE)
    cb = make()
    for e in range(N_EXP):
        if e > 0:
            torch.save(cb.state_dict(), tmp_path / "cb.pt")
            cb = make()
            cb.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
        dm.set_experience(e)
        dm.epoch_offset = e * EPE
        L.Trainer(max_epochs=EPE, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)
    assert_same(state_of(reference), state_of(model))
    assert sorted(cb.task_module_states) == sorted(reference_cb.task_module_states)
    for task, state in reference_cb.task_module_states.items():
        assert_same(state, cb.task_module_states[task])


def test_state_dict_round_trip_and_option_mismatch(tmp_path):
    cb = LoRAAdapters(**lora_kwargs(method="ties"))
    run_one_fit(cb)
    path = tmp_path / "cb.pt"
    torch.save(cb.state_dict(), path)
    fresh = LoRAAdapters(**lora_kwargs(method="ties"))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.merger.num_tasks == N_EXP
    for n, t in cb.merger.merged().items():
        assert torch.equal(fresh.merger.merged()[n], t)
    with pytest.raises(ConfigError, match=r"other options, .*method: checkpoint 'ties', now 'magmax'"):
        LoRAAdapters(**lora_kwargs()).load_state_dict(torch.load(path, weights_only=True))
    with pytest.raises(ConfigError, match=r"r: checkpoint 2, now 3"):
        LoRAAdapters(**lora_kwargs(method="ties", r=3)).load_state_dict(torch.load(path, weights_only=True))


def test_the_state_key_names_the_callback_not_its_settings():
    assert {LoRAAdapters(**lora_kwargs()).state_key, LoRAAdapters(**lora_kwargs(mode="per_task")).state_key} == {"LoRAAdapters"}
    assert {SharedSubspaceAdapters(**share_kwargs()).state_key, SharedSubspaceAdapters(**share_kwargs(k=4)).state_key} == {
        "SharedSubspaceAdapters"
    }


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=None), r"`target_modules` is required"),
        (dict(target_modules=[]), r"`target_modules` is empty"),
        (dict(target_modules=[3]), r"`target_modules` must hold non-empty module names"),
        (dict(target_modules="net.(0"), r"not a valid regular expression"),
        (dict(r=0), r"`r` must be an int >= 1, got 0"),
        (dict(alpha=-1.0), r"`alpha` must be a real number in \(0, inf\), got -1.0"),
        (dict(dropout=1.0), r"`dropout` must be a real number in \[0, 1\), got 1.0"),
        (dict(mode="pertask"), r"`mode` must be one of \['merge', 'per_task'\], got 'pertask'.*Did you mean 'per_task'"),
        (dict(method="magmaks"), r"Unknown merging method 'magmaks'.*Did you mean 'magmax'"),
        (dict(method="ties", topk=0.2), r"Unknown option\(s\) \['topk'\]"),
        (dict(scale=0.0), r"`scale` must be a real number in \(0, 10\], got 0.0"),
        (dict(start_from="pretrain"), r"`start_from` must be one of \['pretrained', 'finetuned', 'merged'\].*Did you mean 'pretrained'"),
        (dict(mode="per_task", start_from="merged"), r"with mode='per_task', got 'merged'"),
        (dict(mode="per_task", scale=0.5), r"\['scale'\] only apply to mode='merge'"),
        (dict(mode="per_task", top_k=0.2), r"\['top_k'\] only apply to mode='merge'"),
        (dict(seed=-1), r"`seed` must be an int >= 0, got -1"),
        (dict(reset_optimizer="yes"), r"`reset_optimizer` must be True or False, got 'yes'"),
        (dict(check_ranks=1), r"`check_ranks` must be True or False, got 1"),
        (dict(trainable=[""]), r"`trainable` must hold non-empty module names"),
    ],
)
def test_lora_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoRAAdapters(**lora_kwargs(**kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), r"`k` must be an int >= 1, got 0"),
        (dict(p=9), r"`p`=9 must not exceed `k`=8"),
        (dict(explained_variance=1.5), r"`explained_variance` must be a real number in \(0, 1\], got 1.5"),
        (dict(temporary_directions=-1), r"`temporary_directions` must be an int >= 0, got -1"),
        (dict(init="previus"), r"`init` must be one of \['previous', 'fresh'\].*Did you mean 'previous'"),
        (dict(r=1.5), r"`r` must be an int >= 1, got 1.5"),
        (dict(target_modules={"net.0": 1}), r"`target_modules` must be a regex string or a list of module names"),
    ],
)
def test_share_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SharedSubspaceAdapters(**share_kwargs(**kwargs))


def _fit_once(model, callbacks):
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, **trainer_kwargs())
    trainer.fit(model, datamodule=ToyStream(1, 1))


def test_setup_errors_name_the_problem():
    with pytest.raises(NoMatchingModulesError, match="net.9"):
        _fit_once(TinyClassifier(), [LoRAAdapters(["net.9"])])
    with pytest.raises(ConfigError, match="remove ModelMerging"):
        _fit_once(TinyClassifier(), [LoRAAdapters(TARGETS), ModelMerging()])
    with pytest.raises(ConfigError, match="one adapter callback per Trainer"):
        _fit_once(TinyClassifier(), [LoRAAdapters(TARGETS), SharedSubspaceAdapters(TARGETS, k=4, r=2)])
    pre_injected = TinyClassifier()
    inject_lora(pre_injected, TARGETS, r=2)
    with pytest.raises(ConfigError, match="did not inject"):
        _fit_once(pre_injected, [LoRAAdapters(TARGETS)])
    cb = LoRAAdapters(TARGETS, r=2)
    _fit_once(TinyClassifier(), [cb])
    with pytest.raises(ConfigError, match="Pass the same module to every `fit`"):
        _fit_once(TinyClassifier(), [cb])


def test_per_task_rejects_training_an_experience_twice():
    cb = LoRAAdapters(**lora_kwargs(mode="per_task"))
    model, _ = run_fit_per_experience(cb, n_exp=2)
    dm = ToyStream(2, 1)
    dm.set_experience(0)
    with pytest.raises(ConfigError, match="experience 0 already has a trained adapter '0'"):
        L.Trainer(max_epochs=1, callbacks=[cb], **trainer_kwargs()).fit(model, datamodule=dm)


class _StubStrategy:
    def setup_optimizers(self, trainer):  # pragma: no cover - must not be reached under DDP
        raise AssertionError("the optimizer must not be rebuilt under DDP")


@pytest.mark.parametrize("make", [lambda: LoRAAdapters(**lora_kwargs(mode="per_task")), lambda: SharedSubspaceAdapters(**share_kwargs())])
def test_new_parameters_inside_one_ddp_fit_raise_a_clear_error(make):
    cb = make()
    model, _ = run_one_fit(cb, n_exp=1)
    if isinstance(cb, SharedSubspaceAdapters):
        assert cb.share is not None  # the next experience would create coefficients
    ddp_trainer = types.SimpleNamespace(world_size=2, strategy=_StubStrategy())
    with pytest.raises(ConfigError, match=r"DDP \(world_size=2\).*one `fit` per experience with strategy='ddp'"):
        cb.on_experience_start(ddp_trainer, model, 1)
    # A ContinualDataModule-like datamodule tells it at setup, before any training.
    dm = types.SimpleNamespace(fixed_experience=None, epochs_per_experience=2, n_experiences=3)
    fresh = make()
    setup_trainer = types.SimpleNamespace(world_size=2, datamodule=dm, max_epochs=6, callbacks=[fresh])
    with pytest.raises(ConfigError, match="creates new Parameters at task boundaries"):
        fresh.setup(setup_trainer, TinyClassifier(), "fit")
    merge = LoRAAdapters(**lora_kwargs())  # merge mode creates none: no error
    merge.setup(types.SimpleNamespace(world_size=2, datamodule=dm, max_epochs=6, callbacks=[merge]), TinyClassifier(), "fit")


# -- DDP ---------------------------------------------------------------------------------------------------------


def _ddp_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


class RankCheckingLoRA(LoRAAdapters):
    """Asserts inside the worker, after every boundary, that all ranks hold identical weights."""

    def on_experience_end(self, trainer, pl_module, experience, at_fit_end):
        super().on_experience_end(trainer, pl_module, experience, at_fit_end)
        flat = torch.cat([t.detach().double().flatten() for t in pl_module.state_dict().values() if t.is_floating_point()])
        gathered = trainer.strategy.all_gather(flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"ranks differ after experience {experience}"
        assert gathered.shape[0] == 2


@pytest.mark.ddp
def test_ddp_script_per_task_and_share_one_fit_per_experience(tmp_path):
    """strategy="ddp", one fit per experience: new adapters and coefficients are made before DDP wraps the model."""
    if not _ddp_available():
        pytest.fail("torch.distributed with gloo is required for the DDP tests and is not available")
    script = Path(__file__).with_name("ddp_adapters_script.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "merge RANKS IDENTICAL: True tasks=2" in result.stdout, result.stdout[-3000:]
    assert "per_task RANKS IDENTICAL: True tasks=('0', '1')" in result.stdout, result.stdout[-3000:]
    assert "share RANKS IDENTICAL: True tasks=('0', '1')" in result.stdout, result.stdout[-3000:]
