"""Anomaly-detection metrics (ADer / MVTec conventions), streaming, per class and mean over classes.

Image level (exact, the scores are kept): AUROC, AP, F1-max.
Pixel level (binned, constant memory): AUROC, AP, F1-max, AUPRO (FPR <= 0.3).
mAD = mean of those 7. All values are fractions in [0, 1]; `format_table` prints percent.

Definitions
  AUROC   area under the ROC curve; tied scores count one half (= sklearn `roc_auc_score`).
  AP      sum_k (R_k - R_{k-1}) P_k over descending thresholds (= sklearn `average_precision_score`).
  F1-max  max over thresholds of 2PR / (P + R) on the precision-recall curve.
  AUPRO   MVTec AD: the regions are the 8-connected components of every ground-truth mask
          (`cv2.connectedComponents`); PRO(t) = mean over all regions of the class of the fraction of
          the region's pixels with score >= t; FPR(t) = fraction of all normal pixels of the class
          (normal images included) with score >= t; the PRO-vs-FPR curve (thresholds at the distinct
          scores / bin edges, linear between them) is integrated over FPR in [0, 0.3] (the end point
          interpolated) and divided by 0.3.
  mAD     mean of the 7 above (NaN if one of them is undefined).

Streaming pixel metrics (memory independent of the number of maps)
  Every map is reduced, per class, to three histograms over one common grid of `n_bins` equal-width
  score bins: normal-pixel counts, defect-pixel counts, and per-region weights (each defect pixel
  adds 1 / |its region|, so a suffix sum over bins / #regions is PRO at that bin edge). The grid is
  fixed from the first `warmup_pixels` values (their [min, max], widened by 5 % each side; these
  first values are buffered, not lost); a later value outside the grid widens it by doubling the bin
  width and merging neighbouring bins pairwise, which keeps every count exact (only the resolution
  halves, so give `score_range=(lo, hi)` when the range is known). With `n_bins=None` all values are
  kept and the pixel metrics are exact (small evaluations, tests).
  Error against the exact metrics: binning makes all scores of one bin a tie. For AUROC the error is
  bounded by half the fraction of (defect, normal) pixel pairs that share a bin; AP, F1-max and
  AUPRO only see thresholds at bin edges. Measured in tests/models/test_metrics.py on 64 smooth
  random 96x96 maps with elevated blob defects (score range about [0, 1.5]): with 1,000 bins the
  largest absolute difference over the 4 pixel metrics is below 2e-3, with 10,000 bins (default)
  below 2e-4 (the test asserts these bounds).

Degenerate classes (no defective image, no defect pixel, or no normal sample) get NaN for the
metrics that are undefined, a line in `result["notes"]`, and are skipped (nan-mean) in the mean.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRICS = IMAGE_METRICS + PIXEL_METRICS
ALL_KEYS = METRICS + ("mad",)
TABLE_HEADERS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
                 "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max",
                 "pixel_aupro": "AUPRO@0.3", "mad": "mAD"}


# ------------------------------------------------------------------------------------------
# curve statistics from groups of tied scores, in descending score order
# ------------------------------------------------------------------------------------------
def curve_metrics(pos: np.ndarray, neg: np.ndarray) -> Dict[str, float]:
    """AUROC, AP, F1-max from positive / negative counts per score group (groups sorted by
    descending score; one group = one threshold). Undefined values are NaN."""
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    keep = (pos + neg) > 0
    pos, neg = pos[keep], neg[keep]
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    P = tp[-1] if tp.size else 0.0
    N = fp[-1] if fp.size else 0.0
    out = dict(auroc=math.nan, ap=math.nan, f1max=math.nan)
    if P > 0 and N > 0:
        tpr = np.concatenate([[0.0], tp / P])
        fpr = np.concatenate([[0.0], fp / N])
        out["auroc"] = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) * 0.5))
    if P > 0:
        precision = tp / (tp + fp)
        recall = tp / P
        out["ap"] = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        out["f1max"] = float(f1.max())
    return out


def pro_auc(neg: np.ndarray, pro_weight: np.ndarray, n_regions: int, max_fpr: float = 0.3) -> float:
    """Normalised area under PRO(FPR) for FPR in [0, max_fpr], from per-group normal-pixel counts and
    summed region weights (groups sorted by descending score). NaN when undefined."""
    neg = np.asarray(neg, np.float64)
    w = np.asarray(pro_weight, np.float64)
    N = neg.sum()
    if n_regions <= 0 or N <= 0:
        return math.nan
    fpr = np.concatenate([[0.0], np.cumsum(neg) / N])
    pro = np.concatenate([[0.0], np.cumsum(w) / n_regions])
    # drop groups that add nothing (empty bins) so that the curve has no repeated points
    keep = np.concatenate([[True], (neg > 0) | (w > 0)])
    fpr, pro = fpr[keep], pro[keep]
    return _trapezoid_upto(fpr, pro, max_fpr) / max_fpr


def _trapezoid_upto(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x non-decreasing) for x in [x[0], x_max]."""
    i = int(np.searchsorted(x, x_max, side="right"))   # x[:i] <= x_max
    area = float(np.sum((x[1:i] - x[:i - 1]) * (y[1:i] + y[:i - 1]) * 0.5))
    if i < len(x) and x[i - 1] < x_max:
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_at) * 0.5
    return area


