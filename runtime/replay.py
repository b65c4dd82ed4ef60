"""Event-level evaluation through the production stream: labelled images replayed as a line camera.

A set of images (normal, or MVTec-layout test images with defect masks) is laid end to end as the
strip a line camera of width W would deliver (each image resized to width W, as linesim does),
streamed through `linesim` and the real `Pipeline` (the same tiling, batching, engine and stitching
as `runtime.stream`), and every band's tile maps are recorded. Events at any pixel threshold then
come from replaying those bands through the production `StripStitcher`, so one inference pass
gives a whole threshold curve:

    strip = lay_out(images, width, folder)              # resized pages + ground truth on the strip
    rec = record(engine, strip, config)                 # one stream, bands + tile maps kept
    events = rec.events(threshold)                      # StripStitcher at that threshold
    m = score_events(events, strip, ...)                # recall, precision, false events

Matching: a ground-truth region is a connected component (8-connectivity) of a defect mask on the
strip; an event finds a region when the event's bounding box holds a pixel of it. An event that
finds no region is a false event; it belongs to the image holding its peak line. Rates: false
events per 100 good images, per metre of web (given the line pitch) and per hour (given the line
rate). Used by `runtime.calibrate` (thresholds in operator units) and benchmarks/events.py.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from deploy import Engine

from .pipeline import Pipeline, StreamConfig
from .sources import open_source
from deploy.contract import image_files

from .sources.base import read_image, to_format
from .tiling import DefectEvent, StripStitcher

GOOD = "good"


class ReplayError(ValueError):
    """A replay request that cannot run (bad folder, missing mask); the message says which."""


@dataclass
class Image:
    """One image to replay: its file, defect type ("good" for a normal one) and mask file."""

    path: pathlib.Path
    defect_type: str = GOOD
    mask_path: Optional[pathlib.Path] = None


@dataclass
class Placed:
    """An image on the strip: lines [line0, line1), its defect mask at strip resolution."""

    image: Image
    line0: int
    line1: int
    mask: Optional[np.ndarray] = None     # bool (line1 - line0, width), defective images only


@dataclass
class Strip:
    width: int
    channels: int
    folder: pathlib.Path                  # the resized pages, named in replay order
    placed: List[Placed]

    @property
    def lines(self) -> int:
        return self.placed[-1].line1 if self.placed else 0

    @property
    def n_good(self) -> int:
        return sum(p.image.defect_type == GOOD for p in self.placed)


def normal_images(folder) -> List[Image]:
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ReplayError(f"{folder}: expected a folder of normal images")
    files = image_files(folder)
    if not files:
        raise ReplayError(f"{folder}: no images")
    return [Image(f) for f in files]


def mvtec_test_images(root) -> List[Image]:
    """Images of an MVTec-layout class folder's test/ split: test/good/* and test/<type>/* with
    masks at ground_truth/<type>/<stem>_mask.png (or <stem>.png)."""
    root = pathlib.Path(root)
    test = root / "test"
    if not test.is_dir():
        raise ReplayError(f"{root}: expected an MVTec-layout class folder with test/ (and ground_truth/)")
    out = []
    for tdir in sorted(d for d in test.iterdir() if d.is_dir()):
        for f in image_files(tdir):
            if tdir.name == GOOD:
                out.append(Image(f))
                continue
            gt = root / "ground_truth" / tdir.name
            mask = next((m for m in (gt / f"{f.stem}_mask.png", gt / f"{f.stem}.png") if m.is_file()), None)
            if mask is None:
                raise ReplayError(f"{f}: no mask at {gt / (f.stem + '_mask.png')}")
            out.append(Image(f, tdir.name, mask))
    if not out:
        raise ReplayError(f"{test}: no images")
    return out


def _resize_to_width(img: np.ndarray, width: int, interpolation=None) -> np.ndarray:
    """linesim's rule: width W, aspect kept, INTER_AREA when shrinking else INTER_LINEAR."""
    h = max(1, int(round(img.shape[0] * width / img.shape[1])))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if img.shape[1] > width else cv2.INTER_LINEAR
    return cv2.resize(img, (width, h), interpolation=interpolation)


