"""Streams: the digits benchmarks, ContinualDataModule (both stream styles, both batch formats), benchmark_by_name."""

from __future__ import annotations

import struct
import types
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cl_plugin.benchmarks import (
    BENCHMARK_NAMES,
    ContinualDataModule,
    MissingDatasetError,
    ResumableDataLoader,
    ResumableSampler,
    benchmark_by_name,
    load_digits_tensors,
    permuted_digits,
    resumes_mid_epoch,
    rotated_digits,
    split_digits,
)
from cl_plugin.errors import CheckpointError, ConfigError

from stream_helpers import trainer_kwargs

N_TRAIN, N_TEST = 1257, 540


def tensors(dataset):
    """(x, y, t) of a whole Avalanche dataset, in its order."""
    return next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))


def stream_tensors(stream):
    return [tensors(e.dataset) for e in stream]


def quiet_trainer(**kwargs):
    # Lightning's default `deterministic`, not stream_helpers' True: these tests check data order only.
    kwargs.setdefault("limit_val_batches", 1)
    return L.Trainer(**trainer_kwargs(deterministic=None, num_sanity_val_steps=0, **kwargs))


def three_class_blocks():
    """A 3-experience class-incremental digits stream: classes {0..3}, {4,5,6}, {7,8,9}."""
    from avalanche.benchmarks import nc_benchmark

    from cl_plugin.benchmarks.digits import _DigitsDataset

    d = load_digits_tensors()
    return nc_benchmark(
        _DigitsDataset(d.x_train, d.y_train),
        _DigitsDataset(d.x_test, d.y_test),
        n_experiences=3,
        task_labels=False,
        fixed_class_order=list(range(10)),
        per_exp_classes={0: 4},
    )


# ---------------------------------------------------------------- the digits data


def test_digits_split_is_fixed_stratified_and_scaled():
    a, b = load_digits_tensors(), load_digits_tensors()
    assert tuple(a.x_train.shape) == (N_TRAIN, 1, 8, 8) and tuple(a.x_test.shape) == (N_TEST, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    a.x_train.add_(1.0)  # a copy: the next call is unchanged
    assert float(load_digits_tensors().x_train.max()) == 1.0
    per_class_test = torch.bincount(a.y_test, minlength=10)
    per_class_all = per_class_test + torch.bincount(a.y_train, minlength=10)
    assert (per_class_test - 0.3 * per_class_all).abs().max() <= 1.0


def _image_keys(images):
    return {tuple(x.flatten().tolist()) for x in images}


def test_validation_split_comes_from_the_training_images_only():
    full, val = load_digits_tensors(), load_digits_tensors(validation=True)
    assert tuple(val.x_train.shape) == (1005, 1, 8, 8) and tuple(val.x_test.shape) == (252, 1, 8, 8)
    # the two validation parts are exactly the training images, and never a test image
    assert sorted(_image_keys(val.x_train) | _image_keys(val.x_test)) == sorted(_image_keys(full.x_train))
    assert not _image_keys(val.x_test) & _image_keys(full.x_test)
    assert not _image_keys(val.x_test) & _image_keys(val.x_train)
    per_class = torch.bincount(val.y_test, minlength=10)
    assert (per_class - 0.2 * torch.bincount(full.y_train, minlength=10)).abs().max() <= 1.0  # stratified
    assert torch.equal(load_digits_tensors(validation=True).x_test, val.x_test)  # fixed


@pytest.mark.parametrize("build", [split_digits, permuted_digits, rotated_digits])
def test_every_digits_stream_builds_on_the_validation_split(build):
    bm = build(n_experiences=5, validation=True)
    assert sum(len(e.dataset) for e in bm.test_stream) == (252 if build is split_digits else 5 * 252)
    assert sum(len(e.dataset) for e in bm.train_stream) == (1005 if build is split_digits else 5 * 1005)
    with pytest.raises(ConfigError, match=r"`validation` must be True or False, got 1"):
        build(n_experiences=5, validation=1)


def test_split_digits_classes_sizes_and_task_labels():
    bm = split_digits(n_experiences=5, seed=0)
    classes = [e.classes_in_this_experience for e in bm.train_stream]
    assert [len(c) for c in classes] == [2] * 5
    assert sorted(c for cs in classes for c in cs) == list(range(10))
    assert sum(len(e.dataset) for e in bm.train_stream) == N_TRAIN
    assert sum(len(e.dataset) for e in bm.test_stream) == N_TEST
    for exp_train, exp_test, cs in zip(stream_tensors(bm.train_stream), stream_tensors(bm.test_stream), classes):
        for x, y, t in (exp_train, exp_test):
            assert tuple(x.shape[1:]) == (1, 8, 8)
            assert sorted(set(y.tolist())) == sorted(cs)
            assert set(t.tolist()) == {0}
    tl = split_digits(n_experiences=5, seed=0, task_labels=True)
    assert [e.task_label for e in tl.train_stream] == [0, 1, 2, 3, 4]
    assert [set(tensors(e.dataset)[2].tolist()) for e in tl.test_stream] == [{k} for k in range(5)]
    assert [e.classes_in_this_experience for e in tl.train_stream] == classes  # class ids are not remapped


def test_split_digits_class_order_and_seed():
    fixed = split_digits(n_experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert [e.classes_in_this_experience for e in fixed.train_stream] == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]

    def order(seed):
        return [e.classes_in_this_experience for e in split_digits(5, seed=seed).train_stream]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert len(split_digits(10).train_stream) == 10 and len(split_digits(1).train_stream) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_experiences=3), r"must divide the 10 digit classes.*\[1, 2, 5, 10\]"),
        (dict(n_experiences=0), r"`n_experiences` must be >= 1, got 0"),
        (dict(n_experiences="5"), r"`n_experiences` must be an int, got '5'"),
        (dict(class_order=[0, 1, 2]), r"`class_order` must list each of the classes 0-9 exactly once"),
        (dict(class_order=[0] * 10), r"`class_order` must list each"),
        (dict(seed=1.5), r"`seed` must be an int"),
        (dict(task_labels=1), r"`task_labels` must be True or False"),
    ],
)
def test_split_digits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_digits(**kwargs)


