"""Packaging: the wheel carries the CUDA sources and (x86-64) the kernels of every instruction-set
variant, the build falls back to serial kernels without OpenMP, and the operator registry is
consistent with the public API."""
import importlib.resources
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import roialign_cy
from roialign_cy import _backends, _cpu

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(roialign_cy.__file__).resolve().parent
# (not "REPO not in PACKAGE.parents": CI's virtual environment lives inside the checkout)
INSTALLED = PACKAGE != REPO / "roialign_cy"


def test_repository_has_cuda_sources():
    names = {p.name for p in (REPO / "cuda").iterdir()}
    assert {"roi_align.cu", "roi_align_rotated.cu"} <= names


@pytest.mark.skipif(not INSTALLED, reason="roialign_cy is imported from the source checkout, "
                    "not from an installed wheel (CI installs it with pip install .)")
def test_installed_package_carries_every_cuda_source():
    shipped = importlib.resources.files("roialign_cy.cuda")
    shipped_names = {p.name for p in shipped.iterdir() if p.name.endswith((".cu", ".cuh"))}
    expected = {p.name for p in (REPO / "cuda").iterdir() if p.suffix in (".cu", ".cuh")}
    assert expected and expected == shipped_names
    for name in expected:
        assert shipped.joinpath(name).read_text() == (REPO / "cuda" / name).read_text()


@pytest.mark.skipif(not INSTALLED or platform.machine() != "x86_64" or sys.platform != "linux",
                    reason="checks a wheel installed on x86-64 Linux (CI installs one)")
def test_installed_package_has_every_instruction_set_variant():
    assert _cpu._variants.built() == list(_cpu._variants.VARIANTS)


def test_cuda_loader_finds_the_sources():
    from roialign_cy import _cuda

    d = pathlib.Path(_cuda.source_dir())
    for name in list(_cuda.SOURCES.values()) + list(_cuda.HEADERS):
        assert (d / name).is_file(), name


def test_registry_matches_public_api():
    for op, entry in roialign_cy.OPERATORS.items():
        assert callable(getattr(roialign_cy, op))
        assert callable(getattr(roialign_cy, roialign_cy.gradient_of(op)))
        assert set(roialign_cy.devices_of(op)) == {"cpu", "cuda"}
        assert entry["gradient"] == op + "_backward"


def test_thread_count_helper():
    if _cpu.openmp_enabled():
        assert _cpu.effective_n_threads(3) == 3
        assert _cpu.effective_n_threads() >= 1
    else:
        assert _cpu.effective_n_threads(3) == 1


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler on this machine")
def test_serial_build_without_openmp(tmp_path):
    """ROIALIGN_CY_NO_OPENMP=1 builds the kernels as if the compiler had no OpenMP; they must
    import, report the serial build, and give the same numbers."""
    pytest.importorskip("Cython", reason="the serial-build test compiles the .pyx sources")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.so", "*.c", "__pycache__", "tests", "benchmarks"))
    # the instruction-set variants are left out (ROIALIGN_CY_BASELINE_ONLY): they change
    # nothing in the OpenMP fallback, and the build takes a third of the time without them
    env = dict(os.environ, ROIALIGN_CY_NO_OPENMP="1", ROIALIGN_CY_BASELINE_ONLY="1")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"],
                   cwd=src, env=env, check=True, capture_output=True)
    check = textwrap.dedent("""
        import numpy as np, roialign_cy
        from roialign_cy import _cpu
        assert not _cpu.openmp_enabled()
        assert _cpu._variants.built() == ["baseline"] == [_cpu._variants.active]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 5, 9, 11))
        boxes = np.c_[rng.integers(0, 2, 7), rng.uniform(-2, 12, (7, 4))]
        np.save("out.npy", roialign_cy.roi_align(x, boxes, 3, 0.5, 2, True, n_threads=4,
                                              allow_inverted=True))
    """)
    subprocess.run([sys.executable, "-c", check], cwd=src, check=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 11))
    boxes = np.c_[rng.integers(0, 2, 7), rng.uniform(-2, 12, (7, 4))]
    np.testing.assert_array_equal(np.load(src / "out.npy"),
                                  roialign_cy.roi_align(x, boxes, 3, 0.5, 2, True,
                                                        allow_inverted=True))


def test_backend_selection():
    x = np.zeros((1, 1, 4, 4))
    assert _backends.select("roi_align", {"features": x}, "auto") == "cpu"
    with pytest.raises(TypeError, match="backend='cuda'"):
        _backends.select("roi_align", {"features": x}, "cuda")
    with pytest.raises(ValueError, match="backend"):
        _backends.select("roi_align", {"features": x}, "tpu")
