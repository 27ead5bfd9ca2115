"""Benchmarks by name: the embedded digits streams and Avalanche's real ones.

:func:`benchmark_by_name` builds the digits streams of
:mod:`cl_plugin.benchmarks.digits` (no files needed) and seven of Avalanche's
classic benchmarks from files already on disk. Avalanche downloads a dataset
whose files are missing; where that cannot work (no network, a cluster node)
it fails late, deep inside torchvision. Here the files each benchmark reads
are checked first, and a missing one stops the call at once with a message
that names every missing file, where it must go, and where to get it.

Files each real benchmark reads under ``dataset_root`` (learned from the
loading code of Avalanche 0.6 and torchvision):

====================  ======================================================
``split_mnist``,      ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
``permuted_mnist``,   (the four MNIST files, decompressed; torchvision checks
``rotated_mnist``     only that they exist, so any files in MNIST's format do)
``split_fmnist``      ``FashionMNIST/raw/`` with the same four names
``split_cifar100``    ``cifar-100-python/{train,test,meta}`` (the extracted
                      ``cifar-100-python.tar.gz``; ``train`` and ``test`` must
                      match torchvision's MD5 sums, or torchvision re-downloads)
``split_cub200``      ``CUB_200_2011/{images.txt,train_test_split.txt,``
                      ``image_class_labels.txt,bounding_boxes.txt,images/}``
``core50``            ``core50_128x128/`` (``core50_32x32/`` with ``mini=True``),
                      ``batches_filelists/``, the scenario's file lists (e.g.
                      ``NIC_v2_391/`` from ``batches_filelists_NICv2.zip``) and
                      ``paths.pkl``, ``LUP.pkl``, ``labels.pkl``, ``labels2names.pkl``
====================  ======================================================

When ``dataset_root`` is None, Avalanche's default location for the dataset
is used (``~/.avalanche/data/<dataset>`` unless its configuration says
otherwise), and that is the folder the message names.

CORe50 is checked further, because Avalanche reads it with ``pickle.load``
(any pickle can run code) and downloads it again whenever loading fails:

1. each of the four ``.pkl`` files must have the MD5 sum Avalanche itself
   checks after downloading it (``avalanche/benchmarks/datasets/core50/
   core50_data.py::data``); any other file is refused before anything
   unpickles it, with a :class:`~cl_plugin.errors.ConfigError` naming it;
2. the scenario's file lists for the chosen ``run`` must be there;
3. Avalanche's own loader is then run once with ``download=False``, so
   whatever else would make it fall back to a download (for example a file
   list it cannot parse when it derives the category-level lists) fails here,
   as a ``ConfigError``, instead. After that the benchmark is built from the
   same files, which now load, so Avalanche never reaches its download.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_plugin.benchmarks import digits
from cl_plugin.errors import ConfigError, did_you_mean

__all__ = ["BENCHMARK_NAMES", "EMBEDDED_BENCHMARKS", "MissingDatasetError", "benchmark_by_name"]


class MissingDatasetError(ConfigError, FileNotFoundError):
    """Files a real benchmark reads are not on disk, and nothing will be downloaded."""


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# torchvision's CIFAR100.train_list / test_list: a file whose MD5 differs triggers a download.
_CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}
_CUB_FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "bounding_boxes.txt")
_CORE50_PICKLES = ("paths.pkl", "LUP.pkl", "labels.pkl", "labels2names.pkl")
# The MD5 sums Avalanche checks after downloading these files itself
# (avalanche/benchmarks/datasets/core50/core50_data.py::data, Avalanche 0.6).
# Avalanche unpickles them, so a file with any other content is never handed to it.
_CORE50_MD5 = {
    "paths.pkl": "b568f86998849184df3ec3465290f1b0",
    "LUP.pkl": "33afc26faa460aca98739137fdfa606e",
    "labels.pkl": "281c95774306a2196f4505f22fd60ab1",
    "labels2names.pkl": "557d0b9f0ec32765ccea65624aa51b3b",
}
_CORE50_PICKLE_URL = "https://vlomonaco.github.io/core50/data/{name}"
# Avalanche's CORe50 scenarios: number of training experiences, and the folder of their file lists.
_CORE50_SCENARIOS = {
    "ni": (8, "batches_filelists/NI_inc"),
    "nc": (9, "batches_filelists/NC_inc"),
    "nic": (79, "batches_filelists/NIC_inc"),
    "nicv2_79": (79, "NIC_v2_79"),
    "nicv2_196": (196, "NIC_v2_196"),
    "nicv2_391": (391, "NIC_v2_391"),
}


def _missing_mnist(root: Path, folder: str, options: Mapping[str, Any]) -> list[str]:
    legacy = [root / folder / "processed" / f for f in ("training.pt", "test.pt")]
    if all(p.is_file() for p in legacy):  # torchvision still reads this old layout
        return []
    return [f"{folder}/raw/{f}" for f in _MNIST_FILES if not (root / folder / "raw" / f).is_file()]


def _missing_cifar100(root: Path, options: Mapping[str, Any]) -> list[str]:
    from torchvision.datasets.utils import check_integrity

    missing = []
    for name, md5 in _CIFAR100_MD5.items():
        path = root / "cifar-100-python" / name
        if not path.is_file():
            missing.append(f"cifar-100-python/{name}")
        elif not check_integrity(str(path), md5):
            missing.append(f"cifar-100-python/{name} (present, but its MD5 sum is wrong: a partial or corrupt copy)")
    if not (root / "cifar-100-python" / "meta").is_file():
        missing.append("cifar-100-python/meta")
    return missing


def _missing_cub200(root: Path, options: Mapping[str, Any]) -> list[str]:
    base = root / "CUB_200_2011"
    missing = [f"CUB_200_2011/{f}" for f in _CUB_FILES if not (base / f).is_file()]
    if not (base / "images").is_dir():
        missing.append("CUB_200_2011/images/")
    return missing


def _missing_core50(root: Path, options: Mapping[str, Any]) -> list[str]:
    images = "core50_32x32" if options.get("mini", False) else "core50_128x128"
    count, lists = _CORE50_SCENARIOS[options.get("scenario", "nicv2_391")]
    folders = [images, "batches_filelists", lists]
    missing = [f"{d}/" for d in dict.fromkeys(folders) if not (root / d).is_dir()]
    missing += [f for f in _CORE50_PICKLES if not (root / f).is_file()]
    run = f"{lists}/run{options.get('run', 0)}"
    if (root / lists).is_dir():  # the lists Avalanche's CORe50 reads for this scenario and run
        needed = [f"train_batch_{b:02d}_filelist.txt" for b in range(count)] + ["test_filelist.txt"]
        absent = [f for f in needed if not (root / run / f).is_file()]
        if len(absent) == len(needed):
            missing.append(f"{run}/")
        else:
            missing += [f"{run}/{f}" for f in absent]
    return missing


def _md5(path: Path) -> str:
    # MD5 is the only sum published for these files. It still identifies them: the genuine files are
    # fixed, so a hostile file would need a second preimage, which no known attack on MD5 provides.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _untrusted_core50_pickles(root: Path) -> list[str]:
    """The CORe50 ``.pkl`` files present under ``root`` whose content is not the genuine file's."""
    bad = []
    for name, expected in _CORE50_MD5.items():
        path = root / name
        if path.is_file() and _md5(path) != expected:
            bad.append(name)
    return bad


