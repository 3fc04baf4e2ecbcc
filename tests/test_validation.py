"""Every bad argument of every public operator raises ValueError/TypeError naming the argument;
legal but unusual inputs (inverted boxes, read-only or byte-swapped arrays, numpy scalars, mixed
box/feature dtypes) work and give the reference semantics."""
import numpy as np
import pytest

from conftest import split_batch
from reference import roi_align_backward_ref, roi_align_ref, roi_align_rotated_ref
from roialign_cy import roi_align, roi_align_backward, roi_align_rotated, roi_align_rotated_backward

N, C, H, W = 2, 3, 8, 9
PS = 2  # output size of the valid base call
_rng = np.random.default_rng(7)
X = _rng.standard_normal((N, C, H, W))
AXIS_BOXES = np.array([[0, 1.2, 1.1, 5.3, 6.7], [1, 0.4, 2.2, 7.1, 6.9]])
ROT_BOXES = np.array([[0, 4.1, 3.9, 3.3, 2.2, 30.0], [1, 3.2, 5.1, 4.4, 3.3, -20.0]])
K = 2

FORWARD = {"roi_align": roi_align, "roi_align_rotated": roi_align_rotated}
BACKWARD = {"roi_align_backward": roi_align_backward,
            "roi_align_rotated_backward": roi_align_rotated_backward}
OPS = {**FORWARD, **BACKWARD}
ALL = sorted(OPS)


def _rotated(op):
    return "rotated" in op


def base_kwargs(op):
    """A valid call of ``op``, as keyword arguments."""
    kw = dict(features=X, boxes=(ROT_BOXES if _rotated(op) else AXIS_BOXES).copy(), output_size=PS)
    if op in BACKWARD:
        kw["grad_output"] = np.ones((K, C, PS, PS))
    return kw


def call(op, **overrides):
    kw = base_kwargs(op)
    kw.update(overrides)
    return OPS[op](**kw)


def coords(op):
    """Box coordinates without the batch column: (K, 4) or (K, 5)."""
    return np.ascontiguousarray(base_kwargs(op)["boxes"][:, 1:])


def test_base_calls_are_valid():
    for op in ALL:
        out = call(op)
        assert np.all(np.isfinite(out))


def raises(exc, arg):
    # the message must name the argument as a whole word
    return pytest.raises(exc, match=rf"(?<![A-Za-z_]){arg}(?![A-Za-z_])")


# ---------------------------------------------------------------------------------------------
# features

@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("shape", [(C, H, W), (1, N, C, H, W), (), (H * W,)])
def test_features_wrong_rank(op, shape):
    with raises(ValueError, "features"):
        call(op, features=np.zeros(shape))


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.complex128, object, np.bool_,
                                   np.float16, np.str_])
def test_features_not_float(op, dtype):
    feats = np.zeros((N, C, H, W), dtype=dtype)
    with raises(TypeError, "features"):
        call(op, features=feats)


@pytest.mark.parametrize("op", ALL)
def test_features_not_an_array(op):
    with raises(TypeError, "features"):
        call(op, features=[[1.0], [1.0, 2.0]])  # ragged: numpy cannot read it
    with raises(TypeError, "features"):
        call(op, features=None)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("layout,shape", [("NCHW", (N, C, 0, W)), ("NCHW", (N, C, H, 0)),
                                          ("NHWC", (N, 0, W, C)), ("NHWC", (N, H, 0, C))])
def test_features_empty_spatial_extent_with_boxes(op, layout, shape):
    # no pixel to sample: the bilinear taps would fall outside the buffer
    go_shape = (K, C, PS, PS) if layout == "NCHW" else (K, PS, PS, C)
    extra = {"grad_output": np.ones(go_shape)} if op in BACKWARD else {}
    with raises(ValueError, "features"):
        call(op, features=np.zeros(shape), layout=layout, **extra)


