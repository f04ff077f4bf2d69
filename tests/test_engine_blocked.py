"""The register-blocked direct conv (dfmpc.engine.blocked) against its twins.

Twins: the plain-loop float64 kernel dfmpc.engine.reference_kernels.conv_blocked_loops (same
layouts and index arithmetic) and the float64 reference convolution dfmpc.conv2d (independent of
both).

Tolerance (float32, not guessed): each output of the kernel is a float32 sum of K = kh*kw*C
products plus the bias and the residual, in some order, with or without fused multiply-adds.
Every such evaluation satisfies the standard bound |fl(s) - s| <= gamma_(K+2) * S with
gamma_n = n u / (1 - n u), u = 2^-24, and S = sum |w||x| + |b| + |r| of that output (Higham,
Accuracy and Stability of Numerical Algorithms, 2nd ed., Eq. (3.5)); ReLU is 1-Lipschitz.  The
tests check that bound elementwise.  Inputs are float32 values (exact in float64), no subnormals.
"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dfmpc import conv2d as reference_conv2d
from dfmpc.engine import blocked
from dfmpc.engine import conv as conv_module
from dfmpc.engine.conv import conv2d_f32, conv_output_size
from dfmpc.engine.reference_kernels import conv_blocked_loops
from strategies import seeds, weight_arrays

U = 2.0 ** -24


def _gamma(n):
    return n * U / (1 - n * U)


@st.composite
def geometries(draw, max_c=6, max_o=2 * blocked.LANES + 3):
    """(n, c, h, w, o, (kh, kw), strides, pads, dilations) with a non-empty output."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h0 = max(1, (kh - 1) * dilations[0] + 1 - pads[0] - pads[2])
    w0 = max(1, (kw - 1) * dilations[1] + 1 - pads[1] - pads[3])
    h, w = draw(st.integers(h0, h0 + 6)), draw(st.integers(w0, w0 + 6))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, max_c))
    o = draw(st.integers(1, max_o))
    return n, c, h, w, o, (kh, kw), strides, pads, dilations


def _inputs(geom, wdraw, seed, with_bias, with_res):
    n, c, h, w, o, (kh, kw), strides, pads, dilations = geom
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    W = wdraw.astype(np.float32)
    b = rng.normal(size=o).astype(np.float32) if with_bias else None
    oh = conv_output_size(h, kh, strides[0], pads[0], pads[2], dilations[0])
    ow = conv_output_size(w, kw, strides[1], pads[1], pads[3], dilations[1])
    r = rng.normal(size=(n, o, oh, ow)).astype(np.float32) if with_res else None
    return x, W, b, r, (oh, ow)


def _reference(x, W, b, r, strides, pads, dilations, relu, groups=1):
    """(float64 result, S): dfmpc.conv2d with bias, residual and ReLU, and the bound's S per output."""
    x64, w64 = x.astype(np.float64), W.astype(np.float64)
    y = reference_conv2d(x64, w64, strides, pads, groups, dilation=dilations,
                         bias=None if b is None else b.astype(np.float64))
    s = reference_conv2d(np.abs(x64), np.abs(w64), strides, pads, groups, dilation=dilations)
    if b is not None:
        s = s + np.abs(b.astype(np.float64))[None, :, None, None]
    if r is not None:
        y, s = y + r, s + np.abs(r)
    return (np.maximum(y, 0.0) if relu else y), s


def _padded_nhwc(x, pads):
    pt, pl, pb, pr = pads
    return np.ascontiguousarray(np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (pt, pb), (pl, pr), (0, 0))))


@settings(max_examples=60, deadline=None)
@given(geom=geometries(), data=st.data(), seed=seeds, relu=st.booleans(), with_bias=st.booleans(),
       with_res=st.booleans(), small_group=st.booleans(), threads=st.sampled_from([1, 2]))
