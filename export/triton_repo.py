"""Triton Inference Server model repository for an exported model.

    python -m export.triton_repo --ckpt model.pt --out REPO [--format onnx|plan] [--max-batch 16]
        [--instances 1] [--kind cpu|gpu] [--model-name edge_ad] [--frame-size HxW] [--frame-channels 1|3]

Writes REPO/<model_name>/config.pbtxt and REPO/<model_name>/1/model.onnx (platform
onnxruntime_onnx) or 1/model.plan (tensorrt_plan, built by export.trt: needs TensorRT), each with
its sidecar metadata next to it. The config has the graph's real input/output names, types and
per-sample dims (batch axis implied by max_batch_size; the (B,) scores use dims [1] reshaped to
[]), dynamic batching (preferred batch sizes, bounded queue delay), an instance group, and the
artifact metadata (model, threshold, class names) as string parameters. The written config is
parsed back with tritonclient's model_config_pb2 (when tritonclient is installed). Pre/post
processing around a bare engine (Python-backend ensembles): export.triton_ensemble.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
from dataclasses import dataclass
from typing import List, Optional

from deploy import load_engine, read_metadata
from deploy.contract import INPUT_NAME

from ._common import ExportError, load_model
from .formats import validate_args

try:  # optional (the "serve" extra): parses config.pbtxt as Triton does
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError:
    model_config_pb2 = None
    text_format = None


@dataclass
class TritonRepo:
    root: pathlib.Path
    model_dir: pathlib.Path
    config: pathlib.Path
    model_file: pathlib.Path
    validated: bool
    meta: dict

    def summary(self) -> str:
        return (f"wrote {self.config}\nwrote {self.model_file}\nwrote {self.model_file}.json\n"
                f"config.pbtxt {'parsed by tritonclient model_config_pb2: OK' if self.validated else 'not parsed (tritonclient not installed: pip install tritonclient[grpc])'}")


def _dims(shape) -> List[int]:
    return [int(d) if isinstance(d, int) and d > 0 else -1 for d in shape]


def config_text(meta: dict, model_name: str, platform: str, max_batch: int, instances: int, kind: str,
                output_shapes: dict, opt_batch: Optional[int] = None) -> str:
    """config.pbtxt text for the deployed graph described by `meta`."""
    ex = meta["export"]
    h, w = ex["frame_hw"]
    ch = ex["frame_channels"]
    lines = [f'name: "{model_name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             "input [", "  {", f'    name: "{INPUT_NAME}"', "    data_type: TYPE_UINT8", f"    dims: [ {h}, {w}, {ch} ]",
             "  }", "]", "output ["]
    outs = []
    for name in ex["outputs"]:
        shp = output_shapes[name]
        per_sample = shp[1:]
        if per_sample:
            outs.append(f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, _dims(per_sample)))} ]\n  }}')
        else:   # (B,) -> dims [1] reshaped to a scalar per sample
            outs.append(f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n    reshape: {{ shape: [ ] }}\n  }}')
    lines.append(",\n".join(outs))
    lines.append("]")
    prefs = sorted({b for b in (1, opt_batch or 0, max_batch // 2, max_batch) if 1 <= b <= max_batch})
    lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, prefs))} ]",
              "  max_queue_delay_microseconds: 2000", "}",
              "instance_group [", "  {", f"    count: {instances}", f"    kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'}",
              "  }", "]"]
    stats = meta.get("score_stats", {})
    params = {"edge_ad_model": meta.get("model", "?"), "edge_ad_threshold": str(stats.get("threshold")),
              "edge_ad_score_low": str(stats.get("low")), "edge_ad_verdict": "normalized_score >= 0.5",
              "edge_ad_class_names": json.dumps(meta.get("class_names", [])),
              "edge_ad_precision": str(ex.get("precision", "fp32"))}
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}')
    return "\n".join(lines) + "\n"


def parse_config(path):
    """config.pbtxt -> tritonclient's ModelConfig protobuf (ValueError naming the file when it
    does not parse). Needs tritonclient[grpc] (the `serve` extra)."""
    if model_config_pb2 is None:
        raise ImportError("parsing config.pbtxt needs tritonclient: pip install 'tritonclient[grpc]' "
                          "(or edge-ad[serve])")
    path = pathlib.Path(path)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a valid Triton model config: {e}") from None


def validate_config(path) -> Optional[object]:
    """parse_config + the fields every served model needs; None when tritonclient is absent."""
    if model_config_pb2 is None:
        return None
    try:
        cfg = parse_config(path)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if not cfg.name or not cfg.platform or not cfg.input or not cfg.output:
        raise ExportError(f"{path}: ModelConfig lacks name/platform/input/output")
    return cfg


def _onnx_output_shapes(path, batch: int = 2) -> dict:
    """Output shapes from one run of the artifact (concrete per-sample dims)."""
    import numpy as np

    with load_engine(path, backend="ort-cpu") as engine:
        b = engine.static_batch or batch
        h, w = engine.frame_hw
        out = engine.infer(np.zeros((b, h, w, engine.frame_channels), np.uint8))
    return {k: list(v.shape) for k, v in out.items()}


def export_triton_repo(ckpt, out=None, *, format: str = "onnx", max_batch: int = 16, instances: int = 1,
                       model_name: str = "edge_ad", kind: Optional[str] = None, frame_hw=None, frame_channels=None,
                       full_res_map: bool = False, scan: str = "chunked", opset=None, precision: str = "fp32",
                       check: bool = True, images=None, n=None, quiet: bool = False, onnx_path=None) -> TritonRepo:
    """Write a Triton repository (see module docstring). `onnx_path`: reuse an existing ONNX export."""
    a = validate_args("triton", ckpt=ckpt, out=out, format=format, max_batch=max_batch, instances=instances,
                      model_name=model_name, kind=kind, frame_hw=frame_hw, frame_channels=frame_channels,
                      full_res_map=full_res_map, scan=scan, opset=opset, precision=precision, check=check,
                      images=images, n=n)
    fmt = a["format"] or "onnx"
    name = a["model_name"] or "edge_ad"
    mb = a["max_batch"] or 16
    root = pathlib.Path(out if out is not None else "model_repository")
    mdir = root / name
    vdir = mdir / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        if onnx_path is None:
            from .onnx import export_onnx

            res = export_onnx(load_model(ckpt), vdir / "model.onnx", batch="dynamic", opset=a["opset"],
                              frame_hw=a["frame_hw"], frame_channels=a["frame_channels"], full_res_map=full_res_map,
                              scan=a["scan"] or "chunked", check=check, images=images, n=a["n"], quiet=quiet)
            model_file, meta = res.path, res.meta
        else:
            meta = read_metadata(onnx_path)
            model_file = vdir / "model.onnx"
            shutil.copyfile(onnx_path, model_file)
            shutil.copyfile(pathlib.Path(str(onnx_path) + ".json"), pathlib.Path(str(model_file) + ".json"))
        if meta["export"].get("scan") == "plugin":
            raise ExportError("format=onnx with scan=plugin: Triton's onnxruntime backend cannot run the "
                              "SelectiveScan plugin node; use --scan chunked (or --format plan)")
        shapes = _onnx_output_shapes(model_file)
        platform = "onnxruntime_onnx"
        kind_v = a["kind"] or "cpu"
    else:
        from .trt import export_trt

        res = export_trt(load_model(ckpt), mdir / "_build", precision=a["precision"] or "fp32", scan=a["scan"] or "chunked",
                         max_batch=mb, opt_batch=min(8, mb), min_batch=1, frame_hw=a["frame_hw"],
                         frame_channels=a["frame_channels"], full_res_map=full_res_map, opset=a["opset"],
                         check=check, images=images, n=a["n"], quiet=quiet)
        model_file = vdir / "model.plan"
        shutil.copyfile(res.engine, model_file)
        shutil.copyfile(pathlib.Path(str(res.engine) + ".json"), pathlib.Path(str(model_file) + ".json"))
        meta = read_metadata(res.engine)
        shapes = {k: [mb, *v[1:]] for k, v in _onnx_output_shapes(res.onnx).items()}
        platform = "tensorrt_plan"
        kind_v = a["kind"] or "gpu"
    cfg_path = mdir / "config.pbtxt"
    cfg_path.write_text(config_text(meta, name, platform, mb, a["instances"] or 1, kind_v, shapes,
                                    opt_batch=min(8, mb)))
    parsed = validate_config(cfg_path)
    return TritonRepo(root, mdir, cfg_path, model_file, parsed is not None, meta)


def main(argv=None) -> int:
    from ._common import format_main

    return format_main("triton", "python -m export.triton_repo", __doc__, export_triton_repo, argv)


if __name__ == "__main__":
    sys.exit(main())
