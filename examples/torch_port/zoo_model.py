"""The zoo ResNet-20 as a PyTorch module, weights read from dfmpc's shipped model.

The architecture and module names are those of ``scripts/train_zoo.py`` (``ResNet(BasicBlock, 3)``),
which trained it: stem conv3x3(16)-BN-ReLU, nine basic blocks at 16/32/64 channels with option-B
shortcuts, global average pool, linear. The shipped file stores the ONNX export; its node names
(``/layers/layers.3/shortcut/shortcut.0/Conv``) map onto module names (``layers.3.shortcut.0``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, cin = [], 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(3):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


#: dfmpc parameter name -> PyTorch state_dict suffix
_KEYS = {"W": "weight", "B": "bias", "gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


def resnet20_from_zoo() -> ResNet20:
    """ResNet20 in eval mode with the weights of ``dfmpc.evaluation.load_zoo_model("resnet20")``."""
    from dfmpc.evaluation import load_zoo_model
    from dfmpc.vectors import module_name
    g = load_zoo_model("resnet20")
    sd = {f"{module_name(n.name)}.{_KEYS[k]}": torch.from_numpy(np.array(v)) for n in g.nodes for k, v in n.params.items()}
    model = ResNet20()
    sd.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(sd, strict=True)      # raises naming missing / unexpected keys
    return model.eval()
