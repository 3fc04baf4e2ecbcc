"""``python -m roialign_cy demo``: pool a few boxes of a synthetic picture and draw what happened.

No download: the picture is drawn here (a gradient with a disk, a rectangle, a triangle, a ring, a
striped patch and a tilted bar). The boxes are axis-aligned, plus rotated ones when this build has
``roi_align_rotated``. The figure shows each box with its bins and sampling points on the picture
and, below it, the pooled crop. matplotlib draws it when installed (``pip install
"roialign_cy[demo]"``); otherwise a small numpy rasteriser does, and the PNG is written with Pillow
or, failing that, the built-in encoder, so the demo always writes a picture.
"""
import math
import struct
import time
import zlib

import numpy as np

IMAGE_H, IMAGE_W = 192, 256
OUTPUT_SIZE = (7, 7)
SAMPLING_RATIO = 2
# Box coordinates are image pixels, so spatial_scale is 1; aligned=True puts pixel i's centre at
# i + 0.5, the convention of detectron2 and ONNX half_pixel.
SPATIAL_SCALE = 1.0
ALIGNED = True

AXIS_ALIGNED_BOXES = [  # x1, y1, x2, y2
    (20.0, 24.0, 84.0, 88.0),  # the disk
    (96.0, 20.0, 174.0, 78.0),  # the rectangle
    (20.0, 110.0, 100.0, 176.0),  # the stripes
    (205.0, 118.0, 275.0, 182.0),  # the ring; runs off the right edge: those samples read 0
]
ROTATED_BOXES = [  # cx, cy, w, h, angle in degrees (counter-clockwise on screen)
    (172.0, 140.0, 118.0, 30.0, 25.0),  # the tilted bar, box along it
    (214.0, 66.0, 62.0, 52.0, -20.0),  # the triangle
]
COLOURS = [(255, 80, 80), (80, 220, 80), (90, 160, 255), (255, 220, 60), (255, 120, 255), (80, 240, 240)]


# ---------------------------------------------------------------------------------------------
# The synthetic picture
def _rotated_frame(px, py, cx, cy, angle_deg):
    """Coordinates of points (px, py) in the frame of a box centred at (cx, cy) turned by angle.

    Inverse of the rotated RoIAlign mapping (conventions section 4): x = yy sin + xx cos + cx,
    y = yy cos - xx sin + cy.
    """
    t = math.radians(angle_deg)
    dx, dy = px - cx, py - cy
    return dx * math.cos(t) - dy * math.sin(t), dx * math.sin(t) + dy * math.cos(t)


def make_image():
    """An RGB float32 picture (IMAGE_H, IMAGE_W, 3) in [0, 1] with a few distinct "objects"."""
    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W].astype(np.float64) + 0.5  # pixel centres
    img = np.empty((IMAGE_H, IMAGE_W, 3))
    img[..., 0] = 0.10 + 0.25 * x / IMAGE_W
    img[..., 1] = 0.15 + 0.30 * y / IMAGE_H
    img[..., 2] = 0.40

    def paint(mask, rgb):
        img[mask] = rgb

    paint((x - 52) ** 2 + (y - 56) ** 2 <= 30 ** 2, (0.9, 0.2, 0.2))
    paint((x >= 100) & (x <= 170) & (y >= 24) & (y <= 74), (0.2, 0.75, 0.3))
    paint((x >= 122) & (x <= 148) & (y >= 36) & (y <= 62), (0.05, 0.35, 0.1))
    # Triangle (215, 18), (250, 88), (180, 88): inside all three half-planes.
    tri = (y <= 88) & (2.0 * (x - 215) <= (y - 18)) & (-2.0 * (x - 215) <= (y - 18))
    paint(tri, (0.95, 0.85, 0.2))
    r2 = (x - 236) ** 2 + (y - 150) ** 2
    paint((r2 >= 16 ** 2) & (r2 <= 26 ** 2), (0.3, 0.9, 0.95))
    stripes = (x >= 22) & (x <= 98) & (y >= 112) & (y <= 174)
    img[stripes] = (0.5 + 0.5 * np.sin(2 * np.pi * (x + y) / 9.0))[stripes, None]
    xx, yy = _rotated_frame(x, y, 172.0, 140.0, 25.0)
    paint((np.abs(xx) <= 54) & (np.abs(yy) <= 11), (1.0, 0.55, 0.1))
    return img.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Geometry for drawing (image pixel coordinates, spatial_scale 1, aligned=True)
