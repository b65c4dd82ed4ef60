"""TensorRT engines with the precision set in the ONNX graph (strongly typed build).

    python -m export.trt --ckpt model.pt [--precision fp32|fp16|int8] [--calib DIR] [--workspace GB]
        [--scan chunked|plugin] [--min-batch 1 --opt-batch 8 --max-batch 16] [--target x86|jetpack6]
        [--timing-cache FILE] [--dry-run]

Why the precision lives in the graph: TensorRT 11 removed BuilderFlag.FP16/INT8 and the INT8
calibrators (strongly typed networks only) while JetPack 6 ships TensorRT 10.3; a graph whose
tensors already carry their types builds the same way on both (DESIGN.md section 1).

Steps:
1. fp32 ONNX via export.onnx (dynamic batch, parity gate).
2. fp16: mixed-precision copy (our own pass, `convert_fp16`; I/O types kept): an allowlist of
   ops (convs, matmuls, element-wise, layout) runs in fp16; the selective-scan sub-graph (nodes
   traced from kernels/selective_scan.py), reductions, normalisations, exp/log, softmax, resize,
   the pre-processing and the anomaly-map tail stay fp32.
   int8: explicit symmetric Q/DQ (onnxruntime.quantization, static, per-channel weights) on
   Conv/Gemm/MatMul, calibrated on normal images (`--calib DIR`), scan sub-graph excluded.
   The reduced-precision ONNX is an artifact of its own (sidecar + metadata) and goes through
   the parity gate in ONNX Runtime on CPU with that precision's tolerances.
3. Static TensorRT compatibility check of the final ONNX for `--target`.
4. The equivalent `trtexec` command line (written to trtexec.sh, printed).
5. Where `tensorrt` imports (and not --dry-run): builder with
   NetworkDefinitionCreationFlag.STRONGLY_TYPED, OnnxParser, workspace pool limit, timing cache,
   one optimisation profile for `frames`; a plain plan `model.engine` + sidecar. Elsewhere the
   command ends with one clear message (TensorRTUnavailable, exit code 3) after writing 1-4.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ._common import ExportError, Steps, first_line, load_model
from .artifacts import embed_onnx_metadata, sha256_file, write_sidecar
from .formats import validate_args

try:
    import tensorrt
except Exception:  # ImportError, or a broken CUDA install raising at import
    tensorrt = None

SCAN_SOURCE = "kernels/selective_scan.py"
FP32_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd",
            "ReduceLogSumExp", "ReduceSumSquare", "CumSum", "Exp", "Log", "Softplus", "Softmax",
            "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "BatchNormalization", "Resize", "TopK", "Pow", "Sqrt", "Reciprocal", "Erf", "Einsum",
            "SelectiveScan")
QUANT_OPS = ("Conv", "Gemm", "MatMul")
EXIT_NO_TENSORRT = 3


class TensorRTUnavailable(ExportError):
    """`tensorrt` is not importable: the ONNX and trtexec line were written, no engine built."""


def _require_tensorrt():
    if tensorrt is None:
        raise TensorRTUnavailable("the TensorRT Python package is not importable here: pip install tensorrt "
                                  "(x86 + NVIDIA GPU) or use JetPack's python3-libnvinfer (Jetson)")
    return tensorrt


@dataclass
class TrtExport:
    onnx_fp32: pathlib.Path
    onnx: pathlib.Path                     # the graph the engine is built from (reduced precision)
    trtexec: List[str]
    trtexec_script: pathlib.Path
    compat: object
    engine: Optional[pathlib.Path] = None
    parity: Optional[object] = None
    written: List[pathlib.Path] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def summary(self) -> str:
        from ._common import describe_files

        lines = ["wrote:", describe_files(self.written), self.compat.report()]
        if self.parity is not None:
            lines.append(self.parity.report())
        lines.append("trtexec equivalent:\n  " + shlex.join(self.trtexec))
        if self.note:
            lines.append(self.note)
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)


# ---- graph precision --------------------------------------------------------------------
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
    nodes traced from models/deploy.py itself or from the model's cosine anomaly map."""
    names = []
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.stack_trace" and (
                    _innermost_file(p.value).endswith("models/deploy.py") or "anomaly_map(" in p.value):
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
    import onnx
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
        return {"frames": np.ascontiguousarray(x)}

    def rewind(self):
        self.i = 0


