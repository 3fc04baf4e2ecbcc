"""roialign_cy.torch for the rest of the family: roi_pool, ps_roi_align, ps_roi_pool and the
RoIPool, PSRoIAlign, PSRoIPool modules. Values and input gradients against tests/reference.py
(docs/conventions.md, sections 8 and 9) in both dtypes, layouts and box forms; gradcheck; boxes get
no gradient; the CUDA path (with fakes here; on a GPU where there is one); and parity with
torchvision where it is installed, on its own test shapes too (the documented differences are
tested as such, not skipped)."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

import roialign_cy  # noqa: E402
import roialign_cy.torch as rt  # noqa: E402
import reference as ref  # noqa: E402
from conftest import edge_case_boxes, make_features, random_boxes, split_batch  # noqa: E402
from test_torch import fake_cuda_path  # noqa: E402

N, H, W = 2, 9, 11
SCALE = 0.5
PH, PW = 3, 2
# input channels of each operator: the position-sensitive ones read C_out * PH * PW channels
CHANNELS = {"roi_pool": 3, "ps_roi_align": 2 * PH * PW, "ps_roi_pool": 2 * PH * PW}
OPS = list(CHANNELS)
MODULES = {"roi_pool": rt.RoIPool, "ps_roi_align": rt.PSRoIAlign, "ps_roi_pool": rt.PSRoIPool}
DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _t(a, dtype=torch.float64, requires_grad=False):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).requires_grad_(requires_grad)


def _ours(op, x, boxes, output_size=(PH, PW), scale=SCALE, sampling_ratio=-1, **kwargs):
    """One of our three functions with torchvision's positional arguments."""
    if op == "ps_roi_align":
        return rt.ps_roi_align(x, boxes, output_size, scale, sampling_ratio, **kwargs)
    return getattr(rt, op)(x, boxes, output_size, scale, **kwargs)


def _reference(op, feats, boxes, scale=SCALE, sampling_ratio=-1, dtype=np.float64,
               edge="torchvision", ph=PH, pw=PW):
    rois, bidx = split_batch(boxes)
    if op == "roi_pool":
        return ref.roi_pool_ref(feats, rois, bidx, ph, pw, scale, dtype)[0]
    if op == "ps_roi_align":
        return ref.ps_roi_align_ref(feats, rois, bidx, ph, pw, scale, sampling_ratio)
    return ref.ps_roi_pool_ref(feats, rois, bidx, ph, pw, scale, dtype, edge)


def _reference_grad(op, g, feats, boxes, scale=SCALE, sampling_ratio=-1, dtype=np.float64,
                    edge="torchvision", ph=PH, pw=PW):
    rois, bidx = split_batch(boxes)
    if op == "roi_pool":
        return ref.roi_pool_backward_ref(g, feats, rois, bidx, ph, pw, scale, dtype)
    if op == "ps_roi_align":
        return ref.ps_roi_align_backward_ref(g, feats.shape, rois, bidx, ph, pw, scale,
                                             sampling_ratio)
    return ref.ps_roi_pool_backward_ref(g, feats.shape, rois, bidx, ph, pw, scale, dtype, edge)


def _boxes(rng):
    """Random boxes and every edge case of conftest (partly / wholly outside, tiny, degenerate,
    inverted: allow_inverted=True is passed with them, the whole image)."""
    return np.concatenate([random_boxes(rng, 8, N, H, W, SCALE),
                           edge_case_boxes(rng, N, H, W, SCALE)])