def _refuse_untrusted_core50(root: Path, bad: list[str]) -> None:
    urls = ", ".join(_CORE50_PICKLE_URL.format(name=n) for n in bad)
    raise ConfigError(
        f"Refusing to load CORe50 from {str(root)!r}: {', '.join(bad)} "
        f"{'is not the genuine file' if len(bad) == 1 else 'are not the genuine files'} (MD5 sum differs from "
        "the one Avalanche checks after its own download). Avalanche reads these files with `pickle.load`, "
        "which can run any code a file contains, so only the genuine copies are accepted. Delete "
        f"{'it' if len(bad) == 1 else 'them'} and download the genuine {'copy' if len(bad) == 1 else 'copies'} "
        f"from {urls} into {str(root)!r}, "
        "then call again."
    )


def _probe_core50(root: Path, options: Mapping[str, Any]) -> None:
    """Load CORe50's metadata once with Avalanche's loader and ``download=False``.

    Whatever would make Avalanche's loader fail (and so fall back to a
    download in the benchmark, which always passes ``download=True``) fails
    here instead. Run only after the pickles have passed their MD5 check.
    """
    from avalanche.benchmarks.datasets.core50 import CORe50Dataset

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            CORe50Dataset(root=root, mini=bool(options.get("mini", False)), download=False)
    except Exception as err:
        raise ConfigError(
            f"Avalanche cannot load CORe50's metadata from {str(root)!r} ({type(err).__name__}: {err}). Nothing "
            "was downloaded. The folders look complete, so a file in them is damaged, e.g. a file list under "
            "batches_filelists/ or NIC_v2_*/: unzip batches_filelists.zip and batches_filelists_NICv2.zip "
            "(https://vlomonaco.github.io/core50/) into it again, then call again."
        ) from err


