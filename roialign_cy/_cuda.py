"""CUDA backend: the kernels of ``cuda/`` compiled at run time by NVRTC through CuPy.

``roi_align.cu`` (axis-aligned), ``roi_align_rotated.cu`` (rotated) and ``roi_family.cu`` (roi_pool,
ps_roi_align, ps_roi_pool) include the shared headers ``roi_common.cuh``, ``roi_geometry.cuh`` and
``roi_pool.cuh``. Each (device, source, dtype) is compiled once per process by ``cupy.RawModule``,
its template instantiations named by ``name_expressions``; kernels run on CuPy's current stream,
on the device of the output array.

CuPy is imported on first use, never at import time: ``import roialign_cy`` and this module work
without it, and a GPU call without it raises an ImportError saying what to install.

The launch sequences live in ``_Ops``, written against an array module and a launch function, so
that ``tests/cuda_host`` runs exactly this code on a host emulation of the kernels.
"""
import hashlib
import importlib.resources
import pathlib
import threading

import numpy as np

# module -> source file: axis-aligned RoIAlign, rotated RoIAlign, and the operators of
# docs/conventions.md sections 8 and 9
SOURCES = {"roi_align": "roi_align.cu", "roi_align_rotated": "roi_align_rotated.cu", "roi_family": "roi_family.cu"}
# the kernels' name prefix (OpParams.op, or "roi_align_rotated" for rotated boxes) -> its module
_MODULE_OF = {"roi_align": "roi_align", "roi_align_rotated": "roi_align_rotated", "roi_pool": "roi_family",
              "ps_roi_align": "roi_family", "ps_roi_pool": "roi_family"}
# the headers every source includes
HEADERS = ("roi_common.cuh", "roi_geometry.cuh", "roi_pool.cuh")
# numpy dtype name -> C++ scalar type of the kernels
SCALARS = {"float16": "__half", "float32": "float", "float64": "double"}
COMPILE_OPTIONS = ("-std=c++17",)

_MODES = {"avg": 0, "max": 1, "onnx_max": 2}
_GRADIENT_MODES = ("avg", "max")  # onnx_max reproduces a forward quirk and has no gradient
_FLAG_ALIGNED, _FLAG_CLOCKWISE, _FLAG_IMAGE_EDGE = 1, 2, 4  # rac::FLAG_*
THREADS = 256  # rac::THREADS: block size of every launch (the box gradient's tree needs it)
# Grid-stride kernels loop, so a bounded grid covers any size; 2**16 blocks fill any current GPU.
MAX_BLOCKS = 1 << 16
# Side of the square pixel tiles of the deterministic feature gradient: each tile lists the boxes
# that may touch it. Smaller tiles mean shorter lists per pixel but more tiles to build.
TILE = 16


def source_dir():
    """Directory of the CUDA sources: the ``roialign_cy.cuda`` package data of an installed wheel,
    else the top-level ``cuda/`` of a source checkout."""
    candidates = []
    try:
        # roialign_cy/cuda has no __init__.py (a regular package named cuda in a checkout would
        # shadow NVIDIA's cuda namespace package), so files() may give a MultiplexedPath; a
        # child of it is a real path either way
        installed = importlib.resources.files("roialign_cy.cuda").joinpath(SOURCES["roi_align"])
    except (ModuleNotFoundError, TypeError, ValueError):  # not installed; Python 3.9 namespace
        installed = None
    if isinstance(installed, pathlib.Path):
        candidates.append(installed.parent)
    candidates.append(pathlib.Path(__file__).resolve().parent.parent / "cuda")
    for directory in candidates:
        if all((directory / name).is_file() for name in (*SOURCES.values(), *HEADERS)):
            return directory
    raise FileNotFoundError(
        "roialign_cy's CUDA sources were not found (looked in "
        + ", ".join(str(d) for d in candidates) + "); reinstall the package"
    )


_TILE_KERNELS = ("tiles_count", "tiles_fill", "tiles_count_levels", "tiles_fill_levels")


