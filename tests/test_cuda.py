"""The CUDA backend: its sources, their compilation, and its results against the CPU backend.

Three levels, from what any machine can check to what needs a GPU:
1. sources and compilation: the loader finds every file; nvcc (when installed) compiles every
   kernel instantiation the loader asks for; NVRTC (from the test extra's NVIDIA wheels, needed
   in CI) compiles each module exactly as CuPy will, name expressions included; a machine
   without NVRTC or the CUDA headers gets an error saying what to install;
2. host emulation (tests/cuda_host, needs g++): the same kernel sources compiled as C++ and driven
   by the backend's own launch code (``_cuda._Ops``), compared with the CPU backend, and the
   deterministic gradients checked to be independent of the order threads and blocks run in;
3. on a GPU (marked ``gpu``; skipped with the reason when CuPy or a device is missing): the public
   operators on cupy arrays against the same calls on numpy arrays (Caffe2's CheckCPUGPUEqual).
"""
import ctypes
import ctypes.util
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import edge_case_boxes, random_boxes, random_rotated_boxes, to_nchw, to_nhwc
from cuda_host import emulator
from test_hostile import EDGE_PIXELS, OUTSIDE_BOXES

import roialign_cy
from roialign_cy import _cpu, _cuda
from roialign_cy._params import LAYOUTS, MODES, OpParams

REPO = pathlib.Path(__file__).resolve().parent.parent
GRADIENT_MODES = ("avg", "max")
DTYPES = (np.float16, np.float32, np.float64)
# max |gpu - cpu| <= TOL * max(1, max |cpu|): float16 outputs carry one half-precision rounding
TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-12}
# (N, C, H, W) and spatial_scale; the one-row map clamps every sample vertically
SHAPES = (((2, 3, 13, 11), 1.0), ((1, 2, 1, 7), 0.5))


def cpu_dtype(dtype):
    return np.float32 if dtype == np.float16 else dtype