def _distinct(rng, shape):
    """Features whose values are all distinct, 0.01 apart at least: every max is unique and
    well separated, so roi_pool's arg-max cannot move within a finite-difference step."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 1.0)


# ---- values and gradients against the reference -----------------------------------------------

# (op, sampling_ratio, edge): the variants of each operator
VARIANTS = [("roi_pool", -1, "torchvision"), ("ps_roi_align", -1, "torchvision"),
            ("ps_roi_align", 2, "torchvision"), ("ps_roi_pool", -1, "torchvision"),
            ("ps_roi_pool", -1, "image")]


def _kwargs(op, edge):
    return dict(edge=edge) if op == "ps_roi_pool" else {}


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op, sampling_ratio, edge", VARIANTS)
def test_values_and_gradients_equal_reference(rng, op, sampling_ratio, edge, dtype,
                                              channels_last):
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), _boxes(rng)
    x = _t(feats, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    out = _ours(op, x, _t(boxes, dtype), sampling_ratio=sampling_ratio, allow_inverted=True,
                **_kwargs(op, edge))
    co = CHANNELS[op] // (PH * PW) if op != "roi_pool" else CHANNELS[op]
    assert out.dtype == dtype and out.shape == (len(boxes), co, PH, PW)
    # the result has the input's memory format
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    np_dtype = DTYPES[dtype]
    expected = _reference(op, feats, boxes, sampling_ratio=sampling_ratio, dtype=np_dtype,
                          edge=edge)
    g = make_features(rng, *out.shape)
    # autograd.grad: the gradient as the backward made it (x.grad would be restrided by torch)
    (grad,) = torch.autograd.grad(out, x, _t(g, dtype))
    expected_grad = _reference_grad(op, g, feats, boxes, sampling_ratio=sampling_ratio,
                                    dtype=np_dtype, edge=edge)
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last
                              else torch.contiguous_format)
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:
        # a max is exact in float32; a mean or a bilinear sample is float32 arithmetic
        tol = dict(rtol=0, atol=0) if op == "roi_pool" else dict(rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(out.detach().numpy(), expected, **tol)
    np.testing.assert_allclose(grad.numpy(), expected_grad,
                               **(tol if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)))


@pytest.mark.parametrize("op", OPS)
def test_equal_core_and_list_boxes(rng, op):
    """The adapter returns the core's result bit for bit, for both box forms."""
    feats = make_features(rng, N, CHANNELS[op], H, W)
    boxes = random_boxes(rng, 7, N, H, W, SCALE)
    boxes = boxes[np.argsort(boxes[:, 0], kind="stable")]
    per_image = [_t(boxes[boxes[:, 0] == i, 1:]) for i in range(N)]
    core = getattr(roialign_cy, op)(feats, boxes, (PH, PW), SCALE)
    x = _t(feats, requires_grad=True)
    out = _ours(op, x, per_image)
    np.testing.assert_array_equal(out.detach().numpy(), core)
    np.testing.assert_array_equal(_ours(op, _t(feats), _t(boxes)).numpy(), core)
    g = make_features(rng, *out.shape)
    out.backward(_t(g))
    backward = getattr(roialign_cy, op + "_backward")
    np.testing.assert_array_equal(x.grad.numpy(),
                                  backward(g, feats, boxes, (PH, PW), SCALE))


@pytest.mark.parametrize("form", ["tensor", "list of empties", "empty list"])
@pytest.mark.parametrize("op", OPS)
def test_empty_boxes(rng, op, form):
    feats = make_features(rng, N, CHANNELS[op], H, W)
    boxes = {"tensor": torch.zeros((0, 5), dtype=torch.float64),
             "list of empties": [torch.zeros((0, 4), dtype=torch.float64)] * N,
             "empty list": []}[form]
    x = _t(feats, requires_grad=True)
    out = _ours(op, x, boxes)
    co = CHANNELS[op] if op == "roi_pool" else CHANNELS[op] // (PH * PW)
    assert out.shape == (0, co, PH, PW) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()


# ---- autograd -----------------------------------------------------------------------------------

