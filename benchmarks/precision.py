"""Accuracy of the reduced-precision ONNX graphs (fp16 mixed, INT8 Q/DQ) against fp32, in ONNX Runtime CPU.

    python benchmarks/precision.py --ckpt model.pt --data DIR [--limit N] [--seed 0] [--calib DIR]
        [--precision fp32,fp16,int8] [--calib-method minmax|percentile|entropy] [--calib-percentile P]
        [--n-calib 64] [--int8-weights per-channel|per-tensor] [--int8-ops Conv,Gemm,MatMul]
        [--int8-keep MODULES] [--int8-fp32-consumers fp32|qdq] [--onnx-fp32 model.onnx]
        [--out DIR] [--json out.json] [--md out.md] [--batch 8] [--no-progress]

The fp32 ONNX comes from export.onnx (or `--onnx-fp32`, reused), fp16 / INT8 from
export.trt.export_trt(dry_run=True) - the graphs a TensorRT engine would be built from. Each graph
runs in ONNX Runtime (CPU) over the MVTec-layout test split of `--data` (frames at the model's
input size, gray when the images are gray); image AUROC (score vs good/defect label) and pixel
AUROC (anomaly map vs ground-truth masks) come from sklearn's roc_auc_score; deltas are against
fp32. `--limit N` takes a seeded random subset (numpy default_rng(seed), sorted). INT8 calibrates
on `--calib` (default DATA/train/good). The table is printed and written as markdown and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):   # `python benchmarks/precision.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from deploy import ArtifactError, load_engine, read_metadata
from deploy.contract import PRECISIONS

SCHEMA = "edge-ad-precision/1"
INT8_KEYS = ("calib_method", "calib_percentile", "n_calib", "int8_weights", "int8_ops", "int8_keep",
             "int8_fp32_consumers")


class BenchError(ValueError):
    """A bad argument or input; the message names it and what was expected."""


@dataclass
class TestSet:
    frames: np.ndarray      # (N, S, S, C) uint8
    masks: np.ndarray       # (N, S, S) uint8 0/1
    labels: np.ndarray      # (N,) 0 good / 1 defect
    paths: List[str]
    n_available: int


def load_test_set(data, size: int, channels: Optional[int] = None, limit: int = 0, seed: int = 0,
                  progress: bool = True) -> Tuple[TestSet, int]:
    """Frames (INTER_AREA) and masks (nearest, > 0) of the test split at `size` x `size`; `channels`
    None = 1 if the first image is gray on disk, else 3 (RGB). Returns (test set, channels)."""
    import cv2
    from tqdm import tqdm

    from export.check import read_frame
    from models.data import DataError, scan_mvtec

    root = pathlib.Path(data)
    if not root.is_dir():
        raise BenchError(f"--data: {root} is not a folder (expected an MVTec-layout dataset: test/good, "
                         "test/<defect>, ground_truth/<defect>)")
    try:
        samples, _ = scan_mvtec(root, split="test")
    except (DataError, ValueError, OSError) as e:
        raise BenchError(f"--data: {e}") from None
    if not samples:
        raise BenchError(f"--data: {root} has no test images")
    n_all = len(samples)
    if limit and limit < n_all:
        rng = np.random.default_rng(seed)
        samples = [samples[i] for i in sorted(rng.choice(n_all, limit, replace=False))]
    if channels is None:
        first = cv2.imread(str(samples[0].path), cv2.IMREAD_UNCHANGED)
        if first is None:
            raise BenchError(f"--data: {samples[0].path} cannot be decoded as an image")
        channels = 1 if first.ndim == 2 or first.shape[2] == 1 else 3
    frames, masks, labels = [], [], []
    for s in tqdm(samples, desc="test images", unit="img", disable=not progress):
        try:
            frames.append(read_frame(s.path, (size, size), channels))
        except ValueError as e:
            raise BenchError(f"--data: {e}") from None
        if s.mask_path is not None:
            mk = cv2.imread(str(s.mask_path), cv2.IMREAD_GRAYSCALE)
            if mk is None:
                raise BenchError(f"--data: mask {s.mask_path} of {s.path} is missing or unreadable")
            masks.append((cv2.resize(mk, (size, size), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8))
        else:
            masks.append(np.zeros((size, size), np.uint8))
        labels.append(int(s.label))
    ts = TestSet(np.stack(frames), np.stack(masks), np.asarray(labels), [str(s.path) for s in samples], n_all)
    if len(set(ts.labels.tolist())) < 2:
        raise BenchError(f"--data: the test images used ({len(ts.labels)}) are all "
                         f"{'defective' if ts.labels[0] else 'good'}; image AUROC needs both (raise --limit)")
    if not ts.masks.any():
        raise BenchError("--data: no defect pixel in the ground-truth masks used; pixel AUROC needs some")
    return ts, channels


def run_onnx(path, frames: np.ndarray, batch: int = 8, progress: bool = True, desc: str = "ort",
             threads: int = 0) -> Tuple[np.ndarray, np.ndarray, float]:
    """(scores (N,), maps (N, S, S), seconds) from the deployed ONNX Runtime CPU engine
    (deploy.load_engine), `batch` frames per call."""
    from tqdm import tqdm

    scores, maps = [], []
    with load_engine(path, backend="ort-cpu", threads=threads) as engine:
        t = time.perf_counter()
        for i in tqdm(range(0, len(frames), batch), desc=desc, unit="batch", disable=not progress):
            out = engine.infer(frames[i:i + batch])
            scores.append(np.asarray(out["score"]).reshape(-1))
            maps.append(out["anomaly_map"][:, 0])
        secs = time.perf_counter() - t
    return np.concatenate(scores), np.concatenate(maps), secs


def aurocs(labels, masks, scores, maps) -> Tuple[float, float]:
    """(image AUROC, pixel AUROC) in percent, sklearn."""
    from sklearn.metrics import roc_auc_score

    if maps.shape != masks.shape:
        raise BenchError(f"anomaly map shape {maps.shape[1:]} differs from the mask shape {masks.shape[1:]}")
    return (100.0 * float(roc_auc_score(labels, scores)),
            100.0 * float(roc_auc_score(masks.reshape(-1), maps.reshape(-1))))


def _int8_kwargs(int8: Optional[dict]) -> dict:
    kw = {k: v for k, v in (int8 or {}).items() if v is not None}
    unknown = sorted(set(kw) - set(INT8_KEYS))
    if unknown:
        raise BenchError(f"int8 options {unknown} unknown; expected some of {', '.join(INT8_KEYS)}")
    return kw


def run_precision(ckpt, data, *, precisions: Sequence[str] = PRECISIONS, limit: int = 0, seed: int = 0,
                  calib=None, int8: Optional[dict] = None, onnx_fp32=None, out=None, batch: int = 8,
                  frame_channels: Optional[int] = None, progress: bool = True) -> dict:
    """Export (or reuse) the graphs, run them over the test set, return the result dict (see `format_table`)."""
    from export._common import ExportError
    from export.formats import ExportArgError
    from models.checkpoint import CheckpointError, load_checkpoint

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise BenchError(f"--precision: expected a comma list from {','.join(PRECISIONS)}, got {list(precisions)}")
    precisions = ["fp32"] + [p for p in dict.fromkeys(precisions) if p != "fp32"]   # fp32 is the reference
    int8_kw = _int8_kwargs(int8)
    if int8_kw and "int8" not in precisions:
        raise BenchError("INT8 options given but int8 is not in --precision")
    ckpt_p = pathlib.Path(ckpt)
    if not ckpt_p.is_file():
        raise BenchError(f"--ckpt: {ckpt_p} does not exist (expected a checkpoint written by models.train)")
    data = pathlib.Path(data)
    calib = pathlib.Path(calib) if calib is not None else data / "train" / "good"
    if "int8" in precisions and not calib.is_dir():
        raise BenchError(f"--calib: {calib} is not a folder of normal images (INT8 calibration)")
    if batch < 1:
        raise BenchError(f"--batch: expected >= 1, got {batch}")
    try:
        model = load_checkpoint(ckpt_p)
    except CheckpointError as e:
        raise BenchError(f"--ckpt: {e}") from None
    size = int(model.preprocess.input_size)
    if onnx_fp32 is not None:        # a reused export fixes the frame size and channels
        if not pathlib.Path(onnx_fp32).is_file():
            raise BenchError(f"--onnx-fp32: {onnx_fp32} does not exist")
        try:
            ex = read_metadata(onnx_fp32)["export"]
        except (ArtifactError, ValueError, KeyError) as e:
            raise BenchError(f"--onnx-fp32: {onnx_fp32} is not an export of this toolkit ({e})") from None
        if tuple(ex["frame_hw"]) != (size, size):
            raise BenchError(f"--onnx-fp32: frames of {ex['frame_hw']} expected, the benchmark feeds {size}x{size}")
        if frame_channels is not None and frame_channels != ex["frame_channels"]:
            raise BenchError(f"--frame-channels {frame_channels}: {onnx_fp32} takes {ex['frame_channels']}")
        frame_channels = int(ex["frame_channels"])
    ts, ch = load_test_set(data, size, frame_channels, limit, seed, progress)
    outdir = pathlib.Path(out) if out is not None else pathlib.Path("benchmarks/out/precision")
    outdir.mkdir(parents=True, exist_ok=True)
    from export.onnx import export_onnx
    from export.trt import export_trt

    graphs: Dict[str, pathlib.Path] = {}
    build_s: Dict[str, float] = {}
    try:
        t = time.perf_counter()
        if onnx_fp32 is None:
            r = export_onnx(model, outdir / "model.onnx", frame_hw=(size, size), frame_channels=ch,
                            images=data / "test", n=8, quiet=not progress)
            graphs["fp32"] = r.path
        else:
            graphs["fp32"] = pathlib.Path(onnx_fp32)
        build_s["fp32"] = time.perf_counter() - t
        for prec in precisions[1:]:
            t = time.perf_counter()
            kw = dict(int8_kw, calib=calib) if prec == "int8" else {}
            e = export_trt(model, outdir, precision=prec, dry_run=True, onnx_fp32=graphs["fp32"],
                           images=data / "test", n=8, quiet=not progress, **kw)
            graphs[prec] = e.onnx
            build_s[prec] = time.perf_counter() - t
    except (ExportError, ExportArgError) as e:
        raise BenchError(str(e)) from None
    rows = []
    ref = None
    for prec in precisions:
        scores, maps, secs = run_onnx(graphs[prec], ts.frames, batch, progress, desc=f"ort {prec}")
        img, pix = aurocs(ts.labels, ts.masks, scores, maps)
        if ref is None:
            ref = (img, pix)
        meta = read_metadata(graphs[prec])["export"]
        rows.append({"precision": prec, "onnx": str(graphs[prec]), "image_auroc": img, "pixel_auroc": pix,
                     "d_image": img - ref[0], "d_pixel": pix - ref[1], "s_per_image": secs / len(ts.labels),
                     "build_s": build_s[prec], "precision_info": meta.get("precision_info")})
    return {"schema": SCHEMA, "ckpt": str(ckpt_p), "data": str(data), "input_size": size, "frame_channels": ch,
            "n_test": int(len(ts.labels)), "n_available": ts.n_available, "n_defect": int(ts.labels.sum()),
            "limit": limit, "seed": seed, "batch": batch, "calib": str(calib) if "int8" in precisions else None,
            "int8_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in int8_kw.items()},
            "rows": rows, "host": {"cpu_count": os.cpu_count(),
                                   "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _pi(info: Optional[dict]) -> str:
    if info and "fp16_nodes" in info:
        return f"mixed fp16: {info['fp16_nodes']} nodes fp16, {info['kept_fp32_nodes']} kept fp32 (scan, tail)"
    if not info or "method" not in info:
        return ""
    keep = ",".join(info.get("keep_fp32") or []) or "-"
    pct = f" p{info['percentile']:g}" if info.get("percentile") is not None else ""
    return (f"{info['method']}{pct}, {'per-channel' if info.get('per_channel') else 'per-tensor'}, "
            f"ops {','.join(info.get('quant_ops', []))}, keep {keep}, fp32 readers {info.get('fp32_consumers')}, "
            f"{info.get('calib_frames')} calib frames")


def format_table(result: dict) -> str:
    """Markdown table: one row per precision."""
    lines = ["| precision | image AUROC | pixel AUROC | d image | d pixel | ORT CPU s/image | setting |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['image_auroc']:.2f} | {r['pixel_auroc']:.2f} | {r['d_image']:+.2f} | "
                     f"{r['d_pixel']:+.2f} | {r['s_per_image']:.4f} | {_pi(r['precision_info']).replace('|', '/')} |")
    load = (result.get("host") or {}).get("loadavg")
    lines.append("")
    subset = f", seeded subset (default_rng({result['seed']}))" if result["n_test"] < result["n_available"] else ""
    load_s = f"; load average {load[0]:.2f} at the end" if load else ""
    lines.append(f"{result['n_test']} test images ({result['n_defect']} defective) of {result['n_available']}{subset}; "
                 f"{result['input_size']} px frames, batch {result['batch']}{load_s}")
    return "\n".join(lines)


def parse_args(argv=None):
    from export.formats import CALIB_METHODS, INT8_FP32_CONSUMERS, INT8_WEIGHTS

    p = argparse.ArgumentParser(prog="python benchmarks/precision.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (model.pt)")
    p.add_argument("--data", required=True, help="MVTec-layout dataset folder (test/, ground_truth/, train/good)")
    p.add_argument("--limit", type=int, default=0, help="seeded random subset of N test images (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--calib", default=None, help="INT8 calibration images (default DATA/train/good)")
    p.add_argument("--precision", default=",".join(PRECISIONS), help="comma list of fp32,fp16,int8 (default all)")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default=None, help="INT8 activation ranges")
    p.add_argument("--calib-percentile", type=float, default=None, help="percentile for --calib-method percentile")
    p.add_argument("--n-calib", type=int, default=None, help="number of calibration images (default 64)")
    p.add_argument("--int8-weights", choices=INT8_WEIGHTS, default=None, help="weight scales")
    p.add_argument("--int8-ops", default=None, help="op types quantised (subset of Conv,Gemm,MatMul)")
    p.add_argument("--int8-keep", default=None, help="module paths kept fp32 (e.g. encoder,fuse.gate,heads,first,last)")
    p.add_argument("--int8-fp32-consumers", choices=INT8_FP32_CONSUMERS, default=None,
                   help="fp32 ops read the original tensor (fp32) or the int8-rounded copy (qdq)")
    p.add_argument("--onnx-fp32", default=None, help="reuse this fp32 export instead of exporting again")
    p.add_argument("--frame-channels", type=int, choices=(1, 3), default=None,
                   help="1 gray / 3 RGB frames (default: as the images are on disk)")
    p.add_argument("--batch", type=int, default=8, help="frames per ORT call (default 8)")
    p.add_argument("--out", default="benchmarks/out/precision", help="folder for the graphs and reports")
    p.add_argument("--json", default=None, help="JSON result path (default OUT/precision.json)")
    p.add_argument("--md", default=None, help="markdown table path (default OUT/precision.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    int8 = {"calib_method": a.calib_method, "calib_percentile": a.calib_percentile, "n_calib": a.n_calib,
            "int8_weights": a.int8_weights, "int8_ops": a.int8_ops, "int8_keep": a.int8_keep,
            "int8_fp32_consumers": a.int8_fp32_consumers}
    try:
        precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
        if a.limit < 0:
            raise BenchError(f"--limit: expected >= 0, got {a.limit}")
        result = run_precision(a.ckpt, a.data, precisions=precisions, limit=a.limit, seed=a.seed, calib=a.calib,
                               int8=int8, onnx_fp32=a.onnx_fp32, out=a.out, batch=a.batch,
                               frame_channels=a.frame_channels, progress=not a.no_progress)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = command
    table = format_table(result)
    out = pathlib.Path(a.out)
    jpath = pathlib.Path(a.json) if a.json else out / "precision.json"
    mpath = pathlib.Path(a.md) if a.md else out / "precision.md"
    for p in (jpath, mpath):
        p.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(result, indent=1) + "\n")
    mpath.write_text(f"Command: `{command}`\n\n{table}\n")
    print()
    print(table)
    print(f"\nwritten: {jpath}, {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
