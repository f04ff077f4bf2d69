"""dfmpc.diagnose: predicted (re-calibrated BN) vs measured statistics of every quantized conv's output."""

import numpy as np
import pytest

from dfmpc.diagnose import compare_statistics, diagnose
from dfmpc.evaluation import load_zoo_model
from dfmpc.zoo import load_fashion_mnist_test, normalize


@pytest.fixture(scope="module")
def model_and_images():
    x, _ = load_fashion_mnist_test()
    return load_zoo_model("resnet20"), normalize(x[:64]).astype(np.float32)


def test_compare_statistics_definition():
    """ratio = geometric mean of (varhat + eps) / (var + eps); mean error in measured sigmas (median)."""
    pm, pv = np.array([1.0, 0.0]), np.array([4.0, 1.0])
    mm, mv = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    ratio, log_ratio, worst, mean_err = compare_statistics(pm, pv, mm, mv, eps=0.0)
    assert ratio == pytest.approx(2.0) and log_ratio == pytest.approx(np.log(2.0))
    assert worst == pytest.approx(np.log(4.0)) and mean_err == pytest.approx(0.5)
    with pytest.raises(ValueError, match="variances"):
        compare_statistics(pm, -pv, mm, mv, eps=1e-5)
    with pytest.raises(ValueError, match="four"):
        compare_statistics(pm[:1], pv, mm, mv, eps=1e-5)


def test_data_mode_on_the_measured_images_predicts_them_exactly(model_and_images):
    """Re-measured on the very images diagnose measures on, every BN predicts its conv's statistics:
    |log ratio| < 1e-3 (float32 accumulation), mean error < 1e-3 sigma. Negative control: absorb does not.
    This is the instrument that measures how well (S.2)'s variance (derivation 15) holds on real images."""
    g, x = model_and_images
    d = diagnose(g, x, recalibration="data", compensation="none", calibration_data=x)
    assert d.summary["layers"] == len(d.layers) > 10
    assert d.summary["max_abs_log_ratio"] < 1e-3
    assert max(r.mean_error_sigma for r in d.layers) < 1e-3
    assert any(r.low for r in d.layers) and any(not r.low for r in d.layers)
    bad = diagnose(g, x, recalibration="absorb", compensation="none")
    assert bad.summary["max_abs_log_ratio"] > 0.3


def test_diagnosis_json_has_the_documented_fields(model_and_images):
    g, x = model_and_images
    d = diagnose(g, x[:16], recalibration="analytic", compensation="none").to_dict()
    rec = d["layers"][0]
    for key in ("conv", "predicted_var", "measured_var", "ratio", "log_ratio", "mean_error_sigma"):
        assert key in rec
    assert len(rec["predicted_var"]) == len(rec["measured_var"])
    assert {"median_abs_log_ratio", "max_abs_log_ratio"} <= set(d["summary"])
    with pytest.raises(ValueError, match="images"):
        diagnose(g, x.astype(np.float64))


def test_summary_without_low_layers_says_so():
    """A network with no pair (or no re-calibrated conv) reports None for the low-layer summary, not a fake 0."""
    from dfmpc.diagnose import Diagnosis, LayerDiagnosis, _summary
    rec = LayerDiagnosis("c", "b", False, [0.0], [1.0], [0.0], [1.0], 1.0, 0.1, 0.1, 0.0)
    s = _summary([rec])
    assert s["median_abs_log_ratio"] == pytest.approx(0.1) and s["median_abs_log_ratio_low"] is None
    assert "no low layers" in Diagnosis([rec], s).table()
    assert _summary([])["median_abs_log_ratio"] is None
    assert "nothing was re-calibrated" in Diagnosis([], _summary([])).table()


