"""The shipped evaluation data: the Fashion-MNIST 10k test set.

The two gzipped IDX files next to this module are the unmodified t10k files of
Fashion-MNIST (Zalando SE, MIT licence, see ``LICENSE.fashion-mnist``), copied
from Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/``). Nothing is downloaded at run time.

Conventions
-----------
* :func:`load_fashion_mnist_test` returns **raw pixels scaled to [0, 1]**
  (``uint8 / 255`` as float32), *not* normalised.
* Every model of the zoo was trained on normalised inputs
  ``(x - mean) / std`` with the train-set statistics ``FASHION_MNIST_MEAN`` and
  ``FASHION_MNIST_STD`` below; ``models.json`` records them per model and
  :func:`normalize` applies them. Evaluate a zoo model as
  ``model(normalize(x))``.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "TEST_FILES",
    "read_idx",
    "load_fashion_mnist_test",
    "normalize",
    "data_path",
]

#: Class names in label order (from the upstream README).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Mean and standard deviation of the 60k *train* images after scaling to
#: [0, 1] (measured: 0.28604, 0.35302), rounded to 4 digits. These exact
#: values were used for training every zoo model.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

#: Shipped files and the SHA-256 of each (of the gzip file as shipped).
TEST_FILES = {
    "t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur here.
_IDX_DTYPES = {0x08: np.uint8}


def data_path(name: str) -> Path:
    """Path of a file shipped in the ``dfmpc.zoo`` package directory.

    Parameters
    ----------
    name : str
        File name, e.g. ``"t10k-images-idx3-ubyte.gz"``.

    Returns
    -------
    pathlib.Path
    """
    return Path(str(resources.files(__package__ or "dfmpc.zoo").joinpath(name)))


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file as used by MNIST and Fashion-MNIST.

    Parameters
    ----------
    path : str or Path
        File name; read through gzip when it ends in ``.gz``.

    Returns
    -------
    numpy.ndarray
        Array of dtype uint8 with the shape stored in the header, e.g.
        (N, 28, 28) for images and (N,) for labels.

    Raises
    ------
    ValueError
        If the header is malformed or the payload size does not match it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: payload has {len(raw) - header} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """Load the shipped Fashion-MNIST 10k test set.

    Returns
    -------
    x : numpy.ndarray, float32, shape (10000, 1, 28, 28)
        Pixels scaled to [0, 1] (``uint8 / 255``), NCHW, **not** normalised;
        apply :func:`normalize` before feeding a zoo model.
    y : numpy.ndarray, int64, shape (10000,)
        Labels in 0..9 (see ``FASHION_MNIST_CLASSES``), 1000 per class.
    """
    images = read_idx(data_path("t10k-images-idx3-ubyte.gz"))
    labels = read_idx(data_path("t10k-labels-idx1-ubyte.gz"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError("image and label counts differ")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    y = labels.astype(np.int64)
    return x, y


def normalize(x: np.ndarray, mean: float = FASHION_MNIST_MEAN,
              std: float = FASHION_MNIST_STD) -> np.ndarray:
    """Normalise [0, 1] images the way the zoo models were trained.

    Parameters
    ----------
    x : numpy.ndarray, shape (N, 1, 28, 28)
        Images in [0, 1], as returned by :func:`load_fashion_mnist_test`.
    mean, std : float
        Normalisation constants; the defaults are the train-set values used
        for every zoo model (also recorded in ``models.json``).

    Returns
    -------
    numpy.ndarray, float32, same shape as ``x``
        ``(x - mean) / std``.
    """
    x = np.asarray(x, dtype=np.float32)
    return (x - np.float32(mean)) / np.float32(std)


def sha256_of(path: str | Path) -> str:
    """SHA-256 hex digest of a file (used to check the shipped data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