def _gradcheck_boxes():
    # boxes partly outside and reaching the last row and column: gradcheck holds for them too,
    # since ps_roi_align and ps_roi_pool are linear in the input and roi_pool's arg-maxes are
    # well separated (_distinct)
    img_h, img_w = 6 / SCALE, 7 / SCALE
    return np.array([[0, 1.3, 0.7, 9.6, 8.2], [0, -2.0, 3.1, 6.2, 13.0],
                     [0, 0.0, 0.0, img_w, img_h], [0, 7.7, 5.1, 16.0, 12.4]])


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("op, sampling_ratio, edge", VARIANTS)
def test_gradcheck(rng, op, sampling_ratio, edge, channels_last):
    shape = (1, CHANNELS[op], 6, 7)
    feats = _distinct(rng, shape) if op == "roi_pool" else make_features(rng, *shape)
    x = _t(feats)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    boxes = _gradcheck_boxes()
    # torchvision's box list form as well: the list position is the batch index
    per_image = [_t(boxes[:, 1:])]
    assert torch.autograd.gradcheck(
        lambda x: _ours(op, x, per_image, sampling_ratio=sampling_ratio, **_kwargs(op, edge)),
        (x,))


@pytest.mark.parametrize("op", OPS)
def test_torchvision_backward_case_gradcheck(op):
    """torchvision's test_backward case (x (1, 8, 5, 5), 2 x 2 bins, three boxes, sampling_ratio
    1), over its seeds, contiguous and transposed; roi_pool on well-separated values."""
    rois = _t([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]])
    for seed in range(3):
        rng = np.random.default_rng(seed)
        feats = _distinct(rng, (1, 8, 5, 5)) if op == "roi_pool" else rng.random((1, 8, 5, 5))
        for x in (_t(feats), _t(feats).permute(0, 1, 3, 2)):
            x.requires_grad_()
            assert torch.autograd.gradcheck(
                lambda z: _ours(op, z, rois, 2, 1.0, sampling_ratio=1), (x,))


@pytest.mark.parametrize("op", OPS)
def test_boxes_get_no_gradient(rng, op):
    """Boxes that require grad are accepted and get None (torchvision's behaviour); the input's
    gradient is the same as without them."""
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), random_boxes(rng, 5, N, H, W, SCALE)
    g = _t(make_features(rng, 5, CHANNELS[op] // (1 if op == "roi_pool" else PH * PW), PH, PW))
    x = _t(feats, requires_grad=True)
    _ours(op, x, _t(boxes)).backward(g)
    expected = x.grad.clone()
    x.grad = None
    b = _t(boxes, requires_grad=True)
    out = _ours(op, x, b)
    assert out.requires_grad
    out.backward(g)
    assert b.grad is None
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    # per-image boxes that require grad
    x.grad = None
    per_image = [_t(boxes[boxes[:, 0] == i, 1:], requires_grad=True) for i in range(N)]
    _ours(op, x, per_image).sum().backward()
    assert all(p.grad is None for p in per_image) and x.grad is not None
    # only the boxes require grad: nothing to compute, nothing fails
    out = _ours(op, x.detach(), b)
    out.sum().backward()
    assert b.grad is None


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("op", OPS)
def test_one_plan_per_step_and_what_the_backward_keeps(rng, spy, op, deterministic):
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), random_boxes(rng, 5, N, H, W, SCALE)
    x = _t(feats, requires_grad=True)
    _ours(op, x, _t(boxes, requires_grad=True), deterministic=deterministic).sum().backward()
    (_, fplan, fargs, _), (_, bplan, bargs, bkw) = spy
    assert fplan is bplan and fplan.params.op == op
    assert np.shares_memory(fargs[0], x.detach().numpy())
    # only the feature gradient is asked for, even though the boxes require grad
    assert bkw["wrt"] == "features" and bkw["deterministic"] is deterministic
    if op == "roi_pool":
        # the forward's arg-max pixels are kept (as torchvision keeps them), not the input
        assert bargs[1] is None and bkw["argmax"].dtype == np.int32
        assert bkw["argmax"].shape == fplan.output_shape()
    else:
        # the average-mode gradients read no feature value: nothing of the input is kept
        assert bargs[1] is None


@pytest.mark.parametrize("op", OPS)
def test_double_backward_raises(rng, op):
    x = _t(make_features(rng, N, CHANNELS[op], H, W), requires_grad=True)
    out = _ours(op, x, _t(random_boxes(rng, 4, N, H, W, SCALE)))
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError,
                       match="(?i)double backward|once_differentiable|not differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("op", OPS)
def test_no_grad_and_threads(rng, op):
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), random_boxes(rng, 6, N, H, W, SCALE)
    x = _t(feats, requires_grad=True)
    with torch.no_grad():
        out = _ours(op, x, _t(boxes), n_threads=1)
    assert not out.requires_grad
    np.testing.assert_array_equal(out.numpy(),
                                  _ours(op, x, _t(boxes), n_threads=2).detach().numpy())