def test_permuted_digits_first_unpermuted_then_one_permutation_each():
    bm = permuted_digits(n_experiences=3, seed=0)
    assert [e.classes_in_this_experience for e in bm.train_stream] == [list(range(10))] * 3
    assert [len(e.dataset) for e in bm.train_stream] == [N_TRAIN] * 3
    assert [len(e.dataset) for e in bm.test_stream] == [N_TEST] * 3
    assert [e.task_label for e in bm.train_stream] == [0, 0, 0]

    d = load_digits_tensors()
    (x0, y0, _), (x1, y1, _), (x2, y2, _) = stream_tensors(bm.train_stream)
    # Experience 0 holds exactly the original training images.
    assert torch.equal(torch.unique(x0.flatten(1), dim=0), torch.unique(d.x_train.flatten(1), dim=0))
    assert torch.equal(y0, y1) and torch.equal(y0, y2)  # same images, same order, in every experience
    for xk in (x1, x2):
        assert not torch.equal(xk, x0)
        # One fixed permutation of the 64 pixels: every pixel column is some column of experience 0...
        a, b = xk.flatten(1), x0.flatten(1)
        assert all(any(torch.equal(a[:, j], b[:, i]) for i in range(64)) for j in range(64))
        # ...and each image keeps its pixel values.
        assert torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)
    assert not torch.equal(x1, x2)
    # The test images of an experience use the training images' permutation.
    t0, t1 = (tensors(e.dataset)[0].flatten(1) for e in list(bm.test_stream)[:2])
    perm = [next(i for i in range(64) if torch.equal(x1.flatten(1)[:, j], x0.flatten(1)[:, i])) for j in range(64)]
    varying = [j for j in range(64) if x0.flatten(1)[:, perm[j]].std() > 0]  # constant pixels are ambiguous
    assert torch.equal(t1[:, varying], t0[:, [perm[j] for j in varying]])


def test_permuted_digits_seeded():
    same = [stream_tensors(permuted_digits(3, seed=7).test_stream) for _ in range(2)]
    other = stream_tensors(permuted_digits(3, seed=8).test_stream)
    for (xa, ya, _), (xb, yb, _) in zip(*same):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(same[0][0][0], other[0][0])  # experience 0 is unpermuted whatever the seed
    assert not torch.equal(same[0][1][0], other[1][0])
    with pytest.raises(ConfigError, match=r"`n_experiences` must be >= 1, got 0 \(permuted_digits\)"):
        permuted_digits(0)


def test_rotated_digits_angles():
    bm = rotated_digits(n_experiences=3, angles=[0, 90, 180])
    (x0, y0, _), (x90, y90, _), (x180, _, _) = stream_tensors(bm.test_stream)
    d = load_digits_tensors()
    assert torch.equal(torch.unique(x0.flatten(1), dim=0), torch.unique(d.x_test.flatten(1), dim=0))
    assert torch.equal(y0, y90)
    assert torch.equal(x90, x0.rot90(1, dims=(2, 3)))  # counter-clockwise
    assert torch.allclose(x180, x0.rot90(2, dims=(2, 3)), atol=1e-6)
    default = rotated_digits()
    assert len(default.train_stream) == 5
    assert [e.classes_in_this_experience for e in default.test_stream] == [list(range(10))] * 5
    x72 = tensors(default.test_stream[1].dataset)[0]
    assert not torch.equal(x72, x0) and float(x72.min()) >= 0.0 and float(x72.max()) <= 1.0
    with pytest.raises(ConfigError, match=r"`angles` has 2 entries but `n_experiences` is 5.*n_experiences=2"):
        rotated_digits(angles=[0, 45])
    with pytest.raises(ConfigError, match=r"finite"):
        rotated_digits(n_experiences=1, angles=[float("nan")])


# ---------------------------------------------------------------- ContinualDataModule