def lay_out(images: Sequence[Image], width: int, folder, channels: int = 1, seed: Optional[int] = 0) -> Strip:
    """Write the images, resized to `width` and in a seeded random order (None: as given), into
    `folder` as 000000.png ...; returns where each lies on the strip and its mask there."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = list(images)
    if seed is not None:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    fmt = "Mono8" if channels == 1 else "RGB8"
    placed, y = [], 0
    for i, im in enumerate(order):
        page = to_format(_resize_to_width(read_image(im.path), width), fmt)
        out = page if page.ndim == 2 else cv2.cvtColor(page, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"{i:06d}.png"), out)
        mask = None
        if im.mask_path is not None:
            m = cv2.imread(str(im.mask_path), cv2.IMREAD_GRAYSCALE)
            if m is None:
                raise ReplayError(f"{im.mask_path}: cannot be read as a mask")
            mask = cv2.resize((m > 0).astype(np.uint8), (width, page.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        placed.append(Placed(im, y, y + page.shape[0], mask))
        y += page.shape[0]
    return Strip(int(width), int(channels), folder, placed)


@dataclass
class Recording:
    """The bands of one replay with their tile maps, and what the stream said about it."""

    width: int
    tile_hw: Tuple[int, int]
    bands: List[tuple] = field(default_factory=list)      # (Band without pixels, maps or None)
    summary: dict = field(default_factory=dict)

    def events(self, threshold: float, min_area: int = 1) -> List[DefectEvent]:
        """The production stitcher's events at `threshold` over the recorded bands."""
        st = StripStitcher(self.width, self.tile_hw[0], self.tile_hw[1], threshold, min_area)
        out: List[DefectEvent] = []
        for band, maps in self.bands:
            out += st.add_band(band, maps)
        return out + st.end_segment()

    def map_values(self, every: int = 7) -> np.ndarray:
        """A sample of the recorded map values (for choosing threshold grids)."""
        vals = [m[:, ::every, ::every].ravel() for _, m in self.bands if m is not None]
        return np.concatenate(vals) if vals else np.zeros(0, np.float32)

    def map_max(self) -> float:
        """The largest recorded map value (no event at any threshold above it)."""
        return max((float(np.max(m)) for _, m in self.bands if m is not None and m.size), default=float("-inf"))


def record(engine: Engine, strip: Strip, config: Optional[StreamConfig] = None, rate: float = 0.0,
           lines_per_buffer: int = 64) -> Recording:
    """Stream the strip once through `engine` with the production pipeline (no drops: the
    replay blocks instead of dropping); keep every band's tile maps."""
    cfg = config or StreamConfig()
    cfg.overload = "block"
    cfg.latency_budget_ms = None   # a replay scores every line, however late (paced replays too)
    fmt = "Mono8" if strip.channels == 1 else "RGB8"
    src = open_source(f"linesim://?images={strip.folder}&width={strip.width}&rate={rate:g}"
                      f"&lines={lines_per_buffer}&format={fmt}&once=1")
    rec = Recording(strip.width, (0, 0))

    def keep(band, r):
        band.tiles = None          # pixels are not needed again; maps are
        rec.bands.append((band, None if r is None else r["maps"]))

    pipe = Pipeline(engine, src, cfg, on_band=keep).start()
    rec.tile_hw = pipe.tile_hw
    pipe.wait()
    rec.summary = pipe.finish()
    if rec.summary.get("error"):
        raise ReplayError(f"replay through {engine.path.name} failed: {rec.summary['error']}")
    if not rec.summary["accounting_ok"] or rec.summary["lines_scored"] != strip.lines:
        raise ReplayError(f"replay scored {rec.summary['lines_scored']} of {strip.lines} lines "
                          f"(dropped {rec.summary['dropped']})")
    return rec