def assert_close(got, want, dtype, what):
    """NaN exactly where the CPU has NaN (docs/conventions.md 1.6 and 3), elsewhere within TOL."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN at {np.argwhere(np.isnan(got) != nan)[:4].tolist()}"
    got, want = got[~nan], want[~nan]
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# 1. sources and compilation


def local_includes(path):
    return re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), flags=re.M)


def test_source_dir_holds_exactly_the_sources_the_loader_needs():
    d = _cuda.source_dir()
    wanted = {*_cuda.SOURCES.values(), *_cuda.HEADERS}
    present = {p.name for p in d.iterdir() if p.suffix in (".cu", ".cuh")}
    # every file is shipped (setup.py packages *.cu, *.cuh) and hashed into CuPy's cache key
    assert present == wanted
    for name in wanted:
        assert set(local_includes(d / name)) <= set(_cuda.HEADERS), name


def test_source_dir_prefers_installed_package_data(tmp_path, monkeypatch):
    installed = tmp_path / "cuda"
    shutil.copytree(REPO / "cuda", installed)
    # the wheel's roialign_cy/cuda has no __init__.py: a namespace package, a MultiplexedPath
    from importlib.resources.readers import MultiplexedPath

    monkeypatch.setattr(_cuda.importlib.resources, "files", lambda package: MultiplexedPath(installed))
    assert _cuda.source_dir() == installed
    (installed / _cuda.HEADERS[0]).unlink()  # an incomplete install: use the checkout, if any
    checkout = pathlib.Path(_cuda.__file__).resolve().parent.parent / "cuda"
    if checkout.is_dir():
        assert _cuda.source_dir() == checkout
    else:  # imported from an installed wheel: nothing to fall back on
        with pytest.raises(FileNotFoundError, match="reinstall"):
            _cuda.source_dir()


def test_name_expressions_name_kernels_defined_in_their_source():
    for source in _cuda.SOURCES.values():
        text = "".join((_cuda.source_dir() / f).read_text() for f in (source, *_cuda.HEADERS))
        defined = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", text))
        for scalar in _cuda.SCALARS.values():
            names = _cuda.name_expressions(source, scalar)
            assert len(names) == len(set(names))
            assert {n.split("<")[0] for n in names} <= defined


def test_module_code_changes_with_the_headers(tmp_path):
    # CuPy caches binaries by source text: a header edit must change the text
    shutil.copytree(REPO / "cuda", tmp_path / "cuda")
    before = _cuda._code(tmp_path / "cuda", "roi_align.cu")
    with open(tmp_path / "cuda" / "roi_common.cuh", "a") as f:
        f.write("\n// edited\n")
    assert _cuda._code(tmp_path / "cuda", "roi_align.cu") != before


def all_instantiations_tu():
    names = sorted({name for _, _, name in emulator.all_kernels()})
    refs = ",\n".join(f"    (void*)&{name}" for name in names)
    includes = "".join(f'#include "{s}"\n' for s in _cuda.SOURCES.values())
    return f"{includes}void* roialign_cy_all_kernels[] = {{\n{refs}\n}};\n"


def test_nvcc_compiles_every_instantiation(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    tu = tmp_path / "all_kernels.cu"
    tu.write_text(all_instantiations_tu())
    # taking each kernel's address instantiates it: one nvcc call compiles all of them for sm_90
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings", f"-I{_cuda.source_dir()}",
           "-c", str(tu), "-o", str(tmp_path / "all_kernels.o")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def find_nvrtc():
    """libnvrtc (and the directory of its builtins) from $ROIALIGN_CY_NVRTC, the NVIDIA wheels on
    sys.path (nvidia/cuda_nvrtc/lib of nvidia-cuda-nvrtc-cu12, nvidia/cu13/lib of nvidia-cuda-nvrtc
    13.x), the CUDA toolkit or the loader's search path; None when absent."""
    found = [os.environ.get("ROIALIGN_CY_NVRTC", "")]
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
    for root in (os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"):
        found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found.append(ctypes.util.find_library("nvrtc") or "")
    for path in found:
        if path and (os.path.isfile(path) or not os.path.dirname(path)):
            return path
    return None


def find_cuda_include():
    """A directory holding cuda_fp16.h, which CuPy passes to NVRTC: like CuPy (cuda.pathfinder), the
    NVIDIA wheels first (nvidia/cuda_runtime/include of nvidia-cuda-runtime-cu12, nvidia/cu13/include
    of nvidia-cuda-runtime 13.x), then the CUDA toolkit."""
    dirs = []
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    roots = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    dirs += [os.path.join(r, "include") for r in roots if r]
    return next((d for d in dirs if os.path.isfile(os.path.join(d, "cuda_fp16.h"))), None)


def nvrtc_missing(reason):
    """Skip, except in CI on Linux, where the test extra installs NVRTC and the headers: there the
    compilation CuPy will do must be checked, so a missing piece fails."""
    if os.environ.get("CI") and sys.platform == "linux":
        pytest.fail(f"{reason}: CI must compile the kernels with NVRTC (pip install \".[test]\" brings it)")
    pytest.skip(reason)


def test_nvrtc_compiles_every_module_as_cupy_does():
    lib_path, include = find_nvrtc(), find_cuda_include()
    if lib_path is None:
        nvrtc_missing("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12, or set ROIALIGN_CY_NVRTC)")
    if include is None:
        nvrtc_missing("no CUDA include directory with cuda_fp16.h (pip install nvidia-cuda-runtime-cu12)")
    for builtins in glob.glob(os.path.join(os.path.dirname(lib_path), "libnvrtc-builtins.so*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(lib_path)
    d = _cuda.source_dir()
    options = [*_cuda.COMPILE_OPTIONS, f"-I{d}", f"-I{include}", "-arch=compute_90"]
    for source in _cuda.SOURCES.values():
        for scalar in _cuda.SCALARS.values():
            prog = ctypes.c_void_p()
            assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), _cuda._code(d, source).encode(),
                                            source.encode(), 0, None, None) == 0
            names = _cuda.name_expressions(source, scalar)
            for name in names:
                assert nvrtc.nvrtcAddNameExpression(prog, name.encode()) == 0
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            rc = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            assert rc == 0, f"{source} / {scalar}:\n{log.value.decode()}"
            for name in names:
                lowered = ctypes.c_char_p()
                assert nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0, name
            nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def test_importing_the_package_and_backend_does_not_import_cupy():
    code = "import sys, roialign_cy, roialign_cy._cuda; sys.exit('cupy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_missing_cupy_raises_an_import_error_naming_the_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(ImportError, match=r"roialign_cy\[cuda12\].*roialign_cy\[cuda13\]"):
        _cuda._cupy()
    assert not _cuda.is_available()


class CompileException(Exception):
    """CuPy's error carrying NVRTC's log."""


class DynamicLibNotFoundError(RuntimeError):
    """cuda.pathfinder's error, raised through CuPy >= 14 when no libnvrtc is found."""


# what CuPy raises on a machine with the NVIDIA driver alone (messages as CuPy 14.2 and 13 word them)
MISSING_TOOLKIT = {
    "headers": CompileException('roi_align.cu(5): catastrophic error: cannot open source file "cuda_fp16.h"'),
    "nvrtc, CuPy 14": DynamicLibNotFoundError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12": '
                                              "No such file: libnvrtc.so.13 or libnvrtc.so.12"),
    "nvrtc, CuPy 13": RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open "
                                   "shared object file: No such file or directory"),
}


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in for CuPy, to check the loader's side of the RawModule calls without a GPU: its
    ``compiled`` lists the (code, options, name_expressions) of each compilation, which raises
    ``fail_with`` when set."""
    device = types.SimpleNamespace(id=0)
    fake = types.SimpleNamespace(compiled=[], fail_with=None, device=device,
                                 cuda=types.SimpleNamespace(Device=lambda: device))

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.args = (code, options, name_expressions)

        def compile(self):
            fake.compiled.append(self.args)
            if fake.fail_with is not None:
                raise fake.fail_with

    fake.RawModule = RawModule
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(_cuda, "_MODULES", {})
    return fake


def test_compilation_is_cached_per_device(fake_cupy):
    first = _cuda._module("roi_align.cu", "float")
    assert _cuda._module("roi_align.cu", "float") is first and len(fake_cupy.compiled) == 1
    code, options, names = fake_cupy.compiled[0]
    assert f"-I{_cuda.source_dir()}" in options and "-std=c++17" in options
    assert names == _cuda.name_expressions("roi_align.cu", "float")
    fake_cupy.device.id = 1  # another device compiles its own module
    assert _cuda._module("roi_align.cu", "float") is not first and len(fake_cupy.compiled) == 2


@pytest.mark.parametrize("missing", MISSING_TOOLKIT)
def test_compilation_without_the_toolkit_says_what_to_install(fake_cupy, missing):
    fake_cupy.fail_with = MISSING_TOOLKIT[missing]
    lacks = "cuda_fp16.h" if missing == "headers" else "cannot load NVRTC"
    with pytest.raises(RuntimeError, match=re.escape(lacks)) as info:
        _cuda._module("roi_align_rotated.cu", "__half")
    for advice in ('pip install "roialign_cy[cuda12]"', '"roialign_cy[cuda13]"', "cupy-cuda12x[ctk]",
                   "cupy-cuda13x[ctk]"):
        assert advice in str(info.value)
    assert info.value.__cause__ is fake_cupy.fail_with
    assert not _cuda._MODULES  # installing the toolkit and calling again compiles


def test_other_compilation_errors_pass_through(fake_cupy):
    fake_cupy.fail_with = CompileException('roi_align.cu(9): error: identifier "x" is undefined')
    with pytest.raises(CompileException):
        _cuda._module("roi_align.cu", "double")


def test_backend_cuda_refuses_numpy_arrays():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(TypeError, match="cuda"):
        roialign_cy.roi_align(x, np.array([[0, 0, 0, 2, 2]], np.float32), 2, backend="cuda")


# ---------------------------------------------------------------------------------------------
# 2. host emulation of the kernels


@pytest.fixture(scope="session")
def emu_lib(request, tmp_path_factory):
    if emulator.compiler() is None:
        pytest.skip("no g++ to build the CUDA host emulation")
    cache = request.config.cache
    cache_dir = cache.mkdir("roialign_cuda_host") if cache is not None else tmp_path_factory.mktemp("emu")
    return emulator.build(cache_dir)


@pytest.fixture
def emu(emu_lib):
    return emulator.Emulator(emu_lib)


def aligned_problem(rng, shape, dtype, layout, pooled=(3, 4)):
    """(features, rois, batch_idx, grad_out) in the kernel dtype, and the same inputs for the
    CPU backend (float32 where the kernels see float16)."""
    N, C, H, W = shape
    boxes = np.concatenate([edge_case_boxes(rng, N, H, W), random_boxes(rng, 6, N, H, W)])
    return _problem(rng, shape, boxes, dtype, layout, pooled)


def rotated_problem(rng, shape, dtype, layout, pooled=(3, 2)):
    N, C, H, W = shape
    return _problem(rng, shape, random_rotated_boxes(rng, 8, N, H, W), dtype, layout, pooled)


def _problem(rng, shape, boxes, dtype, layout, pooled, x=None):
    K = len(boxes)
    x = rng.standard_normal(shape) if x is None else x
    g = rng.standard_normal((K, shape[1], *pooled))
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    rois = np.ascontiguousarray(boxes[:, 1:], dtype=np.float32 if dtype == np.float16 else dtype)
    batch_idx = boxes[:, 0].astype(np.int64)
    kernel = (x.astype(dtype), rois, batch_idx, g.astype(dtype))
    cpu = (kernel[0].astype(cpu_dtype(dtype)), rois.astype(cpu_dtype(dtype)), batch_idx,
           kernel[3].astype(cpu_dtype(dtype)))
    return kernel, cpu


def run_all(ops, arrays, p, out_dtype):
    """forward, feature gradient, box gradient (the latter two when p.mode has a gradient)."""
    x, rois, batch_idx, g = arrays
    out = np.empty(g.shape, out_dtype)
    ops.forward(x, rois, batch_idx, out, p)
    if p.mode not in GRADIENT_MODES:
        return out, None, None
    grad_x = np.zeros(x.shape, out_dtype)
    ops.backward_features(g, x, rois, batch_idx, grad_x, p)
    grad_rois = np.zeros_like(rois)
    ops.backward_boxes(g, x, rois, batch_idx, grad_rois, p)
    return out, grad_x, grad_rois


def compare_with_cpu(ops, kernel, cpu, p, dtype):
    got = run_all(ops, kernel, p, dtype)
    want = run_all(_cpu, cpu, p, cpu_dtype(dtype))
    for what, a, b in zip(("forward", "grad_features", "grad_boxes"), got, want):
        if b is not None:
            assert_close(a, b, dtype, what)


@pytest.mark.parametrize("shape, scale", SHAPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("mode, deterministic", [(m, d) for m in MODES for d in (True, False)
                                                  if m in GRADIENT_MODES or d])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_roi_align_matches_cpu(emu, rng, shape, scale, sampling_ratio, aligned, mode, deterministic,
                                        layout, dtype):
    kernel, cpu = aligned_problem(rng, shape, dtype, layout)
    p = OpParams(3, 4, scale, sampling_ratio, aligned, mode, channels_last=layout == "NHWC",
                 deterministic=deterministic)
    compare_with_cpu(emu.ops, kernel, cpu, p, dtype)


def pyramid_problem(rng, dtype, layout, pooled=(3, 2)):
    """A pyramid of 4 levels (one without boxes, one empty) with the edge-case boxes spread over
    the first three, and an upstream gradient: (kernel arrays, CPU arrays), each (maps, rois,
    batch_idx, level, scales, grad)."""
    N, C = 2, 3
    shapes = [(N, C, 17, 21), (N, C, 9, 11), (N, C, 5, 6), (N, C, 0, 0)]
    scales = [1.0, 0.5, 0.25, 0.125]
    maps = [rng.standard_normal(s) for s in shapes]
    boxes = np.concatenate([edge_case_boxes(rng, N, 17, 21), random_boxes(rng, 9, N, 17, 21)])
    level = np.where(np.arange(len(boxes)) % 3 == 2, 2, np.arange(len(boxes)) % 2).astype(np.int64)
    grad = rng.standard_normal((len(boxes), C, *pooled))
    if layout == "NHWC":
        maps, grad = [to_nhwc(m) for m in maps], to_nhwc(grad)
    rois = np.ascontiguousarray(boxes[:, 1:], np.float32 if dtype == np.float16 else dtype)
    batch_idx = boxes[:, 0].astype(np.int64)
    kernel = ([m.astype(dtype) for m in maps], rois, batch_idx, level, scales, grad.astype(dtype))
    wide = cpu_dtype(dtype)
    cpu = ([np.ascontiguousarray(m.astype(wide)) for m in kernel[0]], rois.astype(wide), batch_idx,
           level, scales, np.ascontiguousarray(kernel[5].astype(wide)))
    return kernel, cpu


def level_gradients(ops, arrays, p, shape_only=False):
    """(feature gradient of every level, box gradient) of a multi-level call."""
    maps, rois, batch_idx, level, scales, grad = arrays
    grads = [np.zeros(m.shape, m.dtype) for m in maps]
    grad_rois = np.zeros_like(rois)
    ops.backward_features_levels(grad, [None] * len(maps) if shape_only else maps, rois, batch_idx,
                                 level, scales, grads, p)
    ops.backward_boxes_levels(grad, maps, rois, batch_idx, level, scales, grad_rois, p)
    return grads, grad_rois


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_multi_level_forward_matches_cpu(emu, rng, mode, layout, dtype):
    """The one-launch forward over every level of a pyramid (a level without boxes, an empty
    one): the CPU's multi-level kernels' values, and one launch."""
    kernel, cpu = pyramid_problem(rng, dtype, layout)
    p = OpParams(3, 2, 1.0, 2, True, mode, channels_last=layout == "NHWC")
    got, want = np.full(kernel[5].shape, np.nan, dtype), np.empty(cpu[5].shape, cpu[5].dtype)
    emu.launches.clear()
    emu.ops.forward_levels(*kernel[:5], got, p)
    assert [name for name, _, _ in emu.launches] == [_cuda._kernel_name(
        "forward_levels", _cuda.SCALARS[np.dtype(dtype).name], "roi_align", mode,
        layout == "NHWC")]
    _cpu.forward_levels(*cpu[:5], want, p)
    assert_close(got, want, dtype, "forward_levels")


@pytest.mark.parametrize("mode, deterministic", [(m, d) for m in GRADIENT_MODES for d in (True, False)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_multi_level_gradients_match_cpu(emu, rng, mode, deterministic, layout, dtype):
    """The multi-level gradients, every level in one launch per step (no per-level loop): the
    CPU's multi-level kernels' values, for the features of each level and for the boxes."""
    kernel, cpu = pyramid_problem(rng, dtype, layout)
    p = OpParams(3, 2, 1.0, 2, True, mode, channels_last=layout == "NHWC", deterministic=deterministic)
    emu.launches.clear()
    got = level_gradients(emu.ops, kernel, p, shape_only=mode == "avg")
    names = [name.split("<")[0] for name, _, _ in emu.launches]
    argmax = ["roi_align_argmax_levels"] if mode == "max" else []
    steps = (["roi_align_footprint_levels", "roi_tiles_count_levels", "roi_tiles_fill_levels",
              "roi_align_backward_features_gather_levels"] if deterministic
             else ["roi_align_backward_features_atomic_levels"])
    assert names == [*argmax, *steps, *argmax, "roi_align_backward_boxes_levels"]
    want = level_gradients(_cpu, cpu, p)
    for level, (a, b) in enumerate(zip(got[0], want[0])):
        assert_close(a, b, dtype, f"grad_features[{level}]")
    assert_close(got[1], want[1], dtype, "grad_boxes")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_emulated_multi_level_gather_ignores_scheduling(emu_lib, rng, monkeypatch, layout):
    """The deterministic multi-level gradients: the same bits whatever the order of blocks and
    threads, and through one block."""
    kernel, _ = pyramid_problem(rng, np.float32, layout)
    p = OpParams(3, 2, 1.0, 2, True, "max", channels_last=layout == "NHWC")

    def gradients(seed):
        grads, grad_rois = level_gradients(emulator.Emulator(emu_lib, seed).ops, kernel, p)
        return b"".join(g.tobytes() for g in grads) + grad_rois.tobytes()

    first = gradients(0)
    assert all(gradients(seed) == first for seed in (1, 2))
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 1)
    assert gradients(3) == first


@pytest.mark.parametrize("shape, scale", SHAPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [True, False])
def test_emulated_roi_align_rotated_matches_cpu(emu, rng, shape, scale, sampling_ratio, clockwise, aligned,
                                                layout, dtype, deterministic):
    kernel, cpu = rotated_problem(rng, shape, dtype, layout)
    p = OpParams(3, 2, scale, sampling_ratio, aligned, channels_last=layout == "NHWC", rotated=True,
                 clockwise=clockwise, deterministic=deterministic)
    compare_with_cpu(emu.ops, kernel, cpu, p, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_emulated_gather_handles_extreme_geometry(emu, rng, aligned, dtype):
    # the gather finds each box's samples near a pixel by inverting the sample grid (with a
    # rounding margin): points, boxes on integer coordinates, sub-pixel boxes with dense grids,
    # boxes far larger than the image or far away
    H, W = 9, 8
    boxes = np.array([
        [0, 3, 3, 3, 3], [0, 2, 1, 2, 6], [0, 1, 1, 5, 7], [0, 0, 0, W, H], [0, 4.2, 3.1, 4.2001, 3.1002],
        [0, -3, -2, -0.5, -1], [0, W - 1, H - 1, W + 1, H], [0, 6, 5, 2, 1], [0, 5e6, 5e6, 5e6 + 3, 5e6 + 2],
        # a few float32 ulps wide, straddling pixel edges: rounding decides on which side of the
        # edge each of the collapsed samples lands, and the gather must agree with the scatter
        *([0, c - d, c + 0.5 - d, c + d, c + 0.5 + d] for c in (1.0, 4.0, 4.5, 6.5) for d in (3e-7, 9e-7)),
        [0, -1e4, -1e4, 1e4, 1e4],  # last: fixed ratios only (adaptive would take 1e8 samples per bin)
    ])
    for sampling_ratio in (-1, 1, 5):
        subset = boxes[:-1] if sampling_ratio <= 0 else boxes
        kernel, cpu = _problem(rng, (1, 2, H, W), subset, dtype, "NCHW", (3, 2))
        for deterministic in (True, False):
            p = OpParams(3, 2, 1.0, sampling_ratio, aligned, deterministic=deterministic)
            compare_with_cpu(emu.ops, kernel, cpu, p, dtype)


def test_emulated_empty_inputs_launch_nothing(emu):
    p = OpParams(2, 2, 1.0, -1, True)
    x = np.ones((1, 2, 5, 5), np.float32)
    rois, batch_idx = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    emu.ops.forward(x, rois, batch_idx, np.empty((0, 2, 2, 2), np.float32), p)
    grad_x = np.zeros_like(x)
    emu.ops.backward_features(np.empty((0, 2, 2, 2), np.float32), x, rois, batch_idx, grad_x, p)
    emu.ops.backward_boxes(np.empty((0, 2, 2, 2), np.float32), x, rois, batch_idx, np.zeros_like(rois), p)
    assert emu.launches == [] and not grad_x.any()


def test_emulated_launches_check_argument_types(emu):
    # the emulator refuses arguments whose type differs from the kernel's parameter: the check
    # that guards every launch of the tests above
    x = np.ones((1, 1, 4, 4), np.float32)
    rois = np.array([[0, 0, 2, 2]], np.float32)
    call = _cuda._Call(x.shape, x.dtype, rois, np.zeros(1, np.int64), OpParams(2, 2, 1.0, -1, True))
    args = [x, *call.problem, np.empty((1, 1, 2, 2), np.float32)]
    args[5] = np.int64(4)  # H as int64 where the kernel takes int
    with pytest.raises(emulator.KernelError, match="argument 5 is i8"):
        emu.launch(call.source, call.scalar, call.name("forward"), (1,), (_cuda.THREADS,), args)
    with pytest.raises(emulator.KernelError, match="not compiled into the module"):
        emu.launch(call.source, "double", call.name("forward"), (1,), (_cuda.THREADS,), args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotated", [False, True])
def test_emulated_deterministic_gradients_ignore_scheduling(emu_lib, rng, monkeypatch, layout, rotated):
    # Large overlapping boxes: many terms per gradient element. Shuffling the order of blocks and
    # threads, or looping everything through one block, must not change a bit.
    N, C, H, W = 2, 3, 20, 17
    if rotated:
        boxes = random_rotated_boxes(rng, 12, N, H, W)
        boxes[:, 3:5] *= 1.5
    else:
        boxes = random_boxes(rng, 12, N, H, W)
    (x, rois, batch_idx, g), _ = _problem(rng, (N, C, H, W), boxes, np.float32, layout, (4, 3))
    mode = "avg" if rotated else "max"
    p = OpParams(4, 3, 1.0, 2, True, mode, channels_last=layout == "NHWC", rotated=rotated)

    def gradients(seed):
        ops = emulator.Emulator(emu_lib, seed).ops
        grad_x, grad_rois = np.zeros_like(x), np.zeros_like(rois)
        ops.backward_features(g, x, rois, batch_idx, grad_x, p)
        ops.backward_boxes(g, x, rois, batch_idx, grad_rois, p)
        return grad_x.tobytes() + grad_rois.tobytes()

    first = gradients(0)
    assert all(gradients(seed) == first for seed in (1, 2))
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 1)
    assert gradients(3) == first


# NaN (issue #10 items 3 and 4; the cases of test_hostile.py sections 3 and 4): a sample outside
# the image is 0 and reads no pixel (docs/conventions.md 1.6), and max pooling propagates NaN
# (section 3). "rotated" is the rotated operator (average mode).

NAN_OPS = (*MODES, "rotated")
# rotated boxes wholly outside an 8 x 8 map: beyond the bottom-right, the top-left, the top, the left
ROTATED_OUTSIDE_BOXES = np.array([[0, 25, 25, 4, 4, 30.0], [0, -20, -20, 6, 3, -60.0],
                                  [0, 4, -20, 3, 3, 45.0], [0, -20, 4, 3, 3, 10.0]])


def nan_params(op, layout, deterministic, pooled, sampling_ratio, aligned):
    rotated = op == "rotated"
    return OpParams(*pooled, 1.0, sampling_ratio, aligned, "avg" if rotated else op,
                    channels_last=layout == "NHWC", rotated=rotated, deterministic=deterministic)


def deterministic_flags(op):
    return (True, False) if op in (*GRADIENT_MODES, "rotated") else (True,)


def nan_features(shape, pixels, fill=None):
    """NCHW features (ones, or `fill`) with NaN at (y, x) of every plane for each pixel."""
    x = np.ones(shape) if fill is None else fill
    for y, x_ in pixels:
        x[:, :, y, x_] = np.nan
    return x


def max_nan_problem(where):
    """(NaN pixel, features, box): one bin of 2 x 2 samples (aligned, sampling_ratio 2) over a
    4 x 4 map whose NaN pixel is read by the bin's first or last sample only."""
    corner = 0 if where == "first" else 3
    x = nan_features((1, 1, 4, 4), [(corner, corner)], np.arange(16.0).reshape(1, 1, 4, 4))
    box = [0, -1.0, -1.0, 7.0, 7.0] if where == "first" else [0, 0.0, 0.0, 4.0, 4.0]
    return (corner, corner), x, np.array([box])


