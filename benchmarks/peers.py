"""Adapters that run the peer implementations (onnxruntime, torchvision) on numpy inputs.

Every peer is optional: ``available_peers()`` reports which ones import, and why the others do not,
so the benchmark can print "n/a" instead of failing. Each adapter takes the arguments of the
roialign_cy operator it stands in for, in the form the benchmark uses ((K, 5) boxes, NCHW float32),
and returns a zero-argument callable that runs one call (the thing being timed) plus a way to fetch
its result as numpy for the agreement check. ``OPERATORS`` says which roialign_cy operators a peer
has; ``KNOWN_DIFFERENCES`` says where a peer computes something else than ours on finite data, and what.
"""
import importlib

import numpy as np


def _try_import(name):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{type(exc).__name__}: {exc}"


class OnnxRuntimePeer:
    """onnxruntime's CPU RoiAlign and MaxRoiPool, each run through a one-node ONNX graph (opset 16)."""

    name = "onnxruntime"

    # roialign_cy operator -> the ONNX operator that computes it
    OPERATORS = {"roi_align": "RoiAlign", "roi_pool": "MaxRoiPool"}

    # Where onnxruntime's result is not ours on finite data: the rule that turns ours into its
    # result (checked before the row is trusted), and why. MaxRoiPool's CPU kernel
    # (onnxruntime/core/providers/cpu/nn/roi_pool.cc) starts each bin's max at
    # numeric_limits<float>::lowest() now (1.32 agrees with ours exactly); older sources started it
    # at numeric_limits<float>::min(), the smallest *positive* float, which clamps every bin from
    # below. A run on such a build is flagged "*", with this note, instead of MISMATCH.
    KNOWN_DIFFERENCES = {
        "roi_pool": (
            lambda ours: np.maximum(ours, np.finfo(np.float32).tiny),
            "this MaxRoiPool starts each bin's max at numeric_limits<float>::min() (1.2e-38) instead "
            "of lowest(), so a bin whose pixels are all negative gives 1.2e-38: onnxruntime = "
            "max(ours, 1.2e-38); the same pixels are read, so the timing still compares like with like",
        ),
    }

    def __init__(self):
        self.ort, err = _try_import("onnxruntime")
        self.onnx, err2 = _try_import("onnx")
        self.error = err or err2
        self._sessions = {}

    @property
    def version(self):
        return getattr(self.ort, "__version__", "?")

    def _session(self, key, dtype, node, inputs, pooled_h, pooled_w, n_threads):
        """A cached session running the one-node graph ``node`` on ``inputs`` [(name, elem, dims)]."""
        key = (key, dtype, n_threads)
        if key in self._sessions:
            return self._sessions[key]
        onnx, helper = self.onnx, self.onnx.helper
        elem = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE}[dtype]
        graph = helper.make_graph(
            [node],
            "roialign_bench",
            [helper.make_tensor_value_info(name, elem if e is None else e, dims) for name, e, dims in inputs],
            [helper.make_tensor_value_info("Y", elem, ["K", "C", pooled_h, pooled_w])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
        # Keep the IR version at one every onnxruntime that supports opset 16 can load.
        model.ir_version = min(model.ir_version, 8)
        onnx.checker.check_model(model)
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = self.ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self._sessions[key] = sess
        return sess

    def forward(self, features, boxes, output_size, spatial_scale, sampling_ratio, aligned, n_threads, mode="avg"):
        """RoiAlign (opset 16): return a callable running one forward; it returns the output as numpy."""
        pooled_h, pooled_w = output_size
        node = self.onnx.helper.make_node(
            "RoiAlign",
            ["X", "rois", "batch_indices"],
            ["Y"],
            mode=mode,
            output_height=pooled_h,
            output_width=pooled_w,
            # ONNX spells adaptive sampling 0 where torchvision and roialign_cy also accept -1.
            sampling_ratio=max(int(sampling_ratio), 0),
            spatial_scale=float(spatial_scale),
            # half_pixel subtracts 0.5 (aligned=True); output_half_pixel is the opset-10 behaviour.
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        )
        inputs = [("X", None, ["N", "C", "H", "W"]), ("rois", None, ["K", 4]),
                  ("batch_indices", self.onnx.TensorProto.INT64, ["K"])]
        key = ("RoiAlign", pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode)
        sess = self._session(key, features.dtype.name, node, inputs, pooled_h, pooled_w, n_threads)
        feeds = {
            "X": features,
            "rois": boxes[:, 1:].astype(features.dtype, copy=True),
            "batch_indices": boxes[:, 0].astype("int64"),
        }
        return lambda: sess.run(["Y"], feeds)[0]

    def roi_pool(self, features, boxes, output_size, spatial_scale, n_threads):
        """MaxRoiPool (opset 1; float32 only in onnxruntime): rois (K, 5) [batch, x1, y1, x2, y2]."""
        pooled_h, pooled_w = output_size
        node = self.onnx.helper.make_node("MaxRoiPool", ["X", "rois"], ["Y"], pooled_shape=[pooled_h, pooled_w],
                                          spatial_scale=float(spatial_scale))
        inputs = [("X", None, ["N", "C", "H", "W"]), ("rois", None, ["K", 5])]
        key = ("MaxRoiPool", pooled_h, pooled_w, spatial_scale)
        sess = self._session(key, features.dtype.name, node, inputs, pooled_h, pooled_w, n_threads)
        feeds = {"X": features, "rois": boxes.astype(features.dtype, copy=True)}
        return lambda: sess.run(["Y"], feeds)[0]


class TorchvisionPeer:
    """torchvision.ops.roi_align, roi_pool, ps_roi_align, ps_roi_pool on CPU (and CUDA for the GPU
    workloads), backward via autograd."""

    name = "torchvision"

    # roialign_cy operator -> torchvision.ops function of the same name (forward; backward by autograd)
    OPERATORS = {"roi_align": "roi_align", "roi_pool": "roi_pool", "ps_roi_align": "ps_roi_align",
                 "ps_roi_pool": "ps_roi_pool"}
    KNOWN_DIFFERENCES = {}

    def __init__(self):
        self.torch, err = _try_import("torch")
        self.tv, err2 = (None, None) if err else _try_import("torchvision")
        self.error = err or err2
        if self.tv is not None and not hasattr(self.tv, "ops"):
            self.error = "torchvision has no ops module"

    @property
    def version(self):
        return f"torch {getattr(self.torch, '__version__', '?')}, torchvision {getattr(self.tv, '__version__', '?')}"

    def set_threads(self, n_threads):
        self.torch.set_num_threads(n_threads)

    def cuda_available(self):
        return self.error is None and self.torch.cuda.is_available()

    def _tensors(self, features, boxes, device, requires_grad=False):
        t = self.torch
        f = t.from_numpy(features).to(device).requires_grad_(requires_grad)
        b = t.from_numpy(boxes.astype(features.dtype)).to(device)
        return f, b

    def _op(self, operator, output_size, spatial_scale, sampling_ratio, aligned):
        """f(features, boxes) -> output for ``operator``, with torchvision's positional arguments."""
        fn = getattr(self.tv.ops, self.OPERATORS[operator])
        args = {"roi_align": (output_size, spatial_scale, sampling_ratio, aligned),
                "roi_pool": (output_size, spatial_scale),
                "ps_roi_align": (output_size, spatial_scale, sampling_ratio),
                "ps_roi_pool": (output_size, spatial_scale)}[operator]
        return lambda f, b: fn(f, b, *args)

    def forward(self, features, boxes, output_size, spatial_scale, sampling_ratio, aligned, device="cpu",
                operator="roi_align"):
        """Return a callable running one forward; its result converts with ``to_numpy``."""
        f, b = self._tensors(features, boxes, device)
        op = self._op(operator, output_size, spatial_scale, sampling_ratio, aligned)
        no_grad = self.torch.no_grad

        def run():
            with no_grad():
                return op(f, b)

        return run

    def backward_features(self, grad_output, features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                          device="cpu", operator="roi_align"):
        """Return a callable computing d(sum(grad_output * out))/d(features) by autograd.

        The forward is run once outside the timed callable (retain_graph keeps it), so only the
        backward kernel is timed, as for roialign_cy's ``*_backward`` functions.
        """
        t = self.torch
        f, b = self._tensors(features, boxes, device, requires_grad=True)
        out = self._op(operator, output_size, spatial_scale, sampling_ratio, aligned)(f, b)
        g = t.from_numpy(grad_output).to(device)

        def run():
            return t.autograd.grad(out, f, g, retain_graph=True)[0]

        return run

    def synchronize(self):
        self.torch.cuda.synchronize()

    @staticmethod
    def to_numpy(x):
        return x.detach().cpu().numpy()


def available_peers():
    """Return {name: peer or None} and {name: reason it is missing}."""
    peers, missing = {}, {}
    for cls in (OnnxRuntimePeer, TorchvisionPeer):
        p = cls()
        if p.error is None:
            peers[cls.name] = p
        else:
            peers[cls.name] = None
            missing[cls.name] = p.error
    return peers, missing