def _kernel_name(kernel, scalar, prefix, mode, channels_last):
    if kernel in _TILE_KERNELS:
        return f"roi_{kernel}"
    if kernel in ("footprint", "footprint_levels"):
        return f"{prefix}_{kernel}<{scalar}>"
    # only axis-aligned RoIAlign has pooling modes
    targs = [scalar] + ([str(_MODES[mode])] if prefix == "roi_align" else []) + ["true" if channels_last else "false"]
    return f"{prefix}_{kernel}<{', '.join(targs)}>"


def _layout_kernels(prefix):
    """(kernel, mode) of the instantiations of one operator for each layout."""
    if prefix not in ("roi_align", "roi_align_rotated"):
        # roi_pool and the position-sensitive operators: no modes, no box gradient (conventions 8, 9)
        kernels = ("forward", "argmax", "forward_argmax") if prefix == "roi_pool" else ("forward",)
        return [(k, None) for k in (*kernels, "backward_features_atomic", "backward_features_gather")]
    rotated = prefix == "roi_align_rotated"
    kernels = [("forward", mode) for mode in (("avg",) if rotated else _MODES)]
    if not rotated:  # the multi-level (FPN) forward
        kernels += [("forward_levels", mode) for mode in _MODES]
    for mode in ("avg",) if rotated else _GRADIENT_MODES:
        for suffix in ("",) if rotated else ("", "_levels"):  # and the multi-level gradients
            if mode != "avg":
                kernels.append(("argmax" + suffix, mode))
            kernels += [(k + suffix, mode) for k in ("backward_features_atomic", "backward_features_gather",
                                                     "backward_boxes")]
    return kernels


def name_expressions(source, scalar):
    """Every kernel instantiation compiled into the module of ``source`` for the C++ ``scalar``."""
    prefixes = [prefix for prefix, module in _MODULE_OF.items() if SOURCES[module] == source]
    names = [_kernel_name("footprint", scalar, prefix, None, None) for prefix in prefixes]
    names += [_kernel_name("footprint_levels", scalar, prefix, None, None)
              for prefix in prefixes if prefix == "roi_align"]
    names += [_kernel_name(k, scalar, None, None, None) for k in _TILE_KERNELS]
    for channels_last in (False, True):
        for prefix in prefixes:
            names += [_kernel_name(k, scalar, prefix, mode, channels_last) for k, mode in _layout_kernels(prefix)]
    return names


def _address(array):
    """Device (CuPy) or host (numpy, under the host emulation) address of an array's data; 0 for
    an empty one, which no box reads."""
    if array.size == 0:
        return 0
    return array.data.ptr if hasattr(array.data, "ptr") else array.ctypes.data


