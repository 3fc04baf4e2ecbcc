"""multi_scale_roi_align: the FPN level rule of torchvision and detectron2, the pooling against
single-level roi_align calls, and the gradients against finite differences (float64)."""
import math

import numpy as np
import pytest

import roialign_cy
from conftest import to_nhwc
from roialign_cy._multiscale import assign_levels

SCALES = [1 / 4, 1 / 8, 1 / 16]  # levels k = 2, 3, 4


def _pyramid(rng, n=2, c=3, h=32, w=40, levels=3, dtype=np.float64):
    return [rng.standard_normal((n, c, h >> i, w >> i)).astype(dtype) for i in range(levels)]


def _fpn_boxes(rng, k, n=2, img=(128, 160)):
    """(K, 5) boxes of log-uniform size (4 to 180 pixels a side) so that every level gets some."""
    w, h = np.exp(rng.uniform(np.log(4), np.log(180), (2, k)))
    x1 = rng.uniform(-8, img[1] - 4, k)
    y1 = rng.uniform(-8, img[0] - 4, k)
    return np.column_stack([rng.integers(n, size=k), x1, y1, x1 + w, y1 + h])


def _level_of(box, k_min, k_max, canonical_scale=224, canonical_level=4, rule="torchvision"):
    """One box's level index by the FPN formula as each peer writes it, in Python floats."""
    size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
    if rule == "torchvision":
        k = math.floor(canonical_level + math.log2(size / canonical_scale) + 1e-6)
    else:
        k = math.floor(canonical_level + math.log2(size / canonical_scale + 1e-8))
    return min(max(k, k_min), k_max) - k_min


def test_level_rule_at_the_boundaries():
    # sqrt(area) = 224 * 2**j is level 4 + j; eps decides the boxes just below a boundary
    sides = [224, 112, 448, 56, 28, 14, 1000, 224 * (1 - 5e-7)]
    rois = np.array([[0, 0, s, s] for s in sides], dtype=np.float64)
    got = assign_levels(rois, 2, 5)
    expected = [_level_of(r, 2, 5) for r in rois]
    assert got.tolist() == expected == [2, 1, 3, 0, 0, 0, 3, 2]
    # torchvision adds eps after the logarithm, detectron2 inside: they part on the last box
    d2 = assign_levels(rois, 2, 5, assign="detectron2")
    assert d2.tolist() == [_level_of(r, 2, 5, rule="detectron2") for r in rois]
    assert d2[-1] == 1 and got[-1] == 2


@pytest.mark.parametrize("rule", ["torchvision", "detectron2"])
@pytest.mark.parametrize("canonical", [(224, 4), (56, 3)])
def test_level_rule_random(rng, rule, canonical):
    boxes = _fpn_boxes(rng, 200)
    got = assign_levels(boxes[:, 1:], 2, 5, *canonical, assign=rule)
    assert got.tolist() == [_level_of(b, 2, 5, *canonical, rule=rule) for b in boxes[:, 1:]]
    # degenerate boxes (zero area) go to the finest level
    assert assign_levels(np.zeros((1, 4)), 2, 5).tolist() == [0]


def test_level_rule_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    poolers = pytest.importorskip("torchvision.ops.poolers",
                                  reason="torchvision is not installed (CI has only torch)")
    boxes = np.concatenate([_fpn_boxes(rng, 300)[:, 1:],
                            [[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 0, 0]]])
    for dtype in (np.float32, np.float64):
        b = boxes.astype(dtype)
        mapper = poolers.LevelMapper(2, 5)
        expected = mapper([torch.from_numpy(b)]).numpy()
        np.testing.assert_array_equal(assign_levels(b, 2, 5), expected)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("rule", ["torchvision", "detectron2"])
