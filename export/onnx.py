"""ONNX export of a checkpoint as a self-describing graph (uint8 frames in, maps + scores out).

    python -m export.onnx --ckpt model.pt [--out DIR] [--batch dynamic|N] [--opset 18]
        [--frame-size HxW] [--frame-channels 1|3] [--full-res-map] [--scan chunked|plugin]

Library: `export_onnx(ckpt, out, ...) -> OnnxExport`. Steps: wrap the model in
deploy.graph.DeployModule (resize + gray->RGB + normalisation in the graph), export with
`torch.onnx.export(dynamo=True)` (the TorchScript exporter only as a fallback, recorded in the
metadata), `onnx.checker` + shape inference, embed metadata_props["edge_ad"], write the sidecar,
run the parity gate (export/check.py). An artifact that fails the gate is renamed
`*.rejected.onnx` and the export raises ParityError with the report.
"""
from __future__ import annotations

import pathlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from deploy.artifacts import embed_onnx_metadata, write_sidecar
from deploy.graph import DeployModule, default_frame_hw
from kernels.onnx_plugin import count_plugin_nodes

from ._common import ExportError, Steps, build_metadata, first_line, load_model, resolve_out, scan_lowering
from .formats import DEFAULT_OPSET, validate_args

MAX_DYNAMIC_BATCH = 1024


@dataclass
class OnnxExport:
    path: pathlib.Path
    sidecar: pathlib.Path
    meta: dict
    parity: Optional[object] = None         # export.check.ParityResult
    seconds: float = 0.0
    steps: dict = field(default_factory=dict)
    node_count: int = 0
    size_bytes: int = 0

    def summary(self) -> str:
        ex = self.meta["export"]
        lines = [f"wrote {self.path}  ({self.size_bytes / 1e6:.2f} MB, {self.node_count} nodes, opset "
                 f"{ex['opset']}, scan={ex['scan']}, batch={ex['batch']}, exporter={ex['exporter']})",
                 f"wrote {self.sidecar}",
                 f"export took {self.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in self.steps.items())})"]
        if self.parity is not None:
            lines.append(self.parity.report())
        return "\n".join(lines)