class LinearDigits(L.LightningModule):
    """A linear model on the 64 pixels that records what every epoch trained and validated on (either batch format)."""

    def __init__(self, crash_at_epoch: int | None = None):
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.crash_at_epoch = crash_at_epoch
        self.train_classes: dict[int, set[int]] = {}
        self.train_batches: list[tuple[int, list[int]]] = []
        self.batch_lengths: set[int] = set()  # fields per batch: 2 for (x, y), 3 for (x, y, task_label)
        self.val_loaders: dict[int, int] = {}
        self.val_examples: dict[int, int] = {}

    def forward(self, x):
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.crash_at_epoch:
            raise RuntimeError("simulated crash")
        x, y = batch[0], batch[1]
        self.batch_lengths.add(len(batch))
        self.train_classes.setdefault(self.current_epoch, set()).update(y.tolist())
        self.train_batches.append((self.current_epoch, y.tolist()))
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        epoch = self.current_epoch
        self.batch_lengths.add(len(batch))
        self.val_loaders[epoch] = max(self.val_loaders.get(epoch, 0), dataloader_idx + 1)
        self.val_examples[epoch] = self.val_examples.get(epoch, 0) + len(batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SeenExperience(Callback):
    """Records ``datamodule.current_experience`` where a callback reads it."""

    def __init__(self):
        self.at_train_start: list[int] = []
        self.at_epoch_start: dict[int, int] = {}

    def on_train_start(self, trainer, pl_module):
        self.at_train_start.append(trainer.datamodule.current_experience)

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch_start[trainer.current_epoch] = trainer.datamodule.current_experience


def experience_of_classes(dm, classes):
    matches = [i for i, cs in enumerate(dm.classes_in_experience) if classes <= set(cs)]
    assert len(matches) == 1, (classes, dm.classes_in_experience)
    return matches[0]


@pytest.mark.parametrize("batch_format", ["lightning", "avalanche"])
def test_one_fit_serves_each_experience_for_its_epochs(batch_format):
    bm = three_class_blocks()
    dm = ContinualDataModule(bm, batch_size=64, epochs_per_experience=2, batch_format=batch_format)
    assert dm.classes_in_experience == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert (dm.n_experiences, dm.total_epochs) == (3, 6)
    assert [dm.experience_for_epoch(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    model, seen = LinearDigits(), SeenExperience()
    trainer = quiet_trainer(
        max_epochs=dm.total_epochs, reload_dataloaders_every_n_epochs=1, callbacks=[seen], limit_val_batches=1.0
    )
    trainer.fit(model, datamodule=dm)
    trained = [experience_of_classes(dm, model.train_classes[e]) for e in range(6)]
    assert trained == [0, 0, 1, 1, 2, 2]
    assert [model.train_classes[e] for e in (0, 2, 4)] == [set(cs) for cs in dm.classes_in_experience]
    assert seen.at_train_start == [0]
    assert seen.at_epoch_start == {e: e // 2 for e in range(6)}
    # eval_on="seen": the experiences trained so far, in one loader ("lightning") or one loader each ("avalanche")
    sizes = [len(e.dataset) for e in bm.test_stream]
    assert model.val_examples == {e: sum(sizes[: e // 2 + 1]) for e in range(6)}
    if batch_format == "lightning":
        assert model.batch_lengths == {2} and model.val_loaders == {e: 1 for e in range(6)}
    else:
        assert model.batch_lengths == {3} and model.val_loaders == {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3}
    assert dm.current_experience == 2


def test_one_fit_without_reloading_dataloaders_is_an_error():
    dm = ContinualDataModule(three_class_blocks(), epochs_per_experience=2)
    trainer = quiet_trainer(max_epochs=6)
    with pytest.raises(ConfigError, match=r"reload_dataloaders_every_n_epochs=1, max_epochs=6\).*got .*=0"):
        trainer.fit(LinearDigits(), datamodule=dm)


def test_running_past_the_stream_is_an_error():
    dm = ContinualDataModule(three_class_blocks(), epochs_per_experience=2)
    with pytest.raises(ConfigError, match=r"`Trainer\(max_epochs=7\)` runs past the end of the stream.*max_epochs=6"):
        quiet_trainer(max_epochs=7, reload_dataloaders_every_n_epochs=1).fit(LinearDigits(), datamodule=dm)
    with pytest.raises(ConfigError, match=r"Epoch 6 is past the end of the stream.*max_epochs=6"):
        dm.experience_for_epoch(6)
    with pytest.warns(UserWarning, match=r"only experiences 0\.\.0 of 3 will be trained"):
        quiet_trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1, limit_train_batches=1).fit(
            LinearDigits(), datamodule=dm
        )


def test_set_experience_serves_one_experience_per_fit():
    dm = ContinualDataModule(three_class_blocks(), batch_size=128, epochs_per_experience=2)
    for experience in (1, 2):
        dm.set_experience(experience)
        assert dm.current_experience == experience and dm.fixed_experience == experience
        model = LinearDigits()
        quiet_trainer(max_epochs=2).fit(model, datamodule=dm)  # no reload needed, epoch does not choose
        assert [experience_of_classes(dm, model.train_classes[e]) for e in (0, 1)] == [experience, experience]
        assert model.val_loaders == {0: 1, 1: 1}  # one loader over experiences 0..experience
        assert len(dm.val_dataloader().dataset) == sum(len(d) for d in dm._test_sets[: experience + 1])
    dm.set_experience(None)
    assert dm.fixed_experience is None and dm.current_experience == 2
    with pytest.raises(ConfigError, match=r"`experience` must be an int in \[0, 2\].*got 3"):
        dm.set_experience(3)


@pytest.mark.parametrize("crash_at_epoch", [2, 3])  # at an experience's first epoch, and inside it
def test_resume_sees_the_same_stream(tmp_path, crash_at_epoch):
    bm = three_class_blocks()

    def run(model, folder, ckpt_path=None, seen=None):
        dm = ContinualDataModule(bm, batch_size=256, epochs_per_experience=2, seed=3)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_epochs=1)]
        callbacks += [seen] if seen else []
        trainer = quiet_trainer(
            max_epochs=6, reload_dataloaders_every_n_epochs=1, enable_checkpointing=True, callbacks=callbacks
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)

    full = LinearDigits()
    run(full, "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(LinearDigits(crash_at_epoch=crash_at_epoch), "crashed")
    resumed, seen = LinearDigits(), SeenExperience()
    run(resumed, "resumed", ckpt_path=str(tmp_path / "crashed" / "last.ckpt"), seen=seen)
    assert resumed.train_batches == [b for b in full.train_batches if b[0] >= crash_at_epoch]
    assert seen.at_train_start == [crash_at_epoch // 2]
    assert seen.at_epoch_start == {e: e // 2 for e in range(crash_at_epoch, 6)}
    # Resuming a finished run trains nothing and is not mistaken for running past the stream.
    again = LinearDigits()
    run(again, "again", ckpt_path=str(tmp_path / "full" / "last.ckpt"))
    assert again.train_batches == []


def test_sampler_order_is_a_function_of_seed_and_epoch():
    bm = split_digits(5, seed=0)

    def order(seed, epoch):
        sampler = ContinualDataModule(bm, seed=seed).train_sampler(0)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 0)) == list(range(len(bm.train_stream[0].dataset)))


def test_each_rank_gets_its_own_shard():
    bm = split_digits(5, seed=0)
    n = len(bm.train_stream[0].dataset)
    shards = []
    for rank in (0, 1):
        dm = ContinualDataModule(bm, seed=0)
        dm.trainer = types.SimpleNamespace(world_size=2, global_rank=rank)  # what the loader reads
        dm.set_experience(0)
        loader = dm.train_dataloader()
        assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, rank)
        loader.sampler.set_epoch(4)
        shards.append(list(loader.sampler))
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == n % 2  # DistributedSampler pads an odd split with one repeat


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [y.tolist() for _, y in loader]


def test_loader_state_resumes_the_epoch_after_its_finished_batches():
    bm = split_digits(2, seed=0)
    full = epoch_batches(ContinualDataModule(bm, batch_size=64, seed=5).train_dataloader(), 3)
    loader = ContinualDataModule(bm, batch_size=64, seed=5).train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and resumes_mid_epoch(loader)
    loader.sampler.set_epoch(3)
    batches = iter(loader)
    drawn = [next(batches)[1].tolist() for _ in range(4)]
    state = loader.state_dict()
    assert drawn == full[:4]
    assert state == {
        "format_version": 1, "epoch": 3, "batches_done": 4, "batch_size": 64,
        "dataset_size": len(bm.train_stream[0].dataset), "num_replicas": 1, "seed": 5, "drop_last": False,
        "experience": 0,
    }  # fmt: skip
    resumed = ContinualDataModule(bm, batch_size=64, seed=5).train_dataloader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(full)  # Lightning counts the finished batches itself
    resumed.sampler.set_epoch(3)  # Lightning sets the epoch after loading: the position survives it
    assert [y.tolist() for _, y in resumed] == full[4:]
    assert [y.tolist() for _, y in resumed] == full  # the skip is used once
    assert epoch_batches(resumed, 4) != full
    finished = ContinualDataModule(bm, batch_size=64, seed=5).train_dataloader()
    finished.load_state_dict({**state, "batches_done": len(full)})  # a finished epoch: the next one follows
    assert finished.sampler.epoch == 4 and [y.tolist() for _, y in finished] == epoch_batches(finished, 4)


def test_each_rank_resumes_its_own_shard_from_rank_zeros_state():
    bm = split_digits(2, seed=0)

    def loader(rank):
        dm = ContinualDataModule(bm, batch_size=16, seed=1)
        dm.trainer = types.SimpleNamespace(world_size=2, global_rank=rank)  # what the loader reads
        dm.set_experience(0)
        return dm.train_dataloader()

    rank0 = loader(0)
    rank0.sampler.set_epoch(2)
    batches = iter(rank0)
    for _ in range(5):
        next(batches)
    state = rank0.state_dict()  # only rank 0's state is written to the checkpoint
    assert (state["num_replicas"], state["batches_done"]) == (2, 5)
    for rank in (0, 1):
        resumed = loader(rank)
        resumed.load_state_dict(state)
        assert [y.tolist() for _, y in resumed] == epoch_batches(loader(rank), 2)[5:]


def test_the_loader_starts_at_the_epoch_lightning_will_train():
    """Lightning calls set_epoch only after it made a resumed fit's first iterator (drawn at once with workers)."""
    dm = ContinualDataModule(split_digits(2, seed=0), epochs_per_experience=3)
    progress = types.SimpleNamespace(current=types.SimpleNamespace(processed=4))
    dm.trainer = types.SimpleNamespace(
        world_size=1, global_rank=0, reload_dataloaders_every_n_epochs=1, max_epochs=6, max_steps=-1,
        global_step=0, current_epoch=3, fit_loop=types.SimpleNamespace(epoch_progress=progress),
    )  # fmt: skip
    loader = dm.train_dataloader()
    assert (loader.sampler.epoch, loader.experience) == (4, 1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(format_version=2), CheckpointError, r"Unknown training-loader state format_version=2"),
        (dict(epoch=-1), CheckpointError, r"epoch=-1; expected an int >= 0"),
        (dict(batches_done=True), CheckpointError, r"batches_done=True"),
        (dict(batches_done=99), CheckpointError, r"batches_done=99, but an epoch has \d+ batches"),
        (dict(batch_size=32, seed=4), ConfigError, r"batch_size=32 \(this loader: 64\), seed=4 \(this loader: 5\)"),
        (dict(experience=1), ConfigError, r"experience=1 \(this loader: 0\).*end of an epoch"),
        (dict(num_replicas=2), ConfigError, r"num_replicas=2 \(this loader: 1\)"),
    ],
)
def test_loader_state_is_checked_before_it_is_used(change, error, match):
    dm = ContinualDataModule(split_digits(2, seed=0), batch_size=64, seed=5)
    state = dm.train_dataloader().state_dict()
    loader = dm.train_dataloader()
    with pytest.raises(error, match=match):
        loader.load_state_dict({**state, **change})
    with pytest.raises(CheckpointError, match=r"lacks \['seed'\]"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "seed"})
    assert loader.sampler._start is None and loader.sampler.epoch == 0  # nothing was changed


def test_resumes_mid_epoch_on_loaders_and_collections():
    from lightning.pytorch.utilities import CombinedLoader

    ours = ContinualDataModule(split_digits(2, seed=0)).train_dataloader()
    plain = DataLoader(list(range(8)), batch_size=2, shuffle=True)
    sampled = DataLoader(list(range(8)), sampler=DistributedSampler(list(range(8)), num_replicas=1, rank=0))

    class Stateful(DataLoader):  # e.g. torchdata's StatefulDataLoader: taken at its word
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert resumes_mid_epoch(ours) and resumes_mid_epoch(Stateful(list(range(4))))
    assert not resumes_mid_epoch(plain) and not resumes_mid_epoch(sampled)
    assert resumes_mid_epoch(CombinedLoader([ours, ours])) and not resumes_mid_epoch(CombinedLoader([ours, plain]))
    assert resumes_mid_epoch({"a": ours, "b": [ours]}) and not resumes_mid_epoch({"a": ours, "b": [plain]})
    assert not resumes_mid_epoch(None) and not resumes_mid_epoch([])
    with pytest.raises(ConfigError, match=r"`sampler` must be a ResumableSampler, got DistributedSampler"):
        ResumableDataLoader(list(range(8)), sampler=DistributedSampler(list(range(8)), num_replicas=1, rank=0))


class ShardChecker(LinearDigits):
    """Checks, on every rank, that the datamodule's sampler is the one training and that shards are disjoint."""

    def on_train_epoch_end(self):
        import torch.distributed as dist

        dm = self.trainer.datamodule
        sampler = self.trainer.train_dataloader.sampler
        # Lightning would build its own sampler with its own seed (0) if it replaced ours.
        assert type(sampler) is ResumableSampler and sampler.seed == dm.seed == 3
        assert (sampler.num_replicas, sampler.rank, sampler.epoch) == (2, self.global_rank, self.current_epoch)
        mine = (self.current_epoch, dm.current_experience, list(sampler))
        everyone = [None, None]
        dist.all_gather_object(everyone, mine)
        (e0, x0, s0), (e1, x1, s1) = everyone
        assert e0 == e1 and x0 == x1 == self.current_epoch
        n = len(self.trainer.train_dataloader.dataset)
        assert len(s0) == len(s1) == (n + 1) // 2
        assert set(s0) | set(s1) == set(range(n)) and len(set(s0) & set(s1)) == n % 2
        seen = sum(len(y) for e, y in self.train_batches if e == self.current_epoch)
        assert seen == len(s0)


@pytest.mark.ddp
def test_ddp_each_rank_trains_its_shard_of_the_experience():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("DDP test skipped: torch.distributed with the gloo backend is not available here")
    dm = ContinualDataModule(split_digits(2, seed=0), batch_size=64, seed=3)
    trainer = quiet_trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, devices=2, strategy="ddp_spawn")
    trainer.fit(ShardChecker(), datamodule=dm)  # a failed check in a worker is raised here


