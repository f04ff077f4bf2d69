"""The model zoo and the shipped evaluation data.

* :mod:`dfmpc.zoo.data` -- the Fashion-MNIST 10k test set (MIT, Zalando),
  shipped as package data, and its normalisation constants.
* ``models.json`` -- one entry per trained model: architecture, weight file,
  FP32 test accuracy, input normalisation, training settings, seed and the
  command that produced it (``scripts/train_zoo.py``).
"""

from .data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist_test,
    normalize,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "load_fashion_mnist_test", "normalize", "read_idx",
]
