"""Minimal inference engine: a readable graph IR run with NumPy + Numba kernels.

Public names: :class:`Graph`, :class:`Node`, :data:`SUPPORTED_OPS`,
:func:`conv2d_f32`, :func:`max_pool2d`, :func:`avg_pool2d`, and the builders
in :mod:`dfmpc.engine.builders` (e.g. ``resnet_cifar``).
"""

from .graph import Graph, Node
from .ops import SUPPORTED_OPS
from .conv import conv2d_f32
from .pooling import avg_pool2d, max_pool2d
from . import builders

__all__ = ["Graph", "Node", "SUPPORTED_OPS", "conv2d_f32", "max_pool2d", "avg_pool2d", "builders"]