def test_equals_single_level_calls(rng, aligned, sampling_ratio, rule):
    feats = _pyramid(rng)
    boxes = _fpn_boxes(rng, 40)
    got = roialign_cy.multi_scale_roi_align(feats, boxes, (3, 2), SCALES, sampling_ratio, aligned,
                                            canonical_scale=32, canonical_level=3, assign=rule)
    for i, box in enumerate(boxes):
        level = _level_of(box[1:], 2, 4, 32, 3, rule)
        one = roialign_cy.roi_align(feats[level], box[None], (3, 2), SCALES[level],
                                    sampling_ratio, aligned)
        np.testing.assert_array_equal(got[i], one[0])
    counts = np.bincount([_level_of(b[1:], 2, 4, 32, 3, rule) for b in boxes], minlength=3)
    assert counts.min() > 0, "every level must be exercised"


def test_layouts_box_forms_and_dtypes(rng):
    feats = _pyramid(rng, dtype=np.float32)
    boxes = _fpn_boxes(rng, 30)
    boxes = boxes[np.argsort(boxes[:, 0], kind="stable")]
    kw = dict(canonical_scale=32, canonical_level=3)
    ref = roialign_cy.multi_scale_roi_align(feats, boxes, 2, SCALES, 2, True, **kw)
    assert ref.dtype == np.float32 and ref.shape == (30, 3, 2, 2)
    nhwc = roialign_cy.multi_scale_roi_align([to_nhwc(f) for f in feats], boxes, 2, SCALES, 2,
                                             True, layout="NHWC", **kw)
    np.testing.assert_array_equal(np.moveaxis(nhwc, -1, 1), ref)
    b = boxes[:, 0].astype(np.int64)
    per_image = [boxes[b == i, 1:] for i in range(2)]
    for form, extra in [(per_image, {}), (boxes[:, 1:], {"batch_indices": b})]:
        np.testing.assert_array_equal(
            roialign_cy.multi_scale_roi_align(feats, form, 2, SCALES, 2, True, **kw, **extra), ref)
    # no boxes at all, and a single level (every box on it)
    assert roialign_cy.multi_scale_roi_align(feats, np.zeros((0, 5)), 2, SCALES).shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(
        roialign_cy.multi_scale_roi_align(feats[:1], boxes, 2, SCALES[:1], 2, True),
        roialign_cy.roi_align(feats[0], boxes, 2, SCALES[0], 2, True))