def fields(loader) -> tuple[int, ...]:
    """Lengths of the loader's batches (2: ``x, y``; 3: ``x, y, task_label``), as a sorted tuple of distinct values."""
    return tuple(sorted({len(batch) for batch in loader}))


def labels_of(loader) -> list[int]:
    return [int(v) for batch in loader for v in batch[1]]


def test_the_lightning_format_serves_x_y_and_one_loader_per_stage():
    bm = split_digits(5, seed=0, task_labels=True)
    dm = ContinualDataModule(bm, batch_size=16, eval_on="seen")
    assert dm.batch_format == "lightning"
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (16, 1, 8, 8) and y.dtype == torch.int64
    assert set(y.tolist()) <= set(dm.classes_in_experience[0])
    test = dm.test_dataloader()
    assert isinstance(test, DataLoader) and len(test.dataset) == N_TEST and fields(test) == (2,)
    per_experience = dm.experience_dataloaders("test")
    assert [len(t.dataset) for t in per_experience] == [len(e.dataset) for e in bm.test_stream]
    assert labels_of(test) == [v for t in per_experience for v in labels_of(t)]  # experiences in order
    val = dm.val_dataloader()
    assert isinstance(val, DataLoader) and len(val.dataset) == len(per_experience[0].dataset)
    dm.set_experience(3)
    assert len(dm.val_dataloader().dataset) == sum(len(t.dataset) for t in per_experience[:4])
    assert len(ContinualDataModule(bm, eval_on="all").val_dataloader().dataset) == N_TEST
    assert fields(per_experience[2]) == (2,)
    with_labels = dm.experience_dataloaders("test", with_task_labels=True)
    x, y, t = next(iter(with_labels[2]))
    assert set(y.tolist()) <= set(dm.classes_in_experience[2]) and set(t.tolist()) == {2} and t.dtype == torch.int64
    assert len(dm.experience_dataloaders("val")) == 5  # every experience, whatever the one trained


