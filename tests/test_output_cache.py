"""The output block cache (_buffers): large host outputs reuse the memory of dropped ones, never
of live ones (or their views), come back zeroed where the operator needs it, and the cache can be
sized or turned off."""
import gc
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import roialign_cy
from roialign_cy import _buffers

BIG = (2, 64, 96, 96)  # 4.5 MiB of float32 gradient: above the cache's minimum size
BIG_BOXES = 256  # (256, 64, 7, 7) float32 output: 3 MiB... made bigger below


@pytest.fixture
def cache():
    previous = roialign_cy.set_output_cache(256 << 20)
    roialign_cy.set_output_cache(0)  # start empty
    roialign_cy.set_output_cache(256 << 20)
    yield
    roialign_cy.set_output_cache(previous)


def _address(a):
    return a.__array_interface__["data"][0]


def _problem(rng, k=600):
    x = rng.standard_normal(BIG, dtype=np.float32)
    c = rng.uniform(0, 96, (k, 2))
    wh = rng.uniform(2, 40, (k, 2))
    b = np.concatenate([rng.integers(0, 2, (k, 1)), c - wh / 2, c + wh / 2], 1).astype(np.float32)
    return x, b


def test_a_dropped_output_is_reused_and_a_live_one_never(rng, cache):
    x, b = _problem(rng)
    first = roialign_cy.roi_align(x, b, 7, 1.0, 2, True)
    assert first.nbytes >= _buffers.MIN_BYTES and first.base is not None
    want = first.copy()
    addr = _address(first)
    second = roialign_cy.roi_align(x, b, 7, 1.0, 2, True)  # first is alive: other memory
    assert _address(second) != addr
    np.testing.assert_array_equal(second, want)
    del first
    third = roialign_cy.roi_align(x, b, 7, 1.0, 2, True)
    assert _address(third) == addr  # the dropped block, reused
    np.testing.assert_array_equal(third, want)
    np.testing.assert_array_equal(second, want)


def test_a_view_keeps_the_block(rng, cache):
    x, b = _problem(rng)
    out = roialign_cy.roi_align(x, b, 7, 1.0, 2, True)
    view = out[10:20]
    addr = _address(out)
    del out
    gc.collect()
    again = roialign_cy.roi_align(x, b, 7, 1.0, 2, True)
    assert not np.shares_memory(again, view)
    assert _address(again) != addr
    np.testing.assert_array_equal(view, again[10:20])


def test_reused_gradient_memory_is_zeroed(rng, cache):
    x, b = _problem(rng, k=20)  # few boxes: most of the gradient must be exactly 0
    g = np.ones((len(b), 64, 7, 7), np.float32)
    want = roialign_cy.roi_align_backward(g, x.shape, b, 7, 1.0, 2, True)
    addr = _address(want)
    want = want.copy()
    # dirty a block of the gradient's size, drop it, and take the gradient again
    dirty = _buffers.host_array(BIG, np.float32)
    dirty.fill(np.nan)
    del dirty
    got = roialign_cy.roi_align_backward(g, x.shape, b, 7, 1.0, 2, True)
    assert _address(got) != 0
    np.testing.assert_array_equal(got, want)
    assert (want == 0).mean() > 0.5
    del addr