def test_argument_errors(rng):
    x = _t(make_features(rng, N, 5, H, W))
    b = _t(random_boxes(rng, 3, N, H, W, SCALE))
    with pytest.raises(ValueError, match="multiple of output_size"):
        rt.ps_roi_align(x, b, (PH, PW), SCALE)
    with pytest.raises(ValueError, match="multiple of output_size"):
        rt.PSRoIPool((PH, PW), SCALE)(x, b)
    with pytest.raises(ValueError, match="edge must be one of"):
        rt.ps_roi_pool(_t(make_features(rng, N, 6, H, W)), b, (PH, PW), SCALE, edge="clip")
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        rt.roi_pool(x.numpy(), b, 2)
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape \(L, 4\)"):
        rt.roi_pool(x, [b], 2)
    inverted = _t([[0, 8.0, 1.0, 2.0, 6.0]])
    with pytest.raises(ValueError, match="allow_inverted=True"):
        rt.roi_pool(x, inverted, 2)
    assert rt.roi_pool(x, inverted, 2, allow_inverted=True).shape == (1, 5, 2, 2)


# ---- modules ------------------------------------------------------------------------------------

def test_module_reprs_and_state():
    modules = [(rt.RoIPool((7, 7), 0.0625), "RoIPool(output_size=(7, 7), spatial_scale=0.0625)"),
               (rt.PSRoIAlign(7, 0.25, 2),
                "PSRoIAlign(output_size=7, spatial_scale=0.25, sampling_ratio=2)"),
               (rt.PSRoIPool([3, 3], 1.0), "PSRoIPool(output_size=[3, 3], spatial_scale=1.0)"),
               (rt.PSRoIPool(3, 0.5, edge="image"),
                "PSRoIPool(output_size=3, spatial_scale=0.5, edge='image')")]
    for module, expected in modules:
        assert repr(module) == expected
        # like torchvision's, the modules hold no parameters or buffers, and survive copies
        assert module.state_dict() == {} and not list(module.parameters())
        for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
            assert repr(clone) == expected and clone.n_threads is None
    module = rt.PSRoIAlign((2, 3), 0.5, -1, n_threads=2, deterministic=False)
    assert (module.output_size, module.spatial_scale, module.sampling_ratio, module.n_threads,
            module.deterministic) == ((2, 3), 0.5, -1, 2, False)


