"""Static TensorRT compatibility check: real exports pass, unsupported constructs fail loudly."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.trt_compat import TrtCompatError, check_trt_compat, main, require_trt_compat


def graph(nodes, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def test_exported_graphs(onnx_chunked, onnx_plugin):
    for target in ("x86", "jetpack6"):
        assert require_trt_compat(onnx_chunked[0], target).ok
    rep = check_trt_compat(onnx_plugin.path, "x86")
    assert rep.ok and any("SelectiveScan" in str(w) for w in rep.warnings)
    with pytest.raises(TrtCompatError, match="no Python plugins"):
        require_trt_compat(onnx_plugin.path, "jetpack6")


def test_unsupported_op_fails_loudly(tmp_path, capsys):
    m = graph([helper.make_node("Relu", ["x"], ["r"], name="ok"),
               helper.make_node("Unique", ["r"], ["y"], name="uniq")])
    rep = check_trt_compat(m)
    assert not rep.ok and [e.node for e in rep.errors] == ["uniq"]
    assert "Unique" in rep.report() and "not supported" in rep.report()
    p = tmp_path / "bad.onnx"
    onnx.save(m, str(p))
    assert main([str(p)]) == 1
    assert "ERROR Unique node 'uniq'" in capsys.readouterr().out


@pytest.mark.parametrize("attrs,msg", [({"mode": "cubic"}, "mode='cubic'"), ({"antialias": 1}, "antialias"),
                                       ({"coordinate_transformation_mode": "tf_crop_and_resize", "mode": "linear"},
                                        "coordinate_transformation_mode")])
def test_resize_attributes(attrs, msg):
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    m = graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="rs", **attrs)], [scales])
    rep = check_trt_compat(m)
    assert not rep.ok and msg in str(rep.errors[0])


def test_quantize_zero_point_and_custom_node_and_opset():
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(3, np.int8), "zp")
    m = graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
               helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")], [s, zp])
    rep = check_trt_compat(m)
    assert len(rep.errors) == 2 and all("zero point must be 0" in str(e) for e in rep.errors)
    m = graph([helper.make_node("Mystery", ["x"], ["y"], name="m", domain="acme")],
              extra_opsets=[helper.make_opsetid("acme", 1)])
    assert "no importer" in str(check_trt_compat(m).errors[0])
    m = graph([helper.make_node("Relu", ["x"], ["y"])], opset=22)
    assert check_trt_compat(m, "x86").ok
    assert "outside TensorRT 10.3" in str(check_trt_compat(m, "jetpack6").errors[0])


def test_axes_must_be_constant():
    m = graph([helper.make_node("Shape", ["x"], ["shp"]),
               helper.make_node("ReduceMin", ["shp"], ["ax"], keepdims=1),
               helper.make_node("ReduceSum", ["x", "ax"], ["y"], name="rsum")])
    rep = check_trt_compat(m)
    assert any(e.node == "rsum" and "build-time constant" in e.message for e in rep.errors)