@pytest.mark.parametrize("op", sorted(FORWARD))
def test_features_empty_spatial_extent_without_boxes_is_fine(op):
    width = 6 if _rotated(op) else 5
    out = call(op, features=np.zeros((N, C, 0, W)), boxes=np.zeros((0, width)))
    assert out.shape == (0, C, PS, PS)


# ---------------------------------------------------------------------------------------------
# boxes and batch indices

@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("width", [2, 3, 7])
def test_boxes_wrong_width(op, width):
    with raises(ValueError, "boxes"):
        call(op, boxes=np.zeros((K, width)))


@pytest.mark.parametrize("op", ALL)
def test_boxes_of_the_other_family(op):
    # axis-aligned (K, 5) boxes given to a rotated operator read as (K, 5) + batch_indices
    # there, which N = 2 images forbid; rotated (K, 6) boxes are too wide for roi_align
    other = AXIS_BOXES if _rotated(op) else ROT_BOXES
    with pytest.raises(ValueError, match="boxes"):
        call(op, boxes=other)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("shape", [(5,), (1, K, 5), ()])
def test_boxes_wrong_rank(op, shape):
    with raises(ValueError, "boxes"):
        call(op, boxes=np.zeros(shape))


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("dtype", [np.complex128, np.bool_, object, np.str_])
def test_boxes_not_real(op, dtype):
    boxes = base_kwargs(op)["boxes"].astype(dtype)
    with raises(TypeError, "boxes"):
        call(op, boxes=boxes)


@pytest.mark.parametrize("op", ALL)
def test_boxes_none(op):
    with raises(TypeError, "boxes"):
        call(op, boxes=None)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("column", [1, 2, 3, 4])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_boxes_non_finite(op, column, value):
    boxes = base_kwargs(op)["boxes"]
    boxes[1, column] = value
    with raises(ValueError, "boxes"):
        call(op, boxes=boxes)


@pytest.mark.parametrize("op", ALL)
def test_boxes_overflowing_the_feature_dtype(op):
    # finite in float64, inf once cast to the float32 the kernels read
    boxes = base_kwargs(op)["boxes"]
    boxes[0, 3] = 1e300
    with raises(ValueError, "boxes"):
        call(op, features=X.astype(np.float32), boxes=boxes,
             **({"grad_output": np.ones((K, C, PS, PS), np.float32)} if op in BACKWARD else {}))


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [-1, N, N + 10, 0.5, -0.5, 1e20, np.nan, np.inf, -np.inf])
def test_batch_column_bad(op, value):
    boxes = base_kwargs(op)["boxes"]
    boxes[1, 0] = value
    with raises(ValueError, "batch index"):
        call(op, boxes=boxes)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [-1, N, 2**40])
def test_batch_indices_out_of_range(op, value):
    with pytest.raises(ValueError, match=rf"batch index out of range.*{value}"):
        call(op, boxes=coords(op), batch_indices=np.array([0, value]))