def _box_mapper(box, rotated):
    """Map (u, v) in [0, 1]^2 across the box's width and height to image coordinates (x, y)."""
    if not rotated:
        x1, y1, x2, y2 = box
        return lambda u, v: (x1 + u * (x2 - x1), y1 + v * (y2 - y1))
    cx, cy, w, h, angle = box
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def to_image(u, v):
        xx, yy = (u - 0.5) * w, (v - 0.5) * h
        return yy * s + xx * c + cx, yy * c - xx * s + cy

    return to_image


def box_geometry(box, rotated):
    """Outline (5, 2), bin lines [(2, 2) segments] and sampling points (n, 2) of one box, (x, y)."""
    f = _box_mapper(box, rotated)
    ph, pw = OUTPUT_SIZE
    corners = np.array([f(u, v) for u, v in [(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)]])
    lines = [np.array([f(j / pw, 0), f(j / pw, 1)]) for j in range(1, pw)]
    lines += [np.array([f(0, i / ph), f(1, i / ph)]) for i in range(1, ph)]
    g = SAMPLING_RATIO
    u = (np.arange(pw)[:, None] + (np.arange(g)[None, :] + 0.5) / g).ravel() / pw
    v = (np.arange(ph)[:, None] + (np.arange(g)[None, :] + 0.5) / g).ravel() / ph
    uu, vv = np.meshgrid(u, v)
    px, py = f(uu.ravel(), vv.ravel())
    return corners, lines, np.stack([px, py], axis=1)


# ---------------------------------------------------------------------------------------------
# Pooling and timing
def available_backends():
    """{"cpu": None or why not, "cuda": None or why not}: None means usable."""
    status = {}
    try:
        from . import _cpu  # noqa: F401

        status["cpu"] = None
    except ImportError as exc:
        status["cpu"] = f"the Cython extension is not built ({exc})"
    except RuntimeError as exc:  # ROIALIGN_CY_SIMD names a build this machine cannot run
        status["cpu"] = f"RuntimeError: {exc}"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            status["cuda"] = "CuPy sees no CUDA device"
        else:
            from . import _cuda  # noqa: F401

            status["cuda"] = None
    except Exception as exc:  # ImportError, or CUDA driver errors from getDeviceCount
        status["cuda"] = f"{type(exc).__name__}: {exc}"
    return status


def _time_call(fn, sync, budget_s=0.2, max_calls=200):
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def pool_and_time(features, boxes, backends):
    """Pool every box with each backend; returns (rows, crops) where crops are (PH, PW, 3) arrays.

    Each row: (label, kind, box, output shape, {backend: seconds per call}). The backends' crops
    are compared, so a disagreement between CPU and CUDA shows up here rather than in a picture.
    """
    import roialign_cy

    rows, crops = [], []
    for kind, box in boxes:
        fn = roialign_cy.roi_align if kind == "axis" else roialign_cy.roi_align_rotated
        b = np.array([[0.0, *box]], dtype=np.float32)
        times, outs = {}, {}
        for name in backends:
            if name == "cuda":
                import cupy

                f, bb, sync, to_host = cupy.asarray(features), cupy.asarray(b), cupy.cuda.Device().synchronize, cupy.asnumpy
            else:
                f, bb, sync, to_host = features, b, lambda: None, np.asarray

            def call(f=f, bb=bb, name=name):
                return fn(f, bb, OUTPUT_SIZE, SPATIAL_SCALE, SAMPLING_RATIO, ALIGNED, backend=name)

            outs[name] = to_host(call())
            times[name] = _time_call(call, sync)
        first = outs[backends[0]]
        for name in backends[1:]:
            diff = float(np.abs(outs[name] - first).max())
            if diff > 1e-5:
                raise RuntimeError(f"backends disagree on box {box}: max |{name} - {backends[0]}| = {diff:g}")
        rows.append((f"#{len(rows) + 1}", kind, box, tuple(first.shape), times))
        crops.append(np.clip(first[0].transpose(1, 2, 0), 0, 1))
    return rows, crops


def format_rows(rows, backends):
    head = ["", "kind", "box", "output"] + [f"{b} us/call" for b in backends]
    lines = [head]
    for label, kind, box, shape, times in rows:
        lines.append([label, kind, "(" + ", ".join(f"{v:g}" for v in box) + ")", "x".join(map(str, shape))]
                     + [f"{1e6 * times[b]:.1f}" for b in backends])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)


