"""roialign_cy.torch: torchvision's functions and modules on our kernels, autograd to the input and
the boxes, zero-copy data movement, the CUDA path (with fakes here; on a GPU where there is one),
and parity with torchvision where it is installed (values and gradients, float64)."""
import contextlib
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

import roialign_cy  # noqa: E402
import roialign_cy.torch as rt  # noqa: E402
from conftest import edge_case_boxes, make_features, random_boxes, random_rotated_boxes  # noqa: E402

N, C, H, W = 2, 3, 9, 11
SCALE = 0.5


def _t(a, requires_grad=False):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(requires_grad)


@pytest.fixture
def data(rng):
    return make_features(rng, N, C, H, W), random_boxes(rng, 6, N, H, W, SCALE)


def _fpn_inputs(rng, dtype=torch.float64, n=2, c=2, size=(64, 80), boxes_per_image=10):
    """A 4-level pyramid dict (strides 4 to 32), per-image boxes of log-uniform size over an image
    of ``size`` pixels, and the image shapes."""
    x = {str(i): torch.from_numpy(rng.standard_normal((n, c, size[0] >> (2 + i),
                                                       size[1] >> (2 + i)))).to(dtype)
         for i in range(4)}
    boxes = []
    for _ in range(n):
        w, h = np.exp(rng.uniform(np.log(2), np.log(60), (2, boxes_per_image)))
        x1, y1 = rng.uniform(0, size[1] - w), rng.uniform(0, size[0] - h)
        boxes.append(torch.from_numpy(np.column_stack([x1, y1, x1 + w, y1 + h])).to(dtype))
    return x, boxes, [size] * n


# ---- import, forward values, box forms ---------------------------------------------------------

def test_import_roialign_cy_does_not_import_torch():
    code = "import sys, roialign_cy; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    # without PyTorch, the adapter says what to install
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import roialign_cy.torch\n"
            "except ImportError as exc:\n    assert 'roialign_cy[torch]' in str(exc), exc\n"
            "else:\n    raise AssertionError('no ImportError')")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_equals_core(data, dtype, aligned):
    feats, boxes = data
    got = rt.roi_align(_t(feats).to(dtype), _t(boxes).to(dtype), (3, 2), SCALE, 2, aligned)
    expected = roialign_cy.roi_align(feats.astype(got.numpy().dtype),
                                     boxes.astype(got.numpy().dtype), (3, 2), SCALE, 2, aligned)
    assert got.dtype == dtype and got.shape == (6, C, 3, 2)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_list_boxes_and_modules(data, rng):
    feats, boxes = data
    boxes = boxes[np.argsort(boxes[:, 0], kind="stable")]
    per_image = [_t(boxes[boxes[:, 0] == i, 1:]) for i in range(N)]
    x = _t(feats)
    ref = rt.roi_align(x, _t(boxes), 2, SCALE, -1, True)
    torch.testing.assert_close(rt.roi_align(x, per_image, 2, SCALE, -1, True), ref, rtol=0, atol=0)
    module = rt.RoIAlign(2, SCALE, -1, True)
    torch.testing.assert_close(module(x, per_image), ref, rtol=0, atol=0)
    assert "spatial_scale=0.5" in repr(module)
    rboxes = random_rotated_boxes(rng, 5, N, H, W, SCALE)
    expected = roialign_cy.roi_align_rotated(feats, rboxes, 2, SCALE, 2, True, clockwise=True)
    got = rt.RoIAlignRotated(2, SCALE, 2, True, True)(x, _t(rboxes))
    np.testing.assert_array_equal(got.numpy(), expected)


# ---- autograd ----------------------------------------------------------------------------------

def test_gradients_equal_core(data, rng):
    feats, boxes = data
    x, b = _t(feats, True), _t(boxes, True)
    out = rt.roi_align(x, b, (3, 2), SCALE, 2, True)
    g = rng.standard_normal(tuple(out.shape))
    out.backward(_t(g))
    gf, gb = roialign_cy.roi_align_backward(g, feats, boxes, (3, 2), SCALE, 2, True, wrt="both")
    np.testing.assert_array_equal(x.grad.numpy(), gf)
    np.testing.assert_array_equal(b.grad.numpy(), gb)
    # only the boxes require grad; then only the input
    b.grad = None
    rt.roi_align(x.detach(), b, (3, 2), SCALE, 2, True).backward(_t(g))
    np.testing.assert_array_equal(b.grad.numpy(), gb)
    x.grad = None
    rt.roi_align(x, b.detach(), (3, 2), SCALE, 2, True).backward(_t(g))
    np.testing.assert_array_equal(x.grad.numpy(), gf)