@dataclass(frozen=True)
class _RealBenchmark:
    avalanche_name: str  # the function in avalanche.benchmarks
    default_folder: str  # argument of Avalanche's default_dataset_location
    default_n_experiences: int
    missing: Callable[[Path, Mapping[str, Any]], list[str]]
    how_to_get: str


_MNIST_HOW_TO_GET = (
    "Download the four MNIST .gz files (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/), "
    "decompress each with gunzip, and put them in {root}/MNIST/raw/."
)

_REAL: dict[str, _RealBenchmark] = {
    "split_mnist": _RealBenchmark(
        "SplitMNIST",
        "mnist",
        5,
        lambda root, options: _missing_mnist(root, "MNIST", options),
        _MNIST_HOW_TO_GET,
    ),
    "permuted_mnist": _RealBenchmark(
        "PermutedMNIST",
        "mnist",
        5,
        lambda root, options: _missing_mnist(root, "MNIST", options),
        _MNIST_HOW_TO_GET,
    ),
    "rotated_mnist": _RealBenchmark(
        "RotatedMNIST",
        "mnist",
        5,
        lambda root, options: _missing_mnist(root, "MNIST", options),
        _MNIST_HOW_TO_GET,
    ),
    "split_fmnist": _RealBenchmark(
        "SplitFMNIST",
        "fashionmnist",
        5,
        lambda root, options: _missing_mnist(root, "FashionMNIST", options),
        "Download the four Fashion-MNIST .gz files (http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/), "
        "decompress each with gunzip, and put them in {root}/FashionMNIST/raw/.",
    ),
    "split_cifar100": _RealBenchmark(
        "SplitCIFAR100",
        "cifar100",
        10,
        _missing_cifar100,
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it in {root} "
        "(tar xzf cifar-100-python.tar.gz -C {root}), which creates {root}/cifar-100-python/.",
    ),
    "split_cub200": _RealBenchmark(
        "SplitCUB200",
        "CUB_200_2011",
        11,
        _missing_cub200,
        "Download CUB_200_2011.tgz (Caltech-UCSD Birds-200-2011, "
        "https://www.vision.caltech.edu/datasets/cub_200_2011/) "
        "and extract it in {root} (tar xzf CUB_200_2011.tgz -C {root}), which creates {root}/CUB_200_2011/.",
    ),
    "core50": _RealBenchmark(
        "CORe50",
        "core50",
        391,
        _missing_core50,
        "From https://vlomonaco.github.io/core50/ download core50_128x128.zip (core50_32x32.zip for mini=True), "
        "batches_filelists.zip and batches_filelists_NICv2.zip and unzip them in {root}; put paths.pkl, LUP.pkl, "
        "labels.pkl and labels2names.pkl in {root} too.",
    ),
}

_EMBEDDED: dict[str, Callable[..., Any]] = {
    "split_digits": digits.split_digits,
    "permuted_digits": digits.permuted_digits,
    "rotated_digits": digits.rotated_digits,
}

#: Benchmarks that need no files (scikit-learn's digits).
EMBEDDED_BENCHMARKS: tuple[str, ...] = tuple(sorted(_EMBEDDED))
#: Every name :func:`benchmark_by_name` knows, sorted.
BENCHMARK_NAMES: tuple[str, ...] = tuple(sorted([*_EMBEDDED, *_REAL]))


def _check_options(name: str, fn: Callable[..., Any], options: Mapping[str, Any], taken: tuple[str, ...]) -> None:
    accepted = [p for p in inspect.signature(fn).parameters if p not in taken]
    for key in options:
        if key not in accepted:
            raise ConfigError(
                f"Unknown option {key!r} for benchmark {name!r}. Options: {accepted}.{did_you_mean(key, accepted)}"
            )