@pytest.mark.parametrize("op", ALL)
def test_batch_indices_beyond_int64(op):
    # must be refused before the cast to int64 wraps it to a valid-looking index
    idx = np.array([0, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=r"batch index out of range.*18446744073709551615"):
        call(op, boxes=coords(op), batch_indices=idx)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("idx", [np.array([0.0, 1.0]), np.array([0, 0.5]), np.array([True, False]),
                                 np.array(["0", "1"])])
def test_batch_indices_not_integer(op, idx):
    with raises(TypeError, "batch_indices"):
        call(op, boxes=coords(op), batch_indices=idx)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("idx", [np.array([0, 1, 1]), np.array([0]), np.array([[0, 1]]), np.array(0)])
def test_batch_indices_wrong_shape(op, idx):
    with raises(ValueError, "batch_indices"):
        call(op, boxes=coords(op), batch_indices=idx)


@pytest.mark.parametrize("op", ALL)
def test_batch_indices_with_batch_column(op):
    with raises(ValueError, "batch_indices"):
        call(op, batch_indices=np.array([0, 1]))


@pytest.mark.parametrize("op", ALL)
def test_batch_indices_missing(op):
    # (K, 4) / (K, 5) coordinates alone are only unambiguous for a single image
    with raises(ValueError, "batch_indices"):
        call(op, boxes=coords(op))


@pytest.mark.parametrize("op", ALL)
def test_batch_indices_as_list_is_fine(op):
    np.testing.assert_array_equal(call(op, boxes=coords(op), batch_indices=[0, 1]), call(op))


@pytest.mark.parametrize("op", ALL)
def test_list_boxes_wrong_width(op):
    c = coords(op)
    wide = np.column_stack([c, c[:, :1]])
    with raises(ValueError, r"boxes\[1\]"):
        call(op, boxes=[c[:1], wide[1:]])
    with raises(ValueError, r"boxes\[0\]"):
        call(op, boxes=[c[:1, :-1], c[1:]])
    with raises(ValueError, r"boxes\[0\]"):
        call(op, boxes=[c[0], c[1:]])  # a single box given as a 1-D row


@pytest.mark.parametrize("op", ALL)
def test_list_boxes_bad_values(op):
    c = coords(op)
    bad = c[1:].copy()
    bad[0, 0] = np.nan
    with raises(ValueError, "boxes"):
        call(op, boxes=[c[:1], bad])
    with raises(TypeError, r"boxes\[1\]"):
        call(op, boxes=[c[:1], c[1:].astype(complex)])
    with raises(ValueError, "batch index"):
        call(op, boxes=[c[:1], c[1:], c[1:]])  # three images' boxes, two images
    with raises(ValueError, "batch_indices"):
        call(op, boxes=[c[:1], c[1:]], batch_indices=np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# scalar arguments

@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [0, -1, (2, 0), (-3, 2), (1, 2, 3), ()])
def test_output_size_bad_value(op, value):
    with raises(ValueError, "output_size"):
        call(op, output_size=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [2.0, "2", "22", True, None, (2, 2.5), (np.bool_(True), 2), 2j])
def test_output_size_bad_type(op, value):
    with raises(TypeError, "output_size"):
        call(op, output_size=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [0, 0.0, -1.0, -1e-300, np.nan, np.inf, -np.inf])
def test_spatial_scale_bad_value(op, value):
    with raises(ValueError, "spatial_scale"):
        call(op, spatial_scale=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", ["1", None, True, 1j, np.array([0.5])])
def test_spatial_scale_bad_type(op, value):
    with raises(TypeError, "spatial_scale"):
        call(op, spatial_scale=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [-2, -100])
def test_sampling_ratio_below_minus_one(op, value):
    with raises(ValueError, "sampling_ratio"):
        call(op, sampling_ratio=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [1.5, 2.0, "2", True, None, np.float64(2)])
def test_sampling_ratio_not_integer(op, value):
    with raises(TypeError, "sampling_ratio"):
        call(op, sampling_ratio=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [0, -1, 2**40])
def test_n_threads_bad_value(op, value):
    with raises(ValueError, "n_threads"):
        call(op, n_threads=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [2.0, "2", True])
def test_n_threads_not_integer(op, value):
    with raises(TypeError, "n_threads"):
        call(op, n_threads=value)


FLAGS = [(op, "aligned") for op in ALL] + [(op, "clockwise") for op in ALL if _rotated(op)] + [
    (op, "deterministic") for op in sorted(BACKWARD)]


@pytest.mark.parametrize("op,arg", FLAGS)
@pytest.mark.parametrize("value", [1, 0, "True", None, np.array([True])])
def test_flags_must_be_bool(op, arg, value):
    with raises(TypeError, arg):
        call(op, **{arg: value})


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", ["nchw", "NCWH", "", None, 0])
def test_layout_unknown(op, value):
    with raises(ValueError, "layout"):
        call(op, layout=value)


@pytest.mark.parametrize("op", ["roi_align", "roi_align_backward"])
@pytest.mark.parametrize("value", ["MAX", "mean", "average", "", None])
def test_mode_unknown(op, value):
    with raises(ValueError, "mode"):
        call(op, mode=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", ["gpu", "CPU", "", None, 0])
def test_backend_unknown(op, value):
    with raises(ValueError, "backend"):
        call(op, backend=value)


@pytest.mark.parametrize("op", ALL)
def test_backend_cuda_on_numpy(op):
    with raises(TypeError, "backend"):
        call(op, backend="cuda")


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [0, -5])
def test_max_samples_per_bin_bad_value(op, value):
    with raises(ValueError, "max_samples_per_bin"):
        call(op, max_samples_per_bin=value)


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("value", [1.5, None, "10"])
def test_max_samples_per_bin_not_integer(op, value):
    with raises(TypeError, "max_samples_per_bin"):
        call(op, max_samples_per_bin=value)


# ---------------------------------------------------------------------------------------------
# the sampling-grid bound

def _big_box(op, size):
    """One box ``size`` pixels on each side, in image 0."""
    if _rotated(op):
        return np.array([[0, 4.0, 4.0, size, size, 0.0]])
    return np.array([[0, 0.0, 0.0, size, size]])


@pytest.mark.parametrize("op", ALL)
def test_sampling_ratio_grid_beyond_bound(op):
    go = {"grad_output": np.ones((K, C, 1, 1))} if op in BACKWARD else {}
    with raises(ValueError, "max_samples_per_bin"):
        call(op, output_size=1, sampling_ratio=300, **go)  # 90000 samples per bin > 65536
    out = call(op, output_size=1, sampling_ratio=300, max_samples_per_bin=90000, **go)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("op", ALL)
def test_adaptive_grid_beyond_bound(op):
    # a 600 px box pooled to 1 x 1 takes 600 x 600 adaptive samples
    go = {"grad_output": np.ones((1, C, 1, 1))} if op in BACKWARD else {}
    with raises(ValueError, "max_samples_per_bin"):
        call(op, boxes=_big_box(op, 600.0), output_size=1, **go)
    out = call(op, boxes=_big_box(op, 600.0), output_size=1, max_samples_per_bin=600 * 600, **go)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("size", [1e12, 1e300])
def test_grid_far_beyond_bound(op, size):
    # past int64 once counted in samples: must still be a clean ValueError
    go = {"grad_output": np.ones((1, C, 1, 1))} if op in BACKWARD else {}
    with raises(ValueError, "max_samples_per_bin"):
        call(op, boxes=_big_box(op, size), output_size=1, max_samples_per_bin=2**62, **go)


@pytest.mark.parametrize("op", ALL)
def test_huge_spatial_scale_grid_beyond_bound(op):
    with raises(ValueError, "max_samples_per_bin"):
        call(op, spatial_scale=1e300)


@pytest.mark.parametrize("op", ALL)
def test_one_empty_axis_does_not_hide_a_huge_one(op):
    # aligned=True and a negative width gives no sample columns, but the rows would still be laid
    # out (and a row count past int64 would not survive the cast): refused on the rows alone
    if _rotated(op):
        boxes = np.array([[0, 4.0, 4.0, -3.0, 1e13, 0.0]])
    else:
        boxes = np.array([[0, 5.0, 0.0, 1.0, 1e13]])
    go = {"grad_output": np.ones((1, C, 1, 1))} if op in BACKWARD else {}
    with raises(ValueError, "max_samples_per_bin"):
        call(op, boxes=boxes, output_size=1, aligned=True, allow_inverted=True, **go)


# ---------------------------------------------------------------------------------------------
# out (forward operators)

@pytest.mark.parametrize("op", sorted(FORWARD))
def test_out_wrong_shape_or_dtype(op):
    with raises(ValueError, "out"):
        call(op, out=np.empty((K, C, PS, PS + 1)))
    with raises(ValueError, "out"):
        call(op, out=np.empty((K, PS, PS, C)))  # NHWC shape for an NCHW call
    with raises(ValueError, "out"):
        call(op, out=np.empty((K, C, PS, PS), np.float32))
    with raises(ValueError, "out"):
        call(op, out=np.empty((K, C, PS, PS), ">f8"))


@pytest.mark.parametrize("op", sorted(FORWARD))
def test_out_not_contiguous_or_read_only(op):
    with raises(ValueError, "out"):
        call(op, out=np.empty((K, C, PS, 2 * PS))[..., ::2])
    with raises(ValueError, "out"):
        call(op, out=np.asfortranarray(np.empty((K, C, PS, PS))))
    ro = np.empty((K, C, PS, PS))
    ro.setflags(write=False)
    with raises(ValueError, "out"):
        call(op, out=ro)


@pytest.mark.parametrize("op", sorted(FORWARD))
def test_out_not_an_array(op):
    with raises(TypeError, "out"):
        call(op, out=np.zeros((K, C, PS, PS)).tolist())


@pytest.mark.parametrize("op", sorted(FORWARD))
def test_out_is_filled_and_returned(op):
    out = np.full((K, C, PS, PS), np.nan)
    res = call(op, out=out)
    assert res is out
    np.testing.assert_array_equal(out, call(op))


# ---------------------------------------------------------------------------------------------
# gradient arguments

@pytest.mark.parametrize("op", sorted(BACKWARD))
@pytest.mark.parametrize("shape", [(K, C, PS, PS + 1), (K + 1, C, PS, PS), (K, C, PS), (K, PS, PS, C)])
def test_grad_output_wrong_shape(op, shape):
    with raises(ValueError, "grad_output"):
        call(op, grad_output=np.ones(shape))


@pytest.mark.parametrize("op", sorted(BACKWARD))
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.complex128, np.bool_])
def test_grad_output_wrong_dtype(op, dtype):
    with raises(TypeError, "grad_output"):
        call(op, grad_output=np.ones((K, C, PS, PS), dtype))


