"""TensorRT engines with the precision set in the ONNX graph (strongly typed build).

    python -m export.trt --ckpt model.pt [--precision fp32|fp16|int8] [--calib DIR] [--workspace GB]
        [--scan chunked|plugin] [--min-batch 1 --opt-batch 8 --max-batch 16] [--target x86|jetpack6]
        [--timing-cache FILE] [--dry-run]
        INT8: [--calib-method minmax|percentile|entropy] [--calib-percentile P] [--n-calib N]
        [--int8-weights per-channel|per-tensor] [--int8-ops Conv,Gemm,MatMul] [--int8-keep MODULES]
        [--int8-fp32-consumers fp32|qdq]

Steps:
1. fp32 ONNX via export.onnx (dynamic batch, parity gate).
2. fp16 / int8: the reduced-precision copy of that graph (export.precision: why the precision
   lives in the graph, what stays fp32, how INT8 is calibrated). It is an artifact of its own
   (sidecar + metadata recording every choice) and goes through the parity gate in ONNX Runtime
   on CPU with that precision's tolerances.
3. Static TensorRT compatibility check of the final ONNX for `--target` (export.trt_compat).
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
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from deploy import read_metadata
from deploy.artifacts import sha256_file, strip_sidecar_keys, write_sidecar
from deploy.contract import INPUT_NAME
from deploy.trt_plugin import plugin_forms, register_selective_scan_plugin, trt_version
from kernels.onnx_plugin import set_plugin_aot

from ._common import ExportError, Steps, describe_files, load_model, run_cli
from .check import gate
from .formats import add_cli_args, cli_kwargs, validate_args
from .onnx import export_onnx
from .precision import INT8_DEFAULTS, precision_graph
from .trt_compat import require_trt_compat

try:
    import tensorrt
except Exception:  # ImportError, or a broken CUDA install raising at import
    tensorrt = None

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
        lines = ["wrote:", describe_files(self.written), self.compat.report()]
        if self.parity is not None:
            lines.append(self.parity.report())
        lines.append("trtexec equivalent:\n  " + shlex.join(self.trtexec))
        if self.note:
            lines.append(self.note)
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)


# ---- trtexec + TensorRT API ------------------------------------------------------------
def shape_str(b: int, hw, ch) -> str:
    return f"{INPUT_NAME}:{b}x{hw[0]}x{hw[1]}x{ch}"


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
    profile.set_shape(INPUT_NAME, (min_batch, h, w, channels), (opt_batch, h, w, channels),
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
def _scan_mode(scan: str, target: str):
    """(scan lowering to export, build the AOT plugin form?, note): `plugin` falls back to
    `chunked` where TensorRT has no Python plugins."""
    note, aot = "", False
    if scan == "plugin" and tensorrt is not None:
        if trt_version() < (10, 6):
            note = (f"TensorRT {tensorrt.__version__} has no Python plugins (needs >= 10.6): "
                    "falling back to --scan chunked")
            scan = "chunked"
        else:
            forms = plugin_forms()
            aot = forms["aot"]
            if not aot:
                note = f"TensorRT plugin: no ahead-of-time form ({forms['aot_reason']})"
    if note:
        print("note: " + note, file=sys.stderr)
    if scan == "plugin" and target == "jetpack6":
        raise ExportError("scan=plugin cannot target jetpack6 (TensorRT 10.3 has no Python plugins); "
                          "use --scan chunked")
    return scan, aot, note


def _fp32_onnx(model, outdir, a, scan_mode, plugin_aot, full_res_map, check, images, quiet, onnx_fp32):
    """(fp32 ONNX path, its metadata, files written): exported now, or `onnx_fp32` reused."""
    if onnx_fp32 is not None:
        meta = strip_sidecar_keys(read_metadata(onnx_fp32, expect={"export.scan": scan_mode,
                                                                    "export.precision": "fp32"}))
        return pathlib.Path(onnx_fp32), meta, []
    set_plugin_aot(plugin_aot)  # plugin nodes get aot=1 when the AOT form will be built
    try:
        res = export_onnx(model, outdir / "model.onnx", batch="dynamic", opset=a["opset"], frame_hw=a["frame_hw"],
                          frame_channels=a["frame_channels"], full_res_map=full_res_map, scan=scan_mode,
                          check=check, images=images, n=a["n"], quiet=quiet)
    finally:
        set_plugin_aot(False)
    if not quiet:
        print(res.summary())
    return res.path, res.meta, [res.path, res.sidecar]


def _write_trtexec(outdir, cmd, plugin: bool) -> pathlib.Path:
    script = outdir / "trtexec.sh"
    script.write_text("#!/bin/sh\n# Equivalent TensorRT build (run in this folder).\ncd \"$(dirname \"$0\")\"\n"
                      + " \\\n  ".join(c for c in cmd if not c.startswith("#"))
                      + ("\n" + "\n".join(c for c in cmd if c.startswith("#")) if plugin else "")
                      + "\n")
    os.chmod(script, 0o755)
    return script


def export_trt(ckpt, out=None, *, precision: str = "fp32", calib=None, workspace: float = 4.0,
               scan: str = "chunked", min_batch: int = 1, opt_batch: int = 8, max_batch: int = 16,
               dry_run: bool = False, timing_cache=None, target: str = "x86", frame_hw=None,
               frame_channels=None, full_res_map: bool = False, opset=None, check: bool = True, images=None,
               n=None, n_calib=None, quiet: bool = False, onnx_fp32=None, calib_method=None,
               calib_percentile=None, int8_weights=None, int8_ops=None, int8_keep=None,
               int8_fp32_consumers=None) -> TrtExport:
    """See module docstring. `onnx_fp32`: reuse an existing fp32 export (its metadata is checked).
    INT8 options (precision int8 only; None = export.precision.INT8_DEFAULTS): see `quantize_int8`."""
    a = validate_args("tensorrt", ckpt=ckpt, out=out, precision=precision, calib=calib, workspace=workspace,
                      scan=scan, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, dry_run=dry_run,
                      timing_cache=timing_cache, target=target, frame_hw=frame_hw, frame_channels=frame_channels,
                      full_res_map=full_res_map, opset=opset, check=check, images=images, n=n, n_calib=n_calib,
                      calib_method=calib_method, calib_percentile=calib_percentile, int8_weights=int8_weights,
                      int8_ops=int8_ops, int8_keep=int8_keep, int8_fp32_consumers=int8_fp32_consumers)
    q8 = {k: (INT8_DEFAULTS[k] if a.get(k) is None else a[k]) for k in INT8_DEFAULTS}
    mn, op, mx = a["min_batch"] or 1, a["opt_batch"] or 8, a["max_batch"] or 16
    if not mn <= op <= mx:
        raise ExportError(f"min_batch/opt_batch/max_batch: need min <= opt <= max, got {mn}/{op}/{mx}")
    t0 = time.perf_counter()
    outdir = pathlib.Path(out if out is not None else "export_out")
    outdir.mkdir(parents=True, exist_ok=True)
    scan_mode, plugin_aot, note = _scan_mode(a["scan"] or "chunked", a["target"] or "x86")
    model = load_model(ckpt)
    if a.get("int8_keep") is None:
        q8["int8_keep"] = tuple(model.int8_keep)
    fp32_path, meta, written = _fp32_onnx(model, outdir, a, scan_mode, plugin_aot, full_res_map, check,
                                          images, quiet, onnx_fp32)
    ex = meta["export"]
    hw, ch = tuple(ex["frame_hw"]), int(ex["frame_channels"])
    prec = a["precision"] or "fp32"
    steps = Steps(["precision", "compat", "trtexec", "engine"], desc=f"export tensorrt ({prec})", quiet=quiet)
    parity = None
    try:
        with steps.step("precision"):
            graph = fp32_path
            if prec != "fp32":
                graph = outdir / f"model.{prec}.onnx"
                gmeta = precision_graph(fp32_path, graph, prec, meta, q8, calib=calib)
                if check:
                    parity = gate(model, graph, gmeta, images=images, n=a["n"] or 8, tolerances=prec)
                    write_sidecar(graph, gmeta, parity=parity.to_dict())
                written += [graph, graph.with_name(graph.name + ".json")]
        with steps.step("compat"):
            compat = require_trt_compat(graph, a["target"] or "x86")
        engine_path = outdir / "model.engine"
        cache = pathlib.Path(timing_cache) if timing_cache else outdir / "timing.cache"
        with steps.step("trtexec"):
            cmd = trtexec_command(graph.name, engine_path.name, hw, ch, mn, op, mx, a["workspace"] or 4.0,
                                  str(cache) if timing_cache else cache.name, plugin=scan_mode == "plugin")
            script = _write_trtexec(outdir, cmd, scan_mode == "plugin")
            written.append(script)
        result = TrtExport(fp32_path, graph, cmd, script, compat, parity=parity, written=written, note=note)
        with steps.step("engine"):
            if dry_run:
                result.note = (note + "\n" if note else "") + "dry run: no engine built (run trtexec.sh or drop --dry-run)"
            elif tensorrt is None:
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
