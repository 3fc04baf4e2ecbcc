"""Instruction-set variants of the CPU kernels (roialign_cy._cpu._variants): what is detected,
how ROIALIGN_CY_SIMD chooses, and every variant this machine runs checked against the reference
(a representative subset of the equality suites), across thread counts, and against the
baseline build, whose results it must reproduce bit for bit."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import test_backward
import test_forward
import test_rotated
from test_cli import PACKAGE_PARENT
from test_threads import LOOP_ORDER_SHAPES, _all_operators, loop_order_inputs
from roialign_cy import _cpu
from roialign_cy._cpu import _openmp, _variants


@pytest.fixture(params=_variants.VARIANTS)
def variant(request, monkeypatch):
    """Each variant in turn as the CPU driver's kernels (skipped where it cannot run)."""
    v = request.param
    if v not in _variants.built():
        pytest.skip(f"the {v} kernels are not built here (built: {', '.join(_variants.built())})")
    lack = _variants.missing(v)
    if lack:
        pytest.skip(f"this machine cannot run the {v} kernels: it lacks {', '.join(lack)}")
    for name, module in zip(_variants.KERNELS, _variants.modules(v)):
        monkeypatch.setattr(_cpu, name, module)
    return v


# ---------------------------------------------------------------------------------------------
# detection and choice

def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None


@pytest.mark.skipif(platform.machine() != "x86_64" or _cpuinfo_flags() is None,
                    reason="compares with the flags of Linux's /proc/cpuinfo on x86-64")
def test_detection_agrees_with_the_kernel():
    flags = set(_cpuinfo_flags())
    detected = _variants.cpu_features()
    # Linux lists a flag only when the CPU has it and the kernel supports it
    assert {f for f in _variants._CPUID if f in flags} <= detected
    for v in ("x86-64-v3",):
        assert (not _variants.missing(v)) == (set(_variants._LEVEL_FEATURES[v]) <= flags), v


def test_the_highest_runnable_variant_is_in_use():
    assert _variants.runnable()[0] == _variants.choose("") == _variants.choose("auto")
    if not os.environ.get(_variants.ENV):
        assert _variants.active == _variants.runnable()[0]
    assert "baseline" in _variants.runnable()


def test_choice_refuses_what_cannot_run(monkeypatch):
    assert _variants.choose(" Baseline ") == "baseline"
    with pytest.raises(RuntimeError, match="ROIALIGN_CY_SIMD='avx9' names no instruction-set"):
        _variants.choose("avx9")
    # a CPU without AVX2: x86-64-v3 is refused by name and passed over by default
    monkeypatch.setattr(_variants, "built", lambda: list(_variants.VARIANTS))
    monkeypatch.setattr(_variants, "missing",
                        lambda v: ["avx2", "bmi2"] if v == "x86-64-v3" else [])
    with pytest.raises(RuntimeError, match=r"cannot run the x86-64-v3 kernels \(it lacks avx2, "
                                           r"bmi2\); it can run: baseline"):
        _variants.choose("x86-64-v3")
    assert _variants.choose("") == "baseline"
    # an installation built without the x86-64 levels
    monkeypatch.setattr(_variants, "built", lambda: ["baseline"])
    with pytest.raises(RuntimeError, match="has no x86-64-v3 build"):
        _variants.choose("x86-64-v3")
    assert _variants.choose("") == "baseline"


def test_os_support_is_required(monkeypatch):
    if _variants.cpu_features() is None:
        pytest.skip("not an x86 build: no CPUID")
    monkeypatch.setattr(_openmp, "x86_xcr0", lambda: 0x3)  # SSE state on, AVX state off
    lack = _variants.missing("x86-64-v3")
    assert lack and all(f in _variants.cpu_features() for f in lack[:-1])
    assert lack[-1].startswith("OS support")
    monkeypatch.setattr(_openmp, "x86_cpuid", lambda leaf, subleaf=0: None)  # not x86
    assert _variants.missing("x86-64-v3") == ["an x86-64 CPU"]
    assert _variants.missing("baseline") == []


