"""ONNX precision passes: the precision of a TensorRT engine is set in its ONNX graph.

Why in the graph: TensorRT 11 removed BuilderFlag.FP16/INT8 and the INT8 calibrators (strongly
typed networks only) while JetPack 6 ships TensorRT 10.3; a graph whose tensors already carry
their types builds the same way on both (docs/design.md section 2).

- fp16 (`convert_fp16`, our own pass; graph I/O types kept): an allowlist of ops (convs, matmuls,
  element-wise, layout) runs in fp16; the selective-scan sub-graph (nodes traced from
  kernels/selective_scan.py), reductions, normalisations, exp/log, softmax, resize, the
  pre-processing and the anomaly-map tail stay fp32.
- int8 (`quantize_int8`): explicit symmetric Q/DQ (onnxruntime.quantization, static, per-channel
  weights) on Conv/Gemm/MatMul, calibrated on normal images, scan sub-graph, pre/post tail and
  batched MatMuls excluded, min-max / percentile / entropy activation ranges, biases left float
  (TensorRT's Q/DQ layers take INT8/FP8/INT4, not onnxruntime's int32 biases). Ops that stay fp32
  read the original fp32 tensor, not the int8-rounded copy onnxruntime wires them to by default
  (`fp32_consumers="fp32"`): on the magnetic tile DVAD (128 px) that alone took INT8 from -1.2 /
  -2.4 to -0.5 / -0.5 points of image / pixel AUROC on a 300-image subset, -0.7 / -0.4 on the full
  test set (benchmarks/precision.py; RESULTS.md section 3).
`precision_graph` writes the reduced-precision ONNX as an artifact of its own (metadata with every
choice in export.precision_info, sidecar), which export.trt gates and builds from.
"""
from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re
import sys
from typing import List, Tuple

import numpy as np
import onnx

from deploy.artifacts import embed_onnx_metadata, sha256_file, write_sidecar
from deploy.contract import INPUT_NAME

from ._common import ExportError, first_line
from .check import load_frames, random_frames
from .formats import CALIB_METHODS, INT8_OPS, ExportArgError

SCAN_SOURCE = "kernels/selective_scan.py"
GRAPH_SOURCE = "deploy/graph.py"      # DeployModule: frame pre-processing and the output tail
QUANT_OPS = INT8_OPS


SCAN_MODULES = re.compile(r"\.(SS2D|Mamba\w*|SelectiveScan\w*)'")


def scan_node_names(model) -> List[str]:
    """Nodes of the selective-scan sub-graph, from the exporter's node metadata: traced from
    kernels/selective_scan.py (stack trace), or - where the stack trace stops at the model's
    call site - any node inside a Mamba-style module (class SS2D / Mamba* / SelectiveScan*):
    a superset that keeps the whole scan branch in fp32."""
    names = []
    for n in model.graph.node:
        if n.op_type == "SelectiveScan":
            names.append(n.name)
            continue
        md = {p.key: p.value for p in n.metadata_props}
        trace = md.get("pkg.torch.onnx.stack_trace", "")
        if SCAN_SOURCE in trace or "selective_scan" in trace or SCAN_MODULES.search(
                md.get("pkg.torch.onnx.class_hierarchy", "")):
            names.append(n.name)
    return names


def _innermost_file(trace: str) -> str:
    files = re.findall(r'File "([^"]+)"', trace)
    return files[-1].replace("\\", "/") if files else ""


def tail_node_names(model) -> List[str]:
    """Frame pre-processing and the anomaly-map / score tail (cheap, precision-sensitive):
    nodes traced from deploy/graph.py itself or from models/layers.py's map functions (every one
    named `*anomaly_map`: cosine_anomaly_map, weighted_anomaly_map, patch_anomaly_map)."""
    names = []
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.stack_trace" and (
                    _innermost_file(p.value).endswith(GRAPH_SOURCE) or "anomaly_map(" in p.value):
                names.append(n.name)
                break
    return names