@pytest.mark.parametrize("op", OPS)
def test_modules_equal_functions(rng, op):
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), random_boxes(rng, 6, N, H, W, SCALE)
    boxes = boxes[np.argsort(boxes[:, 0], kind="stable")]
    per_image = [_t(boxes[boxes[:, 0] == i, 1:]) for i in range(N)]
    args = ((PH, PW), SCALE, 2) if op == "ps_roi_align" else ((PH, PW), SCALE)
    kwargs = dict(edge="image") if op == "ps_roi_pool" else {}
    module = MODULES[op](*args, n_threads=1, **kwargs)
    x = _t(feats, requires_grad=True)
    out = module(x, per_image)
    expected = _ours(op, x, _t(boxes), sampling_ratio=2, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (g1,) = torch.autograd.grad(out.sum(), x)
    (g2,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


# ---- the CUDA path ------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_cuda_path_through_dlpack_on_torch_stream(rng, op, monkeypatch):
    """The CUDA branch with fakes (as in test_torch): every tensor goes through DLPack inside
    CuPy's ExternalStream of torch's current stream, nothing is copied to the host, and the result
    is the one of the CPU path."""
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), random_boxes(rng, 5, N, H, W, SCALE)
    x = _t(feats, requires_grad=True)
    expected = _ours(op, x, _t(boxes))
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    events = []

    class ExternalStream:
        def __init__(self, *args):
            self.args = args

        def __enter__(self):
            events.append(("enter", self.args))

        def __exit__(self, *exc):
            events.append(("exit", self.args))

    class Device(ExternalStream):
        pass

    fake_cuda_path(monkeypatch, events, ExternalStream, Device)
    out = _ours(op, x, _t(boxes))
    (grad,) = torch.autograd.grad(out.sum(), x)
    monkeypatch.undo()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    depth, converted = 0, 0
    for kind, what in events:
        depth += {"enter": 1, "exit": -1}.get(kind, 0)
        if kind == "from_dlpack":
            assert depth == 2, "a DLPack exchange outside torch's stream"
            converted += 1
    # forward: input, boxes; backward: grad_output (roi_pool keeps its arg-max array, not the
    # input)
    assert converted == 3
    assert ("enter", (0xC0FFEE, None)) in events


def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    from roialign_cy import _cuda
    return _cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA build of PyTorch, CuPy and a GPU")
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("op, sampling_ratio, edge", VARIANTS)
def test_cuda_equals_cpu_on_a_side_stream(rng, op, sampling_ratio, edge, channels_last,
                                          deterministic):
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), _boxes(rng)
    kwargs = dict(sampling_ratio=sampling_ratio, allow_inverted=True, **_kwargs(op, edge))
    x = _t(feats, requires_grad=True)
    out = _ours(op, x, _t(boxes), **kwargs)
    g = _t(make_features(rng, *out.shape))
    out.backward(g)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc = x.detach().cuda()
        if channels_last:
            xc = xc.to(memory_format=torch.channels_last)
        xc.requires_grad_()
        oc = _ours(op, xc, _t(boxes).cuda(), deterministic=deterministic, **kwargs)
        oc.backward(g.cuda())
    torch.cuda.synchronize()
    assert oc.device.type == "cuda" and xc.grad.device.type == "cuda"
    torch.testing.assert_close(oc.cpu(), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-12, atol=1e-12)


# ---- torchvision parity --------------------------------------------------------------------------

@pytest.fixture
def tv():
    pytest.importorskip("torchvision", reason="torchvision is not installed (CI has only torch)")
    import torchvision.ops
    return torchvision.ops


def _theirs(tv, op, x, boxes, output_size=(PH, PW), scale=SCALE, sampling_ratio=-1):
    if op == "ps_roi_align":
        return tv.ps_roi_align(x, boxes, output_size, scale, sampling_ratio)
    return getattr(tv, op)(x, boxes, output_size, scale)


def _assert_parity(ours, theirs, dtype):
    """float64: equal (-0 == 0); float32: within a few ulps (equal in practice)."""
    if dtype == torch.float64:
        np.testing.assert_array_equal(ours.detach().numpy(), theirs.detach().numpy())
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op, sampling_ratio", [("roi_pool", -1), ("ps_roi_align", -1),
                                                ("ps_roi_align", 2), ("ps_roi_pool", -1)])
