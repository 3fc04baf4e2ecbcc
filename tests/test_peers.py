"""Agreement with the peers that users switch from: torchvision.ops.roi_align (forward and autograd
backward) and onnxruntime's RoiAlign (opset 16). Each part is skipped when its peer is not installed."""
import numpy as np
import pytest

from conftest import edge_case_boxes, make_features, random_boxes
import roialign_cy
from conftest import peers_convention

roi_align = peers_convention(roialign_cy.roi_align)
roi_align_backward = peers_convention(roialign_cy.roi_align_backward)

N, C, H, W = 2, 3, 9, 11
SCALE = 0.5


@pytest.fixture
def data(rng):
    feats = make_features(rng, N, C, H, W)
    # random boxes plus partly / wholly outside, tiny, degenerate and inverted ones
    boxes = np.concatenate([random_boxes(rng, 6, N, H, W, SCALE), edge_case_boxes(rng, N, H, W, SCALE)])
    return feats, boxes


def _peer_boxes(boxes, aligned, sampling_ratio):
    """Drop what the peers cannot take: with aligned=True and an adaptive grid, a box inverted on
    exactly one axis gives a negative gh * gw, on which torchvision raises ("cannot create
    std::vector larger than max_size()") and onnxruntime fails (SafeInt overflow). Our result for
    those boxes (zero, conventions 1.4) is checked against the reference in test_forward."""
    if not aligned or sampling_ratio > 0:
        return boxes
    inverted = (boxes[:, 3] < boxes[:, 1]) != (boxes[:, 4] < boxes[:, 2])
    return boxes[~inverted]


# ---- torchvision -------------------------------------------------------------------------------

@pytest.fixture
def tv():
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    return torch, ops


@pytest.mark.parametrize("output_size", [(3, 2), 4])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torchvision_forward(tv, data, dtype, aligned, sampling_ratio, output_size):
    torch, ops = tv
    feats, boxes = (a.astype(dtype) for a in data)
    boxes = _peer_boxes(boxes, aligned, sampling_ratio)
    expected = ops.roi_align(torch.from_numpy(feats), torch.from_numpy(boxes), output_size, SCALE, sampling_ratio,
                             aligned).numpy()
    got = roi_align(feats, boxes, output_size, SCALE, sampling_ratio, aligned)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got, expected, **tol)


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_torchvision_backward(tv, data, rng, aligned, sampling_ratio):
    torch, ops = tv
    feats, boxes = data
    boxes = _peer_boxes(boxes, aligned, sampling_ratio)
    x = torch.from_numpy(feats).requires_grad_(True)
    out = ops.roi_align(x, torch.from_numpy(boxes), (3, 2), SCALE, sampling_ratio, aligned)
    g = rng.standard_normal(tuple(out.shape))
    out.backward(torch.from_numpy(g))
    got = roi_align_backward(g, feats, boxes, (3, 2), SCALE, sampling_ratio, aligned)
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_torchvision_list_boxes(tv, data):
    torch, ops = tv
    feats, boxes = data
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(N)]
    expected = ops.roi_align(torch.from_numpy(feats), [torch.from_numpy(b) for b in per_image], 2, SCALE, -1,
                             False).numpy()
    np.testing.assert_allclose(roi_align(feats, per_image, 2, SCALE, -1, False), expected, rtol=1e-12, atol=1e-12)


# ---- onnxruntime -------------------------------------------------------------------------------

def _ort_session(dtype, mode, output_size, sampling_ratio, coordinate_mode):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    node = helper.make_node(
        "RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode=mode, output_height=output_size[0],
        output_width=output_size[1], sampling_ratio=sampling_ratio, spatial_scale=SCALE,
        coordinate_transformation_mode=coordinate_mode)
    graph = helper.make_graph(
        [node], "roi_align",
        [helper.make_tensor_value_info("X", elem, [None, C, None, None]),
         helper.make_tensor_value_info("rois", elem, [None, 4]),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("Y", elem, [None, C, output_size[0], output_size[1]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # silence the warning about its (unchanged) max-mode summation
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("output_size", [(3, 2), (1, 4)])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("coordinate_mode", ["half_pixel", "output_half_pixel"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnxruntime(data, dtype, mode, coordinate_mode, sampling_ratio, output_size):
    feats, boxes = (a.astype(dtype) for a in data)
    boxes = _peer_boxes(boxes, coordinate_mode == "half_pixel", sampling_ratio)
    rois, bidx = np.ascontiguousarray(boxes[:, 1:]), boxes[:, 0].astype(np.int64)
    session = _ort_session(dtype, mode, output_size, sampling_ratio, coordinate_mode)
    expected = session.run(None, {"X": feats, "rois": rois, "batch_indices": bidx})[0]
    # ONNX "max" is the onnxruntime quirk (max of weighted taps): our mode="onnx_max".
    got = roi_align(feats, rois, output_size, SCALE, sampling_ratio, coordinate_mode == "half_pixel",
                    mode="onnx_max" if mode == "max" else "avg", batch_indices=bidx)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got, expected, **tol)