def _exact_groups(scores: np.ndarray, *weights: np.ndarray):
    """Sum each weight array over groups of equal score, groups in descending score order."""
    uniq, inv = np.unique(scores, return_inverse=True)
    out = [np.bincount(inv, weights=w, minlength=len(uniq))[::-1] for w in weights]
    return out


def image_metrics(scores, labels) -> Dict[str, float]:
    """Exact image AUROC / AP / F1-max (keys image_auroc, image_ap, image_f1max)."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.size == 0:
        return {k: math.nan for k in IMAGE_METRICS}
    pos, neg = _exact_groups(s, y.astype(np.float64), (~y).astype(np.float64))
    m = curve_metrics(pos, neg)
    return dict(image_auroc=m["auroc"], image_ap=m["ap"], image_f1max=m["f1max"])


def region_weights(mask: np.ndarray) -> tuple:
    """(weights float64 like mask: 1/|region| on defect pixels, 0 elsewhere; number of regions)."""
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    n, lab = cv2.connectedComponents(m, connectivity=8)
    if n <= 1:
        return np.zeros(m.shape, np.float64), 0
    area = np.bincount(lab.ravel(), minlength=n).astype(np.float64)
    inv = np.zeros(n, np.float64)
    inv[1:] = 1.0 / area[1:]
    return inv[lab], n - 1


# ------------------------------------------------------------------------------------------
# pixel statistics (exact or binned) for one class
# ------------------------------------------------------------------------------------------
class _ClassPixels:
    def __init__(self, n_bins: Optional[int]):
        self.chunks: List[tuple] = []       # buffered (scores, is_pos, weight) before binning / exact
        self.n_regions = 0
        if n_bins is not None:
            self.neg = np.zeros(n_bins, np.float64)
            self.pos = np.zeros(n_bins, np.float64)
            self.pro = np.zeros(n_bins, np.float64)


class _Grid:
    """Equal-width bins [lo + k w, lo + (k+1) w), k < n; widened by pairwise merging."""

    def __init__(self, n_bins: int, lo: float, hi: float):
        self.n = n_bins
        span = hi - lo
        if not span > 0:
            span = max(abs(lo), 1.0) * 1e-6
        self.lo = lo - 0.05 * span
        self.w = span * 1.1 / n_bins

    @property
    def hi(self) -> float:
        return self.lo + self.n * self.w

    def widen(self, vmin: float, vmax: float, hists: List[np.ndarray]) -> None:
        h = self.n // 2
        while vmax >= self.hi:               # keep lo, double the width
            for a in hists:
                merged = a[0::2] + a[1::2]
                a[:h], a[h:] = merged, 0.0
            self.w *= 2.0
        while vmin < self.lo:                # keep hi, double the width
            hi = self.hi
            for a in hists:
                merged = a[0::2] + a[1::2]
                a[h:], a[:h] = merged, 0.0
            self.w *= 2.0
            self.lo = hi - self.n * self.w

    def index(self, v: np.ndarray) -> np.ndarray:
        idx = np.floor((v.astype(np.float64) - self.lo) / self.w).astype(np.int64)
        return np.clip(idx, 0, self.n - 1)   # clip guards floating-point rounding at the edges only


class MetricAccumulator:
    """Accumulate image scores (+ optional anomaly maps and masks) batch by batch; see module doc.

    n_bins: number of score bins for the pixel metrics (even), or None for exact pixel metrics.
    score_range: (lo, hi) of the map scores if known (skips the warm-up range estimate).
    warmup_pixels: how many map values to buffer before fixing the bin grid from their range.
    max_fpr: FPR limit of AUPRO.
    """

    def __init__(self, n_bins: Optional[int] = 10_000, score_range: Optional[Sequence[float]] = None,
                 warmup_pixels: int = 1 << 22, max_fpr: float = 0.3):
        if n_bins is not None and (n_bins < 2 or n_bins % 2):
            raise ValueError(f"n_bins must be an even number >= 2 or None, got {n_bins}")
        self.n_bins = n_bins
        self.max_fpr = float(max_fpr)
        self.warmup_pixels = int(warmup_pixels)
        self._grid: Optional[_Grid] = None
        if n_bins is not None and score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not hi > lo:
                raise ValueError(f"score_range must have hi > lo, got {score_range}")
            self._grid = _Grid(n_bins, lo, hi)
        self._buffered = 0
        self._scores: Dict[int, List[np.ndarray]] = {}
        self._labels: Dict[int, List[np.ndarray]] = {}
        self._pixels: Dict[int, _ClassPixels] = {}
        self._has_maps: Optional[bool] = None

    # ---- input --------------------------------------------------------------------------
    @staticmethod
    def _np(x, name):
        if x is None:
            return None
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        return np.asarray(x)

    def update(self, image_scores, image_labels, maps=None, masks=None, class_ids=None) -> None:
        s = self._np(image_scores, "image_scores").astype(np.float64).reshape(-1)
        y = self._np(image_labels, "image_labels").reshape(-1)
        n = s.size
        if y.size != n:
            raise ValueError(f"image_labels has {y.size} entries, image_scores {n}")
        if not np.all(np.isfinite(s)):
            raise ValueError("image_scores contain NaN or inf")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("image_labels must be 0 (normal) or 1 (defective)")
        c = np.zeros(n, np.int64) if class_ids is None else self._np(class_ids, "class_ids").reshape(-1)
        if c.size != n:
            raise ValueError(f"class_ids has {c.size} entries, image_scores {n}")
        if n and (c.min() < 0 or not np.all(c == np.round(c))):
            raise ValueError("class_ids must be non-negative integers")
        c = c.astype(np.int64)
        has_maps = maps is not None
        if self._has_maps is not None and has_maps != self._has_maps and n:
            raise ValueError("maps were given for some batches and not for others")
        if n:
            self._has_maps = has_maps
        if has_maps:
            a = self._np(maps, "maps")
            m = self._np(masks, "masks")
            if m is None:
                raise ValueError("maps need masks (ground truth, zeros for normal images)")
            if a.ndim == 4 and a.shape[1] == 1:
                a = a[:, 0]
            if m.ndim == 4 and m.shape[1] == 1:
                m = m[:, 0]
            if a.ndim != 3 or a.shape[0] != n or m.shape != a.shape:
                raise ValueError(f"maps must be (N, H, W) with N = {n} and masks of the same shape; got "
                                 f"maps {a.shape}, masks {m.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError("maps contain NaN or inf")
            m = m > 0.5 if m.dtype != bool else m
            self._add_pixels(a.astype(np.float32, copy=False), m, c)
        for cid in np.unique(c):
            sel = c == cid
            self._scores.setdefault(int(cid), []).append(s[sel])
            self._labels.setdefault(int(cid), []).append(y[sel].astype(np.int8))

    def _add_pixels(self, maps: np.ndarray, masks: np.ndarray, c: np.ndarray) -> None:
        for i in range(maps.shape[0]):
            w, k = region_weights(masks[i])
            st = self._pixels.setdefault(int(c[i]), _ClassPixels(self.n_bins))
            st.n_regions += k
            st.chunks.append((maps[i].ravel().copy(), masks[i].ravel().copy(), w.ravel()))
            self._buffered += maps[i].size
        if self.n_bins is not None and (self._grid is not None or self._buffered >= self.warmup_pixels):
            self._flush()

    def _flush(self) -> None:
        chunks = [ch for st in self._pixels.values() for ch in st.chunks]
        if not chunks:
            return
        vmin = min(float(ch[0].min()) for ch in chunks)
        vmax = max(float(ch[0].max()) for ch in chunks)
        if self._grid is None:
            self._grid = _Grid(self.n_bins, vmin, vmax)
        hists = [a for st in self._pixels.values() for a in (st.neg, st.pos, st.pro)]
        self._grid.widen(vmin, vmax, hists)
        nb = self.n_bins
        for st in self._pixels.values():
            for v, p, w in st.chunks:
                idx = self._grid.index(v)
                st.pos += np.bincount(idx[p], minlength=nb)
                st.neg += np.bincount(idx[~p], minlength=nb)
                st.pro += np.bincount(idx[p], weights=w[p], minlength=nb)
            st.chunks = []
        self._buffered = 0

    # ---- output -------------------------------------------------------------------------
    def _pixel_metrics(self, st: _ClassPixels) -> Dict[str, float]:
        if self.n_bins is None:
            v = np.concatenate([ch[0] for ch in st.chunks])
            p = np.concatenate([ch[1] for ch in st.chunks]).astype(np.float64)
            w = np.concatenate([ch[2] for ch in st.chunks]).astype(np.float64)
            pos, neg, pro = _exact_groups(v, p, 1.0 - p, w)
        else:
            pos, neg, pro = st.pos[::-1], st.neg[::-1], st.pro[::-1]
        m = curve_metrics(pos, neg)
        return dict(pixel_auroc=m["auroc"], pixel_ap=m["ap"], pixel_f1max=m["f1max"],
                    pixel_aupro=pro_auc(neg, pro, st.n_regions, self.max_fpr))

    def compute(self, class_names: Optional[Sequence[str]] = None) -> dict:
        """{"per_class": {name: {metric: value}}, "mean": {...}, "counts": {...}, "notes": [...]}."""
        if self.n_bins is not None:
            self._flush()
        ids = sorted(self._scores)
        if class_names is not None:
            class_names = list(class_names)
            bad = [i for i in ids if i >= len(class_names)]
            if bad:
                raise ValueError(f"class ids {bad} have no name in class_names ({len(class_names)} names)")
        name_of = (lambda i: class_names[i]) if class_names is not None else (lambda i: str(i))
        per_class, counts, notes = {}, {}, []
        for cid in ids:
            name = name_of(cid)
            s = np.concatenate(self._scores[cid])
            y = np.concatenate(self._labels[cid])
            r = image_metrics(s, y)
            st = self._pixels.get(cid)
            if st is not None:
                r.update(self._pixel_metrics(st))
            else:
                r.update({k: math.nan for k in PIXEL_METRICS})
            vals = [r[k] for k in METRICS]
            r["mad"] = float(np.mean(vals)) if all(np.isfinite(vals)) else math.nan
            per_class[name] = r
            counts[name] = dict(images=int(y.size), defective=int(y.sum()),
                                regions=int(st.n_regions) if st is not None else 0)
            if y.sum() == 0:
                notes.append(f"class {name}: no defective images, so the image and pixel metrics are "
                             f"undefined (NaN) and the class is left out of the mean")
            elif y.sum() == y.size:
                notes.append(f"class {name}: no normal images, so image AUROC is undefined (NaN)")
            elif st is not None and st.n_regions == 0:
                notes.append(f"class {name}: no defect pixels in the masks, so the pixel metrics are NaN")
        if self._has_maps is False:
            notes.append("no anomaly maps were given: pixel metrics and mAD are NaN")
        mean = {}
        for k in METRICS:
            vals = np.array([per_class[n][k] for n in per_class], np.float64)
            vals = vals[np.isfinite(vals)]
            mean[k] = float(vals.mean()) if vals.size else math.nan
        mv = [mean[k] for k in METRICS]
        mean["mad"] = float(np.mean(mv)) if all(np.isfinite(mv)) else math.nan
        return {"per_class": per_class, "mean": mean, "counts": counts, "notes": notes}


def compute_metrics(image_scores, image_labels, maps=None, masks=None, class_ids=None,
                    class_names=None, **kw) -> dict:
    """One-shot convenience wrapper around MetricAccumulator."""
    acc = MetricAccumulator(**kw)
    acc.update(image_scores, image_labels, maps, masks, class_ids)
    return acc.compute(class_names)


def jsonable(obj):
    """A copy of a metrics result with NaN / inf replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def format_table(result: dict, digits: int = 1) -> str:
    """A plain-text table in percent: one row per class, then the mean; NaN shows as '-'."""
    keys = list(ALL_KEYS)
    rows = [(name, result["per_class"][name]) for name in result["per_class"]]
    rows.append(("mean", result["mean"]))
    w0 = max([5] + [len(str(n)) for n, _ in rows])
    widths = [max(len(TABLE_HEADERS[k]), digits + 5) for k in keys]
    lines = ["  ".join([f"{'class':<{w0}}"] + [f"{TABLE_HEADERS[k]:>{w}}" for k, w in zip(keys, widths)])]
    lines.append("-" * len(lines[0]))
    for i, (name, r) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        cells = []
        for k, w in zip(keys, widths):
            v = r.get(k, math.nan)
            cells.append(f"{100.0 * v:>{w}.{digits}f}" if v is not None and np.isfinite(v) else f"{'-':>{w}}")
        lines.append("  ".join([f"{str(name):<{w0}}"] + cells))
    return "\n".join(lines)
