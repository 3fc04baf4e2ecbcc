"""Differential fuzz of the one-pass small calls (``forward_small`` of the kernel modules) against
the general path, through the public functions.

Each generated call is made twice: as given (a plain call takes the one-pass path; any other is
declined and takes the general path) and with ``out=`` (never taken by the one-pass call: the
general path). The two must agree: the same bits (NaN included), shape and dtype, or the same
exception type and message, and neither may change its inputs. The calls are hostile on purpose:
degenerate and huge shapes (H, W, C, PH, PW = 1; K = 1024 / 1025; N = 4096 / 4097), boxes wholly
outside, at +-1e30, subnormal, on x.5 corners, with NaN / inf, batch indices -0.0, N - 1, N, 0.5;
boxes as reversed, Fortran-ordered, column-strided or broadcast (0-stride) views, of the other
float dtype or big-endian; read-only features and views at an offset; numpy scalars, int / float /
str subclasses, 0-d arrays and bools where ints are expected, and 1, 2, 3 or 64 threads.

Seeded numpy generators: the same calls on every run, about 10 s in all. More calls, for a
longer hunt: ``python tests/test_small_calls_fuzz.py --calls 20000 --seed 3`` (each chunk of
calls in a subprocess, so that a crash names its call).
"""
import argparse
import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import roialign_cy
from roialign_cy._params import DEFAULT_MAX_SAMPLES_PER_BIN

# the directory holding the roialign_cy these tests import (as tests/test_cli.py)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(roialign_cy.__file__)))


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyStr(str):
    pass


class SubArray(np.ndarray):
    pass


FUNCTIONS = {
    "roi_align": roialign_cy.roi_align,
    "roi_align_rotated": roialign_cy.roi_align_rotated,
    "roi_pool": roialign_cy.roi_pool,
    "ps_roi_align": roialign_cy.ps_roi_align,
    "ps_roi_pool": roialign_cy.ps_roi_pool,
}


def _pick(rng, values, weights=None):
    """One of ``values`` (weights: relative, default equal); indexing keeps objects intact."""
    if weights is None:
        return values[int(rng.integers(len(values)))]
    p = np.asarray(weights, np.float64)
    return values[int(rng.choice(len(values), p=p / p.sum()))]


