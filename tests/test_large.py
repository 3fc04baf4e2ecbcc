"""Large inputs: 64-bit index arithmetic past 2**31 elements, and allocation failures.

The 2**31 checks use feature maps of ~9 GB that are allocated with np.zeros, i.e. calloc: the
pages stay unmapped until touched, and the kernels touch only the few pixels the boxes sample, so
the resident memory stays around 50 MB. They still need the kernel to grant the address space
(no strict overcommit), hence the skips; they are opt-in (RUN_SLOW=1) like the other slow tests.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from roialign_cy import roi_align, roi_align_backward, roi_align_rotated, roi_align_rotated_backward

slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow test: set RUN_SLOW=1")


def _meminfo_bytes(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _lazy_zeros(shape, dtype=np.float32):
    """A zero array whose pages are not touched; skip when the address space is not granted."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            strict = f.read().strip() == "2"
    except OSError:
        pytest.skip("needs Linux /proc to judge whether a lazily-mapped array is affordable")
    total = (_meminfo_bytes("MemTotal") or 0) + (_meminfo_bytes("SwapTotal") or 0)
    if strict or total < nbytes + (2 << 30):
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of address space (overcommit); have "
                    f"{total / 2**30:.1f} GiB RAM + swap, strict overcommit={strict}")
    try:
        return np.zeros(shape, dtype)
    except MemoryError:
        pytest.skip(f"could not map {nbytes / 2**30:.1f} GiB")


S = 46400  # S * S = 2_152_960_000 > 2**31: the last pixels' flat index needs 64 bits
CROP = 16


def _big_map():
    """(1, 1, S, S) float32 map, zero except its last CROP x CROP block; that block as a map."""
    x = _lazy_zeros((1, 1, S, S))
    block = np.random.default_rng(0).standard_normal((CROP, CROP)).astype(np.float32)
    x[0, 0, S - CROP:, S - CROP:] = block
    return x, block.reshape(1, 1, CROP, CROP)


# boxes near the bottom-right corner, sampled on a grid of exact float32 values (integer corners,
# aligned=False, sampling_ratio 2, 2-pixel bins: samples at k + 0.5) so that the big map and the
# small crop compute the very same bilinear weights
AXIS_BOX = np.array([[0, S - 12, S - 13, S - 4, S - 5]], np.float32)
ROT_BOX = np.array([[0, S - 8, S - 9, 8, 8, 0.0], [0, S - 7.5, S - 8.5, 6, 4, 180.0]], np.float32)


def _shift(boxes, rotated):
    b = boxes.copy()
    off = S - CROP
    if rotated:
        b[:, 1:3] -= off
    else:
        b[:, 1:5] -= off
    return b


def _nhwc(x):
    return x.reshape(x.shape[0], x.shape[2], x.shape[3], 1)  # C == 1: a free reshape


@slow
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_axis_aligned_index_past_2_31(layout):
    x, block = _big_map()
    if layout == "NHWC":
        x, block = _nhwc(x), _nhwc(block)
    small = _shift(AXIS_BOX, False)
    args = (4, 1.0, 2, False)
    for mode in ["avg", "max", "onnx_max"]:
        np.testing.assert_array_equal(roi_align(x, AXIS_BOX, *args, mode=mode, layout=layout),
                                      roi_align(block, small, *args, mode=mode, layout=layout))
    g_shape = (1, 1, 4, 4) if layout == "NCHW" else (1, 4, 4, 1)
    g = np.arange(1, 17, dtype=np.float32).reshape(g_shape)
    for mode in ["avg", "max"]:
        np.testing.assert_array_equal(
            roi_align_backward(g, x, AXIS_BOX, *args, mode=mode, layout=layout, wrt="boxes"),
            roi_align_backward(g, block, small, *args, mode=mode, layout=layout, wrt="boxes"))
    if layout == "NHWC":
        # the NCHW feature gradient needs a channels-last scratch copy of the whole plane
        # (see test_scratch_allocation_failure_is_a_memory_error); NHWC writes in place
        big = roi_align_backward(g, x, AXIS_BOX, *args, layout=layout)
        ref = roi_align_backward(g, block, small, *args, layout=layout)
        np.testing.assert_array_equal(big[0, S - CROP:, S - CROP:], ref[0])
        # every sample lies inside the block: all of sum(g) landed there, nothing elsewhere
        assert float(big[0, S - CROP:, S - CROP:].sum()) == pytest.approx(float(g.sum()))


