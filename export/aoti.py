"""AOTInductor package: the deployed module compiled ahead of time, loadable without model code.

    python -m export.aoti --ckpt model.pt [--out DIR] [--max-batch 16] [--device cpu|cuda]
        [--frame-size HxW] [--frame-channels 1|3] [--full-res-map]

`torch.export.export` of deploy.graph.DeployModule (dynamic batch 1..max_batch; the selective
scan traces to its chunked standard-op form, see kernels/lowering.py) +
`torch._inductor.aoti_compile_and_package` -> `model.pt2` (+ sidecar). On CUDA, Inductor's
generated Triton kernels are compiled into the package. The metadata is embedded twice: in the
AOTInductor package metadata (`runner.get_metadata()["edge_ad"]`) and as a JSON file inside the
zip (read by deploy.artifacts without loading the model). Load with
`torch._inductor.aoti_load_package("model.pt2")` - no model code needed. The parity gate runs
the loaded package against PyTorch. CPU compilation needs a C++ compiler (gcc/clang).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from deploy.artifacts import write_sidecar
from deploy.contract import META_KEY
from deploy.graph import DeployModule, default_frame_hw

from ._common import ExportError, Steps, build_metadata, first_line, load_model, resolve_out
from .formats import validate_args


@dataclass
class AotiExport:
    path: pathlib.Path
    sidecar: pathlib.Path
    meta: dict
    parity: Optional[object] = None
    seconds: float = 0.0
    steps: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"wrote {self.path}  ({self.path.stat().st_size / 1e6:.2f} MB, device "
                 f"{self.meta['export']['device']}, batch 1..{self.meta['export']['max_batch']})",
                 f"wrote {self.sidecar}",
                 f"export took {self.seconds:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in self.steps.items())})"]
        if self.parity is not None:
            lines.append(self.parity.report())
        return "\n".join(lines)


def _embed_zip_metadata(path: pathlib.Path, meta: dict) -> None:
    """Add `<top>/extra/edge_ad_metadata.json` to the package zip (under its top-level folder)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    top = names[0].split("/")[0] if names and "/" in names[0] else "model"
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{top}/extra/{META_KEY}_metadata.json", json.dumps(meta, sort_keys=True))


def export_aoti(ckpt, out=None, *, frame_hw=None, frame_channels: Optional[int] = None, full_res_map: bool = False,
                max_batch: int = 16, device: str = "cpu", check: bool = True, images=None, n: Optional[int] = None,
                quiet: bool = False, inductor_configs: Optional[dict] = None) -> AotiExport:
    """Export `ckpt` to an AOTInductor package; `inductor_configs` are passed to Inductor as-is."""
    a = validate_args("aoti", ckpt=ckpt, out=out, frame_hw=frame_hw, frame_channels=frame_channels,
                      full_res_map=full_res_map, max_batch=max_batch, device=device, check=check, images=images, n=n)

    dev = a["device"] or "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise ExportError("device=cuda: no CUDA device visible (torch.cuda.is_available() is False)")
    if dev == "cpu" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
        raise ExportError("AOTInductor on CPU needs a C++ compiler (g++/clang++) on PATH: apt-get install g++")
    mb = a["max_batch"] or 16
    t0 = time.perf_counter()
    steps = Steps(["load", "torch.export", "compile", "metadata", "parity"], desc="export aoti", quiet=quiet)
    try:
        with steps.step("load"):
            model = load_model(ckpt).to(dev)
            pp = model.preprocess
            hw = a["frame_hw"] or default_frame_hw(model)
            ch = a["frame_channels"] or pp.channels
            dm = DeployModule(model, frame_hw=hw, frame_channels=ch, full_res_map=bool(full_res_map)).to(dev).eval()
            example = dm.example_frames(2).to(dev)
            with torch.no_grad():
                dm(example[:1])
        path = resolve_out(out, "model.pt2")
        with steps.step("torch.export"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dyn = ({0: torch.export.Dim("batch", min=1, max=max(mb, 2))},)
            try:
                ep = torch.export.export(dm, (example,), dynamic_shapes=dyn)
            except Exception as e:
                raise ExportError(f"torch.export failed: {first_line(e)}") from None
        meta = build_metadata(model, format="aoti", artifact=path.name, exporter="torch._inductor.aoti_compile_and_package",
                              scan="chunked", device=dev, frame_hw=list(hw), frame_channels=int(ch), batch="dynamic",
                              max_batch=mb, input="frames", input_layout="NHWC uint8, RGB order for 3 channels",
                              resize="bilinear, half-pixel (align_corners=False), no antialias, on float values",
                              outputs=list(dm.output_names), precision="fp32",
                              source=str(ckpt) if not isinstance(ckpt, torch.nn.Module) else "<model object>")
        with steps.step("compile"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from torch._inductor import aoti_compile_and_package

                cfg = dict(inductor_configs or {})
                cfg["aot_inductor.metadata"] = {META_KEY: json.dumps(meta)}
                aoti_compile_and_package(ep, package_path=str(path), inductor_configs=cfg)
            except Exception as e:
                raise ExportError(f"AOTInductor compilation failed: {first_line(e)}") from None
        with steps.step("metadata"):
            _embed_zip_metadata(path, meta)
            side = write_sidecar(path, meta)
        res = AotiExport(path, side, meta)
        if check:
            with steps.step("parity"):
                from .check import gate_and_record

                if dev == "cuda":
                    model = model.cpu()
                res.parity = gate_and_record(model, path, side, meta, images=images, n=a["n"] or 8)
    finally:
        steps.close()
    res.seconds = time.perf_counter() - t0
    res.steps = dict(steps.times)
    return res


def main(argv=None) -> int:
    from ._common import format_main

    return format_main("aoti", "python -m export.aoti", __doc__, export_aoti, argv)


if __name__ == "__main__":
    sys.exit(main())