# Ops computed in fp16 when not blocked (an allowlist: everything else stays fp32). Their float
# inputs are all of one type T, so casting every float input to fp16 keeps the graph valid.
FP16_OPS = frozenset("""Conv ConvTranspose Gemm MatMul Add Sub Mul Relu Clip Sigmoid HardSigmoid HardSwish
Tanh LeakyRelu Concat Reshape Transpose Split Slice Pad DepthToSpace SpaceToDepth Gather Unsqueeze Squeeze
Expand Flatten Identity MaxPool AveragePool GlobalAveragePool""".split())


def convert_fp16(src, dst, keep_nodes=None) -> dict:
    """Mixed fp16 copy of `src` (graph I/O types unchanged): ops in FP16_OPS run in fp16 except the
    nodes in `keep_nodes` (default: the scan sub-graph and the pre/post-processing tail); Cast
    nodes are inserted at every fp32/fp16 boundary, fp16 initializer copies made where needed."""
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    keep = set(keep_nodes) if keep_nodes is not None else set(scan_node_names(model)) | set(tail_node_names(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:
        raise ExportError(f"{src}: shape inference before fp16 conversion failed: {first_line(e)}") from None
    elem = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name: i for i in model.graph.initializer}
    for name, init in inits.items():
        elem[name] = init.data_type
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    cur = {}                      # float tensor name -> dtype it currently has (F32 / F16)
    casted = {}                   # (name, dtype) -> tensor name of that dtype
    new_nodes, new_inits = [], []
    n_half = 0

    def as_dtype(name, dt):
        if not name or elem.get(name) != F32 or cur.get(name, F32) == dt:
            return name
        key = (name, dt)
        if key not in casted:
            if name in inits and dt == F16:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                t = numpy_helper.from_array(arr, f"{name}__f16")
                new_inits.append(t)
                casted[key] = t.name
            else:
                out = f"{name}__{'f16' if dt == F16 else 'f32'}"
                new_nodes.append(helper.make_node("Cast", [name], [out], to=dt, name=f"cast_{out}"))
                casted[key] = out
        return casted[key]

    for node in model.graph.node:
        float_outs = [o for o in node.output if elem.get(o) == F32]
        known = all(not o or o in elem for o in node.output)
        half = (node.op_type in FP16_OPS and node.domain in ("", "ai.onnx") and node.name not in keep
                and known and float_outs)
        dt = F16 if half else F32
        for i, x in enumerate(node.input):
            node.input[i] = as_dtype(x, dt)
        for o in float_outs:
            cur[o] = dt
        n_half += bool(half)
        new_nodes.append(node)
    # graph outputs keep their declared type
    out_names = {o.name for o in model.graph.output}
    for o in model.graph.output:
        if cur.get(o.name) == F16:
            inner = f"{o.name}__f16_out"
            for n in new_nodes:
                for i, x in enumerate(n.output):
                    if x == o.name:
                        n.output[i] = inner
                for i, x in enumerate(n.input):
                    if x == o.name:
                        n.input[i] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [o.name], to=F32, name=f"cast_out_{o.name}"))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    del model.graph.value_info[:]
    # drop fp32 initializers no node reads any more (replaced by their fp16 copies)
    used = {x for n in model.graph.node for x in n.input} | out_names
    keep_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_inits)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{src}: fp16 graph fails onnx.checker: {first_line(e)}") from None
    onnx.save(model, str(dst))
    return {"fp16_nodes": n_half, "kept_fp32_nodes": len(keep), "fp16_ops": sorted(FP16_OPS),
            "cast_nodes": sum(1 for n in model.graph.node if n.op_type == "Cast")}