@pytest.mark.parametrize("op", sorted(BACKWARD))
def test_grad_output_not_an_array(op):
    with raises(TypeError, "grad_output"):
        call(op, grad_output=np.ones((K, C, PS, PS)).tolist())
    with raises(TypeError, "grad_output"):
        call(op, grad_output=None)


@pytest.mark.parametrize("op", sorted(BACKWARD))
@pytest.mark.parametrize("value", ["feature", "box", "all", "", None])
def test_wrt_unknown(op, value):
    with raises(ValueError, "wrt"):
        call(op, wrt=value)


def test_onnx_max_has_no_gradient():
    with raises(ValueError, "mode"):
        call("roi_align_backward", mode="onnx_max")


@pytest.mark.parametrize("op", sorted(BACKWARD))
def test_shape_only_features_bad(op):
    with raises(ValueError, "features"):
        call(op, features=(N, C, H))
    with raises(ValueError, "features"):
        call(op, features=(N, C, -H, W))
    with raises(TypeError, "features"):
        call(op, features=(N, C, float(H), W))
    with raises(ValueError, "features"):
        call(op, features=(N, C, H, W), wrt="boxes")
    with raises(ValueError, "features"):
        call(op, features=(N, C, H, W), wrt="both")
    with raises(TypeError, "grad_output"):
        call(op, features=(N, C, H, W), grad_output=np.ones((K, C, PS, PS), np.int64))


