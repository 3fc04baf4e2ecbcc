"""Shared fixtures and input generators for the roialign_cy test suites.

Test modules import the plain helpers with ``from conftest import ...`` (pytest puts this
directory on sys.path; there is deliberately no tests/__init__.py).
"""
import functools
import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # Seeded from the test id: every test gets its own stream, and reruns see the same data.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def to_nhwc(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def to_nchw(x):
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def f32_exact(a):
    """``a`` rounded to float32 and held as float64: one input that every dtype sees identically."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def peers_convention(fn):
    """``fn`` with allow_inverted=True: suites that also feed inverted boxes (which the public
    API refuses by default) check the peers' convention for them."""
    return functools.partial(fn, allow_inverted=True)


def make_features(rng, N, C, H, W, dtype=np.float64):
    """Standard-normal NCHW features; float32-representable so one reference serves both dtypes."""
    return f32_exact(rng.standard_normal((N, C, H, W))).astype(dtype)


def _corner_box(rng, lo, hi, size_lo, size_hi):
    # Non-round random coordinates keep samples off the integer grid and the -1 / H boundaries,
    # where a last-bit difference between implementations could flip a sample in or out.
    x1 = rng.uniform(lo, hi)
    y1 = rng.uniform(lo, hi)
    return [x1, y1, x1 + rng.uniform(size_lo, size_hi), y1 + rng.uniform(size_lo, size_hi)]


def random_boxes(rng, K, N, H, W, spatial_scale=1.0):
    """(K, 5) [batch_index, x1, y1, x2, y2] boxes mostly inside an image of H/s x W/s pixels."""
    img = min(H, W) / spatial_scale
    rows = []
    for _ in range(K):
        x1, y1, x2, y2 = _corner_box(rng, -0.1 * img, 0.7 * img, 0.1 * img, 0.6 * img)
        rows.append([rng.integers(N), x1, y1, x2, y2])
    return f32_exact(np.array(rows, dtype=np.float64).reshape(K, 5))


def edge_case_boxes(rng, N, H, W, spatial_scale=1.0):
    """(K, 5) boxes covering the edge cases of docs/conventions.md, one or more of each kind, in image units.

    ordinary, partly outside (each side), wholly outside (beyond every side), tiny, degenerate
    (x1 == x2, y1 == y2, both), inverted (x2 < x1 and/or y2 < y1: refused by default, accepted with
    allow_inverted=True: aligned=True keeps the negative size, aligned=False raises it to 1) and the whole image.
    """
    hi, wi = H / spatial_scale, W / spatial_scale
    u = rng.uniform
    boxes = [
        [u(0.1, 0.3) * wi, u(0.1, 0.3) * hi, u(0.6, 0.9) * wi, u(0.6, 0.9) * hi],  # ordinary
        [u(-0.4, -0.1) * wi, u(0.2, 0.4) * hi, u(0.3, 0.5) * wi, u(0.6, 0.8) * hi],  # past the left edge
        [u(0.4, 0.6) * wi, u(-0.3, -0.1) * hi, u(1.05, 1.3) * wi, u(0.3, 0.5) * hi],  # past top and right
        [u(0.2, 0.4) * wi, u(0.7, 0.9) * hi, u(0.5, 0.7) * wi, u(1.1, 1.3) * hi],  # past the bottom
        [u(1.2, 1.4) * wi, u(0.2, 0.4) * hi, u(1.5, 1.7) * wi, u(0.5, 0.7) * hi],  # wholly right
        [u(-0.6, -0.5) * wi, u(-0.6, -0.5) * hi, u(-0.3, -0.2) * wi, u(-0.3, -0.2) * hi],  # wholly above-left
        [u(0.3, 0.4) * wi, u(1.2, 1.3) * hi, u(0.5, 0.6) * wi, u(1.4, 1.5) * hi],  # wholly below
    ]
    x, y = u(0.2, 0.7) * wi, u(0.2, 0.7) * hi
    boxes.append([x, y, x + u(0.05, 0.3), y + u(0.05, 0.3)])  # tiny (under a pixel)
    x, y = u(0.2, 0.7) * wi, u(0.2, 0.7) * hi
    boxes.append([x, y, x, y + u(0.2, 0.5) * hi])  # degenerate width
    boxes.append([x, y, x + u(0.2, 0.5) * wi, y])  # degenerate height
    boxes.append([x, y, x, y])  # a point
    x, y = u(0.5, 0.8) * wi, u(0.5, 0.8) * hi
    boxes.append([x, y, x - u(0.1, 0.4) * wi, y + u(0.1, 0.4) * hi])  # inverted x
    boxes.append([x, y, x - u(0.1, 0.4) * wi, y - u(0.1, 0.4) * hi])  # inverted both
    boxes.append([0.0, 0.0, wi, hi])  # the whole image
    boxes = np.array(boxes)
    batch = rng.integers(N, size=len(boxes)).astype(np.float64)
    return f32_exact(np.column_stack([batch, boxes]))


