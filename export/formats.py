"""One table of export formats; it drives argument validation, the CLIs and the README table.

Each exporter's library function calls `validate_args(format_name, **kwargs)`: an argument the
format does not take, or a value out of range, is one `ExportArgError` naming the argument and
what was expected. `add_cli_args(parser, format_name)` adds exactly the format's arguments to an
argparse parser (so `--help` never lists a flag the exporter would reject).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from deploy.contract import PRECISIONS

SCAN_MODES = ("chunked", "plugin")
CALIB_METHODS = ("minmax", "percentile", "entropy")
INT8_OPS = ("Conv", "Gemm", "MatMul")                 # op types INT8 Q/DQ may quantise
INT8_WEIGHTS = ("per-channel", "per-tensor")         # weight scale granularity
INT8_FP32_CONSUMERS = ("fp32", "qdq")                # what ops kept in fp32 read: the original or the DQ copy
INT8_ARGS = ("calib_method", "calib_percentile", "n_calib", "int8_weights", "int8_ops", "int8_keep",
             "int8_fp32_consumers")
TRITON_FORMATS = ("onnx", "plan")
DEFAULT_OPSET = 18
OPSET_RANGE = (18, 23)      # dynamo exporter emits >= 18; TensorRT 10.3's parser reads up to 20
MAX_BATCH_LIMIT = 4096


class ExportArgError(ValueError):
    """A bad exporter argument; the message names the argument and what was expected."""


@dataclass(frozen=True)
class ExportFormat:
    name: str          # --format value / table key
    module: str        # `python -m <module>`
    suffix: str        # artifact file name suffix ("/" = a folder)
    artifact: str      # default artifact file name
    cpu: bool          # can be produced and run on a CPU-only host
    gpu: bool          # runs on NVIDIA GPUs
    args: Tuple[str, ...]
    description: str


_COMMON = ("ckpt", "out", "frame_hw", "frame_channels", "full_res_map", "check", "images", "n")
FORMATS: Tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "export.onnx", ".onnx", "model.onnx", True, True,
                 _COMMON + ("batch", "opset", "scan"),
                 "ONNX graph, uint8 frames in; ONNX Runtime (CPU/CUDA/TensorRT EP), TensorRT parser"),
    ExportFormat("tensorrt", "export.trt", ".engine", "model.engine", False, True,
                 _COMMON + ("opset", "scan", "precision", "calib", "workspace", "min_batch", "opt_batch",
                            "max_batch", "dry_run", "timing_cache", "target") + INT8_ARGS,
                 "strongly typed TensorRT plan (precision set in the ONNX graph: fp32/fp16/int8 Q/DQ)"),
    ExportFormat("aoti", "export.aoti", ".pt2", "model.pt2", True, True,
                 _COMMON + ("max_batch", "device"),
                 "AOTInductor package (torch.export + aoti_compile_and_package), loads without model code"),
    ExportFormat("triton", "export.triton_repo", "/", "model_repository", True, True,
                 _COMMON + ("opset", "scan", "format", "max_batch", "instances", "model_name", "precision",
                            "kind"),
                 "Triton Inference Server model repository (config.pbtxt + 1/model.onnx or 1/model.plan)"),
)


def get_format(name: str) -> ExportFormat:
    for f in FORMATS:
        if f.name == name:
            return f
    raise ExportArgError(f"format: unknown export format {name!r}; expected one of "
                         f"{', '.join(f.name for f in FORMATS)}")


def parse_frame_size(value) -> Tuple[int, int]:
    """'HxW' / 'N' / (H, W) -> (H, W) of positive ints."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = value
    elif isinstance(value, int):
        h = w = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*([xX]\s*\d+\s*)?", value):
        parts = re.split(r"[xX]", value)
        h = int(parts[0])
        w = int(parts[1]) if len(parts) > 1 else h
    else:
        raise ExportArgError(f"frame_hw (--frame-size): expected HxW (e.g. 256x256) or one int, got {value!r}")
    try:
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ExportArgError(f"frame_hw (--frame-size): expected integers, got {value!r}") from None
    if not (1 <= h <= 65536 and 1 <= w <= 65536):
        raise ExportArgError(f"frame_hw (--frame-size): height and width must be in 1..65536, got {h}x{w}")
    return h, w


def parse_batch(value):
    """'dynamic' / None -> 'dynamic'; an int >= 1 (or its string) -> int."""
    if value is None or value == "dynamic":
        return "dynamic"
    try:
        b = int(value)
    except (TypeError, ValueError):
        raise ExportArgError(f"batch: expected 'dynamic' or a positive integer, got {value!r}") from None
    if not 1 <= b <= MAX_BATCH_LIMIT:
        raise ExportArgError(f"batch: expected 1..{MAX_BATCH_LIMIT}, got {b}")
    return b


def _choice(name, value, choices):
    if value not in choices:
        raise ExportArgError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _pos_int(name, value, lo=1, hi=MAX_BATCH_LIMIT):
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ExportArgError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and value != v:
        raise ExportArgError(f"{name}: expected an integer, got {value!r}")
    if not lo <= v <= hi:
        raise ExportArgError(f"{name}: expected {lo}..{hi}, got {v}")
    return v