def test_shape_only_features_max_mode():
    with raises(ValueError, "features"):
        call("roi_align_backward", features=(N, C, H, W), mode="max")


# ---------------------------------------------------------------------------------------------
# legal inputs: defined results, no error

def _flip(boxes, rotated):
    """Inverted boxes: x2 < x1 and y2 < y1 (or negative w, h for rotated boxes)."""
    b = boxes.copy()
    if rotated:
        b[:, 3:5] *= -1
    else:
        b[:, [1, 3]] = b[:, [3, 1]]
        b[:, [2, 4]] = b[:, [4, 2]]
    return b


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("aligned", [False, True])
def test_inverted_boxes_are_refused_by_default(op, aligned):
    boxes = _flip(ROT_BOXES if _rotated(op) else AXIS_BOXES, _rotated(op))
    go = {"grad_output": np.ones((len(boxes), C, 2, 3))} if op in BACKWARD else {}
    with raises(ValueError, "allow_inverted=True"):
        call(op, boxes=boxes, output_size=(2, 3), aligned=aligned, **go)
    with raises(ValueError, "boxes must have"):
        call(op, boxes=boxes, output_size=(2, 3), aligned=aligned, **go)
    # degenerate (zero-size) boxes are not inverted
    flat = (ROT_BOXES if _rotated(op) else AXIS_BOXES).copy()
    if _rotated(op):
        flat[:, 3] = 0
    else:
        flat[:, 3] = flat[:, 1]
    call(op, boxes=flat, output_size=(2, 3), aligned=aligned, **go)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("mode", ["avg", "max", "onnx_max"])