# ---------------------------------------------------------------------------------------------
# Drawing with matplotlib
def render_matplotlib(path, image, boxes, crops):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(boxes)
    fig = plt.figure(figsize=(9, 8.2), dpi=100)
    grid = fig.add_gridspec(2, n, height_ratios=[4, 1.2])
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(image, extent=(0, IMAGE_W, IMAGE_H, 0), interpolation="nearest")
    for i, (kind, box) in enumerate(boxes):
        colour = np.array(COLOURS[i % len(COLOURS)]) / 255
        outline, lines, points = box_geometry(box, kind == "rotated")
        ax.plot(outline[:, 0], outline[:, 1], color=colour, lw=2)
        for seg in lines:
            ax.plot(seg[:, 0], seg[:, 1], color=colour, lw=0.6, alpha=0.6)
        inside = (points[:, 0] >= 0) & (points[:, 0] < IMAGE_W) & (points[:, 1] >= 0) & (points[:, 1] < IMAGE_H)
        ax.scatter(points[inside, 0], points[inside, 1], s=2, color="white", zorder=3)
        ax.scatter(points[~inside, 0], points[~inside, 1], s=2, color="grey", zorder=3)
        ax.text(outline[0, 0], outline[0, 1] - 2, f"#{i + 1}", color=colour, fontsize=10, weight="bold")
        cax = fig.add_subplot(grid[1, i])
        cax.imshow(crops[i], interpolation="nearest")
        cax.set_title(f"#{i + 1} {kind} {crops[i].shape[0]}x{crops[i].shape[1]}", fontsize=8)
        cax.set_xticks([])
        cax.set_yticks([])
        for spine in cax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(3)
    ax.set_facecolor("0.15")  # the grey out-of-picture samples must show against it
    ax.set_xlim(-4, IMAGE_W + 24)
    ax.set_ylim(IMAGE_H + 4, -4)
    ax.set_title(f"roialign_cy: {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]} bins, sampling_ratio={SAMPLING_RATIO}, "
                 "aligned=True\nwhite dots: sampling points; grey: outside the picture (they read 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Drawing without matplotlib: a numpy raster
_GLYPHS = {  # 3 x 5 bitmaps, rows top to bottom: enough for the box numbers
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}


class Raster:
    """An RGB uint8 canvas with the few primitives the figure needs."""

    def __init__(self, height, width, background=(32, 32, 36)):
        self.a = np.empty((height, width, 3), np.uint8)
        self.a[:] = background

    def _stamp(self, ys, xs, rgb, alpha, radius):
        h, w, _ = self.a.shape
        ys, xs = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                yy, xx = ys + dy, xs + dx
                ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                px = self.a[yy[ok], xx[ok]].astype(np.float32)
                self.a[yy[ok], xx[ok]] = np.rint((1 - alpha) * px + alpha * np.asarray(rgb, np.float32))

    def line(self, p0, p1, rgb, alpha=1.0, radius=0):
        (x0, y0), (x1, y1) = p0, p1
        n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 2  # half-pixel steps leave no gaps
        t = np.linspace(0, 1, n)
        pts = np.unique(np.rint(np.stack([y0 + t * (y1 - y0), x0 + t * (x1 - x0)], 1)), axis=0)
        self._stamp(pts[:, 0], pts[:, 1], rgb, alpha, radius)

    def dots(self, xs, ys, rgb, radius=1):
        self._stamp(ys, xs, rgb, 1.0, radius)

    def paste(self, top, left, rgb_image):
        h, w, _ = rgb_image.shape
        self.a[top:top + h, left:left + w] = rgb_image

    def text(self, top, left, s, rgb, scale=4):
        for k, ch in enumerate(s):
            bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[ch]])
            block = np.kron(bitmap, np.ones((scale, scale), bool))
            x = left + k * 4 * scale
            region = self.a[top:top + block.shape[0], x:x + block.shape[1]]
            region[block[:region.shape[0], :region.shape[1]]] = rgb