def _torch_export(dm, example, path: pathlib.Path, opset: int, dynamic: bool, names, prefer_dynamo=True):
    """torch.onnx.export, dynamo first; returns the exporter used."""
    kw = dict(input_names=["frames"], output_names=list(names), opset_version=opset)
    errors = []
    if prefer_dynamo:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dyn = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic else None
                torch.onnx.export(dm, (example,), str(path), dynamo=True, dynamic_shapes=dyn,
                                  verbose=False, **kw)
            return "torch.onnx.export(dynamo=True)"
        except Exception as e:  # recorded and reported; the fallback is said out loud
            errors.append(f"dynamo=True: {first_line(e)}")
            print(f"warning: torch.onnx.export(dynamo=True) failed ({first_line(e)}); "
                  "falling back to the TorchScript exporter (dynamo=False)", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn_axes = {n: {0: "batch"} for n in ("frames", *names)} if dynamic else None
            torch.onnx.export(dm, (example,), str(path), dynamo=False, dynamic_axes=dyn_axes, **kw)
        return "torch.onnx.export(dynamo=False)"
    except Exception as e:
        errors.append(f"dynamo=False: {first_line(e)}")
    raise ExportError("ONNX export failed: " + "; ".join(errors))


def fold_constant_topk(model_proto) -> int:
    """Replace TopK nodes whose inputs are all initializers by constant outputs; returns how many.

    The cross-scan merge sorts its constant scan-order tables (argsort -> TopK with K = H*W);
    TensorRT rejects TopK with K >= 3840 (H*W = 4096 at stride 4 of a 256 input), and a constant
    sort has no business running per frame anyway."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model_proto.graph.initializer}
    keep, folded = [], 0
    for node in model_proto.graph.node:
        if (node.op_type == "TopK" and node.domain in ("", "ai.onnx") and len(node.input) == 2
                and all(x in inits for x in node.input)):
            x = numpy_helper.to_array(inits[node.input[0]])
            k = int(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            axis, largest = int(a.get("axis", -1)), int(a.get("largest", 1))
            order = np.argsort(-x if largest else x, axis=axis, kind="stable")
            idx = np.take(order, np.arange(k), axis=axis)
            vals = np.take_along_axis(x, idx, axis=axis)
            for name, arr in zip(node.output, (vals, idx.astype(np.int64))):
                if name:
                    model_proto.graph.initializer.append(numpy_helper.from_array(arr, name))
            folded += 1
            continue
        keep.append(node)
    if folded:
        del model_proto.graph.node[:]
        model_proto.graph.node.extend(keep)
        outs = {o for n in keep for o in n.output}
        kept_vi = [v for v in model_proto.graph.value_info if v.name in outs]
        del model_proto.graph.value_info[:]
        model_proto.graph.value_info.extend(kept_vi)
        used = {x for n in keep for x in n.input} | {o.name for o in model_proto.graph.output}
        kept_init = [i for i in model_proto.graph.initializer if i.name in used]
        del model_proto.graph.initializer[:]
        model_proto.graph.initializer.extend(kept_init)
    return folded


def check_onnx(model_proto, path=None, strict_shapes: bool = True):
    """onnx.checker + shape inference; raises ExportError naming what failed. Returns inferred model."""
    import onnx

    where = f"{path}: " if path else ""
    try:
        onnx.checker.check_model(model_proto)
    except Exception as e:
        raise ExportError(f"{where}onnx.checker rejected the graph: {first_line(e)}") from None
    try:
        return onnx.shape_inference.infer_shapes(model_proto, check_type=True, strict_mode=strict_shapes)
    except Exception as e:
        raise ExportError(f"{where}ONNX shape inference failed: {first_line(e)}") from None


def export_onnx(ckpt, out=None, *, batch="dynamic", opset: Optional[int] = None, frame_hw=None,
                frame_channels: Optional[int] = None, full_res_map: bool = False, scan: str = "chunked",
                check: bool = True, images=None, n: Optional[int] = None, precision: str = "fp32",
                quiet: bool = False, _format: str = "onnx", _file_name: str = "model.onnx") -> OnnxExport:
    """Export `ckpt` (checkpoint path or model) to ONNX; see module docstring."""
    a = validate_args("onnx", ckpt=ckpt, out=out, batch=batch, opset=opset, frame_hw=frame_hw,
                      frame_channels=frame_channels, full_res_map=full_res_map, scan=scan, check=check,
                      images=images, n=n)
    import onnx


    t0 = time.perf_counter()
    steps = Steps(["load", "export", "check graph", "metadata", "parity"], desc="export onnx", quiet=quiet)
    try:
        with steps.step("load"):
            model = load_model(ckpt)
            pp = model.preprocess
            hw = a["frame_hw"] or default_frame_hw(model)
            ch = a["frame_channels"] or pp.channels
            opset_v = a["opset"] or DEFAULT_OPSET
            bsz = a["batch"] or "dynamic"
            dm = DeployModule(model, frame_hw=hw, frame_channels=ch, full_res_map=bool(full_res_map)).eval()
            names = dm.output_names
            example = dm.example_frames(2 if bsz == "dynamic" else bsz, seed=0)
            with torch.no_grad():
                dm(example[:1])     # one eager call first (fills lazily cached constants)
        path = resolve_out(out, _file_name)
        with steps.step("export"), torch.no_grad(), scan_lowering(a["scan"] or "chunked"):
            exporter = _torch_export(dm, example, path, opset_v, bsz == "dynamic", names)
        with steps.step("check graph"):
            mp = onnx.load(str(path))
            n_folded = fold_constant_topk(mp)
            n_plugin = count_plugin_nodes(mp)
            if (a["scan"] or "chunked") == "plugin" and n_plugin == 0:
                raise ExportError("scan=plugin produced no SelectiveScan plugin node (does this model use "
                                  "kernels.selective_scan?)")
            check_onnx(mp, path, strict_shapes=n_plugin == 0)
        with steps.step("metadata"):
            meta = build_metadata(
                model, format="onnx", artifact=path.name, exporter=exporter, scan=a["scan"] or "chunked",
                plugin_nodes=n_plugin, folded_constant_topk=n_folded, opset=opset_v, frame_hw=list(hw),
                frame_channels=int(ch), batch=bsz, input="frames", input_layout="NHWC uint8, RGB order for 3 channels",
                resize="bilinear, half-pixel (align_corners=False), no antialias, on float values",
                outputs=list(names), precision=precision, source=str(ckpt) if not isinstance(ckpt, torch.nn.Module)
                else "<model object>")
            embed_onnx_metadata(mp, meta)
            onnx.save(mp, str(path))
            # the exporter may have written the weights beside the graph (model.onnx.data); they are
            # inline now, so that file is a stale 2nd copy nobody reads: remove it
            stale = path.with_name(path.name + ".data")
            if stale.is_file() and not any(i.data_location == onnx.TensorProto.EXTERNAL
                                           for i in mp.graph.initializer):
                stale.unlink()
            side = write_sidecar(path, meta)
        res = OnnxExport(path, side, meta, node_count=len(mp.graph.node), size_bytes=path.stat().st_size)
        if check:
            with steps.step("parity"):
                from .check import gate_and_record

                res.parity = gate_and_record(model, path, side, meta, images=images, n=a["n"] or 8)
    finally:
        steps.close()
    res.seconds = time.perf_counter() - t0
    res.steps = dict(steps.times)
    return res


def main(argv=None) -> int:
    from ._common import format_main

    return format_main("onnx", "python -m export.onnx", __doc__, export_onnx, argv)


if __name__ == "__main__":
    sys.exit(main())