def test_fp_floor_is_zero_when_the_trained_statistics_are_those_of_the_images(model_and_images):
    """``trained_log_ratio`` compares the FP network's trained BN with its conv output on the images.
    Set every BN's running mean/var, layer by layer, to the statistics measured on those images: the floor is 0 (< 1e-3,
    float32 accumulation). Negative control: the shipped statistics (from augmented training batches)
    are not exactly those of 64 test images, so the floor is > 1e-3 somewhere."""
    from dfmpc.pipeline import prepare
    from dfmpc.recalibration import channel_moments
    g, x = model_and_images
    d0 = diagnose(g, x, recalibration="absorb", compensation="none")
    assert max(abs(r.trained_log_ratio) for r in d0.layers) > 1e-3
    assert d0.summary["max_abs_log_ratio_trained"] == pytest.approx(max(abs(r.trained_log_ratio) for r in d0.layers))
    fitted = prepare(g)
    for r in d0.layers:                            # in topological order: each fit sees the ones before it
        m, v = channel_moments(fitted.run(x, output=fitted.node(r.conv).outputs[0]))
        fitted.node(r.bn).params["mean"] = m.astype(np.float32)
        fitted.node(r.bn).params["var"] = v.astype(np.float32)
    d1 = diagnose(fitted, x, recalibration="absorb", compensation="none")
    assert max(abs(r.trained_log_ratio) for r in d1.layers) < 1e-3
    assert "FP floor" in d1.table()


@pytest.mark.slow          # ~1 min: one distillation, two sequential passes and diagnoses on 1,000 images
def test_mirrored_views_bring_resnet18_within_the_variance_target():
    """Derivation 15, S.5-S.6, on a trained network: with the default four views of its 8 distilled probes
    (seed 0; the images and their mirror images; the variance ratio over the views, the mean shift over the
    images) ResNet-18's largest |log ratio| (MP2/6, c = 1, first 1,000 shipped test images) is within the
    issue's 0.15, and below that of the distilled images alone (``probe_views=1``). Measured on an AVX-512
    `znver4` host: 0.068 against 0.147. The probes' bits depend on the SIMD width the kernels are compiled for (the order
    of float32 sums), so whether the images alone miss 0.15 is not asserted."""
    g = load_zoo_model("resnet18")
    x = normalize(load_fashion_mnist_test()[0][:1000]).astype(np.float32)
    views = diagnose(g, x, compensation="none", progress=False)
    alone = diagnose(g, x, compensation="none", probe_views=1, progress=False)
    assert "4 mirrored views each for the variance" in views.report.probes and "views" not in alone.report.probes
    assert views.summary["max_abs_log_ratio"] < min(0.15, alone.summary["max_abs_log_ratio"])


@pytest.mark.slow          # ~2 min: distillations of 200 and of 200 + 400 + 800 steps, two diagnoses on 1,000 images
def test_the_tighter_tolerance_brings_mobilenetv2_closer_to_the_variance_targets():
    """Derivation 16, "A tighter tolerance" (D.5): on the 17-block MobileNetV2 the default probes (tolerance 0.05)
    are distilled on to 800 steps, and the variances they predict (MP2/6, c = 1, first 1,000 shipped test
    images) are closer to the truth than with the old tolerance 0.1, which stops at 200 steps. Measured on an
    AVX-512 `znver4` host, seed 0, with the default mirrored views: median / max |log ratio| 0.039 / 0.078 against
    0.080 / 0.135 (with the shifted views, 0.043 / 0.092 against 0.096 / 0.151). The probes' bits depend on the SIMD width (the order of float32 sums), so
    only the order (the median with a margin of 0.005, a third of the smaller gain measured) and the issue's
    0.15 for the maximum are asserted; negative control: the loose run stops at 200 steps."""
    g = load_zoo_model("mobilenetv2")
    x = normalize(load_fashion_mnist_test()[0][:1000]).astype(np.float32)
    tight = diagnose(g, x, compensation="none", progress=False)
    loose = diagnose(g, x, compensation="none", probe_tolerance=0.1, progress=False)
    assert "200 steps" in loose.report.probes and "200 steps" not in tight.report.probes    # distilled on
    assert tight.summary["median_abs_log_ratio"] < loose.summary["median_abs_log_ratio"] - 0.005
    assert tight.summary["max_abs_log_ratio"] < min(0.15, loose.summary["max_abs_log_ratio"])