def _grid(total):
    return (int(min(max(-(-total // THREADS), 1), MAX_BLOCKS)),)


def _gradient_mode(p):
    if p.mode not in _GRADIENT_MODES:
        raise ValueError(f"mode={p.mode!r} has no gradient")


class _Call:
    """The kernel names and the problem arguments (RAC_PROBLEM_PARAMS) of one operator call."""

    def __init__(self, shape, dtype, rois, batch_idx, p):
        if p.channels_last:
            n, h, w, c = shape
        else:
            n, c, h, w = shape
        self.p = p
        self.n_images, self.height, self.width, self.n_boxes = n, h, w, rois.shape[0]
        self.scalar = SCALARS[np.dtype(dtype).name]
        self.prefix = "roi_align_rotated" if p.rotated else p.op
        self.source = SOURCES[_MODULE_OF[self.prefix]]
        self.acc_dtype = np.dtype(np.float64 if self.scalar == "double" else np.float32)
        # ps_roi_align's kernels set FLAG_ALIGNED themselves; the edge flag only concerns ps_roi_pool
        flags = ((_FLAG_ALIGNED if p.aligned else 0) | (_FLAG_CLOCKWISE if p.clockwise else 0)
                 | (_FLAG_IMAGE_EDGE if p.edge == "image" else 0))
        sizes = (n, c, h, w, rois.shape[0], p.pooled_h, p.pooled_w)
        self.problem = (rois, batch_idx, *map(np.int32, sizes), np.float64(p.spatial_scale),
                        np.int32(p.sampling_ratio), np.int32(flags))

    def name(self, kernel):
        return _kernel_name(kernel, self.scalar, self.prefix, self.p.mode, self.p.channels_last)


class _Ops:
    """The launch sequence of each backend entry point (contract in ``roialign_cy._backends``).

    ``xp`` is the array module of the arrays (cupy; numpy under the host emulation) and
    ``launch(source, scalar, name, grid, block, args)`` runs one kernel.
    """

    def __init__(self, xp, launch):
        self.xp = xp
        self._launch = launch

    def _run(self, call, kernel, args, grid):
        self._launch(call.source, call.scalar, call.name(kernel), grid, (THREADS,), args)

    def forward(self, features, rois, batch_idx, out, p, argmax=None):
        if out.size == 0:
            return
        call = _Call(features.shape, features.dtype, rois, batch_idx, p)
        if argmax is None:
            self._run(call, "forward", (features, *call.problem, out), _grid(out.size))
            return
        # roi_pool's arg-max pixels too, in the same pass (int32 for the caller, as on the CPU)
        wide = self.xp.empty(out.size, np.int64)
        self._run(call, "forward_argmax", (features, *call.problem, out, wide), _grid(out.size))
        argmax[...] = wide.reshape(argmax.shape)

    def _levels(self, arrays, level, scales, p):
        """The rac::Levels arguments (RAC_LEVELS_PARAMS): each level's data address (its
        features, or its gradient), height, width and scale, and every box's level."""
        xp = self.xp
        hw = (1, 2) if p.channels_last else (2, 3)
        return (xp.asarray([_address(a) for a in arrays], np.int64),
                xp.asarray([a.shape[hw[0]] for a in arrays], np.int32),
                xp.asarray([a.shape[hw[1]] for a in arrays], np.int32),
                xp.asarray(scales, np.float64), xp.ascontiguousarray(level, np.int64))

    def forward_levels(self, maps, rois, batch_idx, level, scales, out, p):
        """Pool box k from ``maps[level[k]]`` at scale ``scales[level[k]]`` into ``out``, every
        level in one launch (roialign_cy._cpu.forward_levels' contract)."""
        if out.size == 0:
            return
        call = _Call(maps[0].shape, maps[0].dtype, rois, batch_idx, p)
        self._run(call, "forward_levels", (*self._levels(maps, level, scales, p), *call.problem, out),
                  _grid(out.size))

    def _argmax_levels(self, call, maps, level, scales, p, n_outputs):
        """The winning sample of every output of a multi-level call in max mode (an unused empty
        array in avg mode)."""
        if p.mode == "avg":
            return self.xp.empty(0, np.int32)
        argmax = self.xp.empty(n_outputs, np.int32)
        self._run(call, "argmax_levels", (*self._levels(maps, level, scales, p), *call.problem, argmax),
                  _grid(n_outputs))
        return argmax

    def backward_features_levels(self, grad_out, maps, rois, batch_idx, level, scales, grads, p):
        """Add the feature gradient of every level of a pyramid into ``grads`` (zeroed by the
        caller), every level in one launch (roialign_cy._cpu.backward_features_levels' contract;
        ``maps`` may be None in avg mode)."""
        _gradient_mode(p)
        if grad_out.size == 0:
            return
        xp = self.xp
        call = _Call(grads[0].shape, grads[0].dtype, rois, batch_idx, p)
        argmax = self._argmax_levels(call, maps, level, scales, p, grad_out.size)
        if p.deterministic:
            levels = self._levels(grads, level, scales, p)
            pixel_base = np.concatenate([[0], np.cumsum([g.size for g in grads])]).astype(np.int64)
            self._run(call, "backward_features_gather_levels",
                      (grad_out, argmax, *levels, *call.problem, np.int64(pixel_base[-1]), xp.asarray(pixel_base),
                       *self._tile_lists_levels(call, levels, grads, p)),
                      _grid(int(pixel_base[-1])))
            return
        # float16 gradients are accumulated in float32, then rounded once
        accs = [g if g.dtype == call.acc_dtype else xp.zeros(g.shape, call.acc_dtype) for g in grads]
        self._run(call, "backward_features_atomic_levels",
                  (grad_out, argmax, *self._levels(accs, level, scales, p), *call.problem), _grid(grad_out.size))
        for g, acc in zip(grads, accs):
            if acc is not g:
                g += acc.astype(g.dtype)

    def _tile_lists_levels(self, call, levels, grads, p):
        """The multi-level gather's tile arguments: (tile_h, tile_w, tile_base, tiles_y, tiles_x,
        offsets, boxes), level l's tiles numbered from tile_base[l], each listing the boxes of its
        level and image that may touch it, in index order."""
        xp = self.xp
        hw = (1, 2) if p.channels_last else (2, 3)
        tiles_y = np.array([-(-g.shape[hw[0]] // TILE) for g in grads], np.int32)
        tiles_x = np.array([-(-g.shape[hw[1]] // TILE) for g in grads], np.int32)
        tile_base = np.concatenate([[0], np.cumsum(call.n_images * tiles_y.astype(np.int64) * tiles_x)])
        n_tiles = int(tile_base[-1])
        footprints = xp.empty((call.n_boxes, 4), np.int32)
        self._run(call, "footprint_levels", (*levels, *call.problem, np.int32(TILE), np.int32(TILE), footprints),
                  _grid(call.n_boxes))
        shape_args = (call.problem[1], levels[4], np.int32(call.n_boxes), np.int64(n_tiles),
                      xp.asarray(tile_base, np.int64), xp.asarray(tiles_y), xp.asarray(tiles_x))
        offsets, boxes = self._fill_tiles(call, "_levels", footprints, shape_args, n_tiles)
        return (np.int32(TILE), np.int32(TILE), *shape_args[4:], offsets, boxes)

    def _fill_tiles(self, call, suffix, footprints, shape_args, n_tiles):
        """(offsets, boxes) of the tile lists: count each tile's boxes, scan, fill."""
        xp = self.xp
        counts = xp.empty(n_tiles, np.int64)
        self._run(call, "tiles_count" + suffix, (footprints, *shape_args, counts), _grid(n_tiles))
        offsets = xp.zeros(n_tiles + 1, np.int64)
        offsets[1:] = xp.cumsum(counts)
        boxes = xp.empty(max(int(offsets[-1]), 1), np.int32)  # one small device-to-host read
        self._run(call, "tiles_fill" + suffix, (footprints, *shape_args, offsets, boxes), _grid(n_tiles))
        return offsets, boxes

    def backward_boxes_levels(self, grad_out, maps, rois, batch_idx, level, scales, grad_rois, p):
        """Add d(sum(grad_out * out)) / d(rois) of a multi-level call into ``grad_rois``, every
        level in one launch."""
        _gradient_mode(p)
        if grad_out.size == 0:
            return
        call = _Call(maps[0].shape, maps[0].dtype, rois, batch_idx, p)
        argmax = self._argmax_levels(call, maps, level, scales, p, grad_out.size)
        self._run(call, "backward_boxes_levels",
                  (grad_out, argmax, *self._levels(maps, level, scales, p), *call.problem, grad_rois),
                  (int(min(call.n_boxes, MAX_BLOCKS)),))

    def _argmax(self, call, features, n_outputs):
        """Winning sample of every output (RoIAlign's max mode), else an unused empty array; roi_pool's
        arg-max pixels (int64: y * W + x may pass 2**31); () when the operator's kernels take no
        arg-max argument (rotated, position-sensitive)."""
        if call.prefix == "roi_pool":
            if features is None:
                raise ValueError("roi_pool's gradient needs the features: it finds the arg-max pixels again")
            argmax = self.xp.empty(n_outputs, np.int64)
            self._run(call, "argmax", (features, *call.problem, argmax), _grid(n_outputs))
            return (argmax,)
        if call.prefix != "roi_align":
            return ()
        if call.p.mode == "avg":
            return (self.xp.empty(0, np.int32),)
        argmax = self.xp.empty(n_outputs, np.int32)
        self._run(call, "argmax", (features, *call.problem, argmax), _grid(n_outputs))
        return (argmax,)

    def backward_features(self, grad_out, features, rois, batch_idx, grad_features, p,
                          argmax=None):
        if p.op == "roi_align":
            _gradient_mode(p)
        if grad_out.size == 0 or grad_features.size == 0:
            return
        call = _Call(grad_features.shape, grad_features.dtype, rois, batch_idx, p)
        if argmax is not None:  # roi_pool, from a forward's arg-max: its pixels must be in the map
            if int(argmax.min()) < -1 or int(argmax.max()) >= call.height * call.width:
                raise ValueError(f"argmax holds entries outside [-1, H * W) = [-1, "
                                 f"{call.height * call.width}): pass the arg-max that "
                                 "roi_pool(..., return_argmax=True) returned for these boxes")
            argmax = (argmax.astype(np.int64),)  # the kernels index with 64 bits
        else:
            argmax = self._argmax(call, features, grad_out.size)
        if p.deterministic:
            tiles = self._tile_lists(call)
            self._run(call, "backward_features_gather", (grad_out, *argmax, *call.problem, *tiles, grad_features),
                      _grid(grad_features.size))
            return
        # float16 gradients are accumulated in float32, then rounded once
        acc = grad_features
        if grad_features.dtype != call.acc_dtype:
            acc = self.xp.zeros(grad_features.shape, call.acc_dtype)
        self._run(call, "backward_features_atomic", (grad_out, *argmax, *call.problem, acc), _grid(grad_out.size))
        if acc is not grad_features:
            grad_features += acc.astype(grad_features.dtype)

    def _tile_lists(self, call):
        """The gather's tile arguments: (tile_h, tile_w, tiles_y, tiles_x, offsets, boxes), where
        boxes[offsets[t]:offsets[t + 1]] are the boxes that may touch tile t, in index order."""
        xp = self.xp
        tiles_y, tiles_x = -(-call.height // TILE), -(-call.width // TILE)
        n_tiles = call.n_images * tiles_y * tiles_x
        footprints = xp.empty((call.n_boxes, 4), np.int32)
        self._run(call, "footprint", (*call.problem, np.int32(TILE), np.int32(TILE), footprints),
                  _grid(call.n_boxes))
        shape_args = (call.problem[1], np.int32(call.n_boxes), np.int32(call.n_images), np.int32(tiles_y),
                      np.int32(tiles_x))
        offsets, boxes = self._fill_tiles(call, "", footprints, shape_args, n_tiles)
        return np.int32(TILE), np.int32(TILE), np.int32(tiles_y), np.int32(tiles_x), offsets, boxes

    def backward_boxes(self, grad_out, features, rois, batch_idx, grad_rois, p):
        if p.op != "roi_align":
            raise ValueError(f"{p.op} has no gradient with respect to the boxes (docs/conventions.md sections 8 "
                             "and 9); use wrt=\"features\"")
        _gradient_mode(p)
        if grad_out.size == 0:
            return
        call = _Call(features.shape, features.dtype, rois, batch_idx, p)
        argmax = self._argmax(call, features, grad_out.size)
        # one block per box; a bounded grid loops over the boxes
        self._run(call, "backward_boxes", (grad_out, features, *argmax, *call.problem, grad_rois),
                  (int(min(call.n_boxes, MAX_BLOCKS)),))


# ---------------------------------------------------------------------------------------------
# CuPy: compilation cache and the public entry points

_MODULES = {}
_MODULES_LOCK = threading.Lock()
_GPU_OPS = []
# CuPy's [ctk] extra (CuPy >= 14) brings NVRTC and the CUDA headers from pip, so that a machine with
# the NVIDIA driver alone compiles the kernels
_INSTALL = ('pip install "roialign_cy[cuda12]" (CUDA 12.x) or "roialign_cy[cuda13]" (CUDA 13.x), which '
            "install cupy-cuda12x[ctk] or cupy-cuda13x[ctk]")


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"roialign_cy's CUDA backend needs CuPy: {_INSTALL}") from exc
    return cupy


def is_available():
    """True when CuPy imports and sees a CUDA device."""
    try:
        cupy = _cupy()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except ImportError:
        return False
    except Exception as exc:  # no driver or no device: CuPy raises its CUDARuntimeError
        if type(exc).__name__ == "CUDARuntimeError":
            return False
        raise


def _code(directory, source):
    # CuPy's on-disk kernel cache is keyed by the source text and the options, not by the files it
    # includes: a digest of the headers in the text makes a header change recompile.
    digest = hashlib.sha256(b"".join((directory / h).read_bytes() for h in HEADERS)).hexdigest()
    return (directory / source).read_text() + f"\n// roialign_cy headers sha256 {digest}\n"


def _missing_toolkit(exc):
    """What CuPy's compilation lacked, when ``exc`` says NVRTC or the CUDA headers are missing
    (a machine with the driver alone); None for any other failure."""
    text = str(exc)
    if "cuda_fp16.h" in text:  # NVRTC's log: cannot open source file "cuda_fp16.h"
        return "CuPy's NVRTC cannot find cuda_fp16.h, which roialign_cy's kernels include"
    # CuPy >= 14 (cuda.pathfinder): Failure finding "libnvrtc.so.13 or libnvrtc.so.12";
    # CuPy 13: CuPy failed to load libnvrtc.so.12 (nvrtc64_120_0.dll on Windows)
    if "libnvrtc" in text or "nvrtc64_" in text:
        return "CuPy cannot load NVRTC, the CUDA run-time compiler of roialign_cy's kernels"
    return None


def _module(source, scalar):
    """The compiled module of ``source`` for ``scalar`` on the current device (once per process)."""
    cupy = _cupy()
    key = (cupy.cuda.Device().id, source, scalar)
    module = _MODULES.get(key)
    if module is None:
        with _MODULES_LOCK:
            module = _MODULES.get(key)
            if module is None:
                directory = source_dir()
                module = cupy.RawModule(code=_code(directory, source),
                                        options=(*COMPILE_OPTIONS, f"-I{directory}"),
                                        name_expressions=name_expressions(source, scalar))
                try:
                    module.compile()
                except Exception as exc:  # CuPy's CompileException, or NVRTC not found
                    missing = _missing_toolkit(exc)
                    if missing is None:
                        raise
                    raise RuntimeError(
                        f"{missing}: {_INSTALL}; or install a CUDA toolkit and set CUDA_PATH"
                    ) from exc
                _MODULES[key] = module
    return module


def _gpu_launch(source, scalar, name, grid, block, args):
    _module(source, scalar).get_function(name)(grid, block, args)


def _ops():
    if not _GPU_OPS:
        _GPU_OPS.append(_Ops(_cupy(), _gpu_launch))
    return _GPU_OPS[0]


def forward(features, rois, batch_idx, out, p, argmax=None):
    with out.device:
        _ops().forward(features, rois, batch_idx, out, p, argmax)


def forward_levels(maps, rois, batch_idx, level, scales, out, p):
    with out.device:
        _ops().forward_levels(maps, rois, batch_idx, level, scales, out, p)


def backward_features_levels(grad_out, maps, rois, batch_idx, level, scales, grads, p):
    with grads[0].device:
        _ops().backward_features_levels(grad_out, maps, rois, batch_idx, level, scales, grads, p)


def backward_boxes_levels(grad_out, maps, rois, batch_idx, level, scales, grad_rois, p):
    with grad_rois.device:
        _ops().backward_boxes_levels(grad_out, maps, rois, batch_idx, level, scales, grad_rois, p)


def backward_features(grad_out, features, rois, batch_idx, grad_features, p, argmax=None):
    with grad_features.device:
        _ops().backward_features(grad_out, features, rois, batch_idx, grad_features, p, argmax)


def backward_boxes(grad_out, features, rois, batch_idx, grad_rois, p):
    with grad_rois.device:
        _ops().backward_boxes(grad_out, features, rois, batch_idx, grad_rois, p)


__all__ = ["forward", "forward_levels", "backward_features", "backward_features_levels", "backward_boxes",
           "backward_boxes_levels", "source_dir", "name_expressions", "is_available"]