class Draws:
    """A seeded numpy generator that also says whether this call is a hostile one (about half
    are: the others are plain calls, of benign forms only, that the one-pass path takes unless
    their values send them to the general path)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.hostile = bool(self.rng.random() < 0.5)

    def __getattr__(self, name):
        return getattr(self.rng, name)


def _rare(rng, p):
    """A hostile choice, in hostile calls only."""
    return rng.hostile and bool(rng.random() < p)


def _maybe(rng, p):
    return bool(rng.random() < p)


# ---------------------------------------------------------------------------------------------
# generated arguments: mostly plain and valid (the one-pass path must match), some hostile


def _output_size(rng, ph, pw):
    if not _rare(rng, 0.4):
        return ph if ph == pw and _maybe(rng, 0.5) else (ph, pw)
    kind = _pick(rng, ["np pair", "np int", "myint", "list", "array", "bad"])
    if kind == "np pair":
        return (np.int64(ph), np.int32(pw))
    if kind == "np int":
        return np.int64(ph) if ph == pw else (ph, np.int16(pw))
    if kind == "myint":
        return (MyInt(ph), pw)
    if kind == "list":
        return [ph, pw]
    if kind == "array":
        return np.array([ph, pw])
    return _pick(rng, [0, (ph, 0), (ph,), (ph, pw, 1), -1, (True, pw), 2.0, (ph, 2**31), None])


def _spatial_scale(rng):
    """Plain floats and ints, extreme ones too (valid: the one-pass path's), then other types
    and invalid values in hostile calls."""
    if _rare(rng, 0.2):
        return _pick(rng, [np.float32(0.5), np.float64(0.25), np.int64(1), MyFloat(0.5),
                           MyInt(1), True, 0.0, -1.0, -0.0, float("nan"), float("inf"), 10**30,
                           "1", None])
    if _maybe(rng, 0.15):
        return _pick(rng, [1e-30, 1e30, 5e-324, 2.2e-308, 3.5e38, 1e300, 3.4028235e38, 1e-45,
                           2**31, 2**31 - 1, 7])
    return _pick(rng, [1.0, 0.5, 0.25, 0.0625, 2.0, 1.5, 1, 2, 1 / 3])


def _sampling_ratio(rng):
    if _rare(rng, 0.15):
        return _pick(rng, [np.int64(2), MyInt(2), True, False, -2, 2.0, None, 2**40 + 1])
    if _maybe(rng, 0.1):
        return _pick(rng, [8, 33, 2**30, 2**30 + 1, 2**40])
    return _pick(rng, [-1, 0, 1, 2, 3, 4])


def _max_samples(rng):
    if _rare(rng, 0.1):
        return _pick(rng, [np.int64(64), MyInt(64), 0, -1, True, 4.0])
    if _maybe(rng, 0.2):
        return _pick(rng, [1, 2, 4, 9, 16, 64, 2**30, 2**30 + 1])
    return DEFAULT_MAX_SAMPLES_PER_BIN


def _flag(rng, value):
    if not _rare(rng, 0.1):
        return value
    return _pick(rng, [np.bool_(value), int(value), None, "yes", not value])


def _choice(rng, value, spellings):
    """A str argument ``value``: as given, or a subclass / numpy / wrong spelling of it."""
    if not _rare(rng, 0.1):
        return value
    return _pick(rng, [MyStr(value), np.str_(value), value.lower(), value.encode(),
                       np.array(value), None] + list(spellings))


def _n_threads(rng):
    if _rare(rng, 0.3):
        return _pick(rng, [np.int64(2), MyInt(2), 0, -1, True, 2.0, 2**31])
    return _pick(rng, [None, 1, 2, 3, 64, 2**31 - 1], [3, 3, 3, 3, 1, 0.3])


def _corners(rng, kind, h_img, w_img):
    """One [x1, y1, x2, y2] of the given kind, in image units."""
    def u(lo, hi):
        return lo + (hi - lo) * rng.random()

    if kind == "inside":
        x1, y1 = u(-0.1, 0.8) * w_img, u(-0.1, 0.8) * h_img
        return [x1, y1, x1 + u(0.05, 0.8) * w_img, y1 + u(0.05, 0.8) * h_img]
    if kind == "outside":
        side = rng.integers(4)
        x1 = _pick(rng, [-3.0, 1.5, 0.2]) * w_img if side < 2 else u(-5, -2) * w_img
        y1 = _pick(rng, [-3.0, 1.5, 0.2]) * h_img if side >= 2 else u(1.5, 4) * h_img
        return [x1, y1, x1 + u(0, 2) * w_img, y1 + u(0, 2) * h_img]
    if kind == "huge":
        big = _pick(rng, [1e30, 3e38, 1e20, 2.0**62, 2.0**63, 1e10])
        return _pick(rng, [[-big, -big, big, big], [0, 0, big, big], [-big, 0, 0, 1],
                           [big, big, big, big], [-big, -big, -big, -big], [0, -big, 1, big]])
    if kind == "tiny":
        t = _pick(rng, [1e-40, 1e-45, 5e-324, 1e-310, 1e-30, 0.0, -0.0])
        return _pick(rng, [[t, t, t, t], [0, 0, t, t], [-t, -t, t, t], [t, 0, 2 * t, 1]])
    if kind == "half":  # x.5 corners in feature pixels, after the scale
        return [rng.integers(-2, 8) + 0.5, rng.integers(-2, 8) + 0.5,
                rng.integers(3, 12) + 0.5, rng.integers(3, 12) + 0.5]
    if kind == "degenerate":
        x, y = u(0, w_img), u(0, h_img)
        return _pick(rng, [[x, y, x, y], [x, y, x, y + 2], [x, y, x + 2, y]])
    if kind == "inverted":
        x, y = u(0, w_img), u(0, h_img)
        return [x, y, x - u(0.1, 3), y + _pick(rng, [-1.0, 1.0]) * u(0.1, 3)]
    return [0.0, 0.0, w_img, h_img]  # the whole image


def _rotated(rng, kind, h_img, w_img):
    """One [cx, cy, w, h, angle] of the given kind."""
    def u(lo, hi):
        return lo + (hi - lo) * rng.random()

    angle = _pick(rng, [u(-180, 180), 0.0, 90.0, -90.0, 45.0, 1e30, -3e38, 1e-40, 720.5])
    if kind == "inside":
        return [u(-0.1, 1.1) * w_img, u(-0.1, 1.1) * h_img, u(0.05, 0.7) * w_img,
                u(0.05, 0.7) * h_img, angle]
    if kind == "outside":
        return [u(2, 5) * w_img, u(-5, -2) * h_img, u(0.1, 1) * w_img, u(0.1, 1) * h_img, angle]
    if kind == "huge":
        big = _pick(rng, [1e30, 3e38, 1e20, 1e10])
        return _pick(rng, [[0, 0, big, big, angle], [big, -big, 1, 1, angle],
                           [1, 1, big, 0, angle], [1, 1, 0.5, big, angle]])
    if kind == "tiny":
        t = _pick(rng, [1e-40, 5e-324, 0.0, -0.0, 1e-30])
        return [t, t, t, t, angle]
    if kind == "half":
        return [rng.integers(0, 8) + 0.5, rng.integers(0, 8) + 0.5, rng.integers(0, 6) + 0.5,
                rng.integers(0, 6) + 0.5, angle]
    if kind == "degenerate":
        return [u(0, w_img), u(0, h_img), _pick(rng, [0.0, 2.0]), _pick(rng, [0.0, 0.0, 3.0]),
                angle]
    if kind == "inverted":
        return [u(0, w_img), u(0, h_img), -u(0.1, 3), _pick(rng, [-1.0, 1.0]) * u(0.1, 3), angle]
    return [w_img / 2, h_img / 2, w_img, h_img, 0.0]


BOX_KINDS = ["inside", "outside", "huge", "tiny", "half", "degenerate", "inverted", "whole"]
BOX_WEIGHTS = [12, 2, 1, 1, 2, 1, 1, 1]


def _boxes(rng, K, N, H, W, scale, rotated, dtype):
    """(K, 5) or (K, 6) float64 rows, mostly valid, then hostile in one of many ways; returns
    (boxes as passed, description)."""
    try:
        s = float(scale)
        s = min(max(s, 1e-3), 1e3) if np.isfinite(s) and s > 0 else 1.0
    except (TypeError, ValueError):
        s = 1.0
    h_img, w_img = H / s, W / s
    mostly = _pick(rng, BOX_KINDS, BOX_WEIGHTS)
    rows = []
    for _ in range(K):
        kind = mostly if rng.random() < 0.93 else _pick(rng, BOX_KINDS, BOX_WEIGHTS)
        coords = (_rotated if rotated else _corners)(rng, kind, h_img, w_img)
        rows.append([float(rng.integers(N))] + [float(c) for c in coords])
    b = np.array(rows, np.float64).reshape(K, 6 if rotated else 5)
    what = [mostly]
    if _maybe(rng, 0.15):  # an edge batch index (or one out of range in a hostile call)
        k = int(rng.integers(K))
        valid = [0.0, -0.0, N - 1]
        b[k, 0] = _pick(rng, valid + ([N, 0.5, -1.0, N - 0.5, 1e300, -1e300, 2.0**63]
                                      if rng.hostile else []))
        what.append(f"batch {b[k, 0]!r} at {k}")
    if _rare(rng, 0.1):  # NaN / inf somewhere
        k, col = int(rng.integers(K)), int(rng.integers(b.shape[1]))
        b[k, col] = _pick(rng, [np.nan, np.inf, -np.inf])
        what.append(f"{b[k, col]} at ({k}, {col})")
    form = _pick(rng, ["contiguous", "reversed", "fortran", "columns", "negative columns",
                       "broadcast", "other dtype", "big-endian", "int", "list", "1-d", "3-d",
                       "wrong width", "transposed"],
                 [20, 3, 3, 3, 2, 1] + ([2, 1, 1, 1, 0.3, 0.3, 0.5, 0.3] if rng.hostile
                                        else [0] * 8))
    what.append(form)
    with np.errstate(over="ignore"):
        cast = b.astype(dtype)
    if form == "contiguous":
        return cast, what
    if form == "reversed":
        return np.ascontiguousarray(cast[::-1])[::-1], what
    if form == "fortran":
        return np.asfortranarray(cast), what
    if form == "columns":
        wide = np.repeat(cast, 3, axis=1)
        return wide[:, ::3], what
    if form == "negative columns":
        return np.ascontiguousarray(cast[:, ::-1])[:, ::-1], what
    if form == "broadcast":  # one row K times, with a row stride of 0 (read-only)
        return np.broadcast_to(cast[:1], cast.shape), what
    if form == "other dtype":
        with np.errstate(over="ignore"):
            return b.astype(np.float64 if dtype == np.float32 else np.float32), what
    if form == "big-endian":
        return cast.astype(cast.dtype.newbyteorder(">")), what
    if form == "int":
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(b).clip(-2**40, 2**40).astype(np.int64), what
    if form == "list":
        return cast.tolist(), what
    if form == "1-d":
        return cast[0], what
    if form == "3-d":
        return cast[None], what
    if form == "wrong width":
        return np.ascontiguousarray(cast[:, :-1]), what
    return cast.T, what


def _features(rng, N, C, H, W, dtype, layout):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    if _maybe(rng, 0.05):
        x.flat[int(rng.integers(x.size))] = _pick(rng, [np.nan, np.inf, -np.inf, -0.0])
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    form = _pick(rng, ["plain", "read-only", "offset view", "non-contiguous", "float16",
                       "big-endian", "rank 3", "subclass", "int"],
                 [20, 3, 3] + ([1, 0.3, 0.3, 0.3, 0.3, 0.3] if rng.hostile else [0] * 6))
    if form == "read-only":
        x.flags.writeable = False
    elif form == "offset view":  # a contiguous view that starts past its buffer's start
        big = np.concatenate([np.full((1,) + x.shape[1:], 7, x.dtype), x])
        x = big[1:]
    elif form == "non-contiguous":
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    elif form == "float16":
        x = x.astype(np.float16)
    elif form == "big-endian":
        x = x.astype(x.dtype.newbyteorder(">"))
    elif form == "rank 3":
        x = x[0]
    elif form == "subclass":
        x = x.view(SubArray)
    elif form == "int":
        x = np.nan_to_num(x, posinf=0, neginf=0).astype(np.int32)
    return x, form


def generate(rng):
    """One call: (name, features, boxes, keywords, description)."""
    name = _pick(rng, list(FUNCTIONS), [4, 2, 2, 2, 2])
    rotated = name == "roi_align_rotated"
    dtype = _pick(rng, [np.float32, np.float64])
    layout = _pick(rng, ["NCHW", "NHWC"])
    shape_kind = _pick(rng, ["small", "ones", "many images", "many boxes", "large bins", "busy"],
                       [12, 2, 1, 2, 1, 1])
    N = int(_pick(rng, [1, 1, 2, 3]))
    C = int(_pick(rng, [1, 2, 3, 4, 5, 8, 16, 17, 20]))
    H, W = int(_pick(rng, [1, 2, 3, 5, 8, 13])), int(_pick(rng, [1, 2, 3, 5, 8, 13]))
    K = int(_pick(rng, [1, 2, 3, 5, 8, 17, 40]))
    ph, pw = int(_pick(rng, [1, 2, 3, 4, 7])), int(_pick(rng, [1, 2, 3, 4, 7]))
    if _maybe(rng, 0.4):
        pw = ph
    if shape_kind == "ones":
        N, C, H, W, ph, pw = 1, 1, 1, 1, 1, 1
        K = int(_pick(rng, [1, 2, 5]))
    elif shape_kind == "many images":
        N, C, H, W = int(_pick(rng, [4095, 4096, 4097])), 1, int(_pick(rng, [1, 2])), 2
        K = int(_pick(rng, [1, 3, 8]))
    elif shape_kind == "many boxes":
        K, C, H, W = int(_pick(rng, [1023, 1024, 1025])), int(_pick(rng, [1, 2])), 6, 7
        ph, pw = int(_pick(rng, [1, 2])), int(_pick(rng, [1, 2]))
    elif shape_kind == "busy":  # work enough for several threads (and NCHW blocks of planes)
        N, C, H, W = int(_pick(rng, [1, 2])), int(_pick(rng, [16, 20, 33])), 13, 11
        K, ph, pw = int(_pick(rng, [64, 300])), 7, int(_pick(rng, [5, 7]))
    elif shape_kind == "large bins":
        ph, pw = int(_pick(rng, [1, 64, 257])), int(_pick(rng, [1, 64, 300]))
        K, C = int(_pick(rng, [1, 2])), 1
    if name.startswith("ps_") and shape_kind == "large bins":
        ph, pw = _pick(rng, [(1, 64), (257, 1), (16, 16), (1, 1)])
    if name.startswith("ps_") and rng.random() < 0.85:
        C = int(_pick(rng, [1, 2])) * ph * pw  # the channel rule (usually) met
    scale = _spatial_scale(rng)
    # a large scale with adaptive sampling takes huge grids: the bound keeps them from running
    # for minutes (the guard itself is not what this test is about)
    far = isinstance(scale, (int, float)) and not 0 < scale <= 4
    x, fform = _features(rng, N, C, H, W, dtype, layout)
    boxes, bform = _boxes(rng, K, N, H, W, scale, rotated, dtype)
    kw = {"output_size": _output_size(rng, ph, pw), "spatial_scale": scale}
    if _maybe(rng, 0.9):
        kw["layout"] = _choice(rng, layout, ["nchw", "CHW"])
    if _maybe(rng, 0.5):
        kw["n_threads"] = _n_threads(rng) if shape_kind != "busy" else _pick(rng, [2, 3, 64])
    if _maybe(rng, 0.7):
        kw["allow_inverted"] = _flag(rng, bool(rng.random() < 0.5))
    if name in ("roi_align", "roi_align_rotated", "ps_roi_align"):
        kw["sampling_ratio"] = _sampling_ratio(rng)
        kw["max_samples_per_bin"] = DEFAULT_MAX_SAMPLES_PER_BIN if far else _max_samples(rng)
    if name in ("roi_align", "roi_align_rotated"):
        kw["aligned"] = _flag(rng, bool(rng.random() < 0.5))
    if name == "roi_align":
        kw["mode"] = _choice(rng, _pick(rng, ["avg", "max", "onnx_max"]), ["mean", "AVG"])
    if rotated:
        kw["clockwise"] = _flag(rng, bool(rng.random() < 0.5))
    if name == "ps_roi_pool" and _maybe(rng, 0.6):
        kw["edge"] = _choice(rng, _pick(rng, ["torchvision", "image"]), ["edge", "Image"])
    if name == "roi_pool" and _maybe(rng, 0.15):
        kw["return_argmax"] = (_pick(rng, [False, np.False_, 0, None, "", []]) if rng.hostile
                               else False)
    if _rare(rng, 0.05):
        kw["backend"] = _pick(rng, ["cpu", "auto", MyStr("cpu"), "CPU", None])
    description = {"features": (fform, tuple(np.shape(x)), str(getattr(x, "dtype", ""))),
                   "boxes": bform, "shape": shape_kind}
    return name, x, boxes, kw, description


# ---------------------------------------------------------------------------------------------
# the comparison


def _outcome(fn, x, boxes, kw):
    try:
        return "returned", fn(x, boxes, **kw)
    except (ValueError, TypeError, MemoryError) as exc:
        return type(exc).__name__, str(exc)


def _snapshot(a):
    if isinstance(a, np.ndarray):
        return a.copy(), a.dtype, a.strides
    return repr(a)


def _same_input(before, a):
    if isinstance(a, np.ndarray):
        b, dtype, strides = before
        return (a.dtype == dtype and a.strides == strides
                and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return before == repr(a)


def check(name, x, boxes, kw):
    """None when the plain call and the general path agree; else what differs."""
    fn = FUNCTIONS[name]
    saved = _snapshot(x), _snapshot(boxes)
    fast = _outcome(fn, x, boxes, kw)
    if not (_same_input(saved[0], x) and _same_input(saved[1], boxes)):
        return "the call changed its inputs"
    if fast[0] == "returned":
        got = fast[1]
        if isinstance(got, tuple):  # roi_pool with an arg-max: compare the pooled part
            got = got[0]
        out = np.full(got.shape, np.nan, got.dtype)
        general = _outcome(fn, x, boxes, dict(kw, out=out))
        if general[0] != "returned":
            return f"the plain call returned; the general path raised {general}"
        want = general[1][0] if isinstance(general[1], tuple) else general[1]
        if want is not out and not np.shares_memory(want, out):
            return "the general path did not write out="
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"shape/dtype {got.shape} {got.dtype} != {want.shape} {want.dtype}"
        # bit for bit (NaN payloads and signed zeros included)
        if got.tobytes() != want.tobytes():
            bits = got.view(np.uint8).reshape(got.shape + (-1,))
            diff = np.argwhere((bits != want.view(np.uint8).reshape(bits.shape)).any(-1))
            return f"different bits at {len(diff)} positions, e.g. {diff[:3].tolist()}"
        return None
    # the general path's own refusal: the arguments are checked before out's shape, and out=
    # of the shape it asks for then reaches the checks made after it (table sizes)
    out = np.empty((1, 1, 1, 1), np.float32)
    general = _outcome(fn, x, boxes, dict(kw, out=out))
    asked = re.match(r"out must have shape (\([0-9, ]*\)) and dtype (\w+)", str(general[1]))
    if asked:
        try:
            out = np.empty(ast.literal_eval(asked.group(1)), asked.group(2))
        except MemoryError:  # (an output past memory: the plain call must have said so)
            return None if fast[0] == "MemoryError" else f"the plain call raised {fast}"
        general = _outcome(fn, x, boxes, dict(kw, out=out))
    if general[0] == "returned":
        return f"the plain call raised {fast}; the general path accepts the call"
    if fast != general:
        return f"plain call {fast} != general path {general}"
    return None


def _describe(seed, i, name, x, boxes, kw, description):
    shown = {k: (v if not isinstance(v, np.ndarray) or v.size < 4 else f"array{v.shape}")
             for k, v in kw.items()}
    return f"seed={seed} call={i} {name} {description} kw={shown!r}"


def run_calls(seed, calls, start=0):
    """Failures of calls start..calls of ``seed`` (each call's generator is seeded by its
    index, so that any call replays alone)."""
    failures = []
    for i in range(start, calls):
        rng = Draws([seed, i])
        name, x, boxes, kw, description = generate(rng)
        why = check(name, x, boxes, kw)
        if why:
            failures.append(f"{_describe(seed, i, name, x, boxes, kw, description)}: {why}")
    return failures


# 3000 calls: about 7 s on two cores
SEEDS_AND_CALLS = [(20260101, 3000)]


@pytest.mark.parametrize("seed, calls", SEEDS_AND_CALLS)
def test_one_pass_calls_match_the_general_path(one_pass, seed, calls):
    failures = run_calls(seed, calls)
    assert not failures, "\n".join(failures[:20])
    # the generator is mostly plain calls: the one-pass path ran many of them
    assert sum(one_pass) > calls // 4, (sum(one_pass), len(one_pass))


# ---------------------------------------------------------------------------------------------
# hand-picked hostile calls

def _x(N=1, C=8, H=6, W=6, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((N, C, H, W)).astype(dtype)


BOXES = np.array([[0, 0, 0, 3, 3], [0, 1, 1, 5, 5]], np.float32)


@pytest.mark.parametrize("name, kw", [
    ("ps_roi_pool", {"edge": np.array("image")}),
    ("ps_roi_pool", {"edge": np.array("torchvision")}),
    ("ps_roi_pool", {"edge": MyStr("image")}),
    ("roi_pool", {"return_argmax": 0}),
    ("roi_pool", {"return_argmax": None}),
    ("roi_pool", {"return_argmax": ""}),
    ("roi_pool", {"return_argmax": np.False_}),
    ("roi_align", {"mode": np.array("max")}),
    ("roi_align", {"layout": np.array("NCHW")}),
    ("roi_align", {"sampling_ratio": np.array(2)}),
    ("roi_align", {"output_size": (np.array(2), 2)}),
])
def test_scalars_that_are_not_plain(name, kw):
    """Arguments that merely compare equal to a valid value (0-d arrays, falsy non-bools) are the
    general path's to accept or refuse, with its words."""
    x, boxes = _x(), BOXES.copy()
    assert check(name, x, boxes, dict({"output_size": 2}, **kw)) is None


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [3.5e38, 1e300, 5e-324, 1e-45])
def test_extreme_scales(name, dtype, scale):
    """Scales whose product with a coordinate overflows the dtype (or underflows to 0)."""
    rotated = name == "roi_align_rotated"
    boxes = (np.array([[0, 0, 0, 2, 2, 30], [0, 1, 0, 0, 4, 0], [0, 0.5, 0.5, 4.5, 4.5, -0.0]])
             if rotated else np.array([[0, 0, 0, 2, 2], [0, 1, 0, 0, 4], [0, 0.5, 0.5, 4.5, 4.5]]))
    for n_threads in (1, 3):
        why = check(name, _x(dtype=dtype), boxes.astype(dtype),
                    {"output_size": 2, "spatial_scale": scale, "n_threads": n_threads,
                     "allow_inverted": True})
        assert why is None, why


