"""Continual-learning streams built from scikit-learn's bundled digits.

The data is real and ships with scikit-learn (``sklearn.datasets.load_digits``:
1,797 grey-scale 8x8 images of the digits 0-9, about 180 per class), so these
streams need no download and build in well under a second.

One fixed train/test split serves every stream: stratified by class, 30 % held
out, drawn once with ``random_state=0`` (:data:`DIGITS_SPLIT_SEED`). That gives
**1,257 training and 540 test images**, whatever ``seed`` a stream is built
with, so results over several seeds are measured on the same test images.
Every stream also takes ``validation=True``, for choosing hyperparameters
without touching the test images: 20 % of the training images (stratified,
``random_state=0``; 252 images) become the evaluation stream and the other
1,005 the training stream. With ``validation_stream=True`` instead, the stream
trains on the same 1,005 images, has a ``valid_stream`` of the other 252
(split per experience like the test stream: the same classes, permutation or
angle) and tests on the 540 test images, as Avalanche's
``benchmark_with_validation_stream`` lays a benchmark out: what
``ModelMerging(scale="validate")`` chooses λ on.
Images are float32 tensors of shape ``(1, 8, 8)`` scaled to [0, 1] (the raw
pixel values run from 0 to 16).

Three streams, each an ordinary Avalanche benchmark (``train_stream``,
``test_stream``, ``classes_in_this_experience``, task labels) built with
Avalanche's own ``nc_benchmark`` generator:

- :func:`split_digits`: class-incremental, the 10 classes split evenly over
  the experiences in a seeded (or given) order;
- :func:`permuted_digits`: domain-incremental, all 10 classes in every
  experience, the pixels of experience ``k > 0`` shuffled by a seeded
  permutation (experience 0 is the unpermuted data);
- :func:`rotated_digits`: domain-incremental, experience ``k`` rotated by its
  own angle (0/72/144/216/288 degrees for five experiences).

Task labels are 0 everywhere (single-head, class- or domain-incremental)
unless ``task_labels=True``, which gives experience ``k`` the task label ``k``
(task-incremental use). Class ids are never remapped: a "7" is class 7 in
every stream and every experience.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from cl_plugin._checks import check_bool
from cl_plugin.errors import ConfigError

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DIGITS_VALIDATION_FRACTION",
    "DIGITS_N_CLASSES",
    "DigitsSplit",
    "load_digits_tensors",
    "split_digits",
    "permuted_digits",
    "rotated_digits",
]

#: ``random_state`` of the one stratified train/test split all streams share.
DIGITS_SPLIT_SEED = 0
#: Fraction of the 1,797 images held out for testing (540 images).
DIGITS_TEST_FRACTION = 0.3
#: Fraction of the training images held out as the evaluation set with ``validation=True``.
DIGITS_VALIDATION_FRACTION = 0.2
#: Number of classes (the digits 0-9).
DIGITS_N_CLASSES = 10
_PIXEL_MAX = 16.0  # load_digits stores integer intensities 0..16
_N_PIXELS = 64


class DigitsSplit(NamedTuple):
    """The fixed digits split: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels ``(N,)`` int64.

    ``x_test``/``y_test`` are the held-out images: the test set, or the
    validation set when the split was made with ``validation=True``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.lru_cache(maxsize=2)
def _cached_split(validation: bool) -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    if validation:  # carved from the training images only: the test images stay unseen
        train_idx, test_idx = train_test_split(
            train_idx,
            test_size=DIGITS_VALIDATION_FRACTION,
            stratify=digits.target[train_idx],
            random_state=DIGITS_SPLIT_SEED,
        )
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def load_digits_tensors(validation: bool = False) -> DigitsSplit:
    """Return the fixed train/test split of scikit-learn's digits as tensors.

    The same 1,257 training and 540 test images on every call (fresh copies,
    so changing them in place does not change the streams).

    Args:
        validation: instead, split the 1,257 training images into 1,005 for
            training and 252 held out (``x_test``/``y_test``), stratified with
            ``random_state=0``, to choose hyperparameters without the test
            images. Default False.

    Example:
        >>> split = load_digits_tensors()
        >>> tuple(split.x_train.shape), tuple(split.x_test.shape)
        ((1257, 1, 8, 8), (540, 1, 8, 8))
        >>> float(split.x_train.min()), float(split.x_train.max())
        (0.0, 1.0)
        >>> tuple(load_digits_tensors(validation=True).x_test.shape)
        (252, 1, 8, 8)
    """
    validation = check_bool(validation, "validation", "load_digits_tensors")
    return DigitsSplit(*(t.clone() for t in _cached_split(validation)))


