"""Static check of an ONNX graph against the ONNX-TensorRT parser's operator support table.

    python -m export.trt_compat model.onnx [--target x86|jetpack6]

Targets: "x86" = current TensorRT (10.15 / 11.x, opsets 9..24) and "jetpack6" = TensorRT 10.3
(JetPack 6.x, opsets 9..20, no Python plugins). The table below is our own transcription of
onnx-tensorrt's docs/operators.md (support matrix + restrictions that matter for our graphs):
every node (including those inside functions and subgraphs) is checked for op support, the
restrictions on key attributes/inputs, quantisation zero points and plugin nodes. Unsupported
constructs are errors (the check fails loudly); known-slow or unverified ones are warnings.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ._common import ExportError

# Ops the ONNX-TensorRT parser supports (default domain), current TensorRT (10.15 / 11.x).
SUPPORTED_CURRENT = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding
Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Not in TensorRT 10.3's parser (ops of opsets > 20, or added in later 10.x releases).
NOT_IN_10_3 = frozenset("Attention RMSNormalization RotaryEmbedding TensorScatter".split())
# Present in 10.3's table as far as we know, but not verified against a 10.3 build: warnings.
UNVERIFIED_10_3 = frozenset("Gelu Mod GroupNormalization DeformConv NonZero".split())


@dataclass(frozen=True)
class Target:
    name: str
    trt_version: str
    opset_min: int
    opset_max: int
    supported: frozenset
    python_plugins: bool        # tensorrt.plugin (>= 10.6); AOT form >= 10.9
    aot_plugins: bool


TARGETS: Dict[str, Target] = {
    "x86": Target("x86", "10.15 / 11.x", 9, 24, SUPPORTED_CURRENT, True, True),
    "jetpack6": Target("jetpack6", "10.3 (JetPack 6.x)", 9, 20, SUPPORTED_CURRENT - NOT_IN_10_3, False, False),
}
RESIZE_COORD_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
RESIZE_MODES = ("nearest", "linear")
NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")
CONST_AXES_OPS = {"CumSum": 1, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1,
                  "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1,
                  "ReduceSumSquare": 1, "Squeeze": 1, "Unsqueeze": 1}
PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")


class TrtCompatError(ExportError):
    """The graph uses something the targeted TensorRT parser does not support."""


@dataclass
class Issue:
    node: str
    op: str
    message: str

    def __str__(self):
        return f"{self.op} node {self.node!r}: {self.message}"


@dataclass
class CompatReport:
    target: Target
    n_nodes: int
    ops: Dict[str, int]
    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def report(self) -> str:
        lines = [f"TensorRT compatibility ({self.target.name}: TensorRT {self.target.trt_version}): "
                 f"{'OK' if self.ok else 'FAILED'} - {self.n_nodes} nodes, {len(self.ops)} op types"]
        lines += [f"  ERROR {e}" for e in self.errors]
        lines += [f"  warning {w}" for w in self.warnings]
        return "\n".join(lines)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _as_str(v):
    return v.decode() if isinstance(v, bytes) else v


def _all_nodes(graph, prefix=""):
    """(node, where) for every node of a graph and of its subgraphs (If / Loop / Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node, prefix
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g, f"{prefix}{node.name}/")
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_nodes(g, f"{prefix}{node.name}/")