def _safe_boxes(rng, k, n, h, w, scale):
    """Boxes well inside the map, at least two pixels a side: no kink within gradcheck's step."""
    rows = []
    for _ in range(k):
        x1, y1 = rng.uniform(0.5, w / 2), rng.uniform(0.5, h / 2)
        rows.append([x1, y1, x1 + rng.uniform(2, w / 2 - 1), y1 + rng.uniform(2, h / 2 - 1)])
    return (np.array(rows) / scale).tolist()


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(rng, aligned):
    x = _t(make_features(rng, 2, 2, 6, 7), True)
    b0, b1 = (_t(_safe_boxes(rng, 2, 1, 6, 7, SCALE), True) for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda x, b0, b1: rt.roi_align(x, [b0, b1], 2, SCALE, 2, aligned), (x, b0, b1))


def test_gradcheck_rotated(rng):
    x = _t(make_features(rng, 1, 2, 8, 8), True)
    b = _t([[0, 4.3, 3.9, 4.2, 3.1, 25.0], [0, 8.7, 7.2, 5.3, 6.1, -70.0]], True)
    assert torch.autograd.gradcheck(
        lambda x, c: rt.roi_align_rotated(x, torch.cat([b[:, :1].detach(), c], 1), 2, SCALE, 2),
        (x, b[:, 1:].detach().requires_grad_()))


def test_gradcheck_multiscale(rng):
    x, boxes, shapes = _fpn_inputs(rng, n=1, c=1, size=(32, 32), boxes_per_image=0)
    boxes = [_t([[2.3, 3.1, 7.4, 6.9], [5.2, 6.3, 27.9, 24.2], [9.6, 4.1, 20.3, 17.8]], True)]
    levels = [x[k].requires_grad_() for k in x]
    pooler = rt.MultiScaleRoIAlign(list(x), 2, 2, canonical_scale=16, canonical_level=3)

    def f(b, *levels):
        return pooler(dict(zip(x, levels)), [b], shapes)

    assert torch.autograd.gradcheck(f, (boxes[0], *levels))


def test_double_backward_raises(data):
    feats, boxes = data
    x = _t(feats, True)
    out = rt.roi_align(x, _t(boxes), 2, SCALE, 2)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)double backward|once_differentiable|not differentiable"):
        g.sum().backward()


def fake_cuda_path(monkeypatch, events, ExternalStream, Device):
    """Send the adapter down its CUDA branch on CPU tensors: a fake CuPy whose from_dlpack records
    ("from_dlpack", shape) in ``events`` and whose ExternalStream and Device are the given context
    managers; torch's current stream is 0xC0FFEE; copying a tensor to the host is an error."""
    def from_dlpack(t):
        assert isinstance(t, torch.Tensor)
        events.append(("from_dlpack", tuple(t.shape)))
        return np.from_dlpack(t)

    fake_cupy = types.SimpleNamespace(
        from_dlpack=from_dlpack, cuda=types.SimpleNamespace(ExternalStream=ExternalStream, Device=Device))
    monkeypatch.setattr(rt._cuda, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(rt, "_is_cuda", lambda t: True)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0xC0FFEE))

    def host_copy(*args, **kwargs):
        raise AssertionError("a CUDA tensor must not be copied to the host")

    monkeypatch.setattr(torch.Tensor, "numpy", host_copy)
    monkeypatch.setattr(torch.Tensor, "cpu", host_copy)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(data, context):
    feats, boxes = data
    x = _t(feats, True)
    with context():
        out = rt.roi_align(x, _t(boxes), 2, SCALE, 2)
    assert not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), roialign_cy.roi_align(feats, boxes, 2, SCALE, 2))


def _call(op, x, boxes, **kwargs):
    """Each operator of the adapter on 2 x 2 bins, scale SCALE, adaptive sampling."""
    if op == "roi_align_rotated":
        return rt.roi_align_rotated(x, boxes, 2, SCALE, -1, **kwargs)
    if op in ("roi_align", "ps_roi_align"):
        return getattr(rt, op)(x, boxes, 2, SCALE, -1, **kwargs)
    return getattr(rt, op)(x, boxes, 2, SCALE, **kwargs)


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "nothing requires grad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("op", ["roi_align", "roi_align_rotated", "roi_pool", "ps_roi_align",
                                "ps_roi_pool"])