def test_torchvision_parity(tv, rng, op, sampling_ratio, dtype):
    """Forward, and input gradient (ps_roi_pool's: test_torchvision_ps_roi_pool_gradient), on
    random boxes and every edge case, inverted ones included (torchvision's convention).
    ps_roi_align: a box without samples (zero size, adaptive grid) gives 0 here, NaN there."""
    feats, boxes = make_features(rng, N, CHANNELS[op], H, W), _boxes(rng)
    x, xt = _t(feats, dtype, True), _t(feats, dtype, True)
    ours = _ours(op, x, _t(boxes, dtype), sampling_ratio=sampling_ratio, allow_inverted=True)
    theirs = _theirs(tv, op, xt, _t(boxes, dtype), sampling_ratio=sampling_ratio)
    nan = torch.isnan(theirs).flatten(1).any(1)
    if op == "ps_roi_align" and sampling_ratio <= 0:
        # the point and the zero-width / zero-height boxes of edge_case_boxes (an inverted box
        # may give NaN there too: ceil of a small negative size is 0 samples)
        assert nan.sum() >= 3 and not ours[nan].any()
    else:
        assert not nan.any()
    _assert_parity(ours[~nan], theirs[~nan], dtype)
    if op == "ps_roi_pool":
        return
    g = _t(make_features(rng, *ours.shape), dtype)
    ours.backward(g)
    theirs.backward(g)  # a box without samples sends no gradient in either
    _assert_parity(x.grad, xt.grad, dtype)