def _name_list(name, value, allowed=None, pattern=r"[A-Za-z0-9_.]+"):
    """'a,b' / ['a', 'b'] -> ('a', 'b'); each item matches `pattern` (and is in `allowed`)."""
    items = [x.strip() for x in value.split(",")] if isinstance(value, str) else [str(x).strip() for x in value]
    items = [x for x in items if x]
    if allowed is not None and (not items or any(x not in allowed for x in items)):
        raise ExportArgError(f"{name}: expected a comma-separated subset of {','.join(allowed)}, got {value!r}")
    bad = [x for x in items if not re.fullmatch(pattern, x)]
    if bad:
        raise ExportArgError(f"{name}: expected module paths like encoder,fuse.gate,heads (or first/last), "
                             f"got {bad}")
    return tuple(dict.fromkeys(items))


def validate_args(format_name: str, **kwargs) -> Dict[str, Any]:
    """Check every argument against the format's table row; return normalised values.

    None means "not given" (use the exporter's default) and is passed through.
    """
    fmt = get_format(format_name)
    unknown = sorted(k for k in kwargs if k not in fmt.args)
    if unknown:
        raise ExportArgError(f"{fmt.name} export does not take argument(s) {unknown}; "
                             f"it takes {', '.join(fmt.args)}")
    out = dict(kwargs)
    for k, v in kwargs.items():
        if v is None:
            continue
        if k == "frame_hw":
            out[k] = parse_frame_size(v)
        elif k == "frame_channels":
            out[k] = _choice(k, int(v) if str(v).isdigit() else v, (1, 3))
        elif k == "batch":
            out[k] = parse_batch(v)
        elif k == "opset":
            out[k] = _pos_int(k, v, *OPSET_RANGE)
        elif k == "scan":
            out[k] = _choice(k, v, SCAN_MODES)
        elif k == "precision":
            out[k] = _choice(k, v, PRECISIONS)
        elif k == "calib_method":
            out[k] = _choice(k, v, CALIB_METHODS)
        elif k == "calib_percentile":
            try:
                pv = float(v)
            except (TypeError, ValueError):
                raise ExportArgError(f"calib_percentile: expected a percentile like 99.99, got {v!r}") from None
            if not 50 <= pv <= 100:
                raise ExportArgError(f"calib_percentile: expected 50 <= p <= 100, got {pv}")
            out[k] = pv
        elif k == "n_calib":
            out[k] = _pos_int(k, v, 1, 10000)
        elif k == "int8_weights":
            out[k] = _choice(k, v, INT8_WEIGHTS)
        elif k == "int8_ops":
            out[k] = _name_list(k, v, INT8_OPS)
        elif k == "int8_keep":
            out[k] = _name_list(k, v)
        elif k == "int8_fp32_consumers":
            out[k] = _choice(k, v, INT8_FP32_CONSUMERS)
        elif k == "format":
            out[k] = _choice(k, v, TRITON_FORMATS)
        elif k in ("min_batch", "opt_batch", "max_batch"):
            out[k] = _pos_int(k, v)
        elif k == "instances":
            out[k] = _pos_int(k, v, 1, 64)
        elif k == "n":
            out[k] = _pos_int(k, v, 1, 10000)
        elif k == "workspace":
            try:
                ws = float(v)
            except (TypeError, ValueError):
                raise ExportArgError(f"workspace: expected a size in GB, got {v!r}") from None
            if not 0 < ws <= 1024:
                raise ExportArgError(f"workspace: expected 0 < GB <= 1024, got {v}")
            out[k] = ws
        elif k == "target":
            out[k] = _choice(k, v, ("x86", "jetpack6"))
        elif k == "device":
            out[k] = _choice(k, v, ("cpu", "cuda"))
        elif k == "kind":
            out[k] = _choice(k, v, ("cpu", "gpu"))
        elif k == "model_name":
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(v)):
                raise ExportArgError(f"model_name: expected letters, digits, '_', '.', '-', got {v!r}")
    given = [k for k in INT8_ARGS if out.get(k) is not None]
    if given and "precision" in fmt.args and out.get("precision") != "int8":
        raise ExportArgError(f"{given[0]}: an INT8 option; it needs precision int8 (--precision int8), "
                             f"got precision {out.get('precision') or 'fp32'}")
    if out.get("calib_percentile") is not None and out.get("calib_method") != "percentile":
        raise ExportArgError("calib_percentile: only used with calib_method percentile (--calib-method percentile)")
    mn, op, mx = (out.get(k) for k in ("min_batch", "opt_batch", "max_batch"))
    if mn is not None and op is not None and mx is not None and not mn <= op <= mx:
        raise ExportArgError(f"min_batch/opt_batch/max_batch: need min <= opt <= max, got {mn}/{op}/{mx}")
    return out