def test_inverted_boxes_follow_the_reference(aligned, sampling_ratio, mode):
    # legal: aligned=True keeps the negative size (no samples in adaptive mode, so 0; samples
    # walking backwards with a fixed ratio), aligned=False raises it to 1 pixel
    boxes = _flip(AXIS_BOXES, False)
    out = roi_align(X, boxes, (2, 3), 1.0, sampling_ratio, aligned, mode=mode, allow_inverted=True)
    rois, bidx = split_batch(boxes)
    expected = roi_align_ref(X, rois, bidx, 2, 3, 1.0, sampling_ratio, aligned, mode)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    if aligned and sampling_ratio == -1:
        assert not np.any(out)
    if mode != "onnx_max":
        grad = roi_align_backward(np.ones_like(out), X, boxes, (2, 3), 1.0, sampling_ratio,
                                  aligned, mode=mode, wrt="both", allow_inverted=True)
        np.testing.assert_allclose(
            grad[0], roi_align_backward_ref(np.ones_like(out), X, rois, bidx, 2, 3, 1.0,
                                            sampling_ratio, aligned, mode), rtol=1e-12, atol=1e-12)
        assert np.all(np.isfinite(grad[1]))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_negative_size_rotated_boxes_follow_the_reference(aligned, sampling_ratio):
    boxes = _flip(ROT_BOXES, True)
    out = roi_align_rotated(X, boxes, (2, 3), 1.0, sampling_ratio, aligned, allow_inverted=True)
    rois, bidx = split_batch(boxes)
    expected = roi_align_rotated_ref(X, rois, bidx, 2, 3, 1.0, sampling_ratio, aligned)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grads = roi_align_rotated_backward(np.ones_like(out), X, boxes, (2, 3), 1.0, sampling_ratio,
                                       aligned, wrt="both", allow_inverted=True)
    assert all(np.all(np.isfinite(g)) for g in grads)


def _read_only(a):
    a = np.array(a)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("op", ALL)
def test_read_only_inputs(op):
    kw = {k: _read_only(v) if isinstance(v, np.ndarray) else v for k, v in base_kwargs(op).items()}
    if op in BACKWARD:
        kw["wrt"] = "both"
    got = OPS[op](**kw)
    expected = call(op, wrt="both") if op in BACKWARD else call(op)
    for g, e in zip(got, expected):  # the two gradients, or the K boxes' outputs
        np.testing.assert_array_equal(g, e)
    idx = _read_only([0, 1])
    np.testing.assert_array_equal(call(op, boxes=_read_only(coords(op)), batch_indices=idx),
                                  call(op))


@pytest.mark.parametrize("op", ALL)
def test_byte_swapped_inputs(op):
    # arrays read from big-endian files: converted, same result
    kw = {k: v.astype(v.dtype.newbyteorder(">")) if isinstance(v, np.ndarray) else v
          for k, v in base_kwargs(op).items()}
    np.testing.assert_array_equal(OPS[op](**kw), call(op))
    if op in BACKWARD:  # shape-only features take the dtype of a byte-swapped grad_output
        got = call(op, features=(N, C, H, W), grad_output=kw["grad_output"])
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, call(op))


