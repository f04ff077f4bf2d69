"""Small PyTorch networks exported with export_onnx, imported, and run against PyTorch itself."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# torch 2.13's TorchScript exporter warns that it is deprecated; it is the offline, onnxscript-free path.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
nn, F = torch.nn, torch.nn.functional

from dfmpc import load_model  # noqa: E402
from dfmpc.engine.builders import resnet_cifar  # noqa: E402
from dfmpc.interop import load_state_dict  # noqa: E402
from dfmpc.interop.torch_export import export_onnx, graph_from_torch  # noqa: E402

# float32 in both engines, <= ~25 layers, logits O(1..10): measured differences ~1e-6 relative;
# 1e-4 relative to the largest logit leaves room for other BLAS builds.
REL_TOL = 1e-4


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _compare(model, shape, tmp_path, n=5):
    torch.manual_seed(0)
    _randomise_bn(model)
    x = torch.randn((n,) + shape)
    with torch.no_grad():
        ref = model(x).numpy()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, shape)
    g = load_model(path)
    got = g.run(x.numpy(), batch_size=2)   # chunked on purpose
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()
    return g, x, ref


class HeadNet(nn.Module):
    """Conv variants + concat + dropout + the x.view(x.size(0), -1) flatten pattern."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.gc = nn.Conv2d(8, 12, (3, 1), stride=(1, 2), padding=(1, 0), groups=4)
        self.b3 = nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(8, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):                                    # x: (N, 3, 14, 14)
        x = F.relu(self.b1(self.c1(x)))                      # (N, 8, 7, 7)
        x = F.relu6(self.b2(self.dw(x)))                     # (N, 8, 7, 7)
        y = F.avg_pool2d(F.relu(self.b3(self.gc(x))), 2, ceil_mode=True)   # (N, 12, 4, 2)
        z = F.max_pool2d(self.pw(x), 2, ceil_mode=True)      # (N, 4, 4, 4)
        y = torch.cat([y, y], dim=3)                         # (N, 12, 4, 4)
        h = torch.cat([y, z], dim=1)                         # (N, 16, 4, 4)
        h = self.drop(h)
        return self.fc(h.view(h.size(0), -1))


class BasicBlockNet(nn.Module):
    """Same architecture and module names as dfmpc.engine.builders.resnet_cifar(8)."""

    class Block(nn.Module):
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

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(self.Block(16, 16, 1), self.Block(16, 32, 2), self.Block(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_conv_variants_head_patterns(tmp_path):
    g, _, _ = _compare(HeadNet(), (3, 14, 14), tmp_path)
    assert {"Conv", "BatchNormalization", "Clip", "Concat", "MaxPool", "AveragePool", "Flatten", "Gemm"} <= {n.op for n in g}
    assert len(g.nodes_of("BatchNormalization")) == 3


def test_resnet_basic_block_bn_kept(tmp_path):
    model = BasicBlockNet()
    g, _, _ = _compare(model, (1, 12, 12), tmp_path)
    assert len(g.nodes_of("BatchNormalization")) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(g.nodes_of("Add")) == 3


def test_state_dict_into_builder_matches_torch():
    """The builder's ResNet is the same network as the PyTorch one, parameter for parameter."""
    model = _randomise_bn(BasicBlockNet(), seed=3)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        ref = model(x).numpy()
    g = load_state_dict(resnet_cifar(8, image_size=12), model.state_dict())
    assert np.abs(g.run(x.numpy()) - ref).max() <= REL_TOL * np.abs(ref).max()
    # negative control: the builder's own random weights give different logits
    assert np.abs(resnet_cifar(8, image_size=12).run(x.numpy()) - ref).max() > 0.1
    sd = dict(model.state_dict())
    sd["extra.weight"] = sd.pop("fc.weight")
    with pytest.raises(KeyError, match=r"missing \['fc.weight'\], unexpected \['extra.weight'\]"):
        load_state_dict(resnet_cifar(8, image_size=12), sd)


def test_graph_from_torch_and_negative_control():
    model = _randomise_bn(BasicBlockNet(), seed=1)
    g = graph_from_torch(model, (1, 12, 12))
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        ref = model(x).numpy()
        model.layers[1].bn1.running_var.mul_(1.05)   # perturb the torch side
        ref_bad = model(x).numpy()
    assert np.abs(g.run(x.numpy()) - ref).max() <= REL_TOL * np.abs(ref).max()
    assert np.abs(g.run(x.numpy()) - ref_bad).max() > 10 * REL_TOL * np.abs(ref).max()


def test_unsupported_torch_op_is_refused(tmp_path):
    class Up(nn.Module):
        def forward(self, x):
            return torch.tanh(x)
    export_onnx(Up(), tmp_path / "t.onnx", (1, 4, 4))
    with pytest.raises(ValueError, match="Tanh x1"):
        load_model(tmp_path / "t.onnx")
    with pytest.raises(FileExistsError):
        export_onnx(Up(), tmp_path / "t.onnx", (1, 4, 4))
