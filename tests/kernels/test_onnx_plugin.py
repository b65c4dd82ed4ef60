"""kernels.onnx_plugin: export_mode("plugin") emits one SelectiveScan node per scan with the
TensorRT plugin attributes; the node runs in ONNX Runtime (onnxruntime-extensions) and in
onnx's reference evaluator and equals the sequential reference."""
import numpy as np
import onnx
import pytest
import torch

import kernels
from kernels import onnx_plugin, selective_scan, selective_scan_ref
from kernels.testing import TwoScans, make_scan_inputs, to_double


@pytest.fixture(scope="module")
def exported():
    kw = make_scan_inputs(2, 6, 29, 5, 3, seed=21)
    kw["delta"] = kw["delta"].abs()  # the second scan has no softplus: keep delta >= 0
    model = TwoScans(kw["A"], kw["D"], kw["delta_bias"]).eval()
    args = (kw["u"], kw["delta"], kw["B"], kw["C"], kw["z"])
    with kernels.export_mode("plugin"):
        proto = torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    with torch.no_grad():
        d = to_double(kw)
        y1 = selective_scan_ref(**d)
        y2 = selective_scan_ref(y1, d["delta"], d["A"], d["B"], d["C"])
    return proto, [a.numpy() for a in args], (y1.numpy(), y2.numpy())


def _check(outs, refs):
    for o, r in zip(outs, refs):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-5


def test_plugin_nodes_and_attributes(exported):
    proto, _, _ = exported
    nodes = [n for n in proto.graph.node if n.op_type == onnx_plugin.OP_TYPE]
    assert len(nodes) == 2 and onnx_plugin.count_plugin_nodes(proto, "edgead") == 2
    for node in nodes:
        assert node.domain == onnx_plugin.DOMAIN and len(node.input) == 8
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"edgead" and attrs["plugin_version"] == b"1"
    a1, a2 = ({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes)
    assert (a1["delta_softplus"], a1["has_z"], a2["delta_softplus"], a2["has_z"]) == (1, 1, 0, 0)
    # no scan arithmetic left outside the plugin nodes
    assert not any(n.op_type in ("CumSum", "Exp", "Loop") for n in proto.graph.node)


def test_plugin_graph_in_reference_evaluator(exported):
    proto, feeds, refs = exported
    ev = onnx_plugin.reference_evaluator(proto)
    _check(ev.run(None, dict(zip(ev.input_names, feeds))), refs)


def test_plugin_graph_in_onnxruntime(exported):
    if onnx_plugin.onnxruntime_extensions is None:
        pytest.skip("onnxruntime-extensions not installed")
    proto, feeds, refs = exported
    sess = onnx_plugin.ort_session(proto)
    _check(sess.run(None, {i.name: f for i, f in zip(sess.get_inputs(), feeds)}), refs)


def test_plugin_mode_outside_export_computes_normally():
    kw = make_scan_inputs(1, 4, 13, 3, 2, seed=22)
    with kernels.export_mode("plugin"):
        y = selective_scan(**kw)
    torch.testing.assert_close(y.double(), selective_scan_ref(**to_double(kw)), rtol=1e-5, atol=1e-5)


def test_plugin_rejects_last_state():
    kw = make_scan_inputs(1, 4, 13, 3, 2, seed=23)
    with pytest.raises(NotImplementedError, match="last-state"):
        onnx_plugin.selective_scan_plugin(**kw, return_last_state=True)