def quantize_int8(src, dst, calib_frames: np.ndarray, method: str = "minmax") -> dict:
    """Explicit symmetric INT8 Q/DQ (TensorRT's form: zero points 0) calibrated on `calib_frames`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    exclude = sorted(set(scan_node_names(model)) | set(tail_node_names(model)))
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    try:
        quantize_static(str(src), str(dst), _FramesReader(calib_frames), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude, calibrate_method=cm,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except Exception as e:
        raise ExportError(f"{src}: INT8 quantisation failed: {first_line(e)}") from None
    q = onnx.load(str(dst))
    n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    return {"quantize_nodes": n_q, "excluded_nodes": len(exclude), "calib_frames": int(len(calib_frames)),
            "method": method}


# ---- trtexec + TensorRT API ------------------------------------------------------------
def shape_str(b: int, hw, ch) -> str:
    return f"frames:{b}x{hw[0]}x{hw[1]}x{ch}"


def trtexec_command(onnx_path, engine_path, frame_hw, channels: int, min_batch=1, opt_batch=8, max_batch=16,
                    workspace_gb: float = 4.0, timing_cache=None, plugin: bool = False) -> List[str]:
    """The trtexec line equivalent to `build_engine` (strongly typed, same profile and pool)."""
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
           f"--minShapes={shape_str(min_batch, frame_hw, channels)}",
           f"--optShapes={shape_str(opt_batch, frame_hw, channels)}",
           f"--maxShapes={shape_str(max_batch, frame_hw, channels)}",
           f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}M"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if plugin:
        # Python (tensorrt.plugin) plugins are registered by the Python builder; trtexec cannot load them.
        cmd.append("# needs the edgead::SelectiveScan plugin registered: build with python -m export.trt instead")
    return cmd


def build_engine(onnx_path, engine_path, frame_hw, channels: int, min_batch=1, opt_batch=8, max_batch=16,
                 workspace_gb: float = 4.0, timing_cache=None, plugin: bool = False) -> dict:
    """Strongly typed TensorRT build (TensorRT >= 10): returns build info. Requires `tensorrt`."""
    trt = _require_tensorrt()
    if plugin:
        from .trt_plugin import register_selective_scan_plugin

        form = register_selective_scan_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if plugin and form == "aot":  # JIT and AOT forms are both registered: build the AOT one
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errs[:10]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache_bytes = b""
    if timing_cache and pathlib.Path(timing_cache).is_file():
        cache_bytes = pathlib.Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    h, w = frame_hw
    profile.set_shape("frames", (min_batch, h, w, channels), (opt_batch, h, w, channels),
                      (max_batch, h, w, channels))
    config.add_optimization_profile(profile)
    t = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    pathlib.Path(engine_path).write_bytes(bytes(plan))
    if timing_cache:
        pathlib.Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "build_seconds": round(time.perf_counter() - t, 2),
            "strongly_typed": True, "plugin_form": form if plugin else None}


# ---- the export ---------------------------------------------------------------------------
def calibration_frames(calib, n: int, frame_hw, channels: int, seed: int = 0):
    from .check import load_frames, random_frames

    if calib is not None:
        return load_frames(calib, n, frame_hw, channels)
    print("warning: no --calib folder: INT8 calibration on seeded random textures; pass --calib DIR "
          "with normal (defect-free) images for a usable INT8 model", file=sys.stderr)
    return random_frames(n, frame_hw, channels, seed), f"seeded random textures (seed {seed})"


def export_trt(ckpt, out=None, *, precision: str = "fp32", calib=None, workspace: float = 4.0,
               scan: str = "chunked", min_batch: int = 1, opt_batch: int = 8, max_batch: int = 16,
               dry_run: bool = False, timing_cache=None, target: str = "x86", frame_hw=None,
               frame_channels=None, full_res_map: bool = False, opset=None, check: bool = True, images=None,
               n=None, n_calib: int = 64, quiet: bool = False, onnx_fp32=None) -> TrtExport:
    """See module docstring. `onnx_fp32`: reuse an existing fp32 export (its metadata is checked)."""
    a = validate_args("tensorrt", ckpt=ckpt, out=out, precision=precision, calib=calib, workspace=workspace,
                      scan=scan, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, dry_run=dry_run,
                      timing_cache=timing_cache, target=target, frame_hw=frame_hw, frame_channels=frame_channels,
                      full_res_map=full_res_map, opset=opset, check=check, images=images, n=n)
    import onnx

    from .check import gate
    from .onnx import export_onnx
    from .trt_compat import require_trt_compat

    t0 = time.perf_counter()
    outdir = pathlib.Path(out if out is not None else "export_out")
    outdir.mkdir(parents=True, exist_ok=True)
    scan_mode = a["scan"] or "chunked"
    note = ""
    plugin_aot = False
    if scan_mode == "plugin" and tensorrt is not None:
        from .trt_plugin import plugin_forms, trt_version

        if trt_version() < (10, 6):
            note = (f"TensorRT {tensorrt.__version__} has no Python plugins (needs >= 10.6): "
                    "falling back to --scan chunked")
            print("note: " + note, file=sys.stderr)
            scan_mode = "chunked"
        else:
            forms = plugin_forms()
            plugin_aot = forms["aot"]
            if not plugin_aot:
                note = f"TensorRT plugin: no ahead-of-time form ({forms['aot_reason']})"
                print("note: " + note, file=sys.stderr)
    if scan_mode == "plugin" and a["target"] == "jetpack6":
        raise ExportError("scan=plugin cannot target jetpack6 (TensorRT 10.3 has no Python plugins); "
                          "use --scan chunked")
    model = load_model(ckpt)
    written: List[pathlib.Path] = []
    if onnx_fp32 is None:
        from kernels.onnx_plugin import set_plugin_aot

        set_plugin_aot(plugin_aot)  # plugin nodes get aot=1 when the AOT form will be built
        try:
            res = export_onnx(model, outdir / "model.onnx", batch="dynamic", opset=a["opset"], frame_hw=a["frame_hw"],
                              frame_channels=a["frame_channels"], full_res_map=full_res_map, scan=scan_mode,
                              check=check, images=images, n=a["n"], quiet=quiet)
        finally:
            set_plugin_aot(False)
        fp32_path, meta = res.path, res.meta
        written += [res.path, res.sidecar]
        if not quiet:
            print(res.summary())
    else:
        from .artifacts import read_metadata, strip_sidecar_keys

        fp32_path = pathlib.Path(onnx_fp32)
        meta = strip_sidecar_keys(read_metadata(fp32_path, expect={"export.scan": scan_mode,
                                                                     "export.precision": "fp32"}))
    ex = meta["export"]
    hw, ch = tuple(ex["frame_hw"]), int(ex["frame_channels"])
    prec = a["precision"] or "fp32"
    steps = Steps(["precision", "compat", "trtexec", "engine"], desc=f"export tensorrt ({prec})", quiet=quiet)
    parity = None
    try:
        with steps.step("precision"):
            if prec == "fp32":
                graph = fp32_path
            else:
                graph = outdir / f"model.{prec}.onnx"
                if prec == "fp16":
                    info = convert_fp16(fp32_path, graph)
                else:
                    frames, src = calibration_frames(calib, n_calib, hw, ch)
                    info = quantize_int8(fp32_path, graph, frames)
                    info["calib_source"] = src
                mp = onnx.load(str(graph))
                gmeta = json.loads(json.dumps(meta))
                gmeta["export"].update(precision=prec, precision_info=info, artifact=graph.name,
                                       source_onnx_sha256=sha256_file(fp32_path))
                embed_onnx_metadata(mp, gmeta)
                onnx.save(mp, str(graph))
                write_sidecar(graph, gmeta)
                if check:
                    parity = gate(model, graph, gmeta, images=images, n=a["n"] or 8, tolerances=prec)
                    write_sidecar(graph, gmeta, parity=parity.to_dict())
                written += [graph, graph.with_name(graph.name + ".json")]
        with steps.step("compat"):
            compat = require_trt_compat(graph, a["target"] or "x86")
        engine_path = outdir / "model.engine"
        cache = pathlib.Path(timing_cache) if timing_cache else outdir / "timing.cache"
        mn, op, mx = a["min_batch"] or 1, a["opt_batch"] or 8, a["max_batch"] or 16
        if not mn <= op <= mx:
            raise ExportError(f"min_batch/opt_batch/max_batch: need min <= opt <= max, got {mn}/{op}/{mx}")
        with steps.step("trtexec"):
            cmd = trtexec_command(graph.name, engine_path.name, hw, ch, mn, op, mx, a["workspace"] or 4.0,
                                  str(cache) if timing_cache else cache.name, plugin=scan_mode == "plugin")
            script = outdir / "trtexec.sh"
            script.write_text("#!/bin/sh\n# Equivalent TensorRT build (run in this folder).\ncd \"$(dirname \"$0\")\"\n"
                              + " \\\n  ".join(c for c in cmd if not c.startswith("#"))
                              + ("\n" + "\n".join(c for c in cmd if c.startswith("#")) if scan_mode == "plugin" else "")
                              + "\n")
            os.chmod(script, 0o755)
            written.append(script)
        result = TrtExport(fp32_path, graph, cmd, script, compat, parity=parity, written=written, note=note)
        with steps.step("engine"):
            if dry_run:
                result.note = (note + "\n" if note else "") + "dry run: no engine built (run trtexec.sh or drop --dry-run)"
            elif tensorrt is None:
                result.seconds = time.perf_counter() - t0
                raise TensorRTUnavailable(
                    "TensorRT is not installed (import tensorrt failed): no engine built. Written:\n"
                    + "\n".join(f"  {p}" for p in written)
                    + f"\nEquivalent build on a machine with TensorRT (also in {script}):\n  {shlex.join(cmd)}")
            else:
                info = build_engine(graph, engine_path, hw, ch, mn, op, mx, a["workspace"] or 4.0, cache,
                                    plugin=scan_mode == "plugin")
                emeta = json.loads(json.dumps(meta))
                emeta["export"].update(format="tensorrt", artifact=engine_path.name, precision=prec,
                                       profile={"min": mn, "opt": op, "max": mx}, workspace_gb=a["workspace"] or 4.0,
                                       source_onnx=graph.name, source_onnx_sha256=sha256_file(graph),
                                       target=a["target"] or "x86", **info)
                emeta["versions"]["tensorrt"] = info["tensorrt"]
                write_sidecar(engine_path, emeta)
                result.engine = engine_path
                written += [engine_path, engine_path.with_name(engine_path.name + ".json"), cache]
    finally:
        steps.close()
    result.seconds = time.perf_counter() - t0
    return result


def main(argv=None) -> int:
    from ._common import run_cli
    from .formats import add_cli_args, cli_kwargs

    ap = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    add_cli_args(ap, "tensorrt")
    state = {}

    def body():
        kw = cli_kwargs(ap.parse_args(argv), "tensorrt")
        try:
            res = export_trt(kw.pop("ckpt"), kw.pop("out"), **{k: v for k, v in kw.items() if v is not None})
        except TensorRTUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            state["rc"] = EXIT_NO_TENSORRT
            return
        print(res.summary())

    rc = run_cli(body)
    return state.get("rc", rc)


if __name__ == "__main__":
    sys.exit(main())