def test_forward_without_autograd_takes_the_one_shot_call(rng, spy, op, channels_last, how):
    """With nothing to record, the forward is the core's one-shot call (no plan kept for a
    backward, no autograd node): the autograd path's values, bit for bit, and no grad."""
    feats = make_features(rng, N, 8, H, W)  # 8 channels: 2 x (2 x 2) for the position-sensitive
    if op == "roi_align_rotated":
        boxes = random_rotated_boxes(rng, 5, N, H, W, SCALE)
    else:
        boxes = random_boxes(rng, 5, N, H, W, SCALE)
    x, b = _t(feats, how != "nothing requires grad"), _t(boxes)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(x.requires_grad)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "nothing requires grad": contextlib.nullcontext}[how]
    with context():
        out = _call(op, x, b)
    assert spy == [] and not out.requires_grad
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
    recorded = _call(op, x.detach().requires_grad_(), b)
    assert len(spy) == 1  # the autograd path keeps a plan
    np.testing.assert_array_equal(out.numpy(), recorded.detach().numpy())


def test_forward_without_autograd_keeps_cuda_tensors_on_the_device(data, monkeypatch):
    feats, boxes = data
    events = []
    fake_cuda_path(monkeypatch, events, lambda ptr, device: contextlib.nullcontext(),
                   lambda device: contextlib.nullcontext())
    with torch.no_grad():
        out = rt.roi_align(_t(feats), _t(boxes), 2, SCALE, 2)
    assert [e[0] for e in events] == ["from_dlpack", "from_dlpack"]
    np.testing.assert_array_equal(np.from_dlpack(out), roialign_cy.roi_align(feats, boxes, 2,
                                                                              SCALE, 2))


# ---- data movement -----------------------------------------------------------------------------

def test_contiguous_input_is_not_copied(data, spy):
    feats, boxes = data
    x, b = _t(feats, True), _t(boxes)
    rt.roi_align(x, b, 2, SCALE, 2).sum().backward()
    (_, fplan, fargs, _), (_, bplan, bargs, bkw) = spy
    # one plan serves the forward and the backward of the step
    assert fplan is bplan and not fplan.params.channels_last
    assert np.shares_memory(fargs[0], x.detach().numpy())
    assert np.shares_memory(fplan._given["boxes"], b.numpy())
    # the avg-mode feature gradient reads no feature value: nothing of the input is kept for it
    assert bargs[1] is None and bkw["wrt"] == "features"


def test_channels_last_uses_the_nhwc_kernels_without_copy(data, spy):
    feats, boxes = data
    x = _t(feats).to(memory_format=torch.channels_last).requires_grad_()
    b = _t(boxes, True)
    out = rt.roi_align(x, b, (3, 2), SCALE, 2, True)
    assert out.shape == (6, C, 3, 2) and out.is_contiguous(memory_format=torch.channels_last)
    (_, fplan, fargs, _), = spy
    assert fplan.params.channels_last and fargs[0].shape == (N, H, W, C)
    assert fargs[0].ctypes.data == x.data_ptr() and fargs[0].flags.c_contiguous
    ref = rt.roi_align(_t(feats, True), _t(boxes, True), (3, 2), SCALE, 2, True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn(out.shape, dtype=out.dtype)
    out.backward(g)
    gf, gb = roialign_cy.roi_align_backward(g.numpy(), feats, boxes, (3, 2), SCALE, 2, True,
                                            wrt="both")
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(x.grad.numpy(), gf, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), gb, rtol=0, atol=1e-12)


