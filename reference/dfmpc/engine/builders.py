"""Build common CNN graphs with seeded random weights, no framework needed.

Node names follow the PyTorch module names of ``scripts/train_zoo.py``
(``stem.0``, ``stem.1``, ``layers.3.conv1``, ``layers.3.shortcut.0``, ``fc``), so
a trained ``state_dict`` maps onto the graph by name
(:func:`dfmpc.interop.load_state_dict`).
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node


class _Builder:
    """Appends nodes and tracks the current tensor; random weights from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Node] = []

    def conv(self, name, x, cin, cout, k, stride=1, groups=1):
        fan_in = cin // groups * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k)).astype(np.float32)
        self.nodes.append(Node(name, "Conv", [x], [name], {
            "kernel_shape": (k, k), "strides": (stride, stride), "pads": (k // 2,) * 4,
            "dilations": (1, 1), "group": groups}, {"W": w}))
        return name

    def bn(self, name, x, c):
        r = self.rng
        params = {"gamma": r.uniform(0.5, 1.5, c), "beta": r.normal(0.0, 0.1, c),
                  "mean": r.normal(0.0, 0.1, c), "var": r.uniform(0.5, 1.5, c)}
        self.nodes.append(Node(name, "BatchNormalization", [x], [name], {"epsilon": 1e-5},
                               {k: v.astype(np.float32) for k, v in params.items()}))
        return name

    def op(self, name, op, inputs, **attrs):
        self.nodes.append(Node(name, op, list(inputs), [name], attrs))
        return name

    def linear(self, name, x, fin, fout):
        w = self.rng.normal(0.0, np.sqrt(1.0 / fin), (fout, fin)).astype(np.float32)
        b = self.rng.normal(0.0, 0.01, fout).astype(np.float32)
        self.nodes.append(Node(name, "Gemm", [x], [name], {}, {"W": w, "B": b}))
        return name


def resnet_cifar(depth: int = 20, in_channels: int = 1, num_classes: int = 10,
                 widths=(16, 32, 64), image_size: int = 28, seed: int = 0) -> Graph:
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with option-B shortcuts and random weights.

    Stem conv3x3(16)-BN-ReLU; three stages of ``(depth - 2) / 6`` basic blocks
    (conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU) at ``widths``, strides 1, 2, 2;
    the shortcut is a conv1x1(stride)-BN where the shape changes, else identity;
    global average pool, flatten, linear.  Same architecture and node names
    as ``ResNet(BasicBlock, n)`` in ``scripts/train_zoo.py``.

    Parameters
    ----------
    depth : int
        6n + 2 (20, 32, 44, 56, ...).
    in_channels, num_classes, image_size : int
        Input is (N, in_channels, image_size, image_size); output (N, num_classes).
    widths : tuple of int
        Channels of the three stages.
    seed : int
        Seed for the weights: He-normal convs, BN gamma ~ U(0.5, 1.5),
        beta, mean ~ N(0, 0.1), var ~ U(0.5, 1.5).

    Returns
    -------
    Graph
        Input ``"input"``, output ``"logits"``.

    Raises
    ------
    ValueError
        ``depth`` is not of the form 6n + 2.

    Example
    -------
    >>> g = resnet_cifar(20)
    >>> g.run(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 10)
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    b = _Builder(seed)
    x = b.conv("stem.0", "input", in_channels, widths[0], 3)
    x = b.bn("stem.1", x, widths[0])
    x = b.op("stem.2", "Relu", [x])
    cin, k = widths[0], 0
    for stage, w in enumerate(widths):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            p = f"layers.{k}"
            h = b.conv(f"{p}.conv1", x, cin, w, 3, stride)
            h = b.op(f"{p}.relu1", "Relu", [b.bn(f"{p}.bn1", h, w)])
            h = b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", h, w, w, 3), w)
            if stride != 1 or cin != w:
                x = b.bn(f"{p}.shortcut.1", b.conv(f"{p}.shortcut.0", x, cin, w, 1, stride), w)
            x = b.op(f"{p}.relu2", "Relu", [b.op(f"{p}.add", "Add", [h, x])])
            cin, k = w, k + 1
    x = b.op("pool", "GlobalAveragePool", [x])
    x = b.op("flatten", "Flatten", [x], axis=1)
    b.linear("fc", x, cin, num_classes)
    b.nodes[-1].outputs = ["logits"]
    return Graph(b.nodes, ["input"], ["logits"], {"input": (in_channels, image_size, image_size)},
                 name=f"resnet{depth}_cifar")


def conv_flops(graph: Graph, input_shape) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Conv and Gemm nodes for one image.

    Parameters
    ----------
    graph : Graph
    input_shape : tuple
        (C, H, W) of one image.

    Returns
    -------
    int
    """
    x = np.zeros((1,) + tuple(input_shape), np.float32)
    shapes = {}
    names = [t for n in graph.nodes for t in n.outputs]
    out = graph.run_many(x, outputs=names)
    for n in graph.nodes:
        shapes[n.outputs[0]] = out[n.outputs[0]].shape
    flops = 0
    for n in graph.nodes:
        if n.op == "Conv":
            w = n.params["W"]
            flops += 2 * int(np.prod(shapes[n.outputs[0]][1:])) * int(np.prod(w.shape[1:]))
        elif n.op == "Gemm":
            flops += 2 * int(np.prod(n.params["W"].shape))
    return flops
