#!/usr/bin/env python3
"""Train the dfmpc model zoo on Fashion-MNIST (one-off; CI never runs this).

Needs PyTorch ``torch==2.13.0`` (CPU build; ``pip install torch==2.13.0``,
never an unpinned torch) and Debian's ``dataset-fashion-mnist`` for the 60k
train set (``apt-get install -y dataset-fashion-mnist``). The 10k test set is
read from the copy shipped in ``reference/dfmpc/zoo/``.

Architectures (all: input 1x28x28, 10 classes, BatchNorm after every conv
(DenseNet: before), no conv bias next to a BN, head = global average pool ->
flatten -> linear (VGG-16: max-pool to 1x1 -> flatten -> linear))

``resnet20`` / ``resnet56``
    CIFAR-style ResNet (He et al. 2016, section 4.2): stem conv3x3(16)-BN-ReLU,
    three stages of n = 3 / 9 basic blocks with 16 / 32 / 64 channels (spatial
    28 -> 14 -> 7). Basic block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU.
    Shortcut **option B**: identity, or conv1x1(stride)-BN where the shape
    changes (first block of stages 2 and 3).
``vgg_small``
    Plain VGG-style chain: [conv3x3-BN-ReLU] x2 at 32, maxpool, x2 at 64,
    maxpool, x2 at 128 channels (6 convs), global average pool, linear.
``resnet_bottleneck``
    Small bottleneck ResNet: stem conv3x3(16)-BN-ReLU, three stages of 1
    bottleneck block each (width 16 / 32 / 64, expansion 4 -> 64 / 128 / 256
    output channels; 11 weight layers + 3 shortcut convs). Bottleneck: conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU,
    conv1x1-BN, + shortcut (option B), ReLU.
``mobilenetv2_small``
    MobileNetV2-style net: stem conv3x3(16)-BN-ReLU6, inverted residual
    blocks (expand conv1x1-BN-ReLU6, depthwise conv3x3-BN-ReLU6, project
    conv1x1-BN; residual add when stride 1 and shape unchanged), settings
    (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,2,2) (6,64,2,1) (6,96,1,1)
    (spatial 28 -> 14 -> 7), last conv1x1(256)-BN-ReLU6, global average pool,
    linear.

The paper's networks (issue 12; the paper's topology -- block type, depth, BN
placement, shortcut type, classifier -- with the width reduced where size and
CPU training time call for it):

``resnet18``
    CIFAR-style ResNet-18: stem conv3x3-BN-ReLU at stride 1, basic blocks
    [2, 2, 2, 2] with strides 1 / 2 / 2 / 2 (28 -> 14 -> 7 -> 4), option-B
    shortcuts, GAP, linear. **Width 16 / 32 / 64 / 128** (the paper's 64 .. 512
    at 1/4: 0.70 M parameters instead of 11.2 M).
``vgg16``
    CIFAR VGG-16-BN: 13 conv3x3-BN-ReLU in blocks of 2 / 2 / 3 / 3 / 3,
    max-pools, flatten, one linear layer. **Width 16 .. 128** (1/4 of 64 .. 512).
    28x28 allows four halvings, not five: the pool after block 4 is left out
    (28 -> 14 -> 7 -> 3, blocks 4 and 5 at 3x3, the last pool 3 -> 1).
``densenet``
    DenseNet-BC-40, growth 12, compression 0.5 (full width): stem conv3x3(24),
    three dense blocks of 6 pre-activation layers BN-ReLU-conv1x1(48)-BN-ReLU-
    conv3x3(12) concatenated to their input, transitions BN-ReLU-conv1x1-
    avgpool2, final BN-ReLU, GAP, linear. (Pre-activation: BN *before* each
    conv, unlike the other models.)
``mobilenetv2``
    MobileNetV2 with the paper's 17 inverted residuals and strides; only the
    stem's stride is 1 (28 -> 14 -> 7 -> 4 -> 2). **Width multiplier 0.5**
    and the last conv1x1 at 640 instead of 1280.

``--init-from`` starts from a shipped ``.npz`` instead of the random
initialisation (continued training; the file's sha256 is recorded). The
retrained ``resnet56`` continues the 4-epoch model (``export_zoo.py``'s
``INIT_SOURCES`` says how to obtain that file).

Training (the same recipe for every model; all settings are recorded)
    SGD momentum 0.9, Nesterov, weight decay 5e-4 (all parameters), batch 128,
    one-cycle LR (max ``--lr``, 25 % warm-up, cosine annealing), cross-entropy.
    Augmentation: random crop 28x28 from the image zero-padded by 2 pixels,
    random horizontal flip. Inputs are ``x/255`` normalised with the train-set
    mean 0.2860 and std 0.3530 (``dfmpc.zoo.data``).
    Seeds: ``torch.manual_seed(seed)``; each epoch's shuffling and augmentation
    come from a generator seeded with ``seed * 1000 + epoch``, so resuming from a
    checkpoint reproduces the uninterrupted run. Deterministic algorithms on.

Outputs (in ``--out-dir``, default /work/zoo_staging, outside the repo)
    ``<arch>_ckpt.pt``  checkpoint after every epoch (resumed automatically)
    ``<arch>_final.pt`` final state dict (eval mode)
    ``<arch>.onnx``     ONNX export with BatchNormalization nodes kept
    ``<arch>.json``     record: accuracy, parameter count, settings, command

Examples
--------
Time a few batches::

    python scripts/train_zoo.py --arch resnet20 --time-batches 50

Train (the commands that produced the shipped zoo; 1 thread each, two at a
time under ``nice`` on a shared 2-core machine; ``models.json`` records each)::

    nice python scripts/train_zoo.py --arch resnet20 --epochs 10
    nice python scripts/train_zoo.py --arch vgg_small --epochs 8
    nice python scripts/train_zoo.py --arch resnet_bottleneck --epochs 5
    nice python scripts/train_zoo.py --arch mobilenetv2_small --epochs 3
    nice python scripts/train_zoo.py --arch resnet56 --epochs 4
    python scripts/export_zoo.py        # -> reference/dfmpc/zoo/*.npz, models.json

Issue 12's models (1 thread each under ``nice -n 19`` on the same machine,
heavily shared; the epochs are what fitted, see models.json for each history)::

    nice -n 19 python scripts/train_zoo.py --arch resnet18 --epochs 3
    git show 1664163:reference/dfmpc/zoo/resnet56.npz > /work/zoo_staging/resnet56_4ep.npz
    nice -n 19 python scripts/train_zoo.py --arch resnet56 --epochs 2 --lr 0.03 \
        --init-from /work/zoo_staging/resnet56_4ep.npz   # 92.67%: short of 93%, not shipped
    python scripts/train_zoo.py --arch vgg16 --epochs 3 --threads 1          # 91.48%, shipped
    python scripts/train_zoo.py --arch mobilenetv2 --epochs 3 --threads 1    # 90.46%, short of 91%:
    mv /work/zoo_staging/mobilenetv2.onnx /work/zoo_staging/mobilenetv2_3ep.onnx   # (and its .json, .pt)
    python scripts/train_zoo.py --arch mobilenetv2 --epochs 2 --lr 0.03 --threads 1 \
        --init-from /work/zoo_staging/mobilenetv2_3ep.onnx --no-resume         # 91.44%, shipped
    python scripts/train_zoo.py --arch densenet --epochs 3 --threads 1       # 91.05%, shipped (about
                                                                             # 38 min an epoch at load 4)
    python scripts/train_zoo.py --arch resnet56 --epochs 4 --lr 0.03 --threads 1 \
        --init-from /work/zoo_staging/resnet56_4ep.npz --no-resume --out-dir /work/zoo_staging/r56run
                                                                             # 93.18%, shipped
    python scripts/export_zoo.py --staging /work/zoo_staging/r56run --arch resnet56

Measured cost per training batch of 128 at 1 thread (AMD EPYC, 2 shared
cores): resnet18 ~0.6-1 s, vgg16 ~0.4-1.2 s, resnet56 ~2.6 s, mobilenetv2 ~1-2 s,
densenet ~4-5 s of CPU (469 batches an epoch); the lower figures on a less loaded machine.

The epoch counts are what fitted the time available, not tuned optima.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO / "reference" / "dfmpc" / "zoo"
TRAIN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _load_data_module():
    """Import ``reference/dfmpc/zoo/data.py`` by path (no package install needed)."""
    spec = importlib.util.spec_from_file_location("dfmpc_zoo_data", ZOO_DIR / "data.py")
    mod = importlib.util.module_from_spec(spec)
    # data_path() resolves files relative to the module's package; point it here.
    mod.__package__ = None
    spec.loader.exec_module(mod)
    mod.data_path = lambda name: ZOO_DIR / name
    return mod


DATA = _load_data_module()
MEAN, STD = DATA.FASHION_MNIST_MEAN, DATA.FASHION_MNIST_STD


# --------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------

def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """conv(k x k, 'same' padding, no bias) followed by BatchNorm2d."""
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Bottleneck block: 1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1-BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3(16)-BN-ReLU, three stages (stride 1, 2, 2), GAP, linear.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
    blocks_per_stage : int
    widths : tuple of int
        Block width per stage (output channels = width * expansion).
    """

    def __init__(self, block, blocks_per_stage: int, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3), nn.ReLU(inplace=True))
        expansion = getattr(block, "expansion", 1)
        layers, cin = [], 16
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, w, stride))
                cin = w * expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGSmall(nn.Module):
    """[conv3x3-BN-ReLU] x2 per stage at 32 / 64 / 128 channels, maxpool between, GAP, linear."""

    def __init__(self, widths=(32, 64, 128), num_classes=10):
        super().__init__()
        layers, cin = [], 1
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += conv_bn(cin, w, 3) + [nn.ReLU(inplace=True)]
                cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand-BN-ReLU6] dw3x3-BN-ReLU6, 1x1 project-BN, (+x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += conv_bn(cin, hidden, 1) + [nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + [nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2Small(nn.Module):
    """Small MobileNetV2 for 28x28 inputs (see module docstring for the settings)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1))

    def __init__(self, last_channels=256, num_classes=10):
        super().__init__()
        layers, cin = conv_bn(1, 16, 3) + [nn.ReLU6(inplace=True)], 16
        for t, c, n, s in self.SETTINGS:
            for j in range(n):
                layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        layers += conv_bn(cin, last_channels, 1) + [nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al. 2016 basic blocks, [2, 2, 2, 2]).

    Stem conv3x3(w)-BN-ReLU at stride 1 (CIFAR-style, no 7x7 / max-pool),
    four stages of two basic blocks at w / 2w / 4w / 8w channels with strides
    1 / 2 / 2 / 2 (spatial 28 -> 14 -> 7 -> 4), option-B shortcuts, GAP,
    linear. The paper's ResNet-18 has w = 64; ``width`` reduces it.
    """

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, width, 3), nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                layers.append(BasicBlock(cin, width * mult, 2 if (i > 0 and j == 0) else 1))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG16(nn.Module):
    """CIFAR VGG-16-BN: 13 [conv3x3-BN-ReLU] in five blocks (2, 2, 3, 3, 3), max-pools, linear.

    Channels (64, 128, 256, 512, 512) scaled by ``width / 64``. The CIFAR
    layout pools after every block (32 -> 1); a 28x28 input has only four
    halvings to 1x1 (28 -> 14 -> 7 -> 3 -> 1), so the pool after block 4 is
    left out: blocks 4 and 5 both run at 3x3 and the pool after block 5 takes
    3x3 to 1x1 (floor). Classifier as the CIFAR VGG: flatten the 1x1 map,
    one linear layer.
    """

    BLOCKS = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))   # (channel multiple, convs)
    POOL_AFTER = (True, True, True, False, True)

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 1
        for (mult, n), pool in zip(self.BLOCKS, self.POOL_AFTER):
            for _ in range(n):
                layers += conv_bn(cin, width * mult, 3) + [nn.ReLU(inplace=True)]
                cin = width * mult
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """DenseNet-BC transition: BN-ReLU-conv1x1(compression)-avgpool2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, 1, 0, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    """DenseNet-BC for CIFAR (Huang et al. 2017): depth L, growth k, compression 0.5.

    Stem conv3x3(2k) (no BN after it: pre-activation), three dense blocks of
    (L - 4) / 6 bottleneck layers each, transitions between them (spatial
    28 -> 14 -> 7), final BN-ReLU, GAP, linear.
    """

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        cin = 2 * growth
        layers = [nn.Conv2d(1, cin, 3, 1, 1, bias=False)]
        for b in range(3):
            for _ in range(n):
                layers.append(DenseLayer(cin, growth))
                cin += growth
            if b < 2:
                layers.append(Transition(cin, cin // 2))
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (MobileNetV2 reference code's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018, Table 2) for 28x28 inputs.

    The paper's 17 inverted residual blocks with its settings (t, c, n, s) =
    (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
    (6,320,1,1), stem conv3x3(32)-BN-ReLU6 and last conv1x1(1280)-BN-ReLU6,
    GAP, linear. Only the stem's stride changes (1 instead of 2: a 28x28
    input is ImageNet's 224 after three halvings), so the spatial size runs
    28 -> 14 -> 7 -> 4 -> 2. Channels (not the last conv's) are scaled by
    ``width_mult`` and rounded to multiples of 8 as in the reference code;
    ``last`` sets the last conv's width.
    """

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 1.0, last: int = 1280, num_classes: int = 10):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        layers = conv_bn(1, cin, 3) + [nn.ReLU6(inplace=True)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for j in range(n):
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
        layers += conv_bn(cin, last, 1) + [nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {
    "resnet20": lambda: ResNet(BasicBlock, 3),
    "resnet56": lambda: ResNet(BasicBlock, 9),
    "vgg_small": lambda: VGGSmall(),
    "resnet_bottleneck": lambda: ResNet(Bottleneck, 1),
    "mobilenetv2_small": lambda: MobileNetV2Small(),
    "resnet18": lambda: ResNet18(width=16),
    "vgg16": lambda: VGG16(width=16),
    "densenet": lambda: DenseNetBC(depth=40, growth=12),
    "mobilenetv2": lambda: MobileNetV2(width_mult=0.5, last=640),
}


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN gamma 1 / beta 0, default linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def load_train() -> tuple[torch.Tensor, torch.Tensor]:
    """60k train images as float32 (N, 1, 28, 28) in [0, 1] and int64 labels (N,)."""
    x = DATA.read_idx(TRAIN_DIR / "train-images-idx3-ubyte.gz")
    y = DATA.read_idx(TRAIN_DIR / "train-labels-idx1-ubyte.gz")
    x = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped 10k test set, [0, 1] float32 (N, 1, 28, 28) and int64 labels."""
    x, y = DATA.load_fashion_mnist_test()
    return torch.from_numpy(x), torch.from_numpy(y)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and random horizontal flip of a batch.

    Parameters
    ----------
    x : torch.Tensor, shape (B, 1, H, W), values in [0, 1]
    gen : torch.Generator

    Returns
    -------
    torch.Tensor, shape (B, 1, H, W)
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    iy = oy[:, None] + torch.arange(h)[None, :]                    # (B, H)
    ix = ox[:, None] + torch.arange(w)[None, :]                    # (B, W)
    flip = torch.rand(b, generator=gen) < 0.5
    ix = torch.where(flip[:, None], ix.flip(1), ix)
    out = padded[torch.arange(b)[:, None, None], 0, iy[:, :, None], ix[:, None, :]]
    return out.unsqueeze(1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000):
    """Top-1 accuracy (fraction) and the logits, model in eval mode, inputs in [0, 1]."""
    model.eval()
    logits = torch.cat([model(normalize(x[i:i + batch])) for i in range(0, len(x), batch)])
    return (logits.argmax(1) == y).double().mean().item(), logits


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: Path, x_check: torch.Tensor) -> dict:
    """Export to ONNX keeping BatchNormalization nodes, and check with onnxruntime.

    The legacy TorchScript exporter folds BN into the preceding conv in eval
    mode; ``training=TrainingMode.PRESERVE`` on an eval-mode model keeps the BN
    nodes (with running statistics) instead.

    Returns
    -------
    dict
        ``{"bn_nodes": int, "conv_nodes": int, "max_abs_logit_diff": float}``.
    """
    import onnx
    import onnxruntime as ort

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17, do_constant_folding=False,
    )
    proto = onnx.load(str(path))
    if _inline_identity_initializers(proto):
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    n_bn, n_conv = ops.count("BatchNormalization"), ops.count("Conv")
    n_bn_torch = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if n_bn != n_bn_torch:
        raise RuntimeError(f"ONNX has {n_bn} BatchNormalization nodes, model has {n_bn_torch}")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xin = normalize(x_check)
    with torch.no_grad():
        ref = model(xin).numpy()
    got = sess.run(None, {"input": xin.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if diff > 1e-4 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"onnxruntime logits differ from PyTorch by {diff}")
    same_top1 = float((ref.argmax(1) == got.argmax(1)).mean())
    return {"bn_nodes": n_bn, "conv_nodes": n_conv, "max_abs_logit_diff": diff,
            "onnxruntime_same_top1_fraction": same_top1, "checked_images": len(xin)}


def _inline_identity_initializers(proto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The TorchScript exporter de-duplicates parameters with equal values and
    links the copies with Identity nodes; this gives every parameter its own
    initializer again so that importers see plain Conv/BN weights.

    Returns
    -------
    int
        Number of Identity nodes removed.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    keep, removed = [], 0
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
            removed += 1
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return removed


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def state_dict_from_npz(path: Path) -> dict:
    """A ``state_dict`` from a shipped zoo ``.npz`` (dfmpc format, ONNX node names).

    The exporter names nodes ``/<module path with '/'>/<Op>`` (e.g.
    ``/layers/layers.0/conv1/Conv`` for module ``layers.0.conv1``); Conv/Gemm carry ``W`` (``B``), BatchNormalization
    ``gamma``/``beta``/``mean``/``var``.
    """
    sys.path.insert(0, str(REPO / "reference"))
    import dfmpc

    keys = {"W": "weight", "B": "bias", "gamma": "weight", "beta": "bias",
            "mean": "running_mean", "var": "running_var"}
    sd = {}
    for node in dfmpc.load_model(path).nodes:
        parts = []
        for c in node.name.strip("/").split("/")[:-1]:     # "layers", "layers.0", "conv1"
            if parts and c.startswith(parts[-1] + "."):
                parts[-1] = c                              # "layers.0" refines "layers"
            else:
                parts.append(c)
        module = ".".join(parts)                           # "layers.0.conv1"
        for pname, arr in node.params.items():
            if pname in keys:
                sd[f"{module}.{keys[pname]}"] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return sd


def make_optimizer(model, args, steps_per_epoch):
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e3)
    return opt, sched


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.1, help="peak one-cycle learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=Path("/work/zoo_staging"))
    p.add_argument("--time-batches", type=int, default=0,
                   help="only time this many training batches and exit")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of a zoo .npz (continued training) instead of "
                        "the random initialisation; its sha256 is recorded")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model = ARCHS[args.arch]()
    init_weights(model)
    init_record = None
    if args.init_from is not None:
        import hashlib
        sd = state_dict_from_npz(args.init_from)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            sys.exit(f"--init-from {args.init_from}: missing {missing}, unexpected {unexpected}")
        init_record = {"file": args.init_from.name,
                       "sha256": hashlib.sha256(args.init_from.read_bytes()).hexdigest()}
        print(f"initialised from {args.init_from}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params} parameters", flush=True)

    xtr, ytr = load_train()
    xte, yte = load_test()
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    opt, sched = make_optimizer(model, args, steps_per_epoch)

    ckpt_path = args.out_dir / f"{args.arch}_ckpt.pt"
    start_epoch, history, train_seconds = 0, [], 0.0
    if ckpt_path.exists() and not args.no_resume and not args.time_batches:
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"]["epochs"] != args.epochs or ck["args"]["lr"] != args.lr:
            sys.exit(f"{ckpt_path} was made with other settings; use --no-resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start_epoch, history, train_seconds = ck["epoch"], ck["history"], ck["train_seconds"]
        print(f"resumed from {ckpt_path} after epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(len(xtr), generator=gen)
        model.train()
        t0, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb = normalize(augment(xtr[idx], gen))
            yb = ytr[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            if args.time_batches and step + 1 == args.time_batches:
                dt = time.time() - t0
                print(f"{args.time_batches} batches in {dt:.1f} s -> "
                      f"{dt / args.time_batches * steps_per_epoch / 60:.1f} min/epoch", flush=True)
                return
            if step % 100 == 0:
                print(f"  epoch {epoch + 1} step {step}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} {time.time() - t0:.0f}s", flush=True)
        dt = time.time() - t0
        train_seconds += dt
        acc, _ = evaluate(model, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen,
                        "train_acc": correct / seen, "test_acc": acc, "seconds": dt})
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss_sum / seen:.4f} "
              f"train {correct / seen:.4f} test {acc:.4f} ({dt:.0f}s)", flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "epoch": epoch + 1, "history": history,
                    "train_seconds": train_seconds, "args": vars(args) | {"out_dir": str(args.out_dir)}},
                   str(ckpt_path) + ".tmp")
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)

    model.eval()
    acc, _ = evaluate(model, xte, yte)
    torch.save(model.state_dict(), args.out_dir / f"{args.arch}_final.pt")
    onnx_info = export_onnx(model, args.out_dir / f"{args.arch}.onnx", xte[:256])
    record = {
        "arch": args.arch,
        "parameters": n_params,
        "fp32_test_accuracy_torch": acc,
        "test_set": "Fashion-MNIST t10k (shipped dfmpc/zoo files), 10000 images",
        "input": {"shape": [1, 28, 28], "scale": "x/255",
                  "normalize_mean": MEAN, "normalize_std": STD},
        "training": {
            "epochs": args.epochs, "batch_size": args.batch_size,
            "optimizer": "SGD momentum 0.9 nesterov", "weight_decay": args.weight_decay,
            "lr_schedule": f"OneCycleLR max_lr={args.lr} pct_start=0.25 cos div_factor=25 final_div_factor=1e3",
            "augmentation": "random crop 28 from zero-pad 2, random horizontal flip",
            "loss": "cross-entropy", "seed": args.seed, "threads": args.threads,
            "init_from": init_record,
            "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
        },
        "history": history,
        "onnx_check": onnx_info,
        "command": "python scripts/train_zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }
    (args.out_dir / f"{args.arch}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("arch", "parameters", "fp32_test_accuracy_torch")}),
          flush=True)


if __name__ == "__main__":
    main()
