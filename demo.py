"""`make demo`: the main job end to end on an embedded default, in a few minutes on 2 CPU cores.

  1. data     the real magnetic-tile set (../shared/data/magnetic_tile) when present, else the
              deterministic synthetic generator (models.synthetic)
  2. train    a small DVAD with the offline EfficientNet-Lite0 backbone (models.train)
  3. evaluate ADer metrics on the test split (models.evaluate)
  4. export   ONNX with raw-frame input + the parity gate (export.onnx)
  5. stream   a simulated line-scan camera through the exported engine (runtime.stream), printing
              the live status line and the summary, writing events, overlays and a strip preview

Everything lands in demo_out/ (override with --out). Options let you make it longer or shorter.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data" / "magnetic_tile"

# A CPU-sized DVAD: 128 px tiles, one block per decoder stage (all branches on: Mamba scan,
# CNN, Hyper AD plug-in, MoE gate). Trains in about a minute on 2 cores.
# map_strides / score_topk / hard_fraction / encoder / memory_weight: the 128 px demo model keeps the map
# of all three scales, its maximum, the plain loss, the smallest encoder and no memory term (DVAD's
# stride-16 / top-1 % / hard-mining / Lite2 / memory defaults were chosen at 256 px on magnetic tile over
# 10-20 epochs; at 128 px the stride-16 map is 8 x 8, and the demo trains 2 epochs)
DEMO_CONFIG = {"input_size": 128, "encoder": "efficientnet_lite0", "dims": [64, 32, 32, 16],
               "depths": [1, 1, 1, 1], "d_state": 8, "scan": "raster4", "map_strides": [4, 8, 16],
               "score_topk": 0.0, "hard_fraction": 0.0, "memory_weight": 0.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def _is_gray(data: pathlib.Path) -> bool:
    """True when the training images are single-channel (a Mono8 camera then feeds the engine)."""
    import cv2

    first = next(p for p in sorted(data.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")
                 and "ground_truth" not in p.parts)
    img = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    return img is not None and img.ndim == 2


def subset_folder(src: pathlib.Path, dst: pathlib.Path, max_train: int, max_test: int) -> pathlib.Path:
    """A small MVTec-layout view of `src` (symlinks, one folder per class): the first `max_train`
    train/good images and `max_test` images per test type of every class, in sorted name order,
    with their masks."""
    from models.data import scan_mvtec

    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    for split, cap in (("train", max_train), ("test", max_test)):
        samples, _ = scan_mvtec(src, None, split)
        kept = {}
        for s in sorted(samples, key=lambda s: str(s.path)):
            key = (s.class_name, s.defect_type)
            if kept.get(key, 0) >= cap:
                continue
            kept[key] = kept.get(key, 0) + 1
            root = dst / s.class_name          # always a folder of class folders: names are kept
            link = root / split / s.defect_type / pathlib.Path(s.path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(pathlib.Path(s.path).resolve())
            if s.mask_path:
                m = root / "ground_truth" / s.defect_type / pathlib.Path(s.mask_path).name
                m.parent.mkdir(parents=True, exist_ok=True)
                m.symlink_to(pathlib.Path(s.mask_path).resolve())
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    ap.add_argument("--data", default=None, help="MVTec-layout data folder (default: magnetic tile if "
                    "present, else synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="use the synthetic generator even when the "
                    "real data is present")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-train", type=int, default=160,
                    help="cap on training images per class (keeps the demo to minutes)")
    ap.add_argument("--max-test", type=int, default=24,
                    help="cap on test images per defect type (keeps the demo to minutes)")
    ap.add_argument("--stream-seconds", type=float, default=30.0)
    ap.add_argument("--line-rate", type=float, default=500.0, help="simulated camera line rate (Hz)")
    ap.add_argument("--width", type=int, default=256, help="simulated camera width (px)")
    args = ap.parse_args(argv)

    from export.onnx import export_onnx
    from models.evaluate import evaluate
    from models.synthetic import generate_dataset
    from models.train import train
    from runtime.stream import run_stream

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    # 1. data ------------------------------------------------------------------------------
    if args.data:
        data = pathlib.Path(args.data)
    elif SHARED.is_dir() and not args.synthetic:
        data = SHARED
    else:
        data = generate_dataset(out / "synthetic", classes=("texture", "object"), n_train=48,
                                n_test_good=12, n_test_defect=12, size=160, seed=0, progress=True)
    log(f"[1/5] data: {data}")
    data = subset_folder(data, out / "data_subset", args.max_train, args.max_test)

    # 2. train -----------------------------------------------------------------------------
    log(f"[2/5] training a small DVAD for {args.epochs} epochs on {data}")
    ckpt = out / "model.pt"
    _, summary = train(data, model="dvad", epochs=args.epochs, out=ckpt, batch_size=8,
                       config=dict(DEMO_CONFIG), seed=0)
    log(f"      {summary['train_time_s']:.0f} s, {summary['images_per_s']:.1f} images/s "
        f"-> {ckpt}")

    # 3. evaluate --------------------------------------------------------------------------
    log("[3/5] evaluating on the test split")
    result = evaluate(ckpt, data, out_dir=out / "eval")
    log(result["table"])

    # 4. export ----------------------------------------------------------------------------
    log("[4/5] exporting ONNX (raw uint8 frames in; resize + normalisation inside) with the parity gate")
    gray = _is_gray(data)
    test_dirs = sorted(p for p in data.rglob("test") if p.is_dir())
    exported = export_onnx(ckpt, out / "export", frame_channels=1 if gray else 3,
                           images=test_dirs[0])    # the parity gate runs on real test images
    onnx_path = exported.path
    log(exported.summary())

    # 5. stream ----------------------------------------------------------------------------
    # The simulated camera scrolls the test images (normal and defective) along an endless strip,
    # each image resized to the camera width, and injects two dark holes at known positions.
    src = (f"linesim://?width={args.width}&rate={args.line_rate:g}&lines=64&images={test_dirs[0]}"
           f"&defects=700:60:6;2300:180:9&seed=0&format={'Mono8' if gray else 'RGB8'}")
    log(f"[5/5] streaming {src}\n      through {onnx_path} for {args.stream_seconds:g} s")
    s = run_stream(onnx_path, src, duration_s=args.stream_seconds, out_dir=out / "stream",
                   console=log)
    log("      accounting: " + json.dumps({k: s.get(k) for k in ("lines_in", "lines_scored", "lines_dropped")}))
    log(f"done in {time.time() - t_all:.0f} s; outputs under {out}/ (eval/ overlays, stream/ events, "
        f"overlays and preview.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