_HELP = {
    "ckpt": "checkpoint (model.pt) to export",
    "out": "output folder (created; default: export_out)",
    "frame_hw": "camera frame size HxW fed to the graph (default: the training tile, else the model input size)",
    "frame_channels": "1 = gray frames, 3 = RGB frames (default: the model's channels)",
    "full_res_map": "also output the anomaly map resized to the frame size (anomaly_map_full)",
    "check": "run the parity gate after export (default on; --no-check skips it)",
    "images": "folder of images for the parity gate / calibration (default: synthetic images)",
    "n": "number of images the parity gate compares (default 8)",
    "batch": "'dynamic' (default) or a fixed batch size",
    "opset": f"ONNX opset ({OPSET_RANGE[0]}..{OPSET_RANGE[1]}, default {DEFAULT_OPSET})",
    "scan": "selective-scan lowering: chunked standard ops (default) or one plugin node per scan",
    "precision": "fp32 (default), fp16 (mixed, scan + reductions fp32) or int8 (explicit Q/DQ)",
    "calib": "folder of normal images for INT8 calibration",
    "calib_method": "INT8 activation ranges: minmax (default), percentile or entropy",
    "calib_percentile": "percentile of |activation| for --calib-method percentile (default 99.999)",
    "n_calib": "number of calibration images taken from --calib (default 64)",
    "int8_weights": "INT8 weight scales: per-channel (default) or per-tensor",
    "int8_ops": "op types INT8 quantises, comma-separated subset of Conv,Gemm,MatMul (default all)",
    "int8_keep": "module paths kept fp32 besides the scan and pre/post tail, e.g. encoder,fuse.gate,heads "
                 "or first,last (default: the model's own - the encoder of a model that scores against a "
                 "memory of its features - else none; \"\" keeps none)",
    "int8_fp32_consumers": "ops kept fp32 read the original tensor (fp32, default) or the int8-rounded copy (qdq)",
    "workspace": "TensorRT workspace memory pool in GB (default 4)",
    "min_batch": "optimisation profile minimum batch (default 1)",
    "opt_batch": "optimisation profile optimal batch (default 8)",
    "max_batch": "maximum batch size (default 16)",
    "dry_run": "write the ONNX and the trtexec command line, build no engine",
    "timing_cache": "TensorRT timing cache file (read if present, written after the build)",
    "target": "x86 (current TensorRT) or jetpack6 (TensorRT 10.3): the compatibility table checked",
    "device": "device the AOTInductor package is compiled for (default cpu)",
    "format": "model file in the repository: onnx (default) or plan (TensorRT engine)",
    "instances": "model instances per device (instance_group count, default 1)",
    "model_name": "model name in the repository (default: edge_ad)",
    "kind": "instance group kind: cpu or gpu (default: cpu for onnx, gpu for plan)",
}


_FLAGS = {"frame_hw": "--frame-size"}


def add_cli_args(parser: argparse.ArgumentParser, format_name: str) -> argparse.ArgumentParser:
    """Add the format's arguments (and only those) to `parser`."""
    fmt = get_format(format_name)
    for a in fmt.args:
        flag = _FLAGS.get(a, "--" + a.replace("_", "-"))
        if a == "ckpt":
            parser.add_argument(flag, required=True, help=_HELP[a])
        elif a == "frame_hw":
            parser.add_argument(flag, dest="frame_hw", default=None, help=_HELP[a])
        elif a in ("full_res_map", "dry_run"):
            parser.add_argument(flag, action="store_true", help=_HELP[a])
        elif a == "check":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=_HELP[a])
        elif a in ("scan", "precision", "format", "target", "device", "kind", "calib_method", "int8_weights",
                   "int8_fp32_consumers"):
            choices = {"scan": SCAN_MODES, "precision": PRECISIONS, "format": TRITON_FORMATS,
                       "target": ("x86", "jetpack6"), "device": ("cpu", "cuda"),
                       "kind": ("cpu", "gpu"), "calib_method": CALIB_METHODS, "int8_weights": INT8_WEIGHTS,
                       "int8_fp32_consumers": INT8_FP32_CONSUMERS}[a]
            parser.add_argument(flag, choices=choices, default=None, help=_HELP[a])
        else:
            parser.add_argument(flag, default=None, help=_HELP[a])
    return parser


def cli_kwargs(ns: argparse.Namespace, format_name: str) -> Dict[str, Any]:
    """argparse namespace -> validated kwargs for the format's library function."""
    fmt = get_format(format_name)
    return validate_args(fmt.name, **{a: getattr(ns, a) for a in fmt.args if hasattr(ns, a)})


def markdown_table() -> str:
    """The README table of export formats."""
    rows = ["| format | command | artifact | CPU | NVIDIA GPU | arguments |",
            "| --- | --- | --- | --- | --- | --- |"]
    for f in FORMATS:
        args = " ".join(_FLAGS.get(a, "--" + a.replace("_", "-")) for a in f.args if a != "ckpt")
        rows.append(f"| {f.name} | `python -m {f.module} --ckpt model.pt` | `{f.artifact}` | "
                    f"{'yes' if f.cpu else 'no'} | {'yes' if f.gpu else 'no'} | {args} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