def _check_even_split(name: str, n: int, n_classes: int, first: int | None) -> None:
    """Raise unless ``n`` experiences split ``n_classes`` evenly (after ``first`` classes in experience 0)."""
    if first is None:
        if n_classes % n:
            divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
            raise ConfigError(
                f"`n_experiences`={n} does not divide the {n_classes} classes of {name!r} evenly. Pass one of "
                f"{divisors}."
            )
        return
    rest = n_classes - first
    if n < 2 or rest % (n - 1):
        raise ConfigError(
            f"With {first} classes in the first experience, the other {rest} classes of {name!r} must split "
            f"evenly over `n_experiences - 1` experiences; n_experiences={n} does not."
        )


def _check_rotations(n: int, options: Mapping[str, Any]) -> None:
    rotations = options.get("rotations_list")
    if rotations is None:
        return
    try:
        angles = [float(a) for a in rotations]
    except (TypeError, ValueError):
        raise ConfigError(
            f"`rotations_list` must be a sequence of angles in degrees, got {rotations!r} ('rotated_mnist')."
        ) from None
    if len(angles) != n:
        raise ConfigError(
            f"`rotations_list` has {len(angles)} angles but n_experiences={n} ('rotated_mnist'). Give one angle "
            f"per experience, or pass n_experiences={len(angles)}."
        )
    if not all(-180.0 <= a <= 180.0 for a in angles):
        raise ConfigError(
            f"`rotations_list` angles must lie in [-180, 180] degrees, got {rotations!r} ('rotated_mnist')."
        )