def test_non_contiguous_input_is_made_contiguous(data):
    feats, boxes = data
    wide = _t(np.repeat(feats, 2, axis=3))
    x = wide[:, :, :, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(rt.roi_align(x, _t(boxes), 2, SCALE, 2).numpy(),
                                  roialign_cy.roi_align(feats, boxes, 2, SCALE, 2))


def test_cuda_path_through_dlpack_on_torch_stream(data, monkeypatch):
    """The CUDA branch with fakes: tensors go through cupy.from_dlpack / torch.from_dlpack, the
    kernels run inside cupy's ExternalStream of torch's current stream, nothing goes to the host
    through .numpy() or .cpu()."""
    feats, boxes = data
    x, b = _t(feats, True), _t(boxes, True)
    ref = rt.roi_align(x, b, 2, SCALE, 2, True)
    ref.sum().backward()
    ref_x, ref_b = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    events = []

    class Context:
        def __init__(self, *args):
            self.args = args

        def __enter__(self):
            events.append((type(self).__name__, self.args))

        def __exit__(self, *exc):
            events.append(("exit", type(self).__name__))

    class ExternalStream(Context):
        pass

    class Device(Context):
        pass

    fake_cuda_path(monkeypatch, events, ExternalStream, Device)
    out = rt.roi_align(x, b, 2, SCALE, 2, True)
    out.sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, ref_x, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, ref_b, rtol=0, atol=0)
    assert ("ExternalStream", (0xC0FFEE, None)) in events
    streams = [i for i, e in enumerate(events) if e[0] == "ExternalStream"]
    exits = [i for i, e in enumerate(events) if e == ("exit", "ExternalStream")]
    converted = [i for i, e in enumerate(events) if e[0] == "from_dlpack"]
    assert len(streams) == 2  # forward and backward
    # every conversion happens on torch's stream
    assert all(any(s < i < e for s, e in zip(streams, exits)) for i in converted)
    assert ("from_dlpack", (N, C, H, W)) in events and ("from_dlpack", (6, 5)) in events


def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    from roialign_cy import _cuda
    return _cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA build of PyTorch, CuPy and a GPU")
def test_cuda_equals_cpu_on_a_side_stream(data, rng):
    feats, boxes = data
    x, b = _t(feats, True), _t(boxes, True)
    out = rt.roi_align(x, b, 2, SCALE, 2, True)
    g = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    out.backward(g)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc, bc = x.detach().cuda().requires_grad_(), b.detach().cuda().requires_grad_()
        oc = rt.roi_align(xc, bc, 2, SCALE, 2, True)
        oc.backward(g.cuda())
    torch.cuda.synchronize()
    assert oc.device.type == "cuda" and xc.grad.device.type == "cuda"
    torch.testing.assert_close(oc.cpu(), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bc.grad.cpu(), b.grad, rtol=1e-10, atol=1e-10)


# ---- argument errors ---------------------------------------------------------------------------

def test_argument_errors(data):
    feats, boxes = data
    x = _t(feats)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        rt.roi_align(feats, _t(boxes), 2)
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, H, W\)"):
        rt.roi_align(x[0], _t(boxes), 2)
    with pytest.raises(TypeError, match="boxes must be a Tensor"):
        rt.roi_align(x, boxes, 2)
    with pytest.raises(ValueError, match=r"boxes\[1\] must have shape \(L, 4\)"):
        rt.roi_align(x, [_t(boxes[:2, 1:]), _t(boxes[:2])], 2)
    with pytest.raises(ValueError, match="boxes must be on the device of input"):
        rt.roi_align(x, torch.empty((3, 5), dtype=x.dtype, device="meta"), 2)
    with pytest.raises(ValueError, match="sampling_ratio must be >= -1"):
        rt.roi_align(x, _t(boxes), 2, SCALE, -3)


# ---- MultiScaleRoIAlign -------------------------------------------------------------------------

def test_multiscale_equals_core(rng):
    x, boxes, shapes = _fpn_inputs(rng)
    pooler = rt.MultiScaleRoIAlign(["0", "1", "2", "3"], 3, 2)
    got = pooler(x, boxes, shapes)
    assert pooler.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    expected = roialign_cy.multi_scale_roi_align(
        [v.numpy() for v in x.values()], [b.numpy() for b in boxes], 3, pooler.scales, 2)
    np.testing.assert_array_equal(got.numpy(), expected)
    # a name left out drops that level; the maps are taken in the dict's order
    partial = rt.MultiScaleRoIAlign(["1", "2"], 3, 2)(x, boxes, shapes)
    np.testing.assert_array_equal(partial.numpy(), roialign_cy.multi_scale_roi_align(
        [x["1"].numpy(), x["2"].numpy()], [b.numpy() for b in boxes], 3, [1 / 8, 1 / 16], 2))