def random_nan_problem(rng, op):
    """(features, boxes) on a (2, 3, 13, 11) map of random numbers with a few NaNs, at corners
    and edges (read only by samples near them) and inside; the axis-aligned boxes include the
    edge cases and a box straddling the left edge."""
    shape = N, C, H, W = (2, 3, 13, 11)
    x = nan_features(shape, [(0, 0), (0, 5), (H - 1, W - 1)], rng.standard_normal(shape))
    x[1, 2, 6, 4] = x[0, 1, 9, 0] = np.nan
    if op == "rotated":
        return x, random_rotated_boxes(rng, 10, N, H, W)
    return x, np.concatenate([edge_case_boxes(rng, N, H, W), random_boxes(rng, 6, N, H, W),
                              [[0, -6.0, 2.0, 0.5, 6.0]]])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", NAN_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_nan_pixel_does_not_leak_into_boxes_outside_the_image(emu, rng, dtype, op, layout):
    boxes = ROTATED_OUTSIDE_BOXES if op == "rotated" else OUTSIDE_BOXES
    for pixel in EDGE_PIXELS:
        kernel, _ = _problem(rng, (1, 2, 8, 8), boxes, dtype, layout, (3, 3), nan_features((1, 2, 8, 8), [pixel]))
        for deterministic in deterministic_flags(op):
            p = nan_params(op, layout, deterministic, (3, 3), 2, False)
            for what, result in zip(("forward", "grad_features", "grad_boxes"), run_all(emu.ops, kernel, p, dtype)):
                assert result is None or (result == 0).all(), (pixel, deterministic, what)