def _regions(strip: Strip):
    """Ground-truth regions sorted by first line: (defect type, line0, col0, mask bool (h, w)) per
    connected component of each defect mask."""
    out = []
    for p in strip.placed:
        if p.mask is None or not p.mask.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(p.mask.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, w, h = (int(v) for v in stats[k, :4])
            out.append((p.image.defect_type, p.line0 + y, x, labels[y:y + h, x:x + w] == k))
    return sorted(out, key=lambda r: r[1])


def score_events(events: Sequence[DefectEvent], strip: Strip, line_pitch_mm: Optional[float] = None,
                 line_rate_hz: Optional[float] = None) -> Dict[str, object]:
    """Recall (overall and per defect type), event precision and false-event rates (module docstring)."""
    regions = _regions(strip)
    y0s = np.array([r[1] for r in regions], np.int64)
    tallest = max((r[3].shape[0] for r in regions), default=0)
    starts = np.array([p.line0 for p in strip.placed], np.int64)
    found = [False] * len(regions)
    false_good = false_defective = hits = 0
    for e in events:
        hit = False
        # regions that can overlap the event's lines: first line in [line_start - tallest, line_end]
        lo, hi = np.searchsorted(y0s, e.line_start - tallest), np.searchsorted(y0s, e.line_end, side="right")
        for i in range(int(lo), int(hi)):
            _t, y0, x0, m = regions[i]
            y1, x1 = y0 + m.shape[0] - 1, x0 + m.shape[1] - 1
            if e.line_start > y1 or e.col_end < x0 or e.col_start > x1:
                continue
            sub = m[max(e.line_start, y0) - y0:min(e.line_end, y1) - y0 + 1,
                    max(e.col_start, x0) - x0:min(e.col_end, x1) - x0 + 1]
            if sub.any():
                found[i] = hit = True
        if hit:
            hits += 1
        elif strip.placed[max(0, int(np.searchsorted(starts, e.peak_line, side="right")) - 1)].image.defect_type == GOOD:
            false_good += 1
        else:
            false_defective += 1
    per_type: Dict[str, list] = {}
    for (t, *_), f in zip(regions, found):
        per_type.setdefault(t, []).append(f)
    false_all = false_good + false_defective
    metres = strip.lines * line_pitch_mm / 1000.0 if line_pitch_mm else None
    hours = strip.lines / line_rate_hz / 3600.0 if line_rate_hz else None
    defective = [p for p in strip.placed if p.mask is not None and p.mask.any()]
    img_found = sum(any(found[i] for i, (_, y0, _, m) in enumerate(regions) if p.line0 <= y0 < p.line1)
                    for p in defective)
    return {
        "events": len(events), "regions": len(regions), "regions_found": int(sum(found)),
        "recall": float(np.mean(found)) if regions else None,
        "image_recall": img_found / len(defective) if defective else None,
        "recall_per_type": {t: float(np.mean(v)) for t, v in sorted(per_type.items())},
        "precision": hits / len(events) if events else None,
        "false_events": false_all, "false_events_good": false_good, "false_events_defective": false_defective,
        "false_per_100_good": 100.0 * false_good / strip.n_good if strip.n_good else None,
        "false_per_metre": false_all / metres if metres else None,
        "false_per_hour": false_all / hours if hours else None,
        "good_images": strip.n_good, "defective_images": len(defective), "lines": strip.lines,
    }


def threshold_grid(rec: Recording, n: int = 40, extra: Sequence[float] = ()) -> List[float]:
    """Thresholds from the 90th percentile of the recorded map values to just above their maximum."""
    v = rec.map_values()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return sorted(set(float(x) for x in extra))
    top = rec.map_max()
    lo, hi = float(np.percentile(v, 90)), top + max(abs(top) * 1e-6, 1e-12)
    return sorted(set(np.linspace(lo, hi, n).tolist()) | set(float(x) for x in extra))


def sweep(rec: Recording, strip: Strip, thresholds: Sequence[float], min_area: int = 1,
          line_pitch_mm: Optional[float] = None, line_rate_hz: Optional[float] = None) -> List[dict]:
    """score_events at every threshold (ascending): the event-level curve."""
    return [dict(threshold=float(t), **score_events(rec.events(t, min_area), strip, line_pitch_mm, line_rate_hz))
            for t in sorted(thresholds)]
