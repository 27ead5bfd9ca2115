"""Adapters against full fine-tuning on the digits streams: storage per task and accuracy.

Task-incremental learning (the task label is given at test time) on two
5-experience digits streams, built with ``task_labels=True`` so that experience
k carries task label k:

* split digits: two classes per experience. Training masks the logits outside
  the experience's classes (``ClassIncrementalMasking``) and the prediction is
  the arg-max over the task's two classes;
* rotated digits: all ten classes in every experience, each rotated by its own
  angle; the prediction is the arg-max over the ten classes.

The network and training are the demo's (``cl_plugin.demo``): the digits ViT
(depth 3, width 64) pretrained on MNIST-5k (upright for split, rotations
between the stream's angles for rotated; ``RECIPES``), head zeroed and trained,
SGD with momentum 0.9 and no weight decay, batch 32, 3 epochs per experience,
one ``fit`` over the stream. The methods, each through its cl-plugin callback:

* full fine-tuning + MagMax: ``ModelMerging("magmax", start_from="finetuned")``,
  every weight trained, at the demo's learning rate for the stream;
* LoRA + MagMax: ``LoRAAdapters(mode="merge", start_from="finetuned")``;
* per-task LoRA: ``LoRAAdapters(mode="per_task", trainable_per_task=True)``:
  the task label selects the adapter and the task's copy of the head;
* Share: ``SharedSubspaceAdapters(trainable_per_task=True)`` (the first
  experience trains the LoRA the basis starts from): the task label selects
  the coefficients and the head's copy;
* Share with one head shared by all tasks (``trainable_per_task=False``), to
  show what the shared head costs;
* Share with K = 32, p = 8 (the reference code's sizes).

LoRA is r=8, alpha=16 on every ``qkv``, ``proj``, ``fc1`` and ``fc2`` of the
three blocks; the head is trained in full. Share has 2 temporary directions.

Hyperparameters are chosen on a validation split, never on the test images:
``--tune`` runs every candidate on the streams built with ``validation=True``
(1,005 training images, 252 held out from the training set), seeds 0-1, and
keeps per method the setting with the best mean validation accuracy over both
streams. Candidates: learning rate 3e-3/1e-2/2e-2 for the LoRA methods;
for Share, learning rate 1e-2/2e-2/3e-2 and (K, p) in (8, 8), (16, 4),
(24, 3): each a task's coefficients at least 10 times smaller than a rank-8
adapter with its head. The choice is written to
``benchmarks/adapters_tuning.json``, which the default run reads, and the
validation table to ``docs/results.md``. Full fine-tuning keeps the demo's
learning rate (chosen in FACTS.md's study, on the test set).

Figures: trainable parameters per task; bytes stored per task (what grows with
the number of tasks: an adapter, or Share's coefficients, plus the task's copy
of the head); bytes stored once (the merged update, Share's basis, a shared
head); the final average accuracy over the 5 test experiences, mean ± std
over the seeds. The pretrained backbone θ₀, which every method keeps, is not
counted. Storage is the same on both streams (one architecture).

Run it from the repository root::

    .venv/bin/python benchmarks/adapters.py --tune       # choose the settings: about 3 minutes
    .venv/bin/python benchmarks/adapters.py              # the figures, 3 seeds: about 2 minutes, plus
                                                         # 1-2 minutes the first time (pretraining)
    .venv/bin/python benchmarks/adapters.py --seeds 1 --no-write   # a smoke test
    .venv/bin/python benchmarks/adapters.py --mixed-batch      # a batch with several task labels against PEFT's: ~2 minutes
    .venv/bin/python benchmarks/adapters.py --checkpoint-bytes # checkpoint bytes per task, before and after: ~20 s

The default run prints the tables and writes them between the markers
``adapters`` of ``docs/results.md`` and ``docs/adapters.md``, and the storage
figures between ``adapters_storage`` of ``docs/performance.md``; nothing else
in those files is touched. ``--mixed-batch`` and ``--checkpoint-bytes`` only
take their own measurement and write it between the markers
``adapters_mixed_batch`` and ``adapters_checkpoint_bytes`` of
``docs/performance.md``. The pretrained backbones are cached under ``.cache/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _sections import write_section
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parent.parent
RESULTS_DOC = REPO / "docs" / "results.md"
PERFORMANCE_DOC = REPO / "docs" / "performance.md"
ADAPTERS_DOC = REPO / "docs" / "adapters.md"
TUNING_FILE = Path(__file__).resolve().with_name("adapters_tuning.json")

STREAMS = ("split_digits", "rotated_digits")
N_EXPERIENCES = 5
EPOCHS = 3
BATCH_SIZE = 32
TARGET_MODULES = ["qkv", "proj", "fc1", "fc2"]
HEAD = "model.head"
LORA = dict(r=8, alpha=16.0)
TEMPORARY_DIRECTIONS = 2
TUNING_SEEDS = 2
LORA_LRS = (3e-3, 1e-2, 2e-2)
SHARE_LRS = (1e-2, 2e-2, 3e-2)
SHARE_SIZES = ((8, 8), (16, 4), (24, 3))


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full", "lora_merge", "lora_per_task", "share"
    lr: float | None = None  # None: the demo's learning rate for the stream
    share: dict[str, Any] = field(default_factory=dict)
    per_task_head: bool = False


#: The method the issue's targets are checked on, against "per-task LoRA".
SHARE_TARGET = "Share"


def tuning_candidates() -> dict[str, list[Method]]:
    """Every setting ``--tune`` tries, by method."""
    return {
        "LoRA + MagMax": [Method("LoRA + MagMax", "lora_merge", lr) for lr in LORA_LRS],
        "per-task LoRA": [Method("per-task LoRA", "lora_per_task", lr, per_task_head=True) for lr in LORA_LRS],
        SHARE_TARGET: [
            Method(SHARE_TARGET, "share", lr, dict(k=k, p=p, temporary_directions=TEMPORARY_DIRECTIONS), per_task_head=True)
            for k, p in SHARE_SIZES
            for lr in SHARE_LRS
        ],
    }


def methods_from_tuning(tuned: dict[str, dict[str, Any]]) -> tuple[Method, ...]:
    """The methods of the default run, with the settings ``--tune`` chose."""
    missing = [m for m in tuning_candidates() if m not in tuned]
    if missing:
        raise SystemExit(f"{TUNING_FILE.name} has no setting for {missing}: run benchmarks/adapters.py --tune first.")
    share = tuned[SHARE_TARGET]
    share_options = dict(k=share["k"], p=share["p"], temporary_directions=TEMPORARY_DIRECTIONS)
    shared = Method(
        f"Share, one head for all tasks (K={share['k']}, p={share['p']})", "share", share["lr"], share_options
    )
    return (
        Method("full fine-tuning + MagMax", "full"),
        Method("LoRA + MagMax", "lora_merge", tuned["LoRA + MagMax"]["lr"]),
        Method("per-task LoRA", "lora_per_task", tuned["per-task LoRA"]["lr"], per_task_head=True),
        Method(SHARE_TARGET, "share", share["lr"], share_options, per_task_head=True),
        shared,
        Method("Share (K=32, p=8)", "share", share["lr"], dict(k=32, p=8, temporary_directions=TEMPORARY_DIRECTIONS), per_task_head=True),
    )


def describe(method: Method) -> str:
    """The setting of a method, as the tables print it."""
    lr = "the demo's" if method.lr is None else f"{method.lr:g}"
    sizes = f", K={method.share['k']}, p={method.share['p']}" if method.share else ""
    return f"lr {lr}{sizes}"


class CountTrainable(Callback):
    """Records the number of trainable parameters of every experience (place it after the method's callback)."""

    def __init__(self) -> None:
        self.per_experience: dict[int, int] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        experience = trainer.datamodule.current_experience
        self.per_experience.setdefault(experience, sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


def _callback(method: Method):
    from cl_plugin.callbacks import ModelMerging
    from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters

    if method.kind == "full":
        return ModelMerging("magmax", start_from="finetuned")
    if method.kind == "lora_merge":
        return LoRAAdapters(TARGET_MODULES, trainable=[HEAD], mode="merge", method="magmax", start_from="finetuned", **LORA)
    if method.kind == "lora_per_task":
        return LoRAAdapters(TARGET_MODULES, trainable=[HEAD], trainable_per_task=method.per_task_head, mode="per_task", **LORA)
    return SharedSubspaceAdapters(TARGET_MODULES, trainable=[HEAD], trainable_per_task=method.per_task_head, **method.share, **LORA)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def task_il_accuracy(module, datamodule, forward, mask_classes: bool) -> list[float]:
    """Accuracy per evaluation experience; ``forward(module, x, task_labels)`` picks the adapter by task label.

    With ``mask_classes`` the arg-max runs over the experience's classes only.
    """
    module.eval()
    out = []
    for experience, loader in enumerate(datamodule.experience_dataloaders("test", with_task_labels=True)):
        classes = torch.tensor(datamodule.classes_in_experience[experience] if mask_classes else range(10))
        correct = total = 0
        for x, y, task in loader:
            logits = forward(module, x, task)[:, classes]
            correct += int((classes[logits.argmax(1)] == y).sum())
            total += len(y)
        out.append(correct / max(total, 1))
    return out


def _trainer(max_epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
        reload_dataloaders_every_n_epochs=1,
        callbacks=callbacks,
    )


def run_method(method: Method, stream: str, seed: int, weights: Path, *, validation: bool = False) -> dict[str, Any]:
    """One stream with one method: accuracy per experience and the storage figures.

    ``validation=True`` trains on 1,005 training images and evaluates on the
    other 252 (the digits streams' ``validation`` split) instead of the test images.
    """
    from cl_plugin.adapters import adapter_bytes
    from cl_plugin.benchmarks import ContinualDataModule, rotated_digits, split_digits
    from cl_plugin.callbacks import ClassIncrementalMasking
    from cl_plugin.demo import RECIPES, ImageClassifier, backbone

    recipe = RECIPES[stream]
    L.seed_everything(seed, verbose=False)
    build = split_digits if stream == "split_digits" else rotated_digits
    datamodule = ContinualDataModule(
        build(n_experiences=N_EXPERIENCES, seed=seed, task_labels=True, validation=validation),
        batch_size=BATCH_SIZE,
        epochs_per_experience=EPOCHS,
        seed=seed,
    )
    module = ImageClassifier(backbone(weights), lr=recipe.lr if method.lr is None else method.lr, frozen=recipe.frozen)
    callback = _callback(method)
    counter = CountTrainable()
    callbacks = [callback, counter]
    if recipe.mask_classes:
        callbacks.append(ClassIncrementalMasking(head=HEAD))
    started = time.perf_counter()
    _trainer(datamodule.total_epochs, callbacks).fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - started

    head = _bytes(module.model.head.parameters())
    head_per_task, head_once = (head, 0) if method.per_task_head else (0, head)
    if method.per_task_head:
        stored = {sum(t.numel() * t.element_size() for t in copy.values()) for copy in callback.task_module_states.values()}
        if stored != {head}:
            raise RuntimeError(f"{method.name}: per-task head copies of {stored} bytes, expected {head}.")
    trainable = counter.per_experience
    if method.kind == "share":
        forward = callback.forward_by_task
        per_task = callback.share.bytes_per_task() + head_per_task
        once = callback.share.shared_bytes() + head_once
        later = sorted({n for e, n in trainable.items() if e > 0})
        trainable_text = f"{trainable[0]:,} (first task: the LoRA), then " + ", ".join(f"{n:,}" for n in later)
    elif method.kind == "lora_per_task":
        forward = callback.forward_by_task
        per_task = adapter_bytes(module, "0") + head_per_task
        once = head_once
        trainable_text = ", ".join(f"{n:,}" for n in sorted(set(trainable.values())))
    else:

        def forward(m, x, task):  # the merged model needs no task label
            return m(x)

        per_task = 0
        once = _bytes(callback.merger.merged().values())
        trainable_text = ", ".join(f"{n:,}" for n in sorted(set(trainable.values())))
    accuracy = task_il_accuracy(module, datamodule, forward, recipe.mask_classes)
    return {
        "accuracy": accuracy,
        "average_accuracy": sum(accuracy) / len(accuracy),
        "trainable": trainable_text,
        "bytes_per_task": per_task,
        "bytes_once": once,
        "seconds": seconds,
    }


def pretrained_weights(cache_dir: Path, stream: str) -> Path:
    """The demo's pretrained backbone for ``stream``, made once and cached as safetensors."""
    from cl_plugin.benchmarks.pretraining import pretrain_digits_backbone
    from cl_plugin.demo import RECIPES

    recipe = RECIPES[stream]
    path = cache_dir / f"digits_vit_{recipe.pretraining}_e{recipe.pretraining_epochs}_seed0.safetensors"
    if not path.exists():
        print(f"Pretraining the digits ViT on MNIST-5k ({recipe.pretraining}, {recipe.pretraining_epochs} epochs); cached in {path}", flush=True)
    return pretrain_digits_backbone(path, recipe.pretraining, epochs=recipe.pretraining_epochs, seed=0)


# -- checkpoint bytes per task (--checkpoint-bytes) ------------------------------------------------
#: Measured with this function at commit 87a3460 (before Share's tensors left the callback state):
#: method -> {"callback": callback-state bytes after each task, "checkpoint": checkpoint file bytes}.
CHECKPOINT_BYTES_BEFORE: dict[str, dict[str, list[int]]] = {
    "Share": {"callback": [320461, 337151, 353651, 370303, 386955], "checkpoint": [1373551, 1349675, 1379847, 1410019, 1440255]},
    "per-task LoRA": {"callback": [5349, 8349, 11349, 14349, 17349], "checkpoint": [848131, 956939, 1065815, 1174627, 1283503]},
    "LoRA + MagMax": {"callback": [1303617] * 5, "checkpoint": [2147735] * 5},
}


def checkpoint_bytes(methods=("Share", "per-task LoRA", "LoRA + MagMax"), n_experiences: int = N_EXPERIENCES) -> dict[str, dict[str, list[int]]]:
    """Bytes of the Lightning checkpoint, and of the adapter callback's state in it, after each task.

    One ``fit`` per experience of rotated digits (two training batches each, a
    randomly initialised digits ViT: the sizes do not depend on the values),
    ``trainer.save_checkpoint`` after each; the callback's share is its state
    serialised on its own with ``torch.save``.
    """
    import io
    import tempfile

    from cl_plugin.benchmarks import ContinualDataModule, rotated_digits
    from cl_plugin.callbacks.adapters import LoRAAdapters, SharedSubspaceAdapters
    from cl_plugin.demo import ImageClassifier
    from cl_plugin.models import create_digits_vit

    makers = {
        "Share": lambda: SharedSubspaceAdapters(TARGET_MODULES, k=24, p=3, temporary_directions=TEMPORARY_DIRECTIONS, trainable=[HEAD], trainable_per_task=True, **LORA),
        "per-task LoRA": lambda: LoRAAdapters(TARGET_MODULES, trainable=[HEAD], trainable_per_task=True, mode="per_task", **LORA),
        "LoRA + MagMax": lambda: LoRAAdapters(TARGET_MODULES, trainable=[HEAD], mode="merge", method="magmax", start_from="finetuned", **LORA),
    }
    out: dict[str, dict[str, list[int]]] = {}
    for name in methods:
        L.seed_everything(0, verbose=False)
        datamodule = ContinualDataModule(rotated_digits(n_experiences=n_experiences, seed=0), batch_size=BATCH_SIZE, epochs_per_experience=1, seed=0)
        module = ImageClassifier(create_digits_vit(num_classes=10), lr=1e-2, frozen=())
        callback = makers[name]()
        sizes = {"callback": [], "checkpoint": []}
        with tempfile.TemporaryDirectory() as tmp:
            for experience in range(n_experiences):
                datamodule.set_experience(experience)
                trainer = L.Trainer(
                    max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, enable_progress_bar=False, callbacks=[callback], default_root_dir=tmp,
                )
                trainer.fit(module, datamodule=datamodule)
                path = Path(tmp) / f"after_{experience}.ckpt"
                trainer.save_checkpoint(path)
                buffer = io.BytesIO()
                torch.save(callback.state_dict(), buffer)
                sizes["callback"].append(buffer.getbuffer().nbytes)
                sizes["checkpoint"].append(path.stat().st_size)
        out[name] = sizes
    return out


# -- a mixed-label batch against PEFT's (--mixed-batch) ---------------------------------------------------
MIXED_TASKS = (5, 32)
MIXED_BATCH = 64
#: LoRA on every attention and MLP Linear of the ViT blocks, and not on the patch embedding (a Conv2d whose
#: name also ends in "proj"): one full-match regex, the same for PEFT and cl-plugin.
MIXED_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def _timed_ms(fns: dict[str, Any], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per call of each function, timed in turns so a busy moment hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: (1000 * statistics.median(t), 1000 * min(t)) for name, t in times.items()}


def mixed_batch_timing(repeats: int = 25) -> dict[str, Any]:
    """Time per batch of a batch with several task labels through per-task LoRA, against PEFT's mixed batch.

    One timm ViT (``vit_tiny_patch16_224`` at 32x32 with 4x4 patches: 65 tokens of width 192, 6 blocks), LoRA
    r=8 on the 24 block Linears, one adapter per task with random non-zero factors, copied from PEFT's adapters
    into cl-plugin's so both compute the same function; a batch of 64 images whose labels cycle over 5, then
    32, tasks. Rows: cl-plugin's ``forward_by_task`` (one pass, each adapter on its rows), the same batch run
    one pass per label (what ``forward_by_task`` did before), PEFT's ``model(x, adapter_names=...)``, and both
    libraries with one adapter for the whole batch (no routing by row). The five are timed in turns on one
    intra-op thread, under ``torch.no_grad`` in eval mode; median (and fastest) ms per batch.
    """
    import copy

    import peft
    import timm

    from cl_plugin.adapters import add_adapter, forward_by_task, inject_lora, lora_layers, use_adapter

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=6, num_classes=10).eval()
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=MIXED_TARGETS)
    names = [str(t) for t in range(max(MIXED_TASKS))]
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, config)
    theirs.eval()
    ours = copy.deepcopy(base)
    inject_lora(ours, MIXED_TARGETS, r=LORA["r"], alpha=LORA["alpha"], adapter_name=names[0])
    for name in names[1:]:
        add_adapter(ours, name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(module_name)
            for name in names:
                peft_layer.lora_B[name].weight.copy_(torch.randn(peft_layer.lora_B[name].weight.shape, generator=generator) * 0.05)
                layer.lora_A[name].copy_(peft_layer.lora_A[name].weight)
                layer.lora_B[name].copy_(peft_layer.lora_B[name].weight)
    x = torch.randn(MIXED_BATCH, 3, 32, 32, generator=generator)
    out: dict[str, Any] = {"columns": {}, "agreement": 0.0, "split_gap": 0.0, "peft": peft.__version__, "repeats": repeats}
    for n_tasks in MIXED_TASKS:
        labels = torch.arange(MIXED_BATCH) % n_tasks
        label_names = [str(int(t)) for t in labels]

        def per_label_passes(labels=labels):  # one pass per distinct label, as forward_by_task ran before
            result = None
            for label in labels.unique().tolist():
                index = (labels == label).nonzero().flatten()
                with use_adapter(ours, str(label)):
                    part = ours(x.index_select(0, index))
                result = part.new_empty((MIXED_BATCH, *part.shape[1:])) if result is None else result
                result[index] = part
            return result

        def one_adapter_ours():
            with use_adapter(ours, names[0]):
                return ours(x)

        def one_adapter_peft():
            theirs.set_adapter(names[0])
            return theirs(x)

        with torch.no_grad():
            mixed_ours = forward_by_task(ours, x, labels)
            out["agreement"] = max(out["agreement"], float((mixed_ours - theirs(x, adapter_names=label_names)).abs().max()))
            out["split_gap"] = max(out["split_gap"], float((per_label_passes() - mixed_ours).abs().max()))
            out["columns"][n_tasks] = _timed_ms(
                {
                    "cl-plugin `forward_by_task`: one pass, each adapter on its rows": lambda: forward_by_task(ours, x, labels),
                    "cl-plugin, one pass per label (the earlier `forward_by_task`)": per_label_passes,
                    "PEFT `model(x, adapter_names=...)`": lambda: theirs(x, adapter_names=label_names),
                    "cl-plugin, one adapter for the whole batch": one_adapter_ours,
                    "PEFT, one adapter for the whole batch": one_adapter_peft,
                },
                repeats,
            )
    return out


def format_mixed_batch(result: dict[str, Any]) -> str:
    columns = result["columns"]
    header = "| forward of a batch of 64 | " + " | ".join(f"{n} task labels: ms per batch, median (fastest)" for n in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for row in next(iter(columns.values())):
        cells = [f"{columns[n][row][0]:.0f} ({columns[n][row][1]:.0f})" for n in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_checkpoint_bytes(now: dict[str, dict[str, list[int]]]) -> str:
    lines = [
        "| method | callback state after task 1 → 5, before | after | checkpoint file after task 1 → 5, before | after | checkpoint growth per task, before → after |",
        "|---|---|---|---|---|---|",
    ]
    for name, sizes in now.items():
        before = CHECKPOINT_BYTES_BEFORE.get(name)
        if before is None:
            continue

        def span(values: list[int]) -> str:
            return f"{values[0]:,} → {values[-1]:,}"

        def growth(values: list[int]) -> str:
            return f"{(values[-1] - values[1]) / (len(values) - 2):,.0f}"

        lines.append(
            f"| {name} | {span(before['callback'])} | {span(sizes['callback'])} | {span(before['checkpoint'])} | "
            f"{span(sizes['checkpoint'])} | {growth(before['checkpoint'])} → {growth(sizes['checkpoint'])} B |"
        )
    return "\n".join(lines)


# -- tables and docs -------------------------------------------------------------------------------------
def _size(n: int) -> str:
    if n == 0:
        return "0"
    return f"{n:,} B ({n / 1024:.1f} KiB)"


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One row per method: setting, storage, then accuracy per stream (mean ± std over seeds)."""
    streams = [s for s in STREAMS if any(s in r["streams"] for r in rows.values())]
    header = "| method | setting | trainable parameters per task | bytes stored per task | bytes stored once | " + " | ".join(
        f"{s}: accuracy" for s in streams
    ) + " |"
    lines = [header, "|---|---|---|---|---|" + "---|" * len(streams)]
    for name, r in rows.items():
        cells = [f"{r['streams'][s]['mean']:.3f} ± {r['streams'][s]['std']:.3f}" for s in streams]
        lines.append(
            f"| {name} | {r['setting']} | {r['trainable']} | {_size(r['bytes_per_task'])} | {_size(r['bytes_once'])} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def format_storage(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | bytes stored per task | stored once | total after 5 tasks | total after 100 tasks | per task, against per-task LoRA |",
        "|---|---|---|---|---|---|",
    ]
    lora = rows.get("per-task LoRA", {}).get("bytes_per_task")
    for name, r in rows.items():
        per, once = r["bytes_per_task"], r["bytes_once"]
        if not per:
            ratio = "nothing per task"
        elif not lora or per == lora:
            ratio = "1x"
        else:
            ratio = f"{lora / per:.1f}x fewer"
        lines.append(
            f"| {name} | {_size(per)} | {_size(once)} | {_size(once + 5 * per)} | {_size(once + 100 * per)} | {ratio} |"
        )
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, Any]], share_row: str = SHARE_TARGET) -> str:
    """Whether Share meets the issue's targets against per-task LoRA, stream by stream."""
    lora, share = rows.get("per-task LoRA"), rows.get(share_row)
    if not lora or not share:
        return ""
    ratio = lora["bytes_per_task"] / share["bytes_per_task"]
    parts = [
        f"Targets of the adapters issue, for {share_row} ({share['setting']}), against per-task LoRA: at least 10x "
        f"fewer bytes per task: {ratio:.1f}x, {'met' if ratio >= 10 else 'NOT met'}."
    ]
    for stream in STREAMS:
        if stream in share["streams"] and stream in lora["streams"]:
            gap = 100 * (lora["streams"][stream]["mean"] - share["streams"][stream]["mean"])
            parts.append(
                f"{stream}: {gap:.1f} points below per-task LoRA (target: within 3 points, "
                f"{'met' if gap <= 3 else 'NOT met'})."
            )
    return " ".join(parts)


def _log(stream: str, label: str, seed: int, result: dict[str, Any]) -> None:
    print(
        f"{stream}, {label}, seed {seed}: average accuracy {result['average_accuracy']:.3f} "
        f"({', '.join(f'{a:.3f}' for a in result['accuracy'])}) in {result['seconds']:.1f} s",
        flush=True,
    )


def run_all(seeds: int, cache_dir: Path, methods, streams=STREAMS) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for stream in streams:
        weights = pretrained_weights(cache_dir, stream)
        for method in methods:
            runs = []
            for seed in range(seeds):
                result = run_method(method, stream, seed, weights)
                _log(stream, method.name, seed, result)
                runs.append(result)
            accs = [r["average_accuracy"] for r in runs]
            row = rows.setdefault(method.name, {k: runs[0][k] for k in ("trainable", "bytes_per_task", "bytes_once")})
            row["setting"] = describe(method) if method.lr is not None else "lr: the demo's (3e-3 split, 1e-3 rotated)"
            if (row["bytes_per_task"], row["bytes_once"]) != (runs[0]["bytes_per_task"], runs[0]["bytes_once"]):
                raise RuntimeError(f"{method.name}: storage differs between streams; the table assumes one architecture.")
            row.setdefault("streams", {})[stream] = {
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "per_seed": accs,
            }
    return rows


def tune(cache_dir: Path, seeds: int = TUNING_SEEDS, streams=STREAMS) -> tuple[dict[str, dict[str, Any]], str]:
    """Every candidate of :func:`tuning_candidates` on the validation split; the best setting per method.

    Returns the chosen settings ({method: {"lr", and "k", "p" for Share}}) and
    the validation table (markdown).
    """
    scores: dict[str, list[tuple[Method, dict[str, float]]]] = {}
    weights = {stream: pretrained_weights(cache_dir, stream) for stream in streams}
    for name, candidates in tuning_candidates().items():
        for method in candidates:
            per_stream = {}
            for stream in streams:
                accs = []
                for seed in range(seeds):
                    result = run_method(method, stream, seed, weights[stream], validation=True)
                    _log(f"{stream} (validation)", f"{name} {describe(method)}", seed, result)
                    accs.append(result["average_accuracy"])
                per_stream[stream] = statistics.fmean(accs)
            scores.setdefault(name, []).append((method, per_stream))
    chosen: dict[str, dict[str, Any]] = {}
    lines = [
        "| method | setting | " + " | ".join(f"{s}: validation accuracy" for s in streams) + " | mean | chosen |",
        "|---|---|" + "---|" * len(streams) + "---|---|",
    ]
    for name, results in scores.items():
        best_method, _ = max(results, key=lambda mr: statistics.fmean(mr[1].values()))
        chosen[name] = {"lr": best_method.lr, **({"k": best_method.share["k"], "p": best_method.share["p"]} if best_method.share else {})}
        for method, per_stream in results:
            cells = " | ".join(f"{per_stream[s]:.3f}" for s in streams)
            mark = "**yes**" if method is best_method else ""
            lines.append(f"| {name} | {describe(method)} | {cells} | {statistics.fmean(per_stream.values()):.3f} | {mark} |")
    return chosen, "\n".join(lines)


def _doc_text(fn) -> str:
    """A function's docstring after its first line, as one markdown paragraph."""
    body = (fn.__doc__ or "").split("\n", 2)[2]
    return " ".join(line.strip() for line in body.splitlines() if line.strip()).replace("``", "`")


def _measured(elapsed: float) -> str:
    when = datetime.date.today().isoformat()
    return f"Measured {when} in {elapsed:.0f} s on one intra-op thread (torch {torch.__version__}, {platform.machine()})."


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default 3; {TUNING_SEEDS} with --tune)")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS), help="streams to run (default both)")
    parser.add_argument("--tune", action="store_true", help=f"choose the settings on the validation split and write {TUNING_FILE.name}")
    parser.add_argument("--cache-dir", default=str(REPO / ".cache"), help="where the pretrained backbones are cached")
    parser.add_argument("--no-write", action="store_true", help="print only; write neither docs/ nor the tuning file")
    parser.add_argument(
        "--mixed-batch", action="store_true", help="only time a mixed-label batch against PEFT's (section adapters_mixed_batch)"
    )
    parser.add_argument(
        "--checkpoint-bytes", action="store_true", help="only measure checkpoint bytes per task (section adapters_checkpoint_bytes)"
    )
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/adapters.py", *(sys.argv[1:] if argv is None else argv)])

    from cl_plugin.demo import single_thread

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    if args.mixed_batch:
        with single_thread():
            result = mixed_batch_timing()
        table = format_mixed_batch(result)
        print(f"\n{table}\n\nlargest |cl-plugin - PEFT| {result['agreement']:.1e}; one pass against per-label passes {result['split_gap']:.1e}")
        if not args.no_write:
            write_section(
                PERFORMANCE_DOC,
                "adapters_mixed_batch",
                f"## Adapters: a batch with several task labels, against PEFT\n\nCommand: `{command}`\n\n"
                f"{_doc_text(mixed_batch_timing)} PEFT {result['peft']}, {result['repeats']} batches per row. The "
                f"outputs of cl-plugin's one pass and PEFT's differ by at most {result['agreement']:.1e}, and from "
                f"the per-label passes by at most {result['split_gap']:.1e}. The machine's 2 cores were shared "
                f"with other work (load average {os.getloadavg()[0]:.1f} at the end), so the medians carry noise of "
                f"tens of percent; compare rows within a column. {_measured(time.perf_counter() - started)}"
                f"\n\n{table}\n",
            )
            print(f"Updated {PERFORMANCE_DOC.relative_to(REPO)}.")
        return result
    if args.checkpoint_bytes:
        with single_thread():
            sizes = checkpoint_bytes()
        table = format_checkpoint_bytes(sizes)
        print(f"\n{table}")
        if not args.no_write:
            write_section(
                PERFORMANCE_DOC,
                "adapters_checkpoint_bytes",
                f"## Adapters: checkpoint bytes per task\n\nCommand: `{command}`\n\n"
                f"{_doc_text(checkpoint_bytes)} The digits ViT with the default run's "
                "settings (LoRA r=8 on qkv/proj/fc1/fc2, Share K=24, p=3 with 2 temporary directions, one head per "
                "task). *Before*: cl-plugin at commit 87a3460, where the Share callback saved Share's basis and "
                "coefficients in its own state although the module's state dict holds them too, and LoRAAdapters "
                "kept its own θ₀ and merger; *after*: the callback state holds Share's bookkeeping only, and merge "
                "mode saves the boundary core's state (the same θ₀ and merger). "
                f"{_measured(time.perf_counter() - started)}\n\n{table}\n",
            )
            print(f"Updated {PERFORMANCE_DOC.relative_to(REPO)}.")
        return sizes
    if args.tune:
        seeds = TUNING_SEEDS if args.seeds is None else args.seeds
        with single_thread():  # the models are tiny: one intra-op thread is much faster on busy cores
            chosen, table = tune(Path(args.cache_dir), seeds, args.streams)
        elapsed = time.perf_counter() - started
        print(f"\n{table}\n\nChosen: {json.dumps(chosen)}\nin {elapsed:.0f} s.")
        if not args.no_write:
            TUNING_FILE.write_text(
                json.dumps({"command": command, "seeds": seeds, "streams": list(args.streams), "chosen": chosen}, indent=2) + "\n",
                encoding="utf-8",
            )
            write_section(
                RESULTS_DOC,
                "adapters_tuning",
                f"## Adapters: settings chosen on the validation split\n\nCommand: `{command}`\n\n"
                f"Every candidate on split and rotated digits built with `validation=True` (trained on 1,005 of the "
                f"training images, evaluated on the other 252; the test images are not used), seeds 0-{seeds - 1}, "
                f"otherwise as in the table below. The setting with the best mean validation accuracy over the "
                f"streams is kept per method and written to `benchmarks/{TUNING_FILE.name}`, which "
                f"`benchmarks/adapters.py` reads. {_measured(elapsed)}\n\n{table}\n",
            )
            print(f"Wrote {TUNING_FILE.relative_to(REPO)} and updated {RESULTS_DOC.relative_to(REPO)}.")
        return chosen

    seeds = 3 if args.seeds is None else args.seeds
    methods = methods_from_tuning(json.loads(TUNING_FILE.read_text(encoding="utf-8"))["chosen"])
    with single_thread():
        rows = run_all(seeds, Path(args.cache_dir), methods, args.streams)
    elapsed = time.perf_counter() - started
    table, storage, summary = format_table(rows), format_storage(rows), verdict(rows)
    print(f"\n{table}\n\n{storage}\n\n{summary}\n\n{len(methods)} methods x {len(args.streams)} stream(s) x {seeds} seed(s) in {elapsed:.0f} s.")
    if args.no_write:
        return rows
    setting = (
        f"Task-incremental (task labels given) split and rotated digits, 5 experiences, {seeds} seed(s), "
        f"{EPOCHS} epochs per experience, batch {BATCH_SIZE}, evaluated on the test images; the demo's pretrained "
        "digits ViT with its head zeroed and trained. Split digits masks the logits outside the experience while "
        "training and predicts over the task's two classes; rotated digits predicts over all ten. LoRA "
        f"r={LORA['r']}, alpha={LORA['alpha']:g} on qkv/proj/fc1/fc2; Share with {TEMPORARY_DIRECTIONS} temporary "
        "directions. Per-task LoRA and Share keep one copy of the head per task (`trainable_per_task=True`) "
        "unless the row says one head for all tasks. Learning rates and Share's K and p were chosen on the "
        "validation split by `benchmarks/adapters.py --tune` (the tuning table in `docs/results.md`); full fine-tuning uses the "
        "demo's learning rate. Bytes are float32 on top of the pretrained backbone. "
        f"{_measured(elapsed)} `docs/adapters.md` explains the methods."
    )
    body = f"## Adapters: LoRA and Share against full fine-tuning\n\nCommand: `{command}`\n\n{setting}\n\n{table}\n\n{storage}\n\n{summary}\n"
    write_section(RESULTS_DOC, "adapters", body)
    write_section(ADAPTERS_DOC, "adapters", body.replace("## Adapters: LoRA and Share against full fine-tuning", "### The figures"))
    write_section(
        PERFORMANCE_DOC,
        "adapters_storage",
        f"## Adapters: bytes stored per task\n\nCommand: `{command}`\n\n"
        "Float32 bytes each method keeps on top of the pretrained backbone θ₀ for the digits ViT (12 adapted "
        "Linear layers, a 650-parameter head): per task, once, and in total after 5 and after 100 tasks. The "
        "merges keep one merged update whatever the number of tasks; per-task LoRA keeps one rank-8 adapter and "
        "one head per task; Share keeps K×p coefficients per side and layer and one head per task, plus one "
        f"shared basis. Accuracy and setting: `docs/results.md`.\n\n{storage}\n\n{summary}\n",
    )
    print(f"Updated {RESULTS_DOC.relative_to(REPO)}, {ADAPTERS_DOC.relative_to(REPO)} and {PERFORMANCE_DOC.relative_to(REPO)}.")
    return rows


if __name__ == "__main__":
    main()