class _DigitsDataset(Dataset):
    """Images and labels held as tensors; ``targets`` is what Avalanche reads the classes from."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images = images
        self.labels = labels
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def _check_int(name: str, value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"`{name}` must be an int, got {value!r} ({what}).")
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value!r} ({what}).")
    return int(value)


def _check_validation(validation: object, validation_stream: object, what: str) -> tuple[bool, bool]:
    validation = check_bool(validation, "validation", what)
    validation_stream = check_bool(validation_stream, "validation_stream", what)
    if validation and validation_stream:
        raise ConfigError(
            f"`validation=True` and `validation_stream=True` exclude each other ({what}): `validation=True` "
            "evaluates on the 252 held-out training images instead of the test images, `validation_stream=True` "
            "adds them as a `valid_stream` and keeps the test images as the test stream. Pass one."
        )
    return validation, validation_stream


def _with_valid_stream(build, train, test, valid):
    """``build(train, test)``'s benchmark with a ``valid_stream``: ``build(train, valid)``'s test stream.

    Both calls get the same arguments but the held-out images, so experience
    ``k`` of the validation stream has the classes, task label and transform
    of experience ``k`` of the test stream. The three streams become one
    Avalanche benchmark (``create_multi_dataset_generic_benchmark``, the
    generator behind ``dataset_benchmark``); ``n_classes`` is carried over.
    """
    from avalanche.benchmarks.scenarios.deprecated.generic_benchmark_creation import (
        create_multi_dataset_generic_benchmark,
    )

    tested = build(train, test)
    validated = build(train, valid)
    benchmark = create_multi_dataset_generic_benchmark(
        [e.dataset for e in tested.train_stream],
        [e.dataset for e in tested.test_stream],
        other_streams_datasets={"valid": [e.dataset for e in validated.test_stream]},
    )
    benchmark.n_classes = tested.n_classes
    return benchmark


def _domain_benchmark(train_sets: list[_DigitsDataset], test_sets: list[_DigitsDataset], task_labels: bool):
    """One experience per (train, test) pair, all 10 classes in each, class ids kept."""
    from avalanche.benchmarks import nc_benchmark

    return nc_benchmark(
        train_sets,
        test_sets,
        n_experiences=len(train_sets),
        task_labels=task_labels,
        shuffle=False,
        one_dataset_per_exp=True,
        # Without this, Avalanche gives each dataset its own block of class ids
        # (0-9, 10-19, ...). With it and shuffle=False every block maps back
        # onto 0-9 in order, so the labels stay the digits.
        class_ids_from_zero_in_each_exp=True,
    )


def split_digits(
    n_experiences: int = 5,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    *,
    task_labels: bool = False,
    validation: bool = False,
    validation_stream: bool = False,
):
    """Class-incremental digits: the 10 classes split evenly over the experiences.

    Args:
        n_experiences: number of experiences; must divide 10 (1, 2, 5 or 10).
            Default 5 (two classes each).
        seed: shuffles the class order (Avalanche's ``nc_benchmark`` seed).
            Ignored when ``class_order`` is given.
        class_order: the 10 classes in the order the stream visits them, e.g.
            ``range(10)``; experience ``k`` gets the ``k``-th block of
            ``10 // n_experiences`` classes.
        task_labels: give experience ``k`` the task label ``k`` (task-incremental
            use); default False, every task label is 0. Class ids stay 0-9.
        validation: train on 1,005 of the training images and evaluate on the
            other 252 (``test_stream`` then holds them) instead of the test
            images; for choosing hyperparameters. Default False.
        validation_stream: train on 1,005 of the training images, add the
            other 252 as a ``valid_stream`` (one experience per training
            experience, the same split), and keep the 540 test images as the
            test stream. Default False; excludes ``validation``.

    Returns:
        An Avalanche ``NCScenario``: ``train_stream`` of 1,257 images and
        ``test_stream`` of 540 images in total, split by class (1,005 and
        252 with ``validation=True``). With ``validation_stream=True``, an
        Avalanche ``GenericCLScenario`` with ``train_stream`` (1,005),
        ``valid_stream`` (252) and ``test_stream`` (540).

    Raises:
        ConfigError: ``n_experiences`` does not divide 10, ``seed`` is not an
            int, ``class_order`` is not a permutation of 0-9, or both
            ``validation`` and ``validation_stream``.

    Example:
        >>> bm = split_digits(n_experiences=5, class_order=range(10))
        >>> [e.classes_in_this_experience for e in bm.train_stream]
        [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    """
    from avalanche.benchmarks import nc_benchmark

    what = "split_digits"
    n = _check_int("n_experiences", n_experiences, 1, what)
    if DIGITS_N_CLASSES % n:
        divisors = [d for d in range(1, DIGITS_N_CLASSES + 1) if DIGITS_N_CLASSES % d == 0]
        raise ConfigError(
            f"`n_experiences` must divide the {DIGITS_N_CLASSES} digit classes evenly, got {n_experiences!r} "
            f"({what}). Pass one of {divisors}."
        )
    seed = _check_int("seed", seed, 0, what)
    task_labels = check_bool(task_labels, "task_labels", what)
    validation, validation_stream = _check_validation(validation, validation_stream, what)
    order = None
    if class_order is not None:
        try:
            order = [int(c) for c in class_order]
        except (TypeError, ValueError):
            order = None
        if order is None or sorted(order) != list(range(DIGITS_N_CLASSES)):
            raise ConfigError(
                f"`class_order` must list each of the classes 0-9 exactly once, got {class_order!r} ({what})."
            )

    def build(train: _DigitsDataset, test: _DigitsDataset):
        return nc_benchmark(
            train, test, n_experiences=n, task_labels=task_labels, shuffle=True, seed=seed, fixed_class_order=order
        )

    # Copies: the cached split must not change if a user edits a stream in place.
    data = _cached_split(validation or validation_stream)
    train = _DigitsDataset(data.x_train.clone(), data.y_train.clone())
    if validation_stream:
        tested = _cached_split(False)
        return _with_valid_stream(
            build,
            train,
            _DigitsDataset(tested.x_test.clone(), tested.y_test.clone()),
            _DigitsDataset(data.x_test.clone(), data.y_test.clone()),
        )
    return build(train, _DigitsDataset(data.x_test.clone(), data.y_test.clone()))


def _pixel_permutations(n_experiences: int, seed: int) -> list[Tensor]:
    """The identity for experience 0, then ``n - 1`` seeded permutations of the 64 pixels."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.arange(_N_PIXELS)]
    perms += [torch.randperm(_N_PIXELS, generator=generator) for _ in range(n_experiences - 1)]
    return perms


def _permute_pixels(images: Tensor, perm: Tensor) -> Tensor:
    flat = images.reshape(len(images), _N_PIXELS)
    return flat[:, perm].reshape(images.shape)


def permuted_digits(
    n_experiences: int = 5,
    seed: int = 0,
    *,
    task_labels: bool = False,
    validation: bool = False,
    validation_stream: bool = False,
):
    """Domain-incremental digits: each experience shuffles the pixels its own way.

    Experience 0 is the unpermuted data; experience ``k > 0`` applies the
    ``k``-th permutation of the 64 pixels drawn from ``torch.randperm`` with a
    generator seeded by ``seed``. Train and test images of one experience
    share its permutation. Every experience holds all 1,257 training and 540
    test images (1,005 and 252 with ``validation=True``) and all 10 classes.

    Args:
        n_experiences: number of experiences (>= 1). Default 5.
        seed: seeds the permutations; the same seed gives the same stream.
        task_labels: give experience ``k`` the task label ``k``; default False
            (every task label 0).
        validation: train on 1,005 of the training images and evaluate on the
            other 252 instead of the test images (see :func:`load_digits_tensors`).
            Default False.
        validation_stream: train on 1,005 of the training images, add the
            other 252 as a ``valid_stream`` (one experience per training
            experience, the same split), and keep the 540 test images as the
            test stream. Default False; excludes ``validation``.

    Returns:
        An Avalanche ``NCScenario`` with ``n_experiences`` experiences in each
        of ``train_stream`` and ``test_stream`` (and ``valid_stream`` with
        ``validation_stream=True``, then a ``GenericCLScenario``).

    Raises:
        ConfigError: ``n_experiences`` < 1, a non-int argument, or both
            ``validation`` and ``validation_stream``.

    Example:
        >>> bm = permuted_digits(n_experiences=3, seed=0)
        >>> [len(e.dataset) for e in bm.train_stream]
        [1257, 1257, 1257]
        >>> bm.train_stream[2].classes_in_this_experience
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    what = "permuted_digits"
    n = _check_int("n_experiences", n_experiences, 1, what)
    seed = _check_int("seed", seed, 0, what)
    task_labels = check_bool(task_labels, "task_labels", what)
    validation, validation_stream = _check_validation(validation, validation_stream, what)
    perms = _pixel_permutations(n, seed)
    return _domain_streams(lambda images, k: _permute_pixels(images, perms[k]), n, task_labels, validation, validation_stream)


def _domain_streams(transform, n: int, task_labels: bool, validation: bool, validation_stream: bool):
    """A domain-incremental benchmark: experience ``k`` holds every image of a split under ``transform(images, k)``."""
    data = _cached_split(validation or validation_stream)

    def sets(images: Tensor, labels: Tensor) -> list[_DigitsDataset]:
        return [_DigitsDataset(transform(images, k), labels) for k in range(n)]

    def build(train, test):
        return _domain_benchmark(train, test, task_labels)

    train = sets(data.x_train, data.y_train)
    if validation_stream:
        tested = _cached_split(False)
        return _with_valid_stream(build, train, sets(tested.x_test, tested.y_test), sets(data.x_test, data.y_test))
    return build(train, sets(data.x_test, data.y_test))


def _rotate(images: Tensor, angle: float) -> Tensor:
    """Rotate ``(N, 1, 8, 8)`` images counter-clockwise by ``angle`` degrees (bilinear, zero fill)."""
    if angle % 360.0 == 0.0:
        return images.clone()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.rotate(images, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)


def rotated_digits(
    n_experiences: int = 5,
    seed: int = 0,
    angles: Sequence[float] | None = None,
    *,
    task_labels: bool = False,
    validation: bool = False,
    validation_stream: bool = False,
):
    """Domain-incremental digits: each experience rotates the images by its own angle.

    Rotation is counter-clockwise about the image centre, bilinear, with
    zero (black) fill, applied once when the stream is built.

    Args:
        n_experiences: number of experiences (>= 1). Default 5.
        seed: accepted so that every digits stream has the same signature; the
            angles are fixed, so the data does not depend on it (the training
            order comes from :class:`~cl_plugin.benchmarks.ContinualDataModule`'s
            ``seed``).
        angles: one angle in degrees per experience. Default: evenly spaced
            from 0, ``360 * k / n_experiences`` (0/72/144/216/288 for five).
        task_labels: give experience ``k`` the task label ``k``; default False.
        validation: train on 1,005 of the training images and evaluate on the
            other 252 instead of the test images (see :func:`load_digits_tensors`).
            Default False.
        validation_stream: train on 1,005 of the training images, add the
            other 252 as a ``valid_stream`` (one experience per training
            experience, the same split), and keep the 540 test images as the
            test stream. Default False; excludes ``validation``.

    Returns:
        An Avalanche ``NCScenario``; every experience holds all 1,257 training
        and 540 test images (1,005 and 252 with ``validation=True``) and all
        10 classes. With ``validation_stream=True`` a ``GenericCLScenario``
        whose experiences hold 1,005 training, 252 validation and 540 test
        images.

    Raises:
        ConfigError: ``n_experiences`` < 1, ``angles`` of the wrong length, an
            angle that is not a finite number, or both ``validation`` and
            ``validation_stream``.

    Example:
        >>> bm = rotated_digits(n_experiences=2, angles=[0, 90])
        >>> x0, x1 = bm.test_stream[0].dataset[0][0], bm.test_stream[1].dataset[0][0]
        >>> bool((x1 == x0.rot90(1, dims=(1, 2))).all())
        True
    """
    what = "rotated_digits"
    n = _check_int("n_experiences", n_experiences, 1, what)
    _check_int("seed", seed, 0, what)
    task_labels = check_bool(task_labels, "task_labels", what)
    if angles is None:
        chosen = [360.0 * k / n for k in range(n)]
    else:
        try:
            chosen = [float(a) for a in angles]
        except (TypeError, ValueError):
            raise ConfigError(f"`angles` must be a sequence of numbers (degrees), got {angles!r} ({what}).") from None
        if len(chosen) != n:
            raise ConfigError(
                f"`angles` has {len(chosen)} entries but `n_experiences` is {n} ({what}). "
                f"Give one angle per experience, or pass n_experiences={len(chosen)}."
            )
        if not all(math.isfinite(a) for a in chosen):
            raise ConfigError(f"`angles` must be finite numbers of degrees, got {angles!r} ({what}).")
    validation, validation_stream = _check_validation(validation, validation_stream, what)
    return _domain_streams(lambda images, k: _rotate(images, chosen[k]), n, task_labels, validation, validation_stream)
