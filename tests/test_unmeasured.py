"""``dfmpc.engine.conv.unmeasured``: inside it a conv's kernel does not depend on the machine's
kernel-choice file, so the quantization pipeline and the probe distillation (which run inside it)
give the same bits on every machine of one kind."""

import numpy as np
import pytest

from dfmpc.engine import conv as conv_module
from dfmpc.engine import kernel_choice
from dfmpc.engine.conv import conv2d_f32, is_unmeasured, unmeasured


def _big_conv(seed=0):
    """8 images of 64 channels at 28x28 and a 3x3 conv to 64: 2^27.8 multiply-adds, above
    MEASURE_MIN_MACS, so outside ``unmeasured`` its kernel comes from the choice file."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 64, 28, 28)).astype(np.float32)
    w = rng.normal(size=(64, 64, 3, 3)).astype(np.float32)
    assert 8 * 28 * 28 * 64 * 64 * 9 >= conv_module.MEASURE_MIN_MACS
    return x, w


def test_unmeasured_conv_ignores_the_choice_file_and_the_measured_one_does_not(monkeypatch):
    """Two machines whose choice files name different kernels: same bits inside ``unmeasured``;
    outside it (negative control) the recorded choice shows in the bits."""
    x, w = _big_conv()
    inside, outside = {}, {}
    for name in ("direct", "winograd_f4"):
        monkeypatch.setattr(kernel_choice, "lookup", lambda key, name=name: name)
        with unmeasured():
            inside[name] = np.array(conv2d_f32(x, w, pads=(1, 1, 1, 1)))
        outside[name] = np.array(conv2d_f32(x, w, pads=(1, 1, 1, 1)))
    assert np.array_equal(inside["direct"], inside["winograd_f4"])
    assert not np.array_equal(outside["direct"], outside["winograd_f4"])
    np.testing.assert_allclose(outside["winograd_f4"], inside["direct"], rtol=0,
                               atol=1e-4 * float(np.abs(inside["direct"]).max()))


def test_unmeasured_is_reentrant_thread_local_and_restored():
    import threading
    assert not is_unmeasured()
    seen = []
    with unmeasured():
        with unmeasured():
            assert is_unmeasured()
        assert is_unmeasured()
        t = threading.Thread(target=lambda: seen.append(is_unmeasured()))
        t.start()
        t.join()
    assert not is_unmeasured() and seen == [False]
    with pytest.raises(RuntimeError):
        with unmeasured():
            raise RuntimeError("boom")
    assert not is_unmeasured()


def test_pipeline_and_probes_run_unmeasured(monkeypatch):
    """quantize_network, probe_inputs and distill run their engine convs inside ``unmeasured``
    (the batch-split workers too): a spy on the conv sees the flag on every call."""
    from dfmpc.engine.builders import resnet_cifar
    from dfmpc.pipeline import quantize_network
    from dfmpc.probes import probe_inputs

    flags = []
    real = conv_module._conv_dense

    def spy(*args, **kwargs):
        flags.append(is_unmeasured())
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_module, "_conv_dense", spy)
    g = resnet_cifar(8, seed=0)
    probes = probe_inputs(g, n=2, iterations=2, seed=0, progress=False)
    quantize_network(g, 2, 6, recalibration="sequential", probes=probes, progress=False)
    x = np.random.default_rng(0).normal(size=(40, 1, 28, 28)).astype(np.float32)
    quantize_network(g, 2, 6, recalibration="data", calibration_data=x, progress=False)
    assert flags and all(flags)
    n = len(flags)
    g.run(x)                                        # evaluation is measured as before
    assert len(flags) > n and not any(flags[n:])


@pytest.mark.slow
def test_vgg_small_probes_do_not_depend_on_the_choice_file(monkeypatch):
    """The zoo's VGG-small, whose convs on 8 probe images exceed MEASURE_MIN_MACS: the default probes
    are the same bits whichever kernel the choice file names."""
    from dfmpc.evaluation import load_zoo_model
    from dfmpc.probes import probe_inputs

    g = load_zoo_model("vgg_small")
    got = {}
    for name in ("direct", "winograd_f4"):
        monkeypatch.setattr(kernel_choice, "lookup", lambda key, name=name: name)
        got[name] = probe_inputs(g, seed=0, progress=False)
    assert np.array_equal(got["direct"], got["winograd_f4"])