@slow
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_rotated_index_past_2_31(layout):
    x, block = _big_map()
    if layout == "NHWC":
        x, block = _nhwc(x), _nhwc(block)
    small = _shift(ROT_BOX, True)
    args = (4, 1.0, 2, True)
    np.testing.assert_allclose(roi_align_rotated(x, ROT_BOX, *args, layout=layout),
                               roi_align_rotated(block, small, *args, layout=layout),
                               rtol=1e-5, atol=1e-6)
    g_shape = (2, 1, 4, 4) if layout == "NCHW" else (2, 4, 4, 1)
    g = np.ones(g_shape, np.float32)
    np.testing.assert_allclose(
        roi_align_rotated_backward(g, x, ROT_BOX, *args, layout=layout, wrt="boxes"),
        roi_align_rotated_backward(g, block, small, *args, layout=layout, wrt="boxes"),
        rtol=1e-4, atol=1e-4)
    if layout == "NHWC":
        big = roi_align_rotated_backward(g, x, ROT_BOX, *args, layout=layout)
        ref = roi_align_rotated_backward(g, block, small, *args, layout=layout)
        np.testing.assert_allclose(big[0, S - CROP:, S - CROP:], ref[0], rtol=1e-5, atol=1e-6)
        assert float(big[0, S - CROP:, S - CROP:].sum()) == pytest.approx(float(g.sum()), rel=1e-5)


@slow
def test_batch_offset_past_2_31():
    # image 1 of two 33000 x 33000 planes starts at element 1.09e9 and ends past 2**31
    s = 33000
    x = _lazy_zeros((2, 1, s, s))
    block = np.random.default_rng(1).standard_normal((CROP, CROP)).astype(np.float32)
    x[1, 0, s - CROP:, s - CROP:] = block
    boxes = np.array([[1, s - 12, s - 13, s - 4, s - 5]], np.float32)
    small = boxes.copy()
    small[0, 0] = 0
    small[0, 1:] -= s - CROP
    for layout in ["NCHW", "NHWC"]:
        xx = x if layout == "NCHW" else x.reshape(2, s, s, 1)
        bb = block.reshape((1, 1, CROP, CROP) if layout == "NCHW" else (1, CROP, CROP, 1))
        np.testing.assert_array_equal(roi_align(xx, boxes, 4, 1.0, 2, False, layout=layout),
                                      roi_align(bb, small, 4, 1.0, 2, False, layout=layout))


# ---------------------------------------------------------------------------------------------
# bounded scratch: calls that once asked for per-thread channels-last copies of whole maps

_SCRATCH_CASES = {
    # one plane (C < 16): the NCHW gradients scatter straight into the plane; a 16-lane
    # channels-last block of 8000 x 8000 float32 would be 4 GB, more than the 3 GB limit below
    "backward_features": """
        roi_align_backward(np.ones((1, 1, 2, 2), np.float32), (1, 1, 8000, 8000),
                           np.array([[0, 10, 10, 50, 50]], np.float32), 2, n_threads=1)
    """,
    "rotated_backward_features": """
        roi_align_rotated_backward(np.ones((1, 1, 2, 2), np.float32), (1, 1, 8000, 8000),
                                   np.array([[0, 30, 30, 20, 20, 10]], np.float32), 2, n_threads=1)
    """,
    "backward_boxes": """
        roi_align_backward(np.ones((1, 1, 2, 2), np.float32), np.zeros((1, 1, 8000, 8000), np.float32),
                           np.array([[0, 10, 10, 50, 50]], np.float32), 2, n_threads=1, wrt="boxes")
    """,
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_AS (Linux)")
@pytest.mark.parametrize("case", sorted(_SCRATCH_CASES))
def test_scratch_stays_bounded(case):
    # run in a child with a 3 GB address-space limit: the feature map and the gradient are
    # calloc'ed lazily and fit; a channels-last copy of whole planes would not
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import numpy as np
        from roialign_cy import roi_align, roi_align_backward, roi_align_rotated_backward
        {call}
        print("done")
    """).format(call=textwrap.dedent(_SCRATCH_CASES[case]).strip())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the child imports the roialign_cy this process imported (checkout or installed wheel)
    import roialign_cy
    root = os.path.dirname(os.path.dirname(os.path.abspath(roialign_cy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    # run from that directory: "python -c" puts the working directory first on sys.path
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert proc.returncode == 0, f"child died with status {proc.returncode}: {proc.stderr[-2000:]}"
    assert "done" in proc.stdout


@pytest.mark.parametrize("c, h, w, samples, blocks", [
    (16, 100, 100, 10**6, True),       # many samples per pixel, a full block: channels-last copy
    (8, 100, 100, 10**6, False),       # fewer channels than a block: read the planes directly
    (16, 100, 100, 10**3, False),      # few samples: the copy would cost more than it saves
    (16, 3000, 3000, 10**9, False),    # a block of 16 planes would pass the scratch bound
])
def test_nchw_strategy_bounds_scratch(c, h, w, samples, blocks):
    from roialign_cy import _cpu

    assert _cpu._use_blocks(samples, c, h, w, 1, 4, 1, 1, False) is blocks
    if blocks:
        assert h * w * 16 * 4 <= _cpu.SCRATCH_BYTES_PER_THREAD