def test_the_avalanche_format_serves_task_labels_and_one_loader_per_experience():
    bm = split_digits(5, seed=0, task_labels=True)
    dm = ContinualDataModule(bm, batch_size=16, eval_on="seen", batch_format="avalanche")
    tests = dm.test_dataloader()
    assert len(tests) == 5
    assert [len(t.dataset) for t in tests] == [len(e.dataset) for e in bm.test_stream]
    assert len(dm.val_dataloader()) == 1
    dm.set_experience(3)
    assert len(dm.val_dataloader()) == 4
    assert len(ContinualDataModule(bm, eval_on="all", batch_format="avalanche").val_dataloader()) == 5
    x, y, t = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (16, 1, 8, 8) and set(y.tolist()) <= set(dm.classes_in_experience[3])
    assert set(t.tolist()) == {3}  # task labels pass through as the third element
    x, y, t = next(iter(tests[2]))
    assert set(y.tolist()) <= set(dm.classes_in_experience[2]) and set(t.tolist()) == {2}
    assert [fields(loader) for loader in dm.experience_dataloaders("test")] == [(3,)] * 5
    assert fields(dm.experience_dataloaders("val", with_task_labels=False)[0]) == (2,)


def _classification(dataset):
    from avalanche.benchmarks.utils import as_classification_dataset

    return as_classification_dataset(dataset)


