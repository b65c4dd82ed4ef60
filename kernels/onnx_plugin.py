"""The selective scan as ONE custom ONNX node (for a TensorRT plugin), and ways to run it.

Under `kernels.export_mode("plugin")`, `torch.onnx.export(..., dynamo=True)` emits, per scan,
a node `edgead::SelectiveScan` (docs/design.md section 2, TensorRT plugin):

    inputs : u (B, D, L), delta (B, D, L), A (D, N) f32, B (B, G, N, L), C (B, G, N, L),
             D (D,) f32, z (B, D, L), delta_bias (D,) f32       (always 8 inputs: absent D /
             delta_bias are passed as zeros - exact - and absent z as u with has_z = 0)
    output : y (B, D, L), u's dtype
    attrs  : plugin_namespace = "edgead", plugin_version = "1", delta_softplus (int 0/1),
             has_z (int 0/1) [, aot = 1 when `set_plugin_aot(True)`]

TensorRT's ONNX parser maps such a node to the plugin registered as "edgead::SelectiveScan".
A graph with this node does NOT run where no implementation is registered; two CPU
implementations exist for tests and for checking an artifact:
- `ort_session(model)`: ONNX Runtime with onnxruntime-extensions' Python custom op (the node is
  re-homed to the domain `ai.onnx.contrib` that the extension requires; fp32 only).
- `reference_evaluator(model)`: `onnx.reference.ReferenceEvaluator` with a Python op (no extra
  dependency; slow, fine for small graphs).
Both compute the node with `selective_scan_chunked`.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import torch

DOMAIN = "edgead"
OP_TYPE = "SelectiveScan"
PLUGIN_NAMESPACE = "edgead"
PLUGIN_VERSION = "1"
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"
_opts = {"aot": False}

try:
    import onnxruntime_extensions
except ImportError:  # optional: only for running plugin graphs in ONNX Runtime
    onnxruntime_extensions = None


def set_plugin_aot(aot: bool) -> None:
    """Add `aot=1` to emitted nodes (TensorRT >= 10.9 ahead-of-time plugin form, whose kernel is
    kernels/scan_aot.py). export.trt turns it on around the ONNX export when the AOT form will
    be built (deploy.trt_plugin.plugin_forms()) and off afterwards."""
    _opts["aot"] = bool(aot)


def selective_scan_plugin(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
    """Emit one `edgead::SelectiveScan` node (only meaningful while exporting)."""
    if return_last_state:
        raise NotImplementedError("selective_scan: export_mode('plugin') has no last-state "
                                  "output; use export_mode('chunked') for return_last_state=True")
    dim = u.shape[1]
    zeros = torch.zeros(dim, dtype=torch.float32, device=u.device)
    attrs = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION,
             "delta_softplus": int(bool(delta_softplus)), "has_z": int(z is not None)}
    if _opts["aot"]:
        attrs["aot"] = 1
    inputs = [u, delta, A.float(), B, C, zeros if D is None else D.float(),
              u if z is None else z, zeros if delta_bias is None else delta_bias.float()]
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", inputs, attrs, dtype=u.dtype,
                                   shape=u.shape, version=1)


def _run_node(u, delta, A, B, C, D, z, delta_bias, delta_softplus, has_z):
    from .selective_scan import selective_scan_chunked
    t = [torch.from_numpy(np.array(a, copy=True)) for a in (u, delta, A, B, C, D, z, delta_bias)]
    with torch.no_grad():
        y = selective_scan_chunked(t[0], t[1], t[2], t[3], t[4], t[5], t[6] if has_z else None,
                                   t[7], bool(delta_softplus))
    return y.numpy()


def count_plugin_nodes(model: onnx.ModelProto, domain: str | None = None) -> int:
    """Number of SelectiveScan nodes (any domain unless given), including inside functions."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sum(n.op_type == OP_TYPE and (domain is None or n.domain == domain) for n in nodes)


def rehome_domain(model: onnx.ModelProto, new_domain: str, old_domain: str = DOMAIN) -> onnx.ModelProto:
    """Copy of `model` with SelectiveScan nodes moved from `old_domain` to `new_domain`."""
    model = copy.deepcopy(model)
    for n in list(model.graph.node) + [n for f in model.functions for n in f.node]:
        if n.op_type == OP_TYPE and n.domain == old_domain:
            n.domain = new_domain
    if not any(o.domain == new_domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(new_domain, 1))
    return model


_ort_registered = []


def _register_ort_op():
    if _ort_registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    s = PyCustomOpDef.dt_string

    @onnx_op(op_type=OP_TYPE, domain=ORT_CONTRIB_DOMAIN, inputs=[f32] * 8, outputs=[f32],
             attrs={"delta_softplus": i64, "has_z": i64, "plugin_namespace": s,
                    "plugin_version": s})
    def _selective_scan_ort(u, delta, A, B, C, D, z, delta_bias, **attrs):
        return _run_node(u, delta, A, B, C, D, z, delta_bias, attrs.get("delta_softplus", 0),
                         attrs.get("has_z", 1))

    _ort_registered.append(_selective_scan_ort)


def ort_session(model, providers=("CPUExecutionProvider",)):
    """ONNX Runtime session able to run `edgead::SelectiveScan` nodes (fp32), through
    onnxruntime-extensions. `model`: path or ModelProto."""
    if onnxruntime_extensions is None:
        raise ImportError("running SelectiveScan plugin nodes in ONNX Runtime needs "
                          "onnxruntime-extensions: pip install onnxruntime-extensions")
    import onnxruntime as ort
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    _register_ort_op()
    model = rehome_domain(model, ORT_CONTRIB_DOMAIN)
    so = ort.SessionOptions()
    so.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))


def reference_evaluator(model):
    """`onnx.reference.ReferenceEvaluator` able to run `edgead::SelectiveScan` nodes."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class SelectiveScan(OpRun):
        op_domain = DOMAIN

        def _run(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus=0, has_z=1,
                 plugin_namespace=None, plugin_version=None, aot=0):
            y = _run_node(u.astype(np.float32), delta.astype(np.float32), A, B.astype(np.float32),
                          C.astype(np.float32), D, z.astype(np.float32), delta_bias,
                          delta_softplus, has_z)
            return (y.astype(u.dtype),)

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return ReferenceEvaluator(model, new_ops=[SelectiveScan])