@pytest.mark.parametrize("K", [1, 1024, 1025])
@pytest.mark.parametrize("N", [1, 4096, 4097])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_box_and_image_counts_at_the_bounds(name, K, N):
    rng = np.random.default_rng(K * N)
    rotated = name == "roi_align_rotated"
    x = rng.standard_normal((N, 4, 2, 3)).astype(np.float32)
    rows = [[rng.integers(N), 0.3, 0.2, 2.5, 1.5] + ([10.0] if rotated else []) for _ in range(K)]
    boxes = np.array(rows, np.float32)
    boxes[0, 0], boxes[-1, 0] = N - 1, -0.0
    why = check(name, x, boxes, {"output_size": 2 if name.startswith("ps_") else 3,
                                 "n_threads": 2})
    assert why is None, why


# ---------------------------------------------------------------------------------------------
# an output past memory: declined, so that the general path says so, with its message


class _NoMemory:
    """numpy, but every ``empty`` is past memory."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        raise MemoryError("test: no memory")


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_an_output_past_memory_is_declined(monkeypatch, name):
    """The one-pass call allocates its output last: when that fails it frees its tables and
    declines (it used to raise numpy's MemoryError and leak them), and the general path runs the
    call (here: its own numpy is not short of memory)."""
    from roialign_cy import _cpu

    for module in ("_roi_align", "_roi_align_rotated", "_roi_pool"):
        monkeypatch.setattr(getattr(_cpu, module), "np", _NoMemory())
    rotated = name == "roi_align_rotated"
    boxes = np.array([[0, 2, 2, 3, 3, 20]] if rotated else [[0, 1, 1, 4, 4]], np.float32)
    if not name.endswith("pool"):  # (roi_pool's general path takes its windows from np.empty)
        why = check(name, _x(), boxes, {"output_size": 2})
        assert why is None, why
    module = getattr(_cpu, "_roi_align_rotated" if rotated else
                     "_roi_pool" if name.endswith("pool") else "_roi_align")
    args = {"roi_align": ("roi_align", _x(), boxes, 2, 1.0, -1, False, "avg", "NCHW", None, 64,
                          False),
            "ps_roi_align": ("ps_roi_align", _x(), boxes, 2, 1.0, -1, True, "avg", "NCHW", None,
                             64, False),
            "roi_align_rotated": (_x(), boxes, 2, 1.0, -1, True, False, "NCHW", None, 64, False),
            "roi_pool": ("roi_pool", _x(), boxes, 2, 1.0, "NCHW", None, False, "torchvision"),
            "ps_roi_pool": ("ps_roi_pool", _x(), boxes, 2, 1.0, "NCHW", None, False,
                            "torchvision")}[name]
    assert module.forward_small(*args) is None


_HUGE_OUTPUT = """
import resource, sys
import numpy as np
import roialign_cy

resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

# 2**20 channels of 1 pixel, 2**18 bins per box: a 1 TiB output (the one-pass bounds take it)
x = np.zeros((1, 1 << 20, 1, 1), np.float32)
calls = {
    "roi_align": lambda: roialign_cy.roi_align(x, np.array([[0, 0, 0, 1, 1]], np.float32), 512,
                                               sampling_ratio=1),
    "roi_align_rotated": lambda: roialign_cy.roi_align_rotated(
        x, np.array([[0, 0.5, 0.5, 1, 1, 0]], np.float32), 512, sampling_ratio=1),
    "roi_pool": lambda: roialign_cy.roi_pool(np.zeros((1, 1, 1, 1 << 20), np.float32),
                                             np.array([[0, 0, 0, 1, 1]], np.float32), 512,
                                             layout="NHWC"),
}
for name, call in calls.items():
    for i in range(350):
        if i == 50:  # (the allocator's first arenas)
            before = rss()
        try:
            call()
        except MemoryError as exc:
            assert str(exc).startswith("cannot allocate the output of shape"), exc
        else:
            raise AssertionError(name + ": a 1 TiB output was allocated")
    grown = rss() - before
    assert grown < 20, f"{name}: {grown:.0f} MB more after 300 calls"
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc (Linux)")
def test_an_output_past_memory_leaks_nothing():
    """For real, under an address-space limit: each call refused with the general path's
    MemoryError, and no memory kept (the one-pass call leaked its tables, 430 kB a call for the
    rotated one)."""
    # (run where the tests' roialign_cy is the one imported: the installed package in CI, the
    # built checkout here; a source checkout as the current directory would shadow it)
    done = subprocess.run([sys.executable, "-c", _HUGE_OUTPUT], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE_PARENT,
                          env=dict(os.environ, PYTHONPATH=PACKAGE_PARENT))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        for line in run_calls(args.seed, args.start + args.chunk, args.start):
            print(line, flush=True)
        return
    bad = 0
    for start in range(args.start, args.calls, args.chunk):
        done = subprocess.run([sys.executable, __file__, "--worker", "--seed", str(args.seed),
                               "--start", str(start), "--chunk",
                               str(min(args.chunk, args.calls - start))],
                              capture_output=True, text=True)
        sys.stdout.write(done.stdout)
        if done.returncode:
            bad += 1
            print(f"calls {start}..{start + args.chunk} of seed {args.seed}: the worker died "
                  f"({done.returncode}): {done.stderr[-2000:]}")
        bad += done.stdout.count("\n")
    print(f"{args.calls} calls of seed {args.seed}: {bad} failures")


if __name__ == "__main__":
    _main()
