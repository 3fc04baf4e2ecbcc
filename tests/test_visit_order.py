"""The order in which the CPU forwards visit boxes (``row_order`` of _calls.pxd: ``_cpu.Run.visit``
and the one-pass small calls): each image's boxes by the y of their centres, for cache locality. It
must change no output bit, on any loop order of the kernels, and the gradients keep the image
order their sums follow."""
import numpy as np
import pytest

import roialign_cy
from roialign_cy import _cpu
from test_threads import LOOP_ORDER_SHAPES, loop_order_inputs


def _forwards(x, boxes, layout, n_threads=2):
    """Every axis-aligned forward of ``boxes`` through the general path (``out=`` takes it) and
    through the one-pass small calls (plain arguments), as (name, general, small) triples."""
    C = x.shape[3 if layout == "NHWC" else 1]
    kw = dict(layout=layout, n_threads=n_threads)
    calls = {f"roi_align {mode} sr={sr}": (roialign_cy.roi_align, ((3, 4), 0.5, sr, True),
                                           dict(mode=mode))
             for mode in ("avg", "max", "onnx_max") for sr in (-1, 2)}
    calls["roi_pool"] = (roialign_cy.roi_pool, ((3, 4), 0.5), {})
    if C % 4 == 0:  # position-sensitive: C_out x 2 x 2
        calls["ps_roi_align"] = (roialign_cy.ps_roi_align, (2, 0.5, 2), {})
        for edge in ("torchvision", "image"):
            calls[f"ps_roi_pool {edge}"] = (roialign_cy.ps_roi_pool, (2, 0.5), dict(edge=edge))
    out = []
    for name, (fn, args, extra) in calls.items():
        small = fn(x, boxes, *args, **extra, **kw)
        general = fn(x, boxes, *args, **extra, out=np.empty_like(small), **kw)
        out.append((name, general, small))
    pooled, argmax = roialign_cy.roi_pool(x, boxes, (3, 4), 0.5, return_argmax=True, **kw)
    out += [("roi_pool with argmax", pooled, pooled), ("roi_pool argmax", argmax, argmax)]
    return out


@pytest.mark.parametrize("N,C,H,W,K", LOOP_ORDER_SHAPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_visiting_order_changes_no_output(monkeypatch, N, C, H, W, K, layout, dtype):
    x, boxes, _ = loop_order_inputs(N, C, H, W, K, layout, dtype)
    boxes = boxes[::-1].copy()  # images interleaved, centres in no order
    boxes[:, 0] = np.arange(K) % N
    got = _forwards(x, boxes, layout)
    monkeypatch.setattr(_cpu.Run, "visit", lambda self, j0, j1: None)  # position order
    want = _forwards(x, boxes, layout)
    for (name, general, small), (_, expected, _) in zip(got, want):
        np.testing.assert_array_equal(general, expected, err_msg=name)
        np.testing.assert_array_equal(small, expected, err_msg=f"{name} (one-pass call)")


def test_visiting_order_over_several_table_chunks(monkeypatch):
    """Chunks of the sampling tables: each chunk's positions are visited in its own order."""
    x, boxes, _ = loop_order_inputs(2, 16, 12, 10, 300, "NCHW", np.float32)
    boxes[:, 0] = np.arange(len(boxes)) % 2
    want = roialign_cy.roi_align(x, boxes, 3, 0.5, 2, True)  # one-pass call, one table
    monkeypatch.setattr(_cpu, "TABLE_ENTRIES_PER_CHUNK", 500)
    visits = []
    visit = _cpu.Run.visit
    monkeypatch.setattr(_cpu.Run, "visit",
                        lambda self, j0, j1: visits.append((j0, j1)) or visit(self, j0, j1))
    got = roialign_cy.roi_align(x, boxes, 3, 0.5, 2, True, out=np.empty_like(want))
    assert len(visits) > 1
    np.testing.assert_array_equal(got, want)


def test_visit_sorts_each_image_by_centre_row():
    rng = np.random.default_rng(5)
    K, N = 200, 3
    boxes = np.column_stack([rng.integers(0, N, K), rng.uniform(0, 50, (K, 4))])
    boxes[:, 3:5] += boxes[:, 1:3]
    boxes[::7, 2] = boxes[::7, 4] = 10.0  # ties: equal centres keep position order
    p = roialign_cy._api.params(False, (2, 2), 1.0, 2, True, "avg", "NCHW")
    rois = np.ascontiguousarray(boxes[:, 1:])
    batch = boxes[:, 0].astype(np.int64)
    run = _cpu.prepare([(N, 4, 60, 60)], np.float64, rois, batch, p)
    for j0, j1, _ in run.chunks():
        visit = run.visit(j0, j1)
        assert sorted(visit.tolist()) == list(range(j0, j1))
        for n in range(N):
            lo, hi = run.img_start[n], run.img_start[n + 1]
            steps = visit[(visit >= lo) & (visit < hi)]
            np.testing.assert_array_equal(np.sort(steps), np.arange(lo, hi))  # within the image
            centre = rois[run.order[steps], 1] + rois[run.order[steps], 3]
            assert np.all(np.diff(centre) >= 0)
            tied = np.diff(centre) == 0
            assert np.all(np.diff(steps)[tied] > 0)
        assert run.visit(j0, j1) is visit  # kept for a plan's next forward


@pytest.mark.parametrize("bad, message", [(lambda v: v[:-1], "entries"),
                                          (lambda v: v + len(v), "outside")])
def test_kernels_refuse_a_visit_outside_the_positions(monkeypatch, bad, message):
    x, boxes, _ = loop_order_inputs(2, 16, 12, 10, 30, "NCHW", np.float32)
    calls = [(roialign_cy.roi_align, (3, 0.5, 2)), (roialign_cy.roi_pool, (3, 0.5)),
             (roialign_cy.ps_roi_align, (2, 0.5, 2))]
    outs = [np.empty_like(fn(x, boxes, *args)) for fn, args in calls]
    visit = _cpu.Run.visit
    monkeypatch.setattr(_cpu.Run, "visit", lambda self, j0, j1: bad(visit(self, j0, j1)))
    for (fn, args), out in zip(calls, outs):
        with pytest.raises(ValueError, match=message):
            fn(x, boxes, *args, out=out)