def test_multiscale_channels_last_and_gradients(rng):
    x, boxes, shapes = _fpn_inputs(rng)
    pooler = rt.MultiScaleRoIAlign(["0", "1", "2", "3"], 3, 2)
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    bs = [b.clone().requires_grad_() for b in boxes]
    out = pooler(xs, bs, shapes)
    g = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    out.backward(g)
    xl = {k: v.to(memory_format=torch.channels_last).requires_grad_() for k, v in x.items()}
    out_l = pooler(xl, boxes, shapes)
    assert out_l.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_l, out, rtol=0, atol=1e-13)
    out_l.backward(g)
    for k in x:
        assert xl[k].grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xl[k].grad, xs[k].grad, rtol=0, atol=1e-13)
    gf, gb = roialign_cy.multi_scale_roi_align_backward(
        g.numpy(), [v.numpy() for v in x.values()], [b.numpy() for b in boxes], 3, pooler.scales,
        2, wrt="both")
    for k, expected in zip(x, gf):
        np.testing.assert_array_equal(xs[k].grad.numpy(), expected)
    for b, expected in zip(bs, gb):
        np.testing.assert_array_equal(b.grad.numpy(), expected)


def test_multiscale_errors(rng):
    x, boxes, shapes = _fpn_inputs(rng)
    with pytest.raises(ValueError, match="consecutive pyramid levels"):
        rt.MultiScaleRoIAlign(["0", "2"], 3, 2)(x, boxes, shapes)
    with pytest.raises(ValueError, match="x must hold the feature maps"):
        rt.MultiScaleRoIAlign(["p2"], 3, 2)(x, boxes, shapes)
    with pytest.raises(ValueError, match="image_shapes must not be empty"):
        rt.MultiScaleRoIAlign(["0"], 3, 2)(x, boxes, [])


# ---- torchvision parity (float64) --------------------------------------------------------------

@pytest.fixture
def tv():
    pytest.importorskip("torchvision", reason="torchvision is not installed (CI has only torch)")
    import torchvision.ops
    return torchvision.ops


def _peer_boxes(boxes, aligned, sampling_ratio):
    # torchvision fails on a box inverted on one axis with aligned=True and an adaptive grid (see
    # test_peers._peer_boxes)
    if not aligned or sampling_ratio > 0:
        return boxes
    return boxes[(boxes[:, 3] < boxes[:, 1]) == (boxes[:, 4] < boxes[:, 2])]


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_torchvision_parity(tv, rng, aligned, sampling_ratio):
    feats = make_features(rng, N, C, H, W)
    boxes = np.concatenate([random_boxes(rng, 8, N, H, W, SCALE), edge_case_boxes(rng, N, H, W, SCALE)])
    boxes = _peer_boxes(boxes, aligned, sampling_ratio)
    x, xt = _t(feats, True), _t(feats, True)
    ours = rt.roi_align(x, _t(boxes), (3, 2), SCALE, sampling_ratio, aligned, allow_inverted=True)
    theirs = tv.roi_align(xt, _t(boxes), (3, 2), SCALE, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.from_numpy(rng.standard_normal(tuple(ours.shape)))
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchvision_multiscale_parity(tv, rng, dtype):
    x, boxes, shapes = _fpn_inputs(rng, dtype, boxes_per_image=40)
    # boxes on the level boundaries: sqrt(area) = 224 * 2**j
    boxes[0] = torch.cat([boxes[0], torch.tensor([[0, 0, 28, 28], [3, 5, 59, 61]], dtype=dtype)])
    names = ["0", "1", "2", "3"]
    ours = rt.MultiScaleRoIAlign(names, (3, 2), 2, canonical_scale=56, canonical_level=4)
    theirs = tv.MultiScaleRoIAlign(names, (3, 2), 2, canonical_scale=56, canonical_level=4)
    xa = {k: v.clone().requires_grad_() for k, v in x.items()}
    xb = {k: v.clone().requires_grad_() for k, v in x.items()}
    out_a, out_b = ours(xa, boxes, shapes), theirs(xb, boxes, shapes)
    assert ours.scales == theirs.scales
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out_a, out_b, **tol)
    g = torch.randn(out_a.shape, dtype=dtype)
    out_a.backward(g)
    out_b.backward(g)
    for k in x:
        torch.testing.assert_close(xa[k].grad, xb[k].grad, **tol)