def _gradient(kind, rng, dtype):
    """One feature gradient of each CPU loop that writes a gradient over (RoIAlign's NCHW block
    and plane loops, roi_pool's from the arg-max) or adds into one zeroed for it (the rest), on
    4.5 MiB (float32) maps where image 1 has no box."""
    x = rng.standard_normal(BIG, dtype=np.float32).astype(dtype)
    k = 20 if kind == "few" else 600
    c = rng.uniform(0, 96, (k, 2))
    wh = rng.uniform(2, 40, (k, 2))
    b = np.concatenate([np.zeros((k, 1)), c - wh / 2, c + wh / 2], 1).astype(dtype)
    if kind in ("avg", "few", "max", "chunks", "nhwc"):
        g = rng.standard_normal((k, 64, 7, 7)).astype(dtype)
        mode = "max" if kind == "max" else "avg"
        if kind == "nhwc":
            return lambda: roialign_cy.roi_align_backward(
                np.ascontiguousarray(g.transpose(0, 2, 3, 1)), x.transpose(0, 2, 3, 1).shape, b,
                7, 1.0, 2, True, layout="NHWC")
        return lambda: roialign_cy.roi_align_backward(g, x if mode == "max" else x.shape, b, 7,
                                                      1.0, 2, True, mode=mode)
    if kind == "rotated":
        rb = np.concatenate([b[:, :1], c, wh, rng.uniform(-90, 90, (k, 1))], 1).astype(dtype)
        g = rng.standard_normal((k, 64, 7, 7)).astype(dtype)
        return lambda: roialign_cy.roi_align_rotated_backward(g, x.shape, rb, 7, 1.0, 2, True)
    if kind in ("roi_pool", "roi_pool_argmax"):
        g = rng.standard_normal((k, 64, 7, 7)).astype(dtype)
        _, am = roialign_cy.roi_pool(x, b, 7, return_argmax=True)
        if kind == "roi_pool":
            return lambda: roialign_cy.roi_pool_backward(g, x, b, 7)
        return lambda: roialign_cy.roi_pool_backward(g, x.shape, b, 7, argmax=am)
    g = rng.standard_normal((k, 64 // 16, 4, 4)).astype(dtype)
    if kind.startswith("ps_roi_align"):
        return lambda: roialign_cy.ps_roi_align_backward(g, x.shape, b, 4, 1.0, 2)
    return lambda: roialign_cy.ps_roi_pool_backward(g, x.shape, b, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["avg", "few", "max", "chunks", "nhwc", "rotated", "roi_pool",
                                  "roi_pool_argmax", "ps_roi_align_blocks", "ps_roi_align_planes",
                                  "ps_roi_align_chunks", "ps_roi_pool_blocks", "ps_roi_pool_planes"])
def test_gradients_written_over_a_dirty_block(rng, cache, monkeypatch, kind, dtype):
    """The CPU gradients come in blocks that are not zeroed first: each loop writes all of it,
    or zeroes it itself. A block full of NaN must give the gradient of a clean one."""
    from roialign_cy import _cpu

    if kind.endswith("chunks"):  # several table chunks: the first writes over, the others add
        monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", 2000)
    # each loop order of the position-sensitive gradients
    previous = _cpu.force_ps_blocks(not kind.endswith("planes") if kind.startswith("ps_") else None)
    try:
        grad = _gradient(kind, rng, dtype)
        roialign_cy.set_output_cache(0)
        want = grad()  # a fresh block: the pages come zeroed
        assert np.isfinite(want).all() and (want == 0).any() and (want != 0).any()
        roialign_cy.set_output_cache(256 << 20)
        dirty = _buffers.host_array(want.shape, want.dtype)
        dirty.fill(np.nan)
        addr = _address(dirty)
        del dirty
        got = grad()
        assert _address(got) == addr  # the dirty block was the one reused
        np.testing.assert_array_equal(got, want)
    finally:
        _cpu.force_ps_blocks(previous)


@pytest.mark.parametrize("zeros", [False, True])
def test_host_array(cache, zeros):
    a = _buffers.host_array((3, 1 << 20), np.float64, zeros)
    assert a.shape == (3, 1 << 20) and a.dtype == np.float64 and a.flags.c_contiguous
    assert a.flags.writeable and _address(a) % _buffers.ALIGN == 0
    if zeros:
        assert not a.any()
    a[:] = 7
    small = _buffers.host_array((10,), np.float32, zeros)  # below the minimum: plain numpy
    assert small.base is None


def test_blocks_of_another_size_are_not_used(cache):
    a = _buffers.host_array((8 << 20,), np.uint8)
    addr = _address(a)
    del a
    b = _buffers.host_array((4 << 20,), np.uint8)  # half the block: too wasteful to reuse
    assert _address(b) != addr
    c = _buffers.host_array((7 << 20,), np.uint8)  # 7/8 of it: reused
    assert _address(c) == addr


def test_limit_and_off(cache):
    a = _buffers.host_array((8 << 20,), np.uint8)
    del a
    assert roialign_cy.output_cache()["idle_blocks"] == 1
    assert roialign_cy.output_cache()["idle_bytes"] >= 8 << 20
    assert roialign_cy.set_output_cache(0) == 256 << 20
    assert roialign_cy.output_cache() == {"max_bytes": 0, "idle_bytes": 0, "idle_blocks": 0}
    a = _buffers.host_array((8 << 20,), np.uint8)
    assert a.base is None  # the cache is off: plain numpy arrays
    roialign_cy.set_output_cache(20 << 20)
    blocks = [_buffers.host_array((8 << 20,), np.uint8) for _ in range(3)]
    del blocks
    info = roialign_cy.output_cache()
    assert info["idle_bytes"] <= 20 << 20 and info["idle_blocks"] == 2  # the oldest freed


@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1.5, TypeError), ("1", TypeError),
                                        (True, TypeError)])
def test_bad_limit(value, exc):
    with pytest.raises(exc, match="max_bytes"):
        roialign_cy.set_output_cache(value)


@pytest.mark.parametrize("value", ["lots", "-5"])
def test_bad_environment_variable_is_refused_at_import(value):
    env = dict(os.environ, ROIALIGN_CY_CACHE_BYTES=value)
    r = subprocess.run([sys.executable, "-c", "import roialign_cy"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "ROIALIGN_CY_CACHE_BYTES" in r.stderr


def test_environment_variable_sets_the_limit():
    env = dict(os.environ, ROIALIGN_CY_CACHE_BYTES="0")
    code = ("import numpy as np, roialign_cy; from roialign_cy import _buffers; "
            "print(roialign_cy.output_cache()['max_bytes'], "
            "_buffers.host_array((8 << 20,), np.uint8).base is None)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["0", "True"], r.stderr


def test_threads_share_the_cache_safely(rng, cache):
    x, b = _problem(rng, k=300)
    want = roialign_cy.roi_align(x, b, 7, 1.0, 2, True, n_threads=1).copy()

    def work(i):
        for _ in range(6):
            out = roialign_cy.roi_align(x, b, 7, 1.0, 2, True, n_threads=1)
            if not np.array_equal(out, want):
                return False
            out += 1  # each thread scribbles on its own output: nobody else may see it
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_while_the_cache_is_locked_does_not_hang_the_child(cache):
    """Another thread of the parent may hold the cache's lock at fork(): the child must not
    inherit it locked (its first large output would wait forever)."""
    import multiprocessing

    def child(q):
        a = _buffers.host_array((8 << 20,), np.uint8, zeros=True)
        q.put(int(a.sum()))

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    with _buffers._cache.lock:  # held by this thread while the child is forked
        p = ctx.Process(target=child, args=(q,))
        p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung on the output cache's lock")
    assert p.exitcode == 0 and q.get(timeout=10) == 0