@pytest.mark.parametrize("op", ALL)
def test_non_contiguous_inputs(op):
    kw = base_kwargs(op)
    kw["features"] = np.asfortranarray(X)
    kw["boxes"] = np.asfortranarray(kw["boxes"])
    if op in BACKWARD:
        kw["grad_output"] = np.ones((K, C, PS, 2 * PS))[..., ::2]
    np.testing.assert_array_equal(OPS[op](**kw), call(op))


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("feature_dtype,box_dtype", [(np.float64, np.float32), (np.float32, np.float64),
                                                     (np.float64, np.int64), (np.float32, np.float16)])
def test_box_dtype_independent_of_feature_dtype(op, feature_dtype, box_dtype):
    # boxes are cast to the features' dtype: the result is that of boxes given in that dtype
    feats = X.astype(feature_dtype)
    boxes = base_kwargs(op)["boxes"].astype(box_dtype)
    go = {"grad_output": np.ones((K, C, PS, PS), feature_dtype)} if op in BACKWARD else {}
    got = call(op, features=feats, boxes=boxes, **go)
    assert got.dtype == feature_dtype
    np.testing.assert_array_equal(got, call(op, features=feats, boxes=boxes.astype(feature_dtype), **go))


@pytest.mark.parametrize("op", ALL)
def test_numpy_scalars_as_arguments(op):
    expected = call(op, output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True,
                    n_threads=1, **({"grad_output": np.ones((K, C, 2, 3))} if op in BACKWARD else {}))
    got = call(op, output_size=(np.int32(2), np.uint8(3)), spatial_scale=np.float32(0.5),
               sampling_ratio=np.int64(2), aligned=np.bool_(True), n_threads=np.int16(1),
               max_samples_per_bin=np.int64(100),
               **({"grad_output": np.ones((K, C, 2, 3))} if op in BACKWARD else {}))
    np.testing.assert_array_equal(got, expected)
    square = call(op, output_size=np.int64(2), spatial_scale=np.float64(1.0))
    np.testing.assert_array_equal(square, call(op))
    np.testing.assert_array_equal(call(op, output_size=np.array([2, 2])), call(op))
    np.testing.assert_array_equal(call(op, spatial_scale=1), call(op))  # an int scale


@pytest.mark.parametrize("op", ALL)
def test_empty_inputs(op):
    width = 6 if _rotated(op) else 5
    go = {"grad_output": np.ones((0, C, PS, PS))} if op in BACKWARD else {}
    out = call(op, boxes=np.zeros((0, width)), **go)
    assert out.shape == ((0, C, PS, PS) if op in FORWARD else X.shape)
    out = call(op, boxes=[], **go)
    assert out.shape == ((0, C, PS, PS) if op in FORWARD else X.shape)
    assert not np.any(out)
    go = {"grad_output": np.ones((K, 0, PS, PS))} if op in BACKWARD else {}
    out = call(op, features=np.zeros((N, 0, H, W)), **go)
    assert out.shape == ((K, 0, PS, PS) if op in FORWARD else (N, 0, H, W))


def test_nested_list_features():
    np.testing.assert_array_equal(roi_align(X.tolist(), AXIS_BOXES, PS), roi_align(X, AXIS_BOXES, PS))


def test_remembered_scalar_checks_tell_types_apart():
    """The scalar checks are kept per combination of types and values: 1 == True and
    0.25 == np.float32(0.25) for Python, not for the checks."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    g = np.zeros((1, 1, 2, 2), np.float32)
    boxes = np.array([[0, 0, 0, 2, 2]], np.float32)
    for _ in range(2):  # the second round runs on remembered checks
        roi_align_backward(g, x, boxes, 2, 1.0, 2, True)
        with pytest.raises(TypeError, match="aligned must be a bool"):
            roi_align_backward(g, x, boxes, 2, 1.0, 2, 1)
        with pytest.raises(TypeError, match="sampling_ratio must be an integer"):
            roi_align_backward(g, x, boxes, 2, 1.0, 2.0, True)
        with pytest.raises(ValueError, match="output_size"):
            roi_align_backward(g, x, boxes, [2, 0], 1.0, 2, True)