def _check_real_arguments(name: str, n: int, options: Mapping[str, Any]) -> None:
    if name == "rotated_mnist":
        _check_rotations(n, options)
    elif name in ("split_mnist", "split_fmnist", "split_cifar100"):
        n_classes = 100 if name == "split_cifar100" else 10
        half = options.get("first_exp_with_half_classes", options.get("first_batch_with_half_classes", False))
        if "fixed_class_order" not in options or options["fixed_class_order"] is None:
            _check_even_split(name, n, n_classes, n_classes // 2 if half else None)
    elif name == "split_cub200":
        _check_even_split(name, n, 200, options.get("classes_first_batch", 100))
    elif name == "core50":
        scenario = options.get("scenario", "nicv2_391")
        if scenario not in _CORE50_SCENARIOS:
            raise ConfigError(
                f"Unknown CORe50 `scenario` {scenario!r}. Choose one of {sorted(_CORE50_SCENARIOS)}."
                f"{did_you_mean(str(scenario), _CORE50_SCENARIOS)}"
            )
        run = options.get("run", 0)
        if isinstance(run, bool) or not isinstance(run, numbers.Integral) or not 0 <= run <= 9:
            raise ConfigError(f"CORe50 `run` must be an int in [0, 9], got {run!r}.")
        count = _CORE50_SCENARIOS[scenario][0]
        if n != count:
            by_count = ", ".join(f"{s!r}: {c}" for s, (c, _) in _CORE50_SCENARIOS.items())
            raise ConfigError(
                f"CORe50's scenario {scenario!r} has {count} experiences, not n_experiences={n}. Pick the "
                f"scenario instead (scenario=...; experiences per scenario: {by_count})."
            )


def _dataset_root(entry: _RealBenchmark, dataset_root: str | Path | None) -> Path:
    if dataset_root is None:
        from avalanche.benchmarks.datasets import default_dataset_location

        return Path(default_dataset_location(entry.default_folder))
    return Path(dataset_root).expanduser()


def benchmark_by_name(
    name: str,
    *,
    dataset_root: str | Path | None = None,
    n_experiences: int | None = None,
    seed: int = 0,
    **options: Any,
):
    """Build a benchmark by name.

    Args:
        name: one of :data:`BENCHMARK_NAMES`: ``"split_digits"``,
            ``"permuted_digits"``, ``"rotated_digits"`` (embedded, no files),
            or ``"split_mnist"``, ``"permuted_mnist"``, ``"rotated_mnist"``,
            ``"split_fmnist"``, ``"split_cifar100"``, ``"split_cub200"``,
            ``"core50"`` (Avalanche's, from local files).
        dataset_root: folder holding the real dataset's files (see the module
            docstring for the layout); None: Avalanche's default location.
            Ignored by the embedded benchmarks.
        n_experiences: number of training experiences; None for the
            benchmark's default (5 for digits, the three MNIST streams and
            Fashion-MNIST; 10 for
            CIFAR-100; 11 for CUB-200, i.e. 100 classes then 10 per
            experience; CORe50's follows its ``scenario``, 391 by default).
        seed: class order of the split benchmarks (CUB-200 keeps Avalanche's
            fixed order unless ``shuffle=True``), permutations of
            ``permuted_digits`` and ``permuted_mnist`` (whose first experience
            is permuted too, as in Avalanche), angles of ``rotated_mnist``
            without ``rotations_list``. Not used by CORe50, whose ``run``
            (0-9) fixes the order.
        **options: passed to the builder, e.g. ``class_order=`` or
            ``task_labels=`` for the digits, ``return_task_id=``,
            ``train_transform=`` or ``fixed_class_order=`` for Avalanche's,
            ``rotations_list=`` for ``rotated_mnist``, ``scenario=``, ``run=``
            or ``mini=`` for CORe50.

    Returns:
        An Avalanche benchmark (``train_stream``, ``test_stream``).

    Raises:
        ConfigError: an unknown name (with the valid names and the closest
            one) or option, an ``n_experiences`` the classes cannot be split
            into, or a ``rotations_list`` without one angle in [-180, 180]
            per experience.
        MissingDatasetError: a real benchmark's files are not under
            ``dataset_root``; nothing is downloaded. Subclasses
            :class:`ConfigError` and ``FileNotFoundError``.
        ConfigError: CORe50 only: a ``.pkl`` file that is not the genuine
            one (refused before anything unpickles it), or metadata that
            Avalanche's loader cannot read (refused instead of downloading).

    Example:
        >>> bm = benchmark_by_name("split_digits", n_experiences=2)
        >>> len(bm.train_stream), len(bm.train_stream[0].classes_in_this_experience)
        (2, 5)
    """
    if not isinstance(name, str) or name not in BENCHMARK_NAMES:
        raise ConfigError(
            f"Unknown benchmark {name!r}. Choose one of {list(BENCHMARK_NAMES)}."
            + did_you_mean(str(name), BENCHMARK_NAMES)
        )
    if n_experiences is not None and (
        isinstance(n_experiences, bool) or not isinstance(n_experiences, numbers.Integral) or n_experiences < 1
    ):
        raise ConfigError(f"`n_experiences` must be an int >= 1 or None, got {n_experiences!r} ({name!r}).")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"`seed` must be an int, got {seed!r} ({name!r}).")

    if name in _EMBEDDED:
        builder = _EMBEDDED[name]
        _check_options(name, builder, options, ("n_experiences", "seed"))
        return builder(n_experiences=5 if n_experiences is None else n_experiences, seed=seed, **options)

    entry = _REAL[name]
    import avalanche.benchmarks as avalanche_benchmarks

    builder = getattr(avalanche_benchmarks, entry.avalanche_name)
    _check_options(name, builder, options, ("n_experiences", "seed", "dataset_root"))
    n = entry.default_n_experiences if n_experiences is None else int(n_experiences)
    if name == "core50" and n_experiences is None:  # the scenario decides
        n = _CORE50_SCENARIOS.get(options.get("scenario", "nicv2_391"), (n, ""))[0]
    _check_real_arguments(name, n, options)

    root = _dataset_root(entry, dataset_root)
    if name == "core50":
        bad = _untrusted_core50_pickles(root)
        if bad:
            _refuse_untrusted_core50(root, bad)
    missing = entry.missing(root, options)
    if missing:
        raise MissingDatasetError(
            f"Benchmark {name!r} reads its data from {str(root)!r}, and {len(missing)} of the files it needs "
            f"{'is' if len(missing) == 1 else 'are'} missing there: {', '.join(missing)}. Nothing is downloaded. "
            + entry.how_to_get.format(root=root)
            + f" Then call again with dataset_root={str(root)!r}."
        )
    if name == "core50":
        _probe_core50(root, options)
        return builder(dataset_root=str(root), **options)
    return builder(n_experiences=n, seed=int(seed), dataset_root=str(root), **options)