def test_blocked_kernel_matches_twins(geom, data, seed, relu, with_bias, with_res, small_group, threads):
    """conv_blocked (one or two threads, output channels in one pass or in groups of LANES) equals
    the plain-loop twin and dfmpc.conv2d within gamma_(K+2) * S elementwise (module docstring), with
    any kernel size, stride, padding and dilation, O not a multiple of LANES, bias, residual, ReLU."""
    n, c, h, w, o, (kh, kw), strides, pads, dilations = geom
    W64 = data.draw(weight_arrays((o, c, kh, kw)))
    x, W, b, r, (oh, ow) = _inputs(geom, W64, seed, with_bias, with_res)
    xp = _padded_nhwc(x, pads)
    taps = blocked.tap_offsets((kh, kw), dilations, xp.shape[2], c)
    assert len(taps) == (kh if dilations[1] == 1 else kh * kw)
    wb = blocked.blocked_weight(W).reshape(len(taps), -1, blocked.LANES * -(-o // blocked.LANES))
    res = None if r is None else np.ascontiguousarray(r.transpose(0, 2, 3, 1)).reshape(-1, o)
    bias = np.zeros(o, np.float32) if b is None else b
    out = np.full((n * oh * ow, o), np.nan, np.float32)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        blocked.conv_blocked(xp.reshape(-1), xp.shape, wb, taps, strides, (oh, ow), bias, relu, res, out,
                             group=blocked.LANES if small_group else None)
    finally:
        numba.set_num_threads(saved)
    twin = conv_blocked_loops(xp.reshape(-1), xp.shape, wb, taps, strides, (oh, ow), bias, relu, res)
    ref, s = _reference(x, W, b, r, strides, pads, dilations, relu)
    ref = ref.transpose(0, 2, 3, 1).reshape(-1, o)
    s = s.transpose(0, 2, 3, 1).reshape(-1, o)
    assert np.all(np.abs(twin - ref) <= 1e-12 * s + 1e-300)        # the twin is the convolution
    bound = _gamma(kh * kw * c + 2) * s + 1e-30
    assert np.all(np.abs(out - twin) <= bound), float(np.max(np.abs(out - twin) - bound))


def test_blocked_result_does_not_depend_on_the_thread_count():
    """Every output is summed by one thread in a fixed order: 1 and 2 threads give the same bits
    (the small convs of the distillation run this kernel; MEASURE_MIN_MACS)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 16, 9, 9)).astype(np.float32)
    W = rng.normal(size=(20, 16, 3, 3)).astype(np.float32)
    ys = []
    saved_threads, saved_kernel = numba.get_num_threads(), conv_module.KERNEL
    try:
        conv_module.KERNEL = "blocked"
        for t in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(t)
            ys.append(conv2d_f32(x, W, pads=(1, 1, 1, 1)))
    finally:
        numba.set_num_threads(saved_threads)
        conv_module.KERNEL = saved_kernel
    assert np.array_equal(ys[0], ys[1])


def test_blocked_negative_control():
    """The agreement check can fail: filters laid out with C and O swapped (a plausible bug) give
    errors far above the bound."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 6, 6)).astype(np.float32)
    W = rng.normal(size=(5, 5, 3, 3)).astype(np.float32)
    xp = _padded_nhwc(x, (1, 1, 1, 1))
    taps = blocked.tap_offsets((3, 3), (1, 1), xp.shape[2], 5)
    wrong = blocked.blocked_weight(W.transpose(1, 0, 2, 3)).reshape(3, 15, -1)
    out = np.empty((36, 5), np.float32)
    blocked.conv_blocked(xp.reshape(-1), xp.shape, wrong, taps, (1, 1), (6, 6), np.zeros(5, np.float32),
                         False, None, out)
    ref, s = _reference(x, W, None, None, (1, 1), (1, 1, 1, 1), (1, 1), False)
    err = np.abs(out - ref.transpose(0, 2, 3, 1).reshape(-1, 5))
    assert np.max(err / (_gamma(47) * s.transpose(0, 2, 3, 1).reshape(-1, 5))) > 1e3


@settings(max_examples=30, deadline=None)
@given(geom=geometries(max_c=4, max_o=20), data=st.data(), seed=seeds, relu=st.booleans(),
       with_res=st.booleans(), groups=st.sampled_from([1, 1, 2]))
def test_conv2d_f32_blocked_through_the_engine(geom, data, seed, relu, with_res, groups):
    """conv2d_f32 with KERNEL = "blocked" equals dfmpc.conv2d within gamma_(K+2) * S: dense convs run
    the blocked kernel (filter layout cached per array), grouped convs are declined and run the
    grouped kernel."""
    n, c, h, w, o, kernel, strides, pads, dilations = geom
    c, o = c * groups, o * groups
    geom = (n, c, h, w, o, kernel, strides, pads, dilations)
    W64 = data.draw(weight_arrays((o, c // groups) + kernel))
    x, W, b, r, _ = _inputs(geom, W64, seed, True, with_res)
    saved = conv_module.KERNEL
    try:
        conv_module.KERNEL = "blocked"
        y = conv2d_f32(x, W, b, strides, pads, dilations, groups, relu=relu, residual=r)
        y2 = conv2d_f32(x, W, b, strides, pads, dilations, groups, relu=relu, residual=r)   # cached layout
    finally:
        conv_module.KERNEL = saved
    ref, s = _reference(x, W, b, r, strides, pads, dilations, relu, groups)
    bound = _gamma(kernel[0] * kernel[1] * (c // groups) + 2) * s + 1e-30
    assert np.all(np.abs(y - ref) <= bound)
    assert np.array_equal(y, y2)


def test_cached_layout_follows_in_place_changes():
    """The filter layout is cached per weight array but rebuilt when the array is changed in place."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    W = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    saved = conv_module.KERNEL
    try:
        conv_module.KERNEL = "blocked"
        conv2d_f32(x, W, pads=(1, 1, 1, 1))
        W *= -2
        y = conv2d_f32(x, W, pads=(1, 1, 1, 1))
    finally:
        conv_module.KERNEL = saved
    ref, s = _reference(x, W, None, None, (1, 1), (1, 1, 1, 1), (1, 1), False)
    assert np.all(np.abs(y - ref) <= _gamma(38) * s + 1e-30)


def test_group_argument_is_checked():
    xp = np.zeros((1, 3, 3, 2), np.float32)
    wb = blocked.blocked_weight(np.zeros((4, 2, 3, 3), np.float32)).reshape(3, 6, -1)
    taps = blocked.tap_offsets((3, 3), (1, 1), 3, 2)
    with pytest.raises(ValueError, match="group"):
        blocked.conv_blocked(xp.reshape(-1), xp.shape, wb, taps, (1, 1), (1, 1), np.zeros(4, np.float32),
                             False, None, np.empty((1, 4), np.float32), group=8)


def test_blocked_is_a_candidate_and_the_small_conv_default():
    """"blocked" is measured for every dense geometry and runs, unmeasured, the small convs whose
    outputs sum >= 16 products into >= 8 channels (else "direct")."""
    assert "blocked" in conv_module.applicable_kernels((3, 3), (1, 1), (1, 1), (28, 28))
    assert "blocked" in conv_module.applicable_kernels((1, 1), (2, 2), (1, 1), (14, 14))
    assert conv_module.small_conv_kernel(16, 16, (3, 3)) == "blocked"
    assert conv_module.small_conv_kernel(1, 16, (3, 3)) == "direct"
    assert conv_module.small_conv_kernel(16, 1, (3, 3)) == "direct"


def test_choose_applies_the_handicap(tmp_path, monkeypatch):
    """A handicapped candidate (im2col + BLAS at 2 threads, conv.BLAS_HANDICAP) loses to a slower one
    unless it is faster by more than the factor; the recorded times stay the measured ones."""
    from dfmpc.engine import kernel_choice
    monkeypatch.setenv("DFMPC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "_memory", {})
    monkeypatch.setattr(kernel_choice, "_loaded", True)
    y = np.arange(4.0)

    def slow():
        s = 0
        for i in range(100_000):
            s += i
        return y.copy()

    cands = {"ref": slow, "fast": lambda: y.copy()}
    assert kernel_choice.choose("k-free", cands, "ref", 0.0)[0] == "fast"
    assert kernel_choice.choose("k-handicapped", cands, "ref", 0.0, {"fast": 1e9})[0] == "ref"
    entry = kernel_choice.table()["k-handicapped"]
    assert entry["handicap"] == {"fast": 1e9} and entry["ms"]["fast"] < entry["ms"]["ref"]


_PIXELS_SCRIPT = """
import sys, numpy as np
from dfmpc.engine import blocked
rng = np.random.default_rng(5)
outs = {}
for i, (n, c, hw, o, k, s) in enumerate([(3, 16, 9, 32, 3, 2), (2, 5, 7, 20, 3, 1), (2, 24, 6, 40, 1, 1)]):
    x = rng.standard_normal((n, hw + k - 1, hw + k - 1, c)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    oh = (hw - 1) // s + 1
    taps = blocked.tap_offsets((k, k), (1, 1), x.shape[2], c)
    wb = blocked.blocked_weight(w).reshape(len(taps), -1, -(-o // 16) * 16)
    res = rng.standard_normal((n * oh * oh, o)).astype(np.float32)
    out = np.empty((n * oh * oh, o), np.float32)
    blocked.conv_blocked(x.reshape(-1), x.shape, wb, taps, (s, s), (oh, oh), rng.standard_normal(o).astype(np.float32),
                         True, res, out)
    outs[str(i)] = out
np.savez(sys.argv[1], pixels=blocked.PIXELS, **outs)
"""


def test_pixels_per_block_follow_the_compile_target_and_keep_the_bits(tmp_path):
    """blocked.PIXELS is 8 where Numba compiles for AVX-512 and 4 otherwise (the features are part of
    Numba's cache key, so a kernel is never loaded under the other value), and both give the same
    bits: each output is the same sum in the same order. The second process compiles for an AVX2 core
    (NUMBA_CPU_NAME=znver3, which every AVX-512 x86 host also runs); on a host without AVX-512 both
    processes have PIXELS = 4 and the comparison holds trivially, which the test reports by its
    assertion on the first process's value."""
    import os
    import platform
    import subprocess
    import sys
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("compiles for an x86 core")
    runs = {}
    for name, extra in (("native", {}), ("avx2", {"NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": ""})):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / f"cache_{name}"), **extra}
        subprocess.run([sys.executable, "-c", _PIXELS_SCRIPT, str(tmp_path / f"{name}.npz")], env=env, check=True)
        runs[name] = np.load(tmp_path / f"{name}.npz")
    assert int(runs["native"]["pixels"]) == (8 if blocked._compiles_for_avx512() else 4)
    assert int(runs["avx2"]["pixels"]) == 4
    for k in ("0", "1", "2"):
        np.testing.assert_array_equal(runs["native"][k], runs["avx2"][k])


def test_compile_target_check_reads_numbas_features(monkeypatch):
    """_compiles_for_avx512 reads NUMBA_CPU_FEATURES when set (negative control: a feature list
    without +avx512f, and one with -avx512f, give False)."""
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512bw")
    assert blocked._compiles_for_avx512()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma")
    assert not blocked._compiles_for_avx512()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,-avx512f")
    assert not blocked._compiles_for_avx512()