def _digits_datasets():
    from cl_plugin.benchmarks.digits import _DigitsDataset

    d = load_digits_tensors()
    return _classification(_DigitsDataset(d.x_train, d.y_train)), _classification(_DigitsDataset(d.x_test, d.y_test))


@pytest.mark.parametrize("generator", ["class_incremental_benchmark", "benchmark_from_datasets", "task_incremental"])
def test_newer_generators_give_the_same_batch_shapes(generator):
    from avalanche.benchmarks import benchmark_from_datasets, class_incremental_benchmark, task_incremental_benchmark

    train, test = _digits_datasets()
    if generator == "benchmark_from_datasets":
        bm = benchmark_from_datasets(train=[train, train], test=[test, test])
    else:
        bm = class_incremental_benchmark({"train": train, "test": test}, num_experiences=5)
        if generator == "task_incremental":
            bm = task_incremental_benchmark(bm)
    n = len(list(bm.test_stream))
    assert len(bm.train_stream[0].dataset[0]) == (3 if generator == "task_incremental" else 2)  # Avalanche's items
    expected = list(range(n)) if generator == "task_incremental" else [0] * n
    lightning = ContinualDataModule(bm, batch_size=64)
    assert fields(lightning.train_dataloader()) == fields(lightning.test_dataloader()) == (2,)
    avalanche = ContinualDataModule(bm, batch_size=64, batch_format="avalanche")
    assert fields(avalanche.train_dataloader()) == (3,)
    loaders = avalanche.test_dataloader()
    assert [{int(v) for b in loader for v in b[2]} for loader in loaders] == [{k} for k in expected]
    with_labels = lightning.experience_dataloaders("test", with_task_labels=True)
    assert [{int(v) for b in loader for v in b[2]} for loader in with_labels] == [{k} for k in expected]


def test_an_item_without_a_task_label_gets_its_experiences():
    from torch.utils.data import TensorDataset

    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    experience = types.SimpleNamespace(dataset=TensorDataset(x, y), task_label=7, classes_in_this_experience=[0, 1])
    unknown = types.SimpleNamespace(dataset=TensorDataset(x, y), classes_in_this_experience=[0, 1])
    stream = types.SimpleNamespace(train_stream=[experience, unknown], test_stream=[experience, unknown])
    dm = ContinualDataModule(stream, batch_size=6, batch_format="avalanche")
    assert [next(iter(loader))[2].tolist() for loader in dm.test_dataloader()] == [[7] * 6, [0] * 6]
    assert torch.equal(next(iter(dm.test_dataloader()[0]))[0], x)