def check_trt_compat(model, target: str = "x86") -> CompatReport:
    """Check an ONNX model (path or ModelProto) against `target`; returns a CompatReport."""
    import onnx
    from onnx import numpy_helper

    if target not in TARGETS:
        raise ValueError(f"target: expected one of {sorted(TARGETS)}, got {target!r}")
    tgt = TARGETS[target]
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    const = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node, _ in _all_nodes(model.graph):
        if node.op_type == "Constant" and node.output:
            a = _attrs(node)
            if "value" in a:
                const[node.output[0]] = numpy_helper.to_array(a["value"])
            elif "value_ints" in a:
                const[node.output[0]] = np.asarray(a["value_ints"])
            elif "value_int" in a:
                const[node.output[0]] = np.asarray(a["value_int"])
    local_funcs = {(f.domain, f.name) for f in model.functions}
    errors, warnings = [], []
    ops: Dict[str, int] = {}

    opset = {o.domain: o.version for o in model.opset_import}
    ver = opset.get("", opset.get("ai.onnx"))
    if ver is not None and not tgt.opset_min <= ver <= tgt.opset_max:
        errors.append(Issue("<model>", "opset", f"default-domain opset {ver} outside TensorRT "
                                                f"{tgt.trt_version}'s {tgt.opset_min}..{tgt.opset_max}; "
                                                f"re-export with --opset {min(max(ver, tgt.opset_min), tgt.opset_max)}"))
    for inp in model.graph.input:
        et = inp.type.tensor_type.elem_type
        if et not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8,
                      onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
                      onnx.TensorProto.BFLOAT16):
            errors.append(Issue(inp.name, "graph input", f"element type "
                                f"{onnx.TensorProto.DataType.Name(et)} not supported as a network input"))

    nodes = list(_all_nodes(model.graph)) + [(n, f"{f.name}/") for f in model.functions for n in f.node]
    for node, where in nodes:
        name = where + (node.name or node.output[0] if node.output else "?")
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        ops[op] = ops.get(op, 0) + 1
        a = _attrs(node)
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) in local_funcs:
                continue    # model-local function: the parser inlines it (its body is checked too)
            if all(k in a for k in PLUGIN_ATTRS):
                if not tgt.python_plugins:
                    errors.append(Issue(name, op, f"plugin node: TensorRT {tgt.trt_version} has no "
                                                  "Python plugins (tensorrt.plugin needs >= 10.6); export with "
                                                  "--scan chunked for this target"))
                elif int(a.get("aot", 0)) and not tgt.aot_plugins:
                    errors.append(Issue(name, op, "aot=1 needs TensorRT >= 10.9"))
                else:
                    warnings.append(Issue(name, op, f"maps to TensorRT plugin "
                                                    f"{_as_str(a['plugin_namespace'])}::{node.op_type} v"
                                                    f"{_as_str(a['plugin_version'])}: it must be registered "
                                                    "when the engine is built (export.trt does this)"))
            else:
                errors.append(Issue(name, op, "custom-domain node with no plugin_namespace/plugin_version "
                                              "attributes: the ONNX-TensorRT parser has no importer for it"))
            continue
        t = node.op_type
        if t not in tgt.supported:
            errors.append(Issue(name, t, f"not supported by the ONNX-TensorRT parser of TensorRT {tgt.trt_version}"))
            continue
        if target == "jetpack6" and t in UNVERIFIED_10_3:
            warnings.append(Issue(name, t, "listed as supported for current TensorRT; not verified on 10.3"))
        if t == "Resize":
            ctm = _as_str(a.get("coordinate_transformation_mode", "half_pixel"))
            mode = _as_str(a.get("mode", "nearest"))
            if ctm not in RESIZE_COORD_MODES:
                errors.append(Issue(name, t, f"coordinate_transformation_mode={ctm!r} unsupported "
                                             f"(supported: {', '.join(RESIZE_COORD_MODES)})"))
            if mode not in RESIZE_MODES:
                errors.append(Issue(name, t, f"mode={mode!r} unsupported (supported: nearest, linear)"))
            if mode == "nearest" and _as_str(a.get("nearest_mode", "round_prefer_floor")) not in NEAREST_MODES:
                errors.append(Issue(name, t, f"nearest_mode={a.get('nearest_mode')!r} unsupported"))
            if int(a.get("antialias", 0)):
                errors.append(Issue(name, t, "antialias=1 unsupported (export resizes with antialias=False)"))
            if _as_str(a.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
                errors.append(Issue(name, t, "keep_aspect_ratio_policy must be 'stretch'"))
        elif t in CONST_AXES_OPS:
            idx = CONST_AXES_OPS[t]
            if len(node.input) > idx and node.input[idx] and node.input[idx] not in const:
                errors.append(Issue(name, t, f"input {idx} (axes) must be a build-time constant, "
                                             f"got computed tensor {node.input[idx]!r}"))
        elif t in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) > 2 and node.input[2]:
                zp = const.get(node.input[2])
                if zp is None:
                    errors.append(Issue(name, t, "zero point must be a constant"))
                elif np.any(np.asarray(zp) != 0):
                    errors.append(Issue(name, t, "zero point must be 0 (symmetric quantisation)"))
                elif np.asarray(zp).dtype not in (np.int8,):
                    warnings.append(Issue(name, t, f"zero point dtype {np.asarray(zp).dtype} (TensorRT "
                                                   "quantises to INT8/FP8/INT4)"))
        elif t == "TopK":
            if int(a.get("sorted", 1)) != 1:
                errors.append(Issue(name, t, "sorted must be 1"))
            k = const.get(node.input[1]) if len(node.input) > 1 else None
            if k is not None and int(np.asarray(k).reshape(-1)[0]) >= 3840:
                errors.append(Issue(name, t, f"K={int(np.asarray(k).reshape(-1)[0])} must be < 3840"))
        elif t in ("MaxPool", "AveragePool", "LpPool"):
            dil = a.get("dilations")
            if dil and any(d != 1 for d in dil):
                errors.append(Issue(name, t, "dilations must be empty or all ones"))
            if t == "MaxPool" and len([o for o in node.output if o]) > 1:
                errors.append(Issue(name, t, "the Indices output is unsupported"))
        elif t == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            errors.append(Issue(name, t, "only the first output (Y) is supported"))
        elif t == "ScatterND" and _as_str(a.get("reduction", "none")) != "none":
            errors.append(Issue(name, t, "reduction other than 'none' is unsupported"))
        elif t == "Loop":
            warnings.append(Issue(name, t, "supported, but a Loop scan is slow (onnxruntime issue 27796 class); "
                                           "use the chunked lowering"))
        elif t == "Cast":
            to = int(a.get("to", 1))
            if to in (onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                errors.append(Issue(name, t, f"cast to {onnx.TensorProto.DataType.Name(to)} unsupported"))
            elif to == onnx.TensorProto.UINT8 and where == "":
                outs = {o.name for o in model.graph.output}
                if node.output[0] not in outs:
                    warnings.append(Issue(name, t, "UINT8 is only supported as a network input/output type"))
    return CompatReport(tgt, len(nodes), dict(sorted(ops.items())), errors, warnings)


def require_trt_compat(model, target: str = "x86") -> CompatReport:
    """check_trt_compat, raising TrtCompatError with the report when it fails."""
    rep = check_trt_compat(model, target)
    if not rep.ok:
        raise TrtCompatError(rep.report())
    return rep


def main(argv=None) -> int:
    from ._common import run_cli

    ap = argparse.ArgumentParser(prog="python -m export.trt_compat", description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", help="ONNX model to check")
    ap.add_argument("--target", choices=sorted(TARGETS), default="x86")
    args = ap.parse_args(argv)

    def body():
        p = pathlib.Path(args.onnx)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: ONNX file not found")
        rep = check_trt_compat(p, args.target)
        print(rep.report())
        if not rep.ok:
            raise TrtCompatError(f"{p}: {len(rep.errors)} construct(s) unsupported on {args.target}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