def _python(simd, *args):
    # from the directory holding the roialign_cy this test imported (as tests/test_cli.py)
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, ROIALIGN_CY_SIMD=simd)
    return subprocess.run([sys.executable, *args], cwd=PACKAGE_PARENT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_environment_variable():
    proc = _python("baseline", "-m", "roialign_cy", "info")
    assert proc.returncode == 0, proc.stderr
    assert "instruction set: baseline (SSE2), chosen by ROIALIGN_CY_SIMD" in proc.stdout
    proc = _python("sse9", "-c", "import numpy as np, roialign_cy; "
                   "roialign_cy.roi_align(np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), 2)")
    assert proc.returncode != 0
    assert "RuntimeError: ROIALIGN_CY_SIMD='sse9' names no instruction-set variant" in proc.stderr
    proc = _python("sse9", "-m", "roialign_cy", "info")
    assert proc.returncode == 0, proc.stderr
    assert "backend cpu:  NOT available: RuntimeError: ROIALIGN_CY_SIMD='sse9'" in proc.stdout


# ---------------------------------------------------------------------------------------------
# every runnable variant: the reference, thread counts, the baseline's bits

def test_matches_reference(variant):
    """A representative subset of the equality suites' grids (each mode, layout and dtype)."""
    for dtype in (np.float32, np.float64):
        for layout in ("NCHW", "NHWC"):
            for mode in ("avg", "max", "onnx_max"):
                test_forward.test_matches_reference(dtype, layout, True, -1, (3, 5), mode)
                test_forward.test_matches_reference(dtype, layout, False, 2, 2, mode)
            for mode in ("avg", "max"):
                test_backward.test_feature_grad_matches_reference(
                    np.random.default_rng(len(mode)), dtype, mode, layout, True, 2)
            test_rotated.test_matches_reference(dtype, layout, True, False, -1, (3, 2))
            test_rotated.test_matches_reference(dtype, layout, False, True, 2, 2)
        test_rotated.test_feature_grad_matches_reference(np.random.default_rng(1), layout, True,
                                                         False, -1)
    for mode in ("avg", "max"):
        test_backward.test_box_grad_finite_differences(np.random.default_rng(2), mode, True, 2)
    test_rotated.test_box_grad_finite_differences(np.random.default_rng(3), True, False, -1)


_baseline_results = {}


def _results(shape, layout, dtype, sampling_ratio, n_threads):
    x, boxes, rboxes = loop_order_inputs(*shape, layout, dtype)
    return _all_operators(x, boxes, rboxes, layout, sampling_ratio, n_threads)


def _baseline(*case):
    if case not in _baseline_results:
        saved = [getattr(_cpu, name) for name in _variants.KERNELS]
        for name, module in zip(_variants.KERNELS, _variants.modules("baseline")):
            setattr(_cpu, name, module)
        try:
            _baseline_results[case] = _results(*case, 1)
        finally:
            for name, module in zip(_variants.KERNELS, saved):
                setattr(_cpu, name, module)
    return _baseline_results[case]


def test_same_bits_as_baseline_for_any_thread_count(variant):
    """Every operator and gradient on each loop order of the CPU backend (LOOP_ORDER_SHAPES):
    the same bits at 1 and 3 threads, and the same bits as the baseline build (the variants are
    compiled without FMA contraction)."""
    for shape in LOOP_ORDER_SHAPES:
        for layout in ("NCHW", "NHWC"):
            for dtype in (np.float32, np.float64):
                for sampling_ratio in (-1, 2):
                    case = (shape, layout, dtype, sampling_ratio)
                    one = _results(*case, 1)
                    for i, (a, b, c) in enumerate(zip(one, _results(*case, 3), _baseline(*case))):
                        np.testing.assert_array_equal(a, b, err_msg=f"{case}: output {i}, 3 threads")
                        np.testing.assert_array_equal(a, c, err_msg=f"{case}: output {i}, baseline")
