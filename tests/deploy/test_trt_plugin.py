"""deploy.trt_plugin: plugin form selection per TensorRT version, the AOT form's TensorRT-free parts,
and an emulation of TensorRT's AOT launch on CPU: every `edgead::SelectiveScan` node of an exported
plugin graph is computed by launching the single-launch kernel (Triton interpreter) with exactly
what the aot_impl hands TensorRT - kernel spec from the node's dtypes / d_state / attributes, grid
and block from the launch parameters, arguments in the order (inputs..., extra scalars..., output)
- and the graph is compared with the float64 sequential reference. Where `tensorrt` imports and a
GPU is present, the plugin is registered and a tiny engine is built and run; here it skips."""
import __future__
import os

import numpy as np
import onnx
import pytest
import torch

import kernels
from deploy import trt_plugin
from kernels import onnx_plugin, selective_scan_ref
from kernels.testing import TwoScans, make_scan_inputs, to_double


@pytest.mark.parametrize("version,api,triton_problem,jit,aot,reason", [
    ((10, 3, 0), False, None, False, False, "< 10.9"),
    ((10, 6, 0), False, None, True, False, "JIT form"),
    ((10, 8, 1), True, None, True, False, "< 10.9"),
    ((10, 9, 0), True, None, True, True, ""),
    ((10, 9, 0), False, None, True, False, "no aot_impl"),
    ((11, 4, 0), True, "triton is not installed", True, False, "triton is not installed"),
    ((11, 4, 0), True, None, True, True, ""),
])
def test_decide_forms(version, api, triton_problem, jit, aot, reason):
    f = trt_plugin.decide_forms(version, api, triton_problem)
    assert (f["jit"], f["aot"]) == (jit, aot)
    assert (reason in f["aot_reason"]) and (f["aot_reason"] == "") == aot
    assert f["tensorrt"] == ".".join(map(str, version))


@pytest.mark.parametrize("text,expected", [("10.9.0.34", (10, 9, 0)), ("11.4.0rc1", (11, 4, 0)),
                                           ("10.3", (10, 3)), ("dev", ())])
def test_parse_version(text, expected):
    assert trt_plugin.parse_version(text) == expected


def test_triton_dtype():
    assert [trt_plugin.triton_dtype(n, "u") for n in ("DataType.FLOAT", "HALF", "BF16")] == ["fp32", "fp16", "bf16"]
    with pytest.raises(ValueError, match="'z' has TensorRT type INT8"):
        trt_plugin.triton_dtype("DataType.INT8", "z")


def test_annotations_stay_classes():
    """tensorrt.plugin validates the decorated functions with inspect.signature (no eval_str):
    postponed (string) annotations would make every registration fail."""
    assert trt_plugin.register_selective_scan_plugin.__annotations__["return"] is str  # not "str"
    assert not trt_plugin.aot_launch.__code__.co_flags & __future__.annotations.compiler_flag


# ---- the AOT launch, emulated on CPU ------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_graph():
    """A two-scan plugin graph exported with aot=1, its inputs and float64 reference outputs.
    Odd length, groups 3, dim 6 (block_d 8 > dim: masked channels)."""
    kw = make_scan_inputs(2, 6, 23, 5, 3, seed=77)
    kw["delta"] = kw["delta"].abs()  # the second scan has no softplus: keep delta >= 0
    model = TwoScans(kw["A"], kw["D"], kw["delta_bias"]).eval()
    args = (kw["u"], kw["delta"], kw["B"], kw["C"], kw["z"])
    onnx_plugin.set_plugin_aot(True)
    try:
        with kernels.export_mode("plugin"):
            proto = torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    finally:
        onnx_plugin.set_plugin_aot(False)
    with torch.no_grad():
        d = to_double(kw)
        y1 = selective_scan_ref(**d)
        y2 = selective_scan_ref(y1, d["delta"], d["A"], d["B"], d["C"])
    return proto, args, (y1.numpy(), y2.numpy())


_TRT_TYPE = {np.dtype("float32"): "FLOAT", np.dtype("float16"): "HALF"}
_aot_launches = []


