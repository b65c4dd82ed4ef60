"""Evaluate a checkpoint on the test split of MVTec-layout data: metrics, JSON, PNG overlays.

    python -m models.evaluate --ckpt model.pt --data DIR [--classes a,b] [--out DIR]
        [--batch-size 8] [--workers 0] [--overlays 4] [--overlay-types T,..] [--device cpu] [--threads N]
        [--val-synthetic [--val-defects crack,scratch] [--val-opacity 0.1,0.4]]

--val-synthetic scores the validation set of `models.validation` (the checkpoint's held-out normal
training images plus synthetic defects pasted onto copies of them) instead of test/: choose recipes
there, and run the test split once per recipe you report. --val-defects draws other synthetic defect
types than the default four (`models.synthetic.DEFECT_TYPES`; e.g. `crack` alone probes thin, faint
lines), --val-opacity another range of their opacity (default `models.validation.DEFAULT_OPACITY`).

Library: `evaluate(ckpt_or_model, data, out_dir=None, ...) -> result dict`
    {"per_class": {name: {metric: value}}, "mean": {...}, "table": str, "n_images": int,
     "threshold": {...confusion at the saved threshold...}, "per_type": {...}, "type_table": str,
     "overlays": [paths]}
Metrics are `models.metrics.MetricAccumulator` (image AUROC / AP / F1-max, pixel AUROC / AP /
F1-max / AUPRO, mAD; fractions in [0, 1]); the table prints percentages. `per_type` says which
defects a model misses: per class and test folder, the image AUROC of that defect type's images
against the class's normal ones, the pixel AUROC and AUPRO of the same images (that type's defect
pixels against every normal pixel of those images), and the fraction scored at or above the saved
threshold (for "good": the false-alarm rate); `type_table` prints it. In `out_dir`:
`metrics.json` and `overlays/{worst,best}_*.png` - a caption strip (class/defect, score, threshold)
over a row of three panels at the model's input size: the image, the anomaly map as a heatmap over it, and the ground-truth mask outline
(green) with the thresholded map outline (red). "Worst" are the highest-scored normal images
and the lowest-scored defective ones; "best" the reverse.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint


def _denormalise(x: np.ndarray, mean, std) -> np.ndarray:
    """(C, S, S) normalised -> uint8 (S, S, 3) RGB."""
    img = x * np.asarray(std, np.float32).reshape(-1, 1, 1) + np.asarray(mean, np.float32).reshape(-1, 1, 1)
    img = np.clip(img.transpose(1, 2, 0) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def render_overlay(image_rgb: np.ndarray, amap: np.ndarray, mask: Optional[np.ndarray], stats,
                   title: str = "") -> np.ndarray:
    """Three panels side by side (uint8 BGR, for cv2.imwrite): image | heatmap | outlines."""
    import cv2

    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    norm = stats.normalize_map(amap)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(bgr, 0.5, heat, 0.5, 0)
    outl = bgr.copy()
    if mask is not None and mask.any():
        cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(outl, cnts, -1, (0, 255, 0), 1)
    pred = (amap >= stats.map_threshold).astype(np.uint8)
    if pred.any():
        cnts, _ = cv2.findContours(pred, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(outl, cnts, -1, (0, 0, 255), 1)
    row = np.concatenate([bgr, blend, outl], axis=1)
    if title:   # a caption strip above the panels, the font scaled to the row width
        scale = float(np.clip(row.shape[1] / 1200.0, 0.3, 0.8))
        (tw, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        strip = np.zeros((th + base + 6, row.shape[1], 3), np.uint8)
        cv2.putText(strip, title, (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        row = np.concatenate([strip, row], axis=0)
    return row


def _type_groups(samples) -> tuple:
    """("class/type" names of every defect type, {sample index: group ids}): a defective image
    belongs to its own type's group, a normal one to every group of its class (the type's images are
    scored against the class's normal ones, as in `defect_type_breakdown`)."""
    types = sorted({(s.class_name, s.defect_type) for s in samples if s.label == 1})
    gid = {ct: k for k, ct in enumerate(types)}
    member = {}
    for j, s in enumerate(samples):
        if s.label == 1:
            member[j] = [gid[(s.class_name, s.defect_type)]]
        else:
            member[j] = [k for (c, _), k in gid.items() if c == s.class_name]
    return [f"{c}/{t}" for c, t in types], member