def _reaches_last_pixel(boxes, scale, h, w, ph, pw, dtype):
    """Per box: does a bin, clipped to the whole map, end at the last row or column? There
    torchvision's forward (clipped to H - 1, W - 1) and backward (clipped to H, W) disagree."""
    out = []
    for roi in boxes[:, 1:]:
        hs, he, ws, we = ref.integer_bins(roi, ph, pw, scale, h, w, "ps_roi_pool", dtype, "image")
        out.append(max(he) >= h or max(we) >= w)
    return np.array(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torchvision_ps_roi_pool_gradient(tv, rng, dtype):
    """torchvision's ps_roi_pool clips its bins to [0, H - 1) x [0, W - 1) in the forward but to
    [0, H) x [0, W) in the backward, so its gradient is that of edge="image", not of its own
    forward. Ours is the gradient of the forward chosen by ``edge``, hence:
    - edge="image": our gradient equals torchvision's for every box;
    - edge="torchvision" (torchvision's forward): equal for the boxes none of whose bins reaches
      the last row or column (where the two clippings coincide), different for the others.
    The coordinates are float32-exact and the scale a power of two, so torchvision's backward,
    which rounds the corners with roundf (float32) even in float64, rounds them as its forward."""
    feats, boxes = make_features(rng, N, CHANNELS["ps_roi_pool"], H, W), _boxes(rng)
    xt = _t(feats, dtype, True)
    theirs = tv.ps_roi_pool(xt, _t(boxes, dtype), (PH, PW), SCALE)
    g = _t(make_features(rng, *theirs.shape), dtype)
    theirs.backward(g)
    x = _t(feats, dtype, True)
    rt.ps_roi_pool(x, _t(boxes, dtype), (PH, PW), SCALE, edge="image",
                   allow_inverted=True).backward(g)
    _assert_parity(x.grad, xt.grad, dtype)

    edge = _reaches_last_pixel(boxes, SCALE, H, W, PH, PW, DTYPES[dtype])
    assert edge.any() and not edge.all()
    for subset, equal in ((~edge, True), (edge, False)):
        x, xt = _t(feats, dtype, True), _t(feats, dtype, True)
        b, gs = _t(boxes[subset], dtype), g[torch.from_numpy(subset)]
        rt.ps_roi_pool(x, b, (PH, PW), SCALE, allow_inverted=True).backward(gs)
        tv.ps_roi_pool(xt, b, (PH, PW), SCALE).backward(gs)
        if equal:
            _assert_parity(x.grad, xt.grad, dtype)
        else:
            assert (x.grad - xt.grad).abs().max() > 0.1


def test_torchvision_ps_roi_pool_gradient_is_not_that_of_its_forward(tv):
    """On a box that reaches the last row and column, our edge="torchvision" gradient is the
    exact gradient of torchvision's forward (linear in the input: its Jacobian, column by column),
    and torchvision's backward is not."""
    x = torch.zeros((1, 4, 5, 6), dtype=torch.float64)
    box = _t([[0, 1.0, 1.0, 6.0, 5.0]])  # rows 1..4, columns 1..5: the last of each
    g = _t(np.arange(1.0, 5.0).reshape(1, 1, 2, 2))

    def theirs(x):
        return (tv.ps_roi_pool(x, box, 2) * g).sum()

    jacobian = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = 1.0
        jacobian.view(-1)[i] = theirs(e.view(x.shape))
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    (rt.ps_roi_pool(xo, box, 2) * g).sum().backward()
    theirs(xt).backward()
    np.testing.assert_array_equal(xo.grad.numpy(), jacobian.numpy())
    assert not torch.equal(xt.grad, jacobian)
    assert xt.grad[..., -1, :].any() and not jacobian[..., -1, :].any()


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_torchvision_forward_case(tv, op, dtype, contiguous):
    """torchvision's test_forward case: x (2, 50, 10, 10) (transposed when not contiguous), 5 x 5
    bins, four boxes, scale 1, adaptive sampling; and the gradient of the same call."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 50, 10, 10))).to(dtype)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = _t([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = _ours(op, xo, rois, 5, 1.0)
    theirs = _theirs(tv, op, xt, rois, 5, 1.0)
    assert ours.dtype == dtype and ours.shape == theirs.shape
    _assert_parity(ours, theirs, dtype)
    g = torch.from_numpy(rng.standard_normal(tuple(ours.shape))).to(dtype)
    ours.backward(g)
    theirs.backward(g)
    # no bin of these boxes reaches row or column 9: ps_roi_pool's gradients agree too
    _assert_parity(xo.grad, xt.grad, dtype)


@pytest.mark.parametrize("op", OPS)
def test_torchvision_backward_case(tv, op):
    """torchvision's test_backward case, the gradients compared with torchvision's."""
    rois = _t([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]])
    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = _t(rng.random((1, 8, 5, 5)), requires_grad=True)
        xt = _t(x.detach().numpy(), requires_grad=True)
        (g1,) = torch.autograd.grad(_ours(op, x, rois, 2, 1.0, sampling_ratio=1).sum(), x)
        (g2,) = torch.autograd.grad(_theirs(tv, op, xt, rois, 2, 1.0, sampling_ratio=1).sum(), xt)
        _assert_parity(g1, g2, torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_torchvision_list_boxes_case(tv, op):
    """torchvision's test_jit_boxes_list case: two images, the same five (x1, y1, x2, y2) rows
    for each (its (4, 5) box table transposed; one is inverted, one a point), 3 x 3 bins."""
    c = 1 if op == "roi_pool" else 9
    x = torch.from_numpy(np.random.default_rng(1).random((2, c, 10, 10)))
    roi = _t([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]).t()
    ours = _ours(op, x, [roi, roi], [3, 3], 1.0, allow_inverted=True)
    theirs = _theirs(tv, op, x, [roi, roi], [3, 3], 1.0)
    assert ours.shape == (10, 1, 3, 3)
    nan = torch.isnan(theirs).flatten(1).any(1)
    assert not ours[nan].any()
    _assert_parity(ours[~nan], theirs[~nan], torch.float64)


def test_torchvision_module_reprs(tv):
    for ours, theirs in [(rt.RoIPool((7, 7), 0.0625), tv.RoIPool((7, 7), 0.0625)),
                         (rt.PSRoIAlign(7, 0.25, 2), tv.PSRoIAlign(7, 0.25, 2)),
                         (rt.PSRoIPool([3, 3], 1.0), tv.PSRoIPool([3, 3], 1.0)),
                         (rt.RoIAlign(5, 0.5, -1, True), tv.RoIAlign(5, 0.5, -1, True))]:
        assert repr(ours) == repr(theirs)
        assert ours.state_dict() == theirs.state_dict() == {}