class _FramesReader:
    """onnxruntime CalibrationDataReader over uint8 frames, one frame per batch."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        self.i = 0

    def get_next(self):
        if self.i >= len(self.frames):
            return None
        x = self.frames[self.i:self.i + 1]
        self.i += 1
        return {INPUT_NAME: np.ascontiguousarray(x)}

    def rewind(self):
        self.i = 0


# INT8 knobs (all recorded in the artifact's precision_info). Defaults chosen on the magnetic tile
# DVAD (benchmarks/precision.py; see benchmarks/RESULTS.md section 3).
INT8_DEFAULTS = {"calib_method": "minmax", "calib_percentile": 99.999, "int8_weights": "per-channel",
                 "int8_ops": QUANT_OPS, "int8_keep": (), "int8_fp32_consumers": "fp32", "n_calib": 64}
KEEP_SPECIAL = ("first", "last")


def _scopes(node) -> List[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return re.findall(r"'([^']*)'", p.value)
    return []


def module_node_names(model, patterns, op_types=None) -> List[str]:
    """Nodes whose module path (exporter's name scopes, e.g. `model.stages.0.0.fuse.gate`) contains
    one of `patterns` as whole dotted components ("encoder", "fuse.gate", "heads.2"); the special
    patterns "first" / "last" name the first / last node of `op_types` outside the scan sub-graph
    and the pre/post tail (the graph is topologically sorted)."""
    pats = [p for p in patterns if p not in KEEP_SPECIAL]
    rx = [re.compile(r"(^|\.)" + re.escape(p) + r"(\.|$)") for p in pats]
    names = []
    for n in model.graph.node:
        if rx and any(r.search(s) for s in _scopes(n) for r in rx):
            names.append(n.name)
    if any(p in KEEP_SPECIAL for p in patterns):
        fixed = set(scan_node_names(model)) | set(tail_node_names(model))
        cand = [n.name for n in model.graph.node if n.op_type in (op_types or QUANT_OPS) and n.name not in fixed]
        if cand and "first" in patterns:
            names.append(cand[0])
        if cand and "last" in patterns:
            names.append(cand[-1])
    return names


def route_fp32_consumers(model, quantized) -> int:
    """After QDQ insertion every reader of a quantised activation reads its dequantised copy; give
    the readers that are not quantised ops (`quantized`: node names) the original fp32 tensor back,
    so only the int8 ops see int8 rounding (e.g. the encoder features the anomaly map compares
    stay exact). Returns the number of rerouted inputs."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    src = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            q = prod.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                src[n.output[0]] = q.input[0]
    qdq = {"QuantizeLinear", "DequantizeLinear"}
    moved = 0
    for n in model.graph.node:
        if n.name in quantized or n.op_type in qdq:
            continue
        for i, x in enumerate(n.input):
            if x in src:
                n.input[i] = src[x]
                moved += 1
    return moved


def _drop_dead_nodes(model) -> int:
    """Remove nodes (e.g. Q/DQ pairs nobody reads any more) and initializers no output depends on."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    dropped = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return dropped


ENTROPY_BINS = (2048, 128)      # histogram bins, quantised bins (TensorRT's entropy calibrator recipe)


def kl_threshold(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 128):
    """Entropy (KL) threshold of a two-sided histogram, the same computation as onnxruntime's
    HistogramCollector.get_entropy_threshold (TensorRT's recipe) with numpy sums instead of
    Python loops: for each symmetric window around the zero bin, the KL divergence between the
    clipped distribution p (outliers folded into its end bins) and p merged into
    `num_quantized_bins` bins q; returns the window (lo, hi) of least divergence."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    n = hist.size
    zero, half = n // 2, num_quantized_bins // 2
    best, best_div = None, np.inf
    csum = np.concatenate([[0], np.cumsum(hist)])
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, n)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += csum[n] - csum[end]
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        qbins = sliced[:body].reshape(num_quantized_bins, merged).sum(1).astype(np.int64)
        qbins[-1] += int(sliced[body:].sum())
        norm = (p[:body] != 0).reshape(num_quantized_bins, merged).sum(1)
        q = np.zeros(p.size, dtype=np.int64)
        q[:body] = np.repeat(np.where(norm != 0, qbins / np.maximum(norm, 1), 0), merged).astype(np.int64)
        ps, qs = smooth_distribution(p), smooth_distribution(q)
        div = np.inf if ps is None or qs is None else float(np.array(entropy(ps, qs), dtype=edges.dtype))
        if div < best_div or best is None:
            best, best_div = (edges[start], edges[end]), div
    return best


def entropy_ranges(src, calib_frames: np.ndarray, op_types, bins=ENTROPY_BINS) -> dict:
    """KL-divergence (entropy) activation ranges {tensor: (lo, hi)}. onnxruntime's quantize_static
    cannot pass histogram sizes to its entropy calibrator, whose defaults (128 bins into 128) leave
    one candidate threshold - the min-max range; its threshold search at 2048 bins takes minutes.
    So the histograms come from its calibrator (2048 bins) and the search is `kl_threshold`."""
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory(prefix="edge_ad_calib_") as d:
        cal = create_calibrator(pathlib.Path(src), list(op_types),
                                augmented_model_path=str(pathlib.Path(d) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy,
                                extra_options={"symmetric": True, "num_bins": bins[0], "num_quantized_bins": bins[1]})
        cal.collect_data(_FramesReader(calib_frames))
        hists = cal.collector.histogram_dict
        del cal
    out = {}
    for name, h in hists.items():
        lo, hi = kl_threshold(np.asarray(h[0]), np.asarray(h[1]), bins[1])
        out[name] = (float(max(lo, h[2])), float(min(hi, h[3])))     # clamp to the observed range
    return out


def quantize_int8(src, dst, calib_frames: np.ndarray, method: str = "minmax", *, percentile: float = 99.999,
                  per_channel: bool = True, quant_ops=QUANT_OPS, keep_fp32=(), fp32_consumers: str = "fp32") -> dict:
    """Explicit symmetric INT8 Q/DQ (TensorRT's form: zero points 0) calibrated on `calib_frames`.

    method: activation range from min-max, a percentile of |x| (`percentile`) or entropy (KL).
    per_channel: per-output-channel weight scales (else one per tensor). quant_ops: op types
    quantised. keep_fp32: module paths (see `module_node_names`) kept fp32 besides the scan
    sub-graph and the pre/post tail, always kept. fp32_consumers: "fp32" = ops that stay fp32
    read the original tensor (only quantised ops see rounding); "qdq" = they read the dequantised
    copy (onnxruntime's default, TensorRT may then fuse more)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise ExportArgError(f"calib_method: expected one of {', '.join(CALIB_METHODS)}, got {method!r}")
    bad = [o for o in quant_ops if o not in QUANT_OPS]
    if bad or not quant_ops:
        raise ExportArgError(f"quant_ops: expected a non-empty subset of {', '.join(QUANT_OPS)}, got {list(quant_ops)}")
    if fp32_consumers not in ("fp32", "qdq"):
        raise ExportArgError(f"fp32_consumers: expected fp32 or qdq, got {fp32_consumers!r}")
    if not 0 < float(percentile) <= 100:
        raise ExportArgError(f"calib_percentile: expected 0 < p <= 100, got {percentile}")
    model = onnx.load(str(src))
    fixed = set(scan_node_names(model)) | set(tail_node_names(model))
    kept = set(module_node_names(model, keep_fp32, quant_ops))
    unmatched = [p for p in keep_fp32 if p not in KEEP_SPECIAL and not module_node_names(model, [p])]
    if unmatched:
        raise ExportArgError(f"keep_fp32: no node of {src} lies in module(s) {unmatched} "
                             "(module paths as in the model, e.g. encoder, neck, fuse.gate, heads)")
    # MatMul against a constant of rank > 2 (e.g. PaDiM's per-position inverse covariances) is a
    # batched distance, not a layer: its per-channel axis is ill-defined and its precision matters
    rank = {i.name: len(i.dims) for i in model.graph.initializer}
    batched = {n.name for n in model.graph.node
               if n.op_type in ("MatMul", "Gemm") and any(rank.get(x, 0) > 2 for x in n.input)}
    exclude = sorted(fixed | kept | batched)
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.MinMax}[method]     # entropy: ranges given as overrides below
    # biases stay float: onnxruntime would store them as int32 behind a DequantizeLinear, which
    # TensorRT's Q/DQ layers do not take (INT8/FP8/INT4 only); TensorRT fuses a float bias itself
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    try:
        with contextlib.redirect_stdout(io.StringIO()):      # the calibrators print their progress
            if method == "entropy":
                inits = {i.name for i in model.graph.initializer}
                ranges = entropy_ranges(src, calib_frames, quant_ops)
                extra["TensorQuantOverrides"] = {k: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                 for k, (lo, hi) in ranges.items() if k not in inits and hi > lo}
            quantize_static(str(src), str(dst), _FramesReader(calib_frames), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(quant_ops), per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude, calibrate_method=cm, extra_options=extra)
    except Exception as e:
        raise ExportError(f"{src}: INT8 quantisation failed: {first_line(e)}") from None
    q = onnx.load(str(dst))
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in q.graph.node
                 if n.op_type in quant_ops and n.name not in set(exclude) and n.input[0] in dq_out}
    moved = 0
    if fp32_consumers == "fp32":
        moved = route_fp32_consumers(q, quantized)
        _drop_dead_nodes(q)
        onnx.save(q, str(dst))
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    info = {"quantize_nodes": n_q, "quantized_nodes": len(quantized), "excluded_nodes": len(exclude),
            "calib_frames": int(len(calib_frames)), "method": method, "per_channel": bool(per_channel),
            "quant_ops": list(quant_ops), "keep_fp32": list(keep_fp32), "fp32_consumers": fp32_consumers,
            "rerouted_inputs": moved, "batched_matmul_kept": len(batched), "symmetric": True,
            "bias": "fp32"}
    if method == "percentile":
        info["percentile"] = float(percentile)
    if method == "entropy":
        info["entropy_bins"] = list(ENTROPY_BINS)
    return info


def calibration_frames(calib, n: int, frame_hw, channels: int, seed: int = 0) -> Tuple[np.ndarray, str]:
    """INT8 calibration frames: n normal images from the folder `calib` (random textures without)."""
    if calib is not None:
        return load_frames(calib, n, frame_hw, channels)
    print("warning: no --calib folder: INT8 calibration on seeded random textures; pass --calib DIR "
          "with normal (defect-free) images for a usable INT8 model", file=sys.stderr)
    return random_frames(n, frame_hw, channels, seed), f"seeded random textures (seed {seed})"


def precision_graph(fp32_path, graph, precision: str, meta: dict, q8: dict, calib=None) -> dict:
    """Write `graph`, the fp16 or int8 copy of the fp32 ONNX `fp32_path`, with its metadata
    embedded and its sidecar; returns that metadata. q8: the INT8 options (INT8_DEFAULTS keys)."""
    graph = pathlib.Path(graph)
    ex = meta["export"]
    if precision == "fp16":
        info = convert_fp16(fp32_path, graph)
    elif precision == "int8":
        frames, src = calibration_frames(calib, q8["n_calib"], tuple(ex["frame_hw"]), int(ex["frame_channels"]))
        info = quantize_int8(fp32_path, graph, frames, q8["calib_method"], percentile=q8["calib_percentile"],
                             per_channel=q8["int8_weights"] == "per-channel", quant_ops=q8["int8_ops"],
                             keep_fp32=q8["int8_keep"], fp32_consumers=q8["int8_fp32_consumers"])
        info["calib_source"] = src
    else:
        raise ExportArgError(f"precision: expected fp16 or int8 for a reduced-precision graph, got {precision!r}")
    mp = onnx.load(str(graph))
    gmeta = json.loads(json.dumps(meta))
    gmeta["export"].update(precision=precision, precision_info=info, artifact=graph.name,
                           source_onnx_sha256=sha256_file(fp32_path))
    embed_onnx_metadata(mp, gmeta)
    onnx.save(mp, str(graph))
    write_sidecar(graph, gmeta)
    return gmeta