def _launch_like_tensorrt(inputs, delta_softplus, has_z):
    """What TensorRT does with the aot_impl's answer, with the Triton interpreter as the GPU."""
    from kernels import scan_aot

    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    dtypes = {n: trt_plugin.triton_dtype(_TRT_TYPE[x.dtype], n) for n, x in zip(scan_aot.INPUT_ARGS, inputs)}
    dtypes["y"] = dtypes["u"]
    kernel = trt_plugin.aot_kernel(dtypes, t[2].shape[1], delta_softplus, has_z, sm=87)
    launch, extra = trt_plugin.aot_launch(kernel, tuple(t[0].shape), tuple(t[3].shape))
    y = torch.empty_like(t[0])
    grid = (launch["grid_x"], launch["grid_y"], launch["grid_z"])
    scan_aot._selective_scan_aot_kernel[grid](*t, *extra, y, num_warps=launch["block_x"] // 32,
                                              **dict(kernel.constexprs))
    _aot_launches.append((kernel, launch, extra))
    return y.numpy()


def test_plugin_graph_through_the_aot_kernel(plugin_graph):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    proto, args, refs = plugin_graph
    nodes = [n for n in proto.graph.node if n.op_type == onnx_plugin.OP_TYPE]
    assert len(nodes) == 2
    for n in nodes:
        assert {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["aot"] == 1

    class SelectiveScan(OpRun):
        op_domain = onnx_plugin.DOMAIN

        def _run(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus=0, has_z=1,
                 plugin_namespace=None, plugin_version=None, aot=0):
            return (_launch_like_tensorrt((u, delta, A, B, C, D, z, delta_bias), delta_softplus, has_z),)

    _aot_launches.clear()
    sess = ReferenceEvaluator(proto, new_ops=[SelectiveScan])
    feeds = {i.name: a.numpy() for i, a in zip(proto.graph.input, args)}
    outs = sess.run(None, feeds)
    assert len(_aot_launches) == 2
    for o, r in zip(outs, refs):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-5
    for kernel, launch, extra in _aot_launches:
        batch, dim, length = args[0].shape
        assert extra == (dim, length, args[2].shape[1])                 # dim, length, groups
        assert launch["grid_y"] == batch and launch["grid_x"] * kernel.block_d >= dim
        assert launch["shared_mem"] == kernel.shared and launch["block_x"] == 32 * kernel.num_warps
    # the two nodes differ in softplus and z: two kernels
    assert [dict(k.constexprs)["SOFTPLUS"] for k, _, _ in _aot_launches] == [True, False]
    assert [dict(k.constexprs)["HAS_Z"] for k, _, _ in _aot_launches] == [True, False]


def test_aot_graph_runs_in_onnxruntime(plugin_graph):
    """The parity gate runs plugin graphs in ONNX Runtime: the aot=1 attribute must not break that."""
    pytest.importorskip("onnxruntime_extensions", reason="plugin graphs run in ORT through onnxruntime-extensions")
    proto, args, refs = plugin_graph
    outs = onnx_plugin.ort_session(proto).run(None, {i.name: a.numpy() for i, a in zip(proto.graph.input, args)})
    for o, r in zip(outs, refs):
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-5


# ---- real TensorRT (skips where it does not import) ---------------------------------------------
@pytest.mark.stack("tensorrt")
def test_tensorrt_plugin_engine(plugin_graph):
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed: plugin engines are built and "
                                                 "run only where it imports (pip install tensorrt, CUDA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    forms = trt_plugin.plugin_forms()
    if not forms["jit"]:
        pytest.skip(f"TensorRT {forms['tensorrt']} has no Python plugins (needs >= 10.6)")
    form = trt_plugin.register_selective_scan_plugin()
    assert form == ("aot" if forms["aot"] else "jit"), forms
    proto, args, refs = plugin_graph
    if form == "jit":  # aot=1 would demand the AOT form
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        for n in proto.graph.node:
            keep = [a for a in n.attribute if a.name != "aot"]
            del n.attribute[:]
            n.attribute.extend(keep)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if form == "aot":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(proto.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    feeds = {i.name: a.cuda().contiguous() for i, a in zip(proto.graph.input, args)}
    outs = {o.name: torch.empty(tuple(engine.get_tensor_shape(o.name)), device="cuda") for o in proto.graph.output}
    for name, t in {**feeds, **outs}.items():
        ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    for o, r in zip((outs[o.name] for o in proto.graph.output), refs):
        o = o.cpu().double().numpy()
        assert np.abs(o - r).max() / np.abs(r).max() <= 1e-4