def _fd(f, x, h=1e-6):
    """Central finite differences of the scalar f() with respect to every element of x (which
    f reads; perturbed in place and restored)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("aligned", [False, True])
def test_gradients_by_finite_differences(rng, aligned):
    feats = _pyramid(rng, n=1, c=2, h=12, w=16)
    boxes = np.array([[0, 3.3, 2.1, 9.7, 8.4], [0, 10.2, 4.6, 30.3, 25.9], [0, 1.4, 6.2, 60.1, 44.7],
                      [0, 20.37, 1.83, 27.19, 9.41]])
    kw = dict(canonical_scale=16, canonical_level=3)
    g = rng.standard_normal((4, 2, 2, 3))
    args = (2, 3), SCALES

    def loss():
        return float(np.sum(roialign_cy.multi_scale_roi_align(feats, boxes, *args, 2, aligned, **kw) * g))

    levels = assign_levels(boxes[:, 1:], 2, 4, 16, 3)
    assert sorted(set(levels.tolist())) == [0, 1, 2]
    grad_feats, grad_boxes = roialign_cy.multi_scale_roi_align_backward(
        g, feats, boxes, *args, 2, aligned, wrt="both", **kw)
    for f, gf in zip(feats, grad_feats):
        np.testing.assert_allclose(gf, _fd(loss, f), atol=1e-8)
    # boxes[:, 1:] is a view: perturbing it perturbs the boxes the loss reads
    np.testing.assert_allclose(grad_boxes[:, 1:], _fd(loss, boxes[:, 1:]), atol=1e-7)
    assert np.all(grad_boxes[:, 0] == 0)
    # the features-only gradient from the shapes alone, and wrt="boxes" alone, agree
    only = roialign_cy.multi_scale_roi_align_backward(g, [f.shape for f in feats], boxes, *args, 2,
                                                      aligned, **kw)
    for a, b in zip(only, grad_feats):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(roialign_cy.multi_scale_roi_align_backward(
        g, feats, boxes, *args, 2, aligned, wrt="boxes", **kw), grad_boxes)


def test_list_boxes_give_a_list_gradient(rng):
    feats = _pyramid(rng)
    boxes = _fpn_boxes(rng, 12)
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
    out = roialign_cy.multi_scale_roi_align(feats, per_image, 2, SCALES, 2)
    gb = roialign_cy.multi_scale_roi_align_backward(np.ones_like(out), feats, per_image, 2, SCALES,
                                                    2, wrt="boxes")
    assert isinstance(gb, list) and [x.shape for x in gb] == [x.shape for x in per_image]


@pytest.mark.parametrize("features, scales, error, match", [
    ("not a list", SCALES, TypeError, "features must be a non-empty list"),
    ("empty", SCALES, TypeError, "features must be a non-empty list"),
    ("mismatched channels", SCALES, ValueError, r"features\[1\] must have the images and channels"),
    ("pyramid", SCALES[:2], ValueError, "one entry per level"),
    ("pyramid", [1 / 4, 1 / 16, 1 / 32], ValueError, "consecutive powers of two"),
    ("pyramid", [0.3, 0.15, 0.075], ValueError, "consecutive powers of two"),
    ("pyramid", 0.25, TypeError, "spatial_scales must be a sequence"),
    ("pyramid", [1 / 4, 1 / 8, -1], ValueError, "spatial_scale must be finite and > 0"),
    ("mixed dtypes", SCALES, TypeError, r"features\[1\] must have a floating dtype"),
])
def test_validation(rng, features, scales, error, match):
    pyramid = _pyramid(rng)
    features = {"pyramid": pyramid,
                "mismatched channels": [pyramid[0], pyramid[1][:, :2], pyramid[2]],
                "mixed dtypes": [pyramid[0], pyramid[1].astype(np.float32), pyramid[2]],
                "empty": [],
                }.get(features, features)
    with pytest.raises(error, match=match):
        roialign_cy.multi_scale_roi_align(features, _fpn_boxes(rng, 3), 2, scales)


def test_validation_of_boxes_and_rule(rng):
    feats = _pyramid(rng)
    inverted = np.array([[0, 5.0, 5.0, 20.0, 20.0], [1, 30.0, 5.0, 10.0, 20.0]])
    with pytest.raises(ValueError, match="box 1 is"):
        roialign_cy.multi_scale_roi_align(feats, inverted, 2, SCALES)
    with pytest.raises(ValueError, match="assign must be one of"):
        roialign_cy.multi_scale_roi_align(feats, inverted[:1], 2, SCALES, assign="mmdet")
    with pytest.raises(ValueError, match="canonical_scale must be finite and > 0"):
        roialign_cy.multi_scale_roi_align(feats, inverted[:1], 2, SCALES, canonical_scale=0)
    with pytest.raises(TypeError, match="canonical_level must be an integer"):
        roialign_cy.multi_scale_roi_align(feats, inverted[:1], 2, SCALES, canonical_level=4.5)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        roialign_cy.multi_scale_roi_align(feats, inverted[:1], 2, SCALES, eps=float("nan"))
    with pytest.raises(TypeError, match="not their shapes"):
        roialign_cy.multi_scale_roi_align([f.shape for f in feats], inverted[:1], 2, SCALES)
    with pytest.raises(ValueError, match="wrt must be one of"):
        roialign_cy.multi_scale_roi_align_backward(np.ones((1, 3, 2, 2)), feats, inverted[:1], 2,
                                                   SCALES, wrt="levels")
    # inverted boxes with the peers' convention: one inverted axis has no size -> finest level
    out = roialign_cy.multi_scale_roi_align(feats, inverted, 2, SCALES, allow_inverted=True)
    np.testing.assert_array_equal(out[1], roialign_cy.roi_align(feats[0], inverted[1:], 2, SCALES[0],
                                                                allow_inverted=True)[0])