def test_items_that_are_not_x_y_are_refused_when_read():
    experience = types.SimpleNamespace(dataset=[torch.zeros(2)] * 3, classes_in_this_experience=[0])
    dm = ContinualDataModule(types.SimpleNamespace(train_stream=[experience], test_stream=[experience]))
    with pytest.raises(ConfigError, match=r"items \(x, y\) or \(x, y, task_label\).*item 0 of list is a Tensor"):
        next(iter(dm.test_dataloader()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), r"`batch_size` must be >= 1, got 0"),
        (dict(epochs_per_experience=1.0), r"`epochs_per_experience` must be an int, got 1.0"),
        (dict(num_workers=-1), r"`num_workers` must be >= 0"),
        (dict(eval_on="last"), r"`eval_on` must be one of \['seen', 'all'\], got 'last'"),
        (
            dict(batch_format="lightnin"),
            r"`batch_format` must be one of \['lightning', 'avalanche'\], got 'lightnin'.*Did you mean 'lightning'",
        ),
        (dict(batch_format=None), r"`batch_format` must be one of"),
        (
            dict(benchmark_options={"seed": 1}),
            r"`benchmark_options` \(\{'seed': 1\}\) apply only to a benchmark given by name",
        ),
        (dict(benchmark_options=[("seed", 1)]), r"`benchmark_options` must be a dict"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContinualDataModule(split_digits(), **kwargs)


def test_experience_dataloaders_rejects_bad_arguments():
    dm = ContinualDataModule(split_digits(2))
    with pytest.raises(ConfigError, match=r"`split` must be one of \['test', 'val'\], got 'valid'.*Did you mean 'val'"):
        dm.experience_dataloaders("valid")
    with pytest.raises(ConfigError, match=r"`with_task_labels` must be None, True or False, got 1"):
        dm.experience_dataloaders("test", with_task_labels=1)


def test_datamodule_rejects_what_is_not_a_benchmark():
    with pytest.raises(ConfigError, match=r"`benchmark` has no `train_stream`"):
        ContinualDataModule([1, 2, 3])
    empty = types.SimpleNamespace(train_stream=[], test_stream=[])
    with pytest.raises(ConfigError, match=r"stream is empty: 0 training and 0 test experiences"):
        ContinualDataModule(empty)


def test_datamodule_builds_a_benchmark_by_name_with_its_options():
    dm = ContinualDataModule("split_digits", benchmark_options={"n_experiences": 2, "seed": 1})
    assert (dm.benchmark_name, dm.benchmark_options) == ("split_digits", {"n_experiences": 2, "seed": 1})
    assert dm.n_experiences == 2
    assert dm.classes_in_experience == [sorted(e.classes_in_this_experience) for e in split_digits(2, 1).train_stream]
    assert ContinualDataModule("rotated_digits").n_experiences == 5  # no options: the builder's defaults
    assert ContinualDataModule(split_digits(2)).benchmark_name is None
    with pytest.raises(ConfigError, match=r"Unknown benchmark 'split_digit'.*Did you mean 'split_digits'"):
        ContinualDataModule("split_digit")
    with pytest.raises(ConfigError, match=r"Unknown option 'n_experience' for benchmark 'split_digits'"):
        ContinualDataModule("split_digits", benchmark_options={"n_experience": 2})
    with pytest.raises(MissingDatasetError, match=r"MNIST/raw/train-images-idx3-ubyte"):
        ContinualDataModule("split_mnist", benchmark_options={"dataset_root": "/nonexistent"})


class DocsStyleClassifier(L.LightningModule):
    """A LightningModule as Lightning's documentation writes one: ``x, y = batch``, one validation loader."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# LightningCLI warns that pytest's own argv is there too, and calls jsonargparse APIs it deprecates.
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter", "ignore::DeprecationWarning")
def test_lightning_cli_builds_the_datamodule_from_yaml(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (pip install it)")
    from lightning.pytorch.cli import LightningCLI

    config, run_dir = tmp_path / "fit.yaml", tmp_path / "run"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  default_root_dir: {run_dir}
  accelerator: cpu
  devices: 1
  max_epochs: 2
  reload_dataloaders_every_n_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  lr: 0.1
data:
  benchmark: split_digits
  benchmark_options:
    n_experiences: 2
    seed: 1
  batch_size: 16
  eval_on: all
"""
    )
    cli = LightningCLI(DocsStyleClassifier, ContinualDataModule, args=["fit", "--config", str(config)])
    dm = cli.datamodule
    assert (dm.benchmark_name, dm.benchmark_options) == ("split_digits", {"n_experiences": 2, "seed": 1})
    assert (dm.n_experiences, dm.batch_size, dm.eval_on, dm.batch_format) == (2, 16, "all", "lightning")
    assert dm.classes_in_experience == [sorted(e.classes_in_this_experience) for e in split_digits(2, 1).train_stream]
    assert cli.model.lr == 0.1 and cli.trainer.current_epoch == 2 and "val_acc" in cli.trainer.callback_metrics
    saved = (run_dir / "config.yaml").read_text()  # LightningCLI's copy of the resolved configuration
    assert "benchmark: split_digits" in saved and "batch_format: lightning" in saved


# ---------------------------------------------------------------- benchmark_by_name


def test_benchmark_by_name_embedded():
    bm = benchmark_by_name("permuted_digits", n_experiences=2, seed=1)
    assert len(bm.train_stream) == 2
    assert len(benchmark_by_name("split_digits").train_stream) == 5
    bm = benchmark_by_name("split_digits", n_experiences=2, class_order=range(10), dataset_root="/ignored")
    assert bm.train_stream[0].classes_in_this_experience == [0, 1, 2, 3, 4]
    assert set(BENCHMARK_NAMES) == {
        "split_digits", "permuted_digits", "rotated_digits",
        "split_mnist", "permuted_mnist", "rotated_mnist", "split_fmnist", "split_cifar100", "split_cub200", "core50",
    }  # fmt: skip