def random_rotated_boxes(rng, K, N, H, W, spatial_scale=1.0, max_angle=180.0):
    """(K, 6) [batch_index, cx, cy, w, h, angle_degrees], some partly outside the image."""
    hi, wi = H / spatial_scale, W / spatial_scale
    rows = []
    for _ in range(K):
        rows.append([
            rng.integers(N), rng.uniform(-0.1, 1.1) * wi, rng.uniform(-0.1, 1.1) * hi,
            rng.uniform(0.1, 0.7) * wi, rng.uniform(0.1, 0.7) * hi, rng.uniform(-max_angle, max_angle),
        ])
    return f32_exact(np.array(rows, dtype=np.float64).reshape(K, 6))


def box_forms(boxes_with_batch, N):
    """The three equivalent box inputs of one (K, 1 + D) array whose rows are sorted by image.

    Returns [(boxes, batch_indices), ...] for the (K, 1+D) form, the (K, D) + batch_indices form
    and the per-image list form (its output order is the list order, hence the sorted rows).
    """
    b = boxes_with_batch[:, 0].astype(np.int64)
    assert np.all(np.diff(b) >= 0), "rows must be sorted by batch index"
    coords = np.ascontiguousarray(boxes_with_batch[:, 1:])
    per_image = [np.ascontiguousarray(coords[b == i]) for i in range(N)]
    return [(boxes_with_batch, None), (coords, b), (per_image, None)]


def sort_by_image(boxes_with_batch):
    return boxes_with_batch[np.argsort(boxes_with_batch[:, 0], kind="stable")]


def split_batch(boxes_with_batch):
    """(coords, batch_idx) of a (K, 1 + D) box array, as the reference functions take them."""
    return boxes_with_batch[:, 1:].astype(np.float64), boxes_with_batch[:, 0].astype(np.int64)


@pytest.fixture
def spy(monkeypatch):
    """Record what each core plan's forward and backward receive: (name, plan, args, kwargs)."""
    seen = []
    from roialign_cy._plan import Plan

    def wrap(name, fn):
        def spy_fn(plan, *args, **kwargs):
            seen.append((name, plan, args, kwargs))
            return fn(plan, *args, **kwargs)
        return spy_fn

    for name in ("forward", "backward"):
        monkeypatch.setattr(Plan, name, wrap(name, getattr(Plan, name)))
    return seen


@pytest.fixture
def one_pass(monkeypatch):
    """Record whether each forward_small call took the call (True) or declined it (False)."""
    taken = []
    from roialign_cy import _cpu

    class Recorded:  # a kernel module with forward_small recorded
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return getattr(self.module, name)

        def forward_small(self, *args):
            result = self.module.forward_small(*args)
            taken.append(result is not None)
            return result

    for name in ("_roi_align", "_roi_align_rotated", "_roi_pool"):
        monkeypatch.setattr(_cpu, name, Recorded(getattr(_cpu, name)))
    return taken