def score_dataset(model, ds, batch_size: int = 8, workers: int = 0, device: str = "cpu",
                  progress: bool = True, desc: str = "evaluating", by_type: bool = False):
    """Score every item of `ds` (dicts with image, mask, label, class_id, index) -> (metrics result
    of `MetricAccumulator.compute` over `ds.class_names`, scores, labels, indices as numpy arrays).

    Maps are streamed into the accumulator batch by batch (memory does not grow with the number of
    images). With `by_type`, result["by_type"] holds the same metrics per "class/defect type" of
    `ds.samples` (each type's images with the class's normal images: `_type_groups`)."""
    from tqdm import tqdm

    from .metrics import MetricAccumulator

    model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    acc = MetricAccumulator()
    type_names, member = _type_groups(ds.samples) if by_type else ([], {})
    type_acc = MetricAccumulator() if type_names else None
    scores, labels, indices = [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            amap, score = model(batch["image"].to(device))
            s = score.float().cpu().numpy().astype(np.float64)
            lab = np.asarray(batch["label"])
            maps, masks = amap[:, 0].float().cpu().numpy(), (batch["mask"][:, 0] > 0.5).numpy()
            idx = np.asarray(batch["index"])
            acc.update(s, lab, maps=maps, masks=masks, class_ids=np.asarray(batch["class_id"]))
            if type_acc is not None:
                rows = [(r, g) for r, j in enumerate(idx) for g in member[int(j)]]
                if rows:
                    r, g = (np.array(v) for v in zip(*rows))
                    type_acc.update(s[r], lab[r], maps=maps[r], masks=masks[r], class_ids=g)
            scores.append(s)
            labels.append(lab)
            indices.append(idx)
    res = acc.compute(class_names=ds.class_names)
    if by_type:
        res["by_type"] = type_acc.compute(class_names=type_names)["per_class"] if type_acc is not None else {}
    return res, np.concatenate(scores), np.concatenate(labels), np.concatenate(indices)


def evaluate(ckpt, data, out_dir=None, classes=None, batch_size: int = 8, workers: int = 0,
             n_overlays: int = 4, device: str = "cpu", progress: bool = True, val_synthetic: bool = False,
             val_defects: Optional[Sequence[str]] = None, val_opacity: Optional[Sequence[float]] = None,
             overlay_types: Optional[Sequence[str]] = None) -> dict:
    """Score the test split of `data` with a checkpoint (path) or a loaded model.

    With `val_synthetic`, score the validation set of `models.validation` instead (held-out normal
    training images + synthetic defects on copies of them): what recipes are chosen on, never the
    test split (`val_defects` / `val_opacity`: the synthetic defect types drawn and their opacity
    range, default the validation split's own). The few overlay images are scored again at the end;
    `overlay_types` limits the defective ones to those defect types (e.g. to look at one type's maps).
    """
    from .data import AnomalyDataset, DataError, scan_mvtec
    from .metrics import format_table, jsonable

    model = load_checkpoint(ckpt) if isinstance(ckpt, (str, pathlib.Path)) else ckpt
    model = model.to(device).eval()
    pp = model.preprocess
    if val_synthetic:
        from .synthetic import DEFECTS
        from .validation import DEFAULT_OPACITY, validation_dataset

        train_meta = (getattr(model, "checkpoint_meta", None) or {}).get("extra", {}).get("train", {})
        ds = validation_dataset(data, pp, classes, val_fraction=train_meta.get("val_fraction", 0.1),
                                seed=train_meta.get("seed", 0), id_names=model.class_names or None,
                                defects=tuple(val_defects or DEFECTS), opacity=tuple(val_opacity or DEFAULT_OPACITY))
    else:
        samples, names = scan_mvtec(data, classes, "test")
        ds = AnomalyDataset(samples, pp.input_size, pp.channels, pp.mean, pp.std, class_names=names)
    known = sorted({s.defect_type for s in ds.samples if s.label == 1})
    unknown = sorted(set(overlay_types or ()) - set(known))
    if unknown:
        raise DataError(f"overlay types {unknown}: not defect types of the scored split (it has {known})")
    res, scores, labels, indices = score_dataset(model, ds, batch_size, workers, device, progress, by_type=True)
    res["table"] = format_table(res)
    res["n_images"] = int(len(ds))
    res["split"] = "validation (held-out normal + synthetic defects)" if val_synthetic else "test"
    st = model.score_stats
    pred = scores >= st.threshold
    y = labels == 1
    res["threshold"] = dict(value=st.threshold, method=st.method,
                            tp=int((pred & y).sum()), fp=int((pred & ~y).sum()),
                            tn=int((~pred & ~y).sum()), fn=int((~pred & y).sum()))
    res["per_type"] = defect_type_breakdown(ds.samples, scores, indices, st.threshold, res.pop("by_type"))
    res["type_table"] = format_type_table(res["per_type"])
    res["model"] = getattr(model, "model_name", "?")
    res["checkpoint"] = str(ckpt) if isinstance(ckpt, (str, pathlib.Path)) else None
    res["scores"] = {"index": indices.tolist(), "score": scores.tolist(), "label": labels.tolist()}
    res["overlays"] = []
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        res["overlays"] = _write_overlays(model, ds, scores, labels, indices, st, out / "overlays",
                                          n_overlays, pp, device, overlay_types)
        (out / "metrics.json").write_text(json.dumps(jsonable(res), indent=2))
    return res


def defect_type_breakdown(samples, scores, indices, threshold: float, pixels: Optional[dict] = None) -> dict:
    """{class: {defect type: {"n", "image_auroc", "flagged"[, "pixel_auroc", "pixel_aupro"]}}} for
    scores[i] of samples[indices[i]].

    image_auroc: that type's images against the same class's normal images (NaN for "good" and for a
    class without normal images); flagged: the fraction scored >= threshold. `pixels` ({"class/type":
    metrics}, `score_dataset(by_type=True)`) adds the pixel AUROC and AUPRO of the same images."""
    from .metrics import image_metrics

    scores = np.asarray(scores, np.float64)
    meta = [samples[int(j)] for j in indices]
    out: dict = {}
    for cls in sorted({s.class_name for s in meta}):
        in_cls = np.array([s.class_name == cls for s in meta])
        good = in_cls & np.array([s.label == 0 for s in meta])
        types = sorted({s.defect_type for s in meta if s.class_name == cls}, key=lambda t: (t != "good", t))
        out[cls] = {}
        for t in types:
            sel = in_cls & np.array([s.defect_type == t for s in meta])
            auroc = float("nan")
            if t != "good" and good.any():
                both = sel | good
                auroc = image_metrics(scores[both], sel[both].astype(int))["image_auroc"]
            out[cls][t] = dict(n=int(sel.sum()), image_auroc=auroc, flagged=float(np.mean(scores[sel] >= threshold)))
            if pixels is not None:
                px = pixels.get(f"{cls}/{t}", {})
                out[cls][t].update({k: float(px.get(k, float("nan"))) for k in ("pixel_auroc", "pixel_aupro")})
    return out


def format_type_table(per_type: dict) -> str:
    """Plain text, percent: class/type, images, I-AUROC against the class's normals, flagged, and the
    pixel AUROC / AUPRO of the same images where `per_type` has them."""
    rows = [(f"{c}/{t}", r) for c, types in per_type.items() for t, r in types.items()]
    pixels = any("pixel_auroc" in r for _, r in rows)
    w0 = max([10] + [len(n) for n, _ in rows])

    def pct(v):
        return f"{100.0 * v:>7.1f}" if np.isfinite(v) else f"{'-':>7}"

    head = f"{'class/type':<{w0}}  {'images':>6}  {'I-AUROC':>7}  {'flagged':>7}"
    lines = [head + (f"  {'P-AUROC':>7}  {'AUPRO':>7}" if pixels else "")]
    lines.append("-" * len(lines[0]))
    for name, r in rows:
        line = f"{name:<{w0}}  {r['n']:>6}  {pct(r['image_auroc'])}  {100.0 * r['flagged']:>6.1f}%"
        if pixels:
            line += f"  {pct(r.get('pixel_auroc', float('nan')))}  {pct(r.get('pixel_aupro', float('nan')))}"
        lines.append(line)
    return "\n".join(lines)


def _write_overlays(model, ds, scores, labels, indices, stats, folder: pathlib.Path, k: int, pp, device,
                    types: Optional[Sequence[str]] = None):
    import cv2

    good, bad = np.nonzero(labels == 0)[0], np.nonzero(labels == 1)[0]
    if types:
        bad = bad[[ds.samples[int(indices[i])].defect_type in types for i in bad]]
    good = good[np.argsort(-scores[good], kind="stable")]   # highest normal first (false alarms)
    bad = bad[np.argsort(scores[bad], kind="stable")]       # lowest defect first (misses)
    picks = [("worst", "good", i) for i in good[:k]] + [("worst", "defect", i) for i in bad[:k]]
    picks += [("best", "good", i) for i in good[::-1][:k]] + [("best", "defect", i) for i in bad[::-1][:k]]
    paths = []
    for kind, lab, i in picks:
        j = int(indices[i])
        s, item = ds.samples[j], ds[j]
        with torch.no_grad():
            amap, _ = model(item["image"][None].to(device))
        img = _denormalise(item["image"].numpy(), pp.mean, pp.std)
        title = f"{s.class_name}/{s.defect_type} {scores[i]:.3f} thr {stats.threshold:.3f}"
        row = render_overlay(img, amap[0, 0].float().cpu().numpy(), item["mask"][0].numpy() > 0.5, stats, title)
        p = folder / f"{kind}_{lab}_{s.class_name}_{s.defect_type}_{s.path.stem}.png"
        cv2.imwrite(str(p), row)
        paths.append(str(p))
    return paths


def main(argv=None) -> int:
    from .synthetic import DEFECT_TYPES

    ap = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True, help="MVTec-layout folder with test/ (and ground_truth/)")
    ap.add_argument("--classes", default=None)
    ap.add_argument("--out", default=None, help="folder for metrics.json and overlays/")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--overlays", type=int, default=4, help="images per worst/best x good/defect group")
    ap.add_argument("--overlay-types", default=None, metavar="TYPES",
                    help="comma-separated defect types the defective overlays are drawn from (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--val-synthetic", action="store_true",
                    help="score the validation set (held-out train/good + synthetic defects) instead of test/")
    ap.add_argument("--val-defects", default=None, metavar="TYPES",
                    help="with --val-synthetic: comma-separated synthetic defect types (default: the validation "
                         "split's own; choices: " + ", ".join(DEFECT_TYPES) + ")")
    ap.add_argument("--val-opacity", default=None, metavar="LO,HI",
                    help="with --val-synthetic: the synthetic defects' opacity range (default 0.1,0.4)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    val_opacity = None
    if a.val_opacity:
        try:
            val_opacity = tuple(float(v) for v in a.val_opacity.split(","))
        except ValueError:
            val_opacity = ()
        if len(val_opacity) != 2 or not 0.0 < val_opacity[0] <= val_opacity[1] <= 1.0 or not a.val_synthetic:
            ap.error(f"--val-opacity {a.val_opacity!r}: expected LO,HI with 0 < LO <= HI <= 1, with --val-synthetic")
    val_defects = [t.strip() for t in a.val_defects.split(",") if t.strip()] if a.val_defects else None
    bad = [t for t in val_defects or [] if t not in DEFECT_TYPES]
    if bad or (val_defects is not None and not val_defects) or (val_defects and not a.val_synthetic):
        ap.error(f"--val-defects {a.val_defects!r}: expected comma-separated types from {', '.join(DEFECT_TYPES)}, "
                 f"with --val-synthetic")
    if a.threads:
        torch.set_num_threads(a.threads)
    from .checkpoint import CheckpointError
    from .data import DataError
    try:
        res = evaluate(a.ckpt, a.data, a.out, a.classes, a.batch_size, a.workers, a.overlays, a.device,
                       progress=not a.no_progress, val_synthetic=a.val_synthetic, val_defects=val_defects,
                       val_opacity=val_opacity,
                       overlay_types=[t.strip() for t in a.overlay_types.split(",") if t.strip()] if a.overlay_types else None)
    except (CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print("\nper defect type (I-AUROC against the class's normal images; flagged = at or above the threshold; "
          "P-AUROC / AUPRO: the type's defect pixels against the normal pixels of its and the normal images):")
    print(res["type_table"])
    t = res["threshold"]
    print(f"at the saved threshold {t['value']:.5f} ({t['method']}): TP {t['tp']} FP {t['fp']} "
          f"TN {t['tn']} FN {t['fn']}")
    if a.out:
        print(f"wrote {pathlib.Path(a.out) / 'metrics.json'} and {len(res['overlays'])} overlays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