def test_benchmark_by_name_unknown_names_and_options():
    unknown = r"Unknown benchmark 'split_digit'.*'split_cifar100'.*Did you mean 'split_digits'"
    with pytest.raises(ConfigError, match=unknown):
        benchmark_by_name("split_digit")
    with pytest.raises(ConfigError, match=r"Unknown option 'angle' for benchmark 'rotated_digits'.*'angles'\?"):
        benchmark_by_name("rotated_digits", angle=[0])
    with pytest.raises(ConfigError, match=r"Unknown option 'colour'"):
        benchmark_by_name("split_mnist", colour=True)
    with pytest.raises(ConfigError, match=r"`n_experiences`=3 does not divide the 100 classes of 'split_cifar100'"):
        benchmark_by_name("split_cifar100", n_experiences=3)
    with pytest.raises(ConfigError, match=r"scenario 'ni' has 8 experiences, not n_experiences=5"):
        benchmark_by_name("core50", n_experiences=5, scenario="ni")
    with pytest.raises(ConfigError, match=r"Unknown CORe50 `scenario` 'nicv2'"):
        benchmark_by_name("core50", scenario="nicv2")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("split_mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte", "gunzip"]),
        ("split_fmnist", ["FashionMNIST/raw/train-labels-idx1-ubyte", "fashion-mnist"]),
        ("split_cifar100", ["cifar-100-python/train", "cifar-100-python/meta", "cifar-100-python.tar.gz"]),
        ("split_cub200", ["CUB_200_2011/images.txt", "CUB_200_2011/images/", "CUB_200_2011.tgz"]),
        ("core50", ["core50_128x128/", "NIC_v2_391/", "labels2names.pkl", "batches_filelists_NICv2.zip"]),
    ],
)
def test_benchmark_by_name_missing_files(tmp_path, name, expected):
    with pytest.raises(MissingDatasetError) as info:
        benchmark_by_name(name, dataset_root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "Nothing is downloaded" in message
    for part in expected:
        assert part in message, (part, message)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # nothing was created or fetched


def test_benchmark_by_name_reports_a_corrupt_cifar_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for f in ("train", "test", "meta"):
        (folder / f).write_bytes(b"not cifar")
    with pytest.raises(MissingDatasetError, match=r"cifar-100-python/train \(present, but its MD5 sum is wrong"):
        benchmark_by_name("split_cifar100", dataset_root=tmp_path)


def _write_idx(path, magic, dims, payload: bytes):
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload)


def test_benchmark_by_name_reads_local_mnist_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", 3), ("t10k", 1)):
        labels = bytes(c for c in range(10) for _ in range(per_class))
        images = bytes(len(labels) * 28 * 28)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 0x803, (len(labels), 28, 28), images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 0x801, (len(labels),), labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = benchmark_by_name("split_mnist", dataset_root=tmp_path, n_experiences=5, seed=0)
    assert [len(e.dataset) for e in bm.train_stream] == [6] * 5
    assert sorted(c for e in bm.train_stream for c in e.classes_in_this_experience) == list(range(10))
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    )  # nothing downloaded next to them


# ---------------------------------------------------------------- writers: one rule (cl_plugin._io.atomic_output)


def _write_heatmap(path):
    from cl_plugin.metrics.plots import plot_accuracy_matrix

    plot_accuracy_matrix([[0.9, float("nan")], [0.5, 0.8]], path)


def _lora_net():
    from cl_plugin.adapters import inject_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    inject_lora(net, ["0", "2"], r=2)
    return net


def _write_lora(path):
    from cl_plugin.adapters.lora import save_lora

    save_lora(_lora_net(), path)


def _write_share(path):
    from cl_plugin.adapters import SharedSubspace

    share = SharedSubspace(k=2, p=2)
    share.inject(_lora_net(), lora_task="lora")
    share.save(path)


def _byte_writer(name):
    """The object and attribute that put the bytes on disk for writer ``name`` (made to fail half-way)."""
    if name.endswith(".png"):
        from matplotlib.figure import Figure

        return Figure, "savefig"  # fig.savefig(fname, ...)
    import safetensors.torch

    return safetensors.torch, "save_file"  # save_file(tensors, filename, ...)


WRITERS = {"heatmap.png": _write_heatmap, "adapter.safetensors": _write_lora, "share.safetensors": _write_share}


@pytest.mark.parametrize("name", list(WRITERS))
def test_writers_log_an_overwrite_and_keep_the_old_file_when_a_write_fails(tmp_path, caplog, monkeypatch, name):
    import logging

    write = WRITERS[name]
    path = tmp_path / "out" / name
    with caplog.at_level(logging.WARNING, logger="cl_plugin"):
        write(path)  # creates the folder
        assert caplog.records == []
        first = path.read_bytes()
        write(path)
    assert [r.getMessage() for r in caplog.records] == [f"cl-plugin: overwriting existing file {path}"]
    if name.endswith(".png"):
        assert first.startswith(b"\x89PNG")  # the format follows the target's suffix, not the temporary name's

    def fail_half_way(first_argument, target, *args, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("No space left on device")

    path.write_bytes(b"the old file")
    monkeypatch.setattr(*_byte_writer(name), fail_half_way)
    with pytest.raises(OSError, match="No space left"):
        write(path)
    assert path.read_bytes() == b"the old file"
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temporary file left behind
