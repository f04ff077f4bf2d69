import os
import sys

import pytest

from hypothesis import settings

# Make tests/strategies.py importable as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic in CI: same examples every run, no shrinking database needed. All health checks are
# on: the strategies draw shapes, seeds and special values and build arrays with NumPy, so generation
# is cheap. deadline=None because no test asserts wall-clock time (a per-example deadline would be one).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def net():
    """A random-weight ResNet-20 (seed 1) for the pipeline tests (tests/test_pipeline.py, tests/test_stages.py)."""
    from dfmpc.engine.builders import resnet_cifar
    return resnet_cifar(20, seed=1)


@pytest.fixture(scope="module")
def images():
    """24 standard-normal 1x28x28 images (seed 0), float32."""
    import numpy as np
    return np.random.default_rng(0).normal(size=(24, 1, 28, 28)).astype(np.float32)


@pytest.fixture
def blocked_convs(monkeypatch):
    """Every dense conv runs the register-blocked kernel (``dfmpc.engine.conv.KERNEL = "blocked"``).

    For the tests on the onnx wheel's 224x224 light models, which check import, graph ops and
    quantization against onnxruntime, not the kernel choice: with ``"auto"`` the first call of each
    of their ~100 conv shapes measures every candidate kernel and compiles a Winograd transform per
    channel count, 30-60 s per model on a fresh machine (the zoo models exercise ``"auto"``, and
    ``tests/test_engine_*.py`` each kernel)."""
    from dfmpc.engine import conv
    monkeypatch.setattr(conv, "KERNEL", "blocked")
