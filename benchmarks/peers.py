"""Adapters that run the peer implementations (onnxruntime, torchvision) on numpy inputs.

Every peer is optional: ``available_peers()`` reports which ones import, and why the others do not,
so the benchmark can print "n/a" instead of failing. Each adapter takes the same arguments as
``roialign_cy.roi_align`` in the form the benchmark uses ((K, 5) boxes, NCHW float32) and returns a
zero-argument callable that runs one call (the thing being timed) plus a way to fetch its result as
numpy for the agreement check.
"""
import importlib


def _try_import(name):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{type(exc).__name__}: {exc}"


class OnnxRuntimePeer:
    """onnxruntime's CPU RoiAlign, run through a one-node ONNX graph (opset 16)."""

    name = "onnxruntime"

    def __init__(self):
        self.ort, err = _try_import("onnxruntime")
        self.onnx, err2 = _try_import("onnx")
        self.error = err or err2
        self._sessions = {}

    @property
    def version(self):
        return getattr(self.ort, "__version__", "?")

    def _session(self, dtype, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode, n_threads):
        key = (dtype, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, mode, n_threads)
        if key in self._sessions:
            return self._sessions[key]
        onnx, helper, TP = self.onnx, self.onnx.helper, self.onnx.TensorProto
        elem = {"float32": TP.FLOAT, "float64": TP.DOUBLE}[dtype]
        node = helper.make_node(
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
        graph = helper.make_graph(
            [node],
            "roialign_bench",
            [
                helper.make_tensor_value_info("X", elem, ["N", "C", "H", "W"]),
                helper.make_tensor_value_info("rois", elem, ["K", 4]),
                helper.make_tensor_value_info("batch_indices", TP.INT64, ["K"]),
            ],
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
        """Return a callable running one forward; calling it returns the output as numpy."""
        sess = self._session(
            features.dtype.name, output_size[0], output_size[1], spatial_scale, sampling_ratio, aligned, mode, n_threads
        )
        feeds = {
            "X": features,
            "rois": boxes[:, 1:].astype(features.dtype, copy=True),
            "batch_indices": boxes[:, 0].astype("int64"),
        }
        return lambda: sess.run(["Y"], feeds)[0]


class TorchvisionPeer:
    """torchvision.ops.roi_align on CPU (and CUDA for the GPU workloads), backward via autograd."""

    name = "torchvision"

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

    def forward(self, features, boxes, output_size, spatial_scale, sampling_ratio, aligned, device="cpu"):
        """Return a callable running one forward; its result converts with ``to_numpy``."""
        f, b = self._tensors(features, boxes, device)
        op = self.tv.ops.roi_align
        no_grad = self.torch.no_grad

        def run():
            with no_grad():
                return op(f, b, output_size, spatial_scale, sampling_ratio, aligned)

        return run

    def backward_features(self, grad_output, features, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                          device="cpu"):
        """Return a callable computing d(sum(grad_output * out))/d(features) by autograd.

        The forward is run once outside the timed callable (retain_graph keeps it), so only the
        backward kernel is timed, as for roialign_cy's roi_align_backward.
        """
        t = self.torch
        f, b = self._tensors(features, boxes, device, requires_grad=True)
        out = self.tv.ops.roi_align(f, b, output_size, spatial_scale, sampling_ratio, aligned)
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