def _to_uint8(img):
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render_raster(image, boxes, crops, scale=3, crop_px=84, margin=12, overhang=24):
    """The figure as an (H, W, 3) uint8 array: the picture with the boxes, then a row of crops.

    ``overhang`` image pixels of room right of the picture show boxes that run off it; their
    sampling points there (which read 0) are drawn grey.
    """
    n = len(boxes)
    label_h = 5 * 4
    panel_h, panel_w = IMAGE_H * scale, IMAGE_W * scale
    width = max(panel_w + overhang * scale + 2 * margin, n * (crop_px + margin) + margin)
    height = margin + panel_h + margin + label_h + 4 + crop_px + margin
    r = Raster(height, width)
    top, left = margin, margin
    r.paste(top, left, np.kron(_to_uint8(image), np.ones((scale, scale, 1), np.uint8)))
    # A continuous image coordinate u lands on canvas pixel u * scale: pixel i spans [i, i + 1).
    to_canvas = lambda xy: (left + xy[..., 0] * scale, top + xy[..., 1] * scale)  # noqa: E731
    for i, (kind, box) in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        outline, lines, points = box_geometry(box, kind == "rotated")
        for seg in lines:
            xs, ys = to_canvas(seg)
            r.line((xs[0], ys[0]), (xs[1], ys[1]), colour, alpha=0.55)
        xs, ys = to_canvas(outline)
        for j in range(4):
            r.line((xs[j], ys[j]), (xs[j + 1], ys[j + 1]), colour, radius=1)
        inside = (points[:, 0] >= 0) & (points[:, 0] < IMAGE_W) & (points[:, 1] >= 0) & (points[:, 1] < IMAGE_H)
        px, py = to_canvas(points[inside])
        r.dots(px, py, (255, 255, 255), radius=1)
        px, py = to_canvas(points[~inside])
        r.dots(px, py, (120, 120, 120), radius=1)
        r.text(int(max(ys[:4].min() - 24, 0)), int(xs[:4].min()), str(i + 1), colour)
        # The crop, enlarged with nearest-neighbour so each pooled bin stays a visible square.
        c = _to_uint8(crops[i])
        k = crop_px // max(c.shape[:2])
        cy0, cx0 = margin + panel_h + margin + label_h + 4, margin + i * (crop_px + margin)
        r.text(cy0 - label_h - 4, cx0, str(i + 1), colour)
        r.paste(cy0, cx0, np.kron(c, np.ones((k, k, 1), np.uint8)))
    return r.a


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (zlib + CRC chunks, filter 0 rows)."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def save_raster(path, rgb):
    """Save with Pillow when it is installed, else with the built-in encoder; returns which."""
    try:
        from PIL import Image
    except ImportError:
        write_png(path, rgb)
        return "built-in PNG writer"
    Image.fromarray(rgb).save(path)
    return "Pillow"


# ---------------------------------------------------------------------------------------------
def run(out="roialign_demo.png", backend="all", renderer="auto", print_fn=print):
    """Run the demo; returns 0, or 2 when the requested backend or renderer is not available."""
    import roialign_cy

    status = available_backends()
    if backend == "all":
        backends = [b for b in ("cpu", "cuda") if status[b] is None]
    else:
        backends = [backend] if status.get(backend, "unknown backend") is None else []
        if not backends:
            print_fn(f"error: backend {backend!r} is not available: {status.get(backend, 'unknown backend')}")
            return 2
    if not backends:
        print_fn(f"error: no backend is available: {status}")
        return 2
    for b, why in status.items():
        if why is not None and backend == "all":
            print_fn(f"note: {b} backend not available ({why})")

    image = make_image()
    features = np.ascontiguousarray(image.transpose(2, 0, 1)[None])  # (1, 3, H, W)
    boxes = [("axis", b) for b in AXIS_ALIGNED_BOXES]
    if hasattr(roialign_cy, "roi_align_rotated"):
        boxes += [("rotated", b) for b in ROTATED_BOXES]
    else:
        print_fn("note: this build has no roi_align_rotated; showing axis-aligned boxes only")

    rows, crops = pool_and_time(features, boxes, backends)
    print_fn(f"features {features.shape} float32, output_size {OUTPUT_SIZE}, sampling_ratio {SAMPLING_RATIO}, "
             f"spatial_scale {SPATIAL_SCALE:g}, aligned={ALIGNED}; one box per call")
    print_fn("box: (x1, y1, x2, y2) or (cx, cy, w, h, angle_deg) in image pixels")
    print_fn(format_rows(rows, backends))

    use_mpl = renderer == "matplotlib"
    if renderer == "auto":
        try:
            import matplotlib  # noqa: F401

            use_mpl = True
        except ImportError:
            print_fn('note: matplotlib not installed (pip install "roialign_cy[demo]" for a nicer figure); '
                     "drawing with the built-in rasteriser")
    if use_mpl:
        try:
            render_matplotlib(out, image, boxes, crops)
        except ImportError:
            print_fn('error: --renderer matplotlib needs matplotlib: pip install "roialign_cy[demo]"')
            return 2
        writer = "matplotlib"
    else:
        writer = save_raster(out, render_raster(image, boxes, crops))
    print_fn(f"wrote {out} ({writer})")
    return 0