@pytest.mark.parametrize("mode", MODES)
def test_emulated_box_straddling_the_edge_reads_only_inside_samples(emu, rng, mode):
    # bin 0's samples lie left of x = -1 and read nothing; bin 1's inside ones read column 0 (NaN)
    x = nan_features((1, 1, 8, 8), [(y, 0) for y in range(8)])
    for dtype in DTYPES:
        kernel, cpu = _problem(rng, x.shape, np.array([[0, -6.0, 2.0, 0.5, 6.0]]), dtype, "NCHW", (1, 2), x)
        p = OpParams(1, 2, 1.0, 2, True, mode)
        out = run_all(emu.ops, kernel, p, dtype)[0]
        assert out[0, 0, 0, 0] == 0 and np.isnan(out[0, 0, 0, 1]), dtype
        compare_with_cpu(emu.ops, kernel, cpu, p, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_max_mode_propagates_nan_wherever_it_is_sampled(emu, rng, dtype, where, layout):
    pixel, x, box = max_nan_problem(where)
    kernel, cpu = _problem(rng, x.shape, box, dtype, layout, (1, 1), x)
    for deterministic in (True, False):
        p = OpParams(1, 1, 1.0, 2, True, "max", channels_last=layout == "NHWC", deterministic=deterministic)
        out, grad_x, _ = run_all(emu.ops, kernel, p, dtype)
        assert np.isnan(out).all()
        # the gradient goes to the taps of the sample that read the NaN (the arg-max)
        assert (to_nchw(grad_x) if layout == "NHWC" else grad_x)[(0, 0, *pixel)] != 0
        compare_with_cpu(emu.ops, kernel, cpu, p, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", NAN_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_nan_features_match_cpu(emu, rng, dtype, op, layout):
    x, boxes = random_nan_problem(rng, op)
    kernel, cpu = _problem(rng, x.shape, boxes, dtype, layout, (3, 2), x)
    for deterministic in deterministic_flags(op):
        compare_with_cpu(emu.ops, kernel, cpu, nan_params(op, layout, deterministic, (3, 2), -1, True), dtype)


# ---------------------------------------------------------------------------------------------
# 3. on a GPU: cupy arrays through the public API against numpy arrays


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy", reason='CuPy is not installed (pip install "roialign_cy[cuda12]" or [cuda13])')
    if not _cuda.is_available():
        pytest.skip("CuPy is installed but sees no CUDA device")
    return cupy


def gpu_vs_cpu_inputs(cp, x, boxes, g, dtype):
    """(gpu features, gpu boxes, gpu grad) and their CPU counterparts holding the same values."""
    xk, gk = x.astype(dtype), g.astype(dtype)
    box_dtype = np.float32 if dtype == np.float16 else dtype
    bk = boxes.astype(box_dtype)
    return ((cp.asarray(xk), cp.asarray(bk), cp.asarray(gk)),
            (xk.astype(cpu_dtype(dtype)), bk.astype(cpu_dtype(dtype)), gk.astype(cpu_dtype(dtype))))


@pytest.mark.gpu
@pytest.mark.parametrize("boxes_kind", ["edge", "random"])
@pytest.mark.parametrize("shape, scale", SHAPES + (((3, 5, 40, 33), 0.25),))
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_roi_align_matches_cpu(cp, rng, boxes_kind, shape, scale, sampling_ratio, aligned, mode, layout,
                                   dtype):
    N, C, H, W = shape
    if boxes_kind == "edge":
        boxes = edge_case_boxes(rng, N, H, W, scale)
    else:
        boxes = random_boxes(rng, 9, N, H, W, scale)
    x = rng.standard_normal(shape)
    g = rng.standard_normal((len(boxes), C, 3, 4))
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    gpu, cpu = gpu_vs_cpu_inputs(cp, x, boxes, g, dtype)
    kw = dict(output_size=(3, 4), spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned, mode=mode,
              layout=layout, allow_inverted=True)
    want = roialign_cy.roi_align(cpu[0], cpu[1], **kw)
    got = roialign_cy.roi_align(gpu[0], gpu[1], **kw)
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    assert_close(cp.asnumpy(got), want, dtype, "forward")
    if mode not in GRADIENT_MODES:
        return
    want_x, want_b = roialign_cy.roi_align_backward(cpu[2], cpu[0], cpu[1], wrt="both", **kw)
    for deterministic in (True, False):
        got_x, got_b = roialign_cy.roi_align_backward(gpu[2], gpu[0], gpu[1], wrt="both",
                                                      deterministic=deterministic, **kw)
        assert_close(cp.asnumpy(got_x), want_x, dtype, f"grad_features deterministic={deterministic}")
        assert_close(cp.asnumpy(got_b), want_b, dtype, "grad_boxes")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", GRADIENT_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_multi_scale_roi_align_matches_cpu(cp, rng, mode, layout, dtype):
    """The public multi-level forward and gradients (features of every level, boxes) on CuPy
    arrays: the CPU's values."""
    N, C = 2, 3
    shapes = [(N, C, 64, 80), (N, C, 32, 40), (N, C, 16, 20), (N, C, 8, 10)]
    maps = [rng.standard_normal(s) for s in shapes]
    boxes = random_boxes(rng, 40, N, 256, 320)  # input-image pixels: sizes over every level
    grad = rng.standard_normal((len(boxes), C, 3, 2))
    if layout == "NHWC":
        maps, grad = [to_nhwc(m) for m in maps], to_nhwc(grad)
    box_dtype = np.float32 if dtype == np.float16 else dtype
    cpu_maps = [m.astype(dtype).astype(cpu_dtype(dtype)) for m in maps]
    cpu_boxes = boxes.astype(box_dtype).astype(cpu_dtype(dtype))
    cpu_grad = grad.astype(dtype).astype(cpu_dtype(dtype))
    gpu_maps = [cp.asarray(m.astype(dtype)) for m in maps]
    kw = dict(output_size=(3, 2), spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2,
              aligned=True, mode=mode, layout=layout, canonical_scale=64)
    got = roialign_cy.multi_scale_roi_align(gpu_maps, cp.asarray(boxes.astype(box_dtype)), **kw)
    assert isinstance(got, cp.ndarray) and got.dtype == dtype
    assert_close(cp.asnumpy(got), roialign_cy.multi_scale_roi_align(cpu_maps, cpu_boxes, **kw), dtype,
                 "forward")
    want_x, want_b = roialign_cy.multi_scale_roi_align_backward(cpu_grad, cpu_maps, cpu_boxes, wrt="both", **kw)
    for deterministic in (True, False):
        got_x, got_b = roialign_cy.multi_scale_roi_align_backward(
            cp.asarray(grad.astype(dtype)), gpu_maps, cp.asarray(boxes.astype(box_dtype)), wrt="both",
            deterministic=deterministic, **kw)
        for level, (a, b) in enumerate(zip(got_x, want_x)):
            assert_close(cp.asnumpy(a), b, dtype, f"grad_features[{level}] deterministic={deterministic}")
        assert_close(cp.asnumpy(got_b), want_b, dtype, "grad_boxes")


@pytest.mark.gpu
@pytest.mark.parametrize("shape, scale", SHAPES + (((3, 5, 40, 33), 0.25),))
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("clockwise", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_roi_align_rotated_matches_cpu(cp, rng, shape, scale, sampling_ratio, clockwise, aligned, layout,
                                           dtype):
    N, C, H, W = shape
    boxes = random_rotated_boxes(rng, 9, N, H, W, scale)
    x = rng.standard_normal(shape)
    g = rng.standard_normal((len(boxes), C, 3, 2))
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    gpu, cpu = gpu_vs_cpu_inputs(cp, x, boxes, g, dtype)
    kw = dict(output_size=(3, 2), spatial_scale=scale, sampling_ratio=sampling_ratio, aligned=aligned,
              clockwise=clockwise, layout=layout, allow_inverted=True)
    want = roialign_cy.roi_align_rotated(cpu[0], cpu[1], **kw)
    assert_close(cp.asnumpy(roialign_cy.roi_align_rotated(gpu[0], gpu[1], **kw)), want, dtype, "forward")
    want_x, want_b = roialign_cy.roi_align_rotated_backward(cpu[2], cpu[0], cpu[1], wrt="both", **kw)
    for deterministic in (True, False):
        got_x, got_b = roialign_cy.roi_align_rotated_backward(gpu[2], gpu[0], gpu[1], wrt="both",
                                                              deterministic=deterministic, **kw)
        assert_close(cp.asnumpy(got_x), want_x, dtype, f"grad_features deterministic={deterministic}")
        assert_close(cp.asnumpy(got_b), want_b, dtype, "grad_boxes")


def gpu_vs_cpu(cp, op, x, boxes, g, dtype, layout, **kw):
    """[(what, gpu result, cpu result)] of the public operator `op` (a mode, or "rotated") on the
    same values: the forward and, where `op` has them, both gradients (deterministic and atomic)."""
    if layout == "NHWC":
        x, g = to_nhwc(x), to_nhwc(g)
    gpu, cpu = gpu_vs_cpu_inputs(cp, x, boxes, g, dtype)
    if op == "rotated":
        forward, backward = roialign_cy.roi_align_rotated, roialign_cy.roi_align_rotated_backward
    else:
        forward, backward = roialign_cy.roi_align, roialign_cy.roi_align_backward
        kw["mode"] = op
    kw.update(layout=layout, allow_inverted=True)
    results = [("forward", cp.asnumpy(forward(gpu[0], gpu[1], **kw)), forward(cpu[0], cpu[1], **kw))]
    if op == "onnx_max":
        return results
    want = backward(cpu[2], cpu[0], cpu[1], wrt="both", **kw)
    for deterministic in (True, False):
        got = backward(gpu[2], gpu[0], gpu[1], wrt="both", deterministic=deterministic, **kw)
        results += [(f"{what} deterministic={deterministic}", cp.asnumpy(a), b)
                    for what, a, b in zip(("grad_features", "grad_boxes"), got, want)]
    return results


# NaN: the emulated cases above (issue #10 items 3 and 4), on the device


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", NAN_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nan_pixel_does_not_leak_into_boxes_outside_the_image(cp, rng, dtype, op, layout):
    boxes = ROTATED_OUTSIDE_BOXES if op == "rotated" else OUTSIDE_BOXES
    g = rng.standard_normal((len(boxes), 2, 3, 3))
    for pixel in EDGE_PIXELS:
        x = nan_features((1, 2, 8, 8), [pixel])
        for what, got, want in gpu_vs_cpu(cp, op, x, boxes, g, dtype, layout, output_size=3, sampling_ratio=2,
                                          aligned=False):
            assert (got == 0).all() and (want == 0).all(), (pixel, what)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_max_mode_propagates_nan_wherever_it_is_sampled(cp, rng, dtype, where, layout):
    pixel, x, box = max_nan_problem(where)
    for what, got, want in gpu_vs_cpu(cp, "max", x, box, np.ones((1, 1, 1, 1)), dtype, layout, output_size=1,
                                      sampling_ratio=2, aligned=True):
        assert_close(got, want, dtype, what)
        if what == "forward":
            assert np.isnan(got).all()
        elif what.startswith("grad_features"):
            assert (to_nchw(got) if layout == "NHWC" else got)[(0, 0, *pixel)] > 0, what


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", NAN_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_nan_features_match_cpu(cp, rng, dtype, op, layout):
    x, boxes = random_nan_problem(rng, op)
    g = rng.standard_normal((len(boxes), x.shape[1], 3, 2))
    for what, got, want in gpu_vs_cpu(cp, op, x, boxes, g, dtype, layout, output_size=(3, 2), sampling_ratio=-1,
                                      aligned=True):
        assert_close(got, want, dtype, what)


@pytest.mark.gpu
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_deterministic_gradients_are_bit_identical(cp, rng, monkeypatch, rotated, layout):
    N, C, H, W = 2, 8, 48, 40
    if rotated:
        boxes, op = random_rotated_boxes(rng, 64, N, H, W), roialign_cy.roi_align_rotated_backward
        kw = {}
    else:
        boxes, op = random_boxes(rng, 64, N, H, W), roialign_cy.roi_align_backward
        kw = {"mode": "max"}
    x = cp.asarray(rng.standard_normal((N, C, H, W)).astype(np.float32))
    g = cp.asarray(rng.standard_normal((len(boxes), C, 7, 7)).astype(np.float32))
    if layout == "NHWC":
        x, g = cp.ascontiguousarray(cp.moveaxis(x, 1, -1)), cp.ascontiguousarray(cp.moveaxis(g, 1, -1))
    b = cp.asarray(boxes.astype(np.float32))

    def bits():
        gx, gb = op(g, x, b, 7, 1.0, 2, True, layout=layout, wrt="both", **kw)
        return cp.asnumpy(gx).tobytes() + cp.asnumpy(gb).tobytes()

    first = bits()
    assert bits() == first
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", 3)  # another launch configuration: same bits
    assert bits() == first


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream_and_shape_only_features(cp, rng):
    x = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)
    boxes = random_boxes(rng, 5, 2, 16, 12)
    g = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    want = roialign_cy.roi_align_backward(g, x.shape, boxes.astype(np.float32), 2, aligned=True)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = roialign_cy.roi_align_backward(cp.asarray(g), x.shape, cp.asarray(boxes.astype(np.float32)), 2,
                                             aligned=True)
        stream.synchronize()
    assert_close(cp.asnumpy(got), want, np.float32, "grad_features from the shape only")


@pytest.mark.gpu
def test_gpu_uses_the_device_of_the_arrays(cp, rng):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    x = rng.standard_normal((1, 2, 9, 9)).astype(np.float32)
    boxes = random_boxes(rng, 4, 1, 9, 9).astype(np.float32)
    want = roialign_cy.roi_align(x, boxes, 3)
    with cp.cuda.Device(1):
        xg, bg = cp.asarray(x), cp.asarray(boxes)
    with cp.cuda.Device(0):
        got = roialign_cy.roi_align(xg, bg, 3)
    assert got.device.id == 1
    assert_close(cp.asnumpy(got), want, np.float32, "forward on device 1")


@pytest.mark.gpu
def test_gpu_refuses_mixed_arrays(cp):
    x = np.zeros((1, 1, 4, 4), np.float32)
    boxes = cp.asarray(np.array([[0, 0, 0, 2, 2]], np.float32))
    with pytest.raises(TypeError, match="cannot mix"):
        roialign_cy.roi_align(x, boxes, 2)
    with pytest.raises(TypeError, match="cannot mix"):
        roialign_cy.roi_align_backward(cp.zeros((1, 1, 2, 2), cp.float32), x, boxes, 2)
