"""Line-scan assembly: a ring of lines -> overlapping tiles -> stitched strip map -> defect events.

Strip coordinates: a line camera produces an endless strip; line `i` is row `i` of the strip,
columns are camera pixels. Everything here speaks strip coordinates so that downstream can mark
material.

* `tile_starts(length, tile, stride)` - tile origins along one axis: 0, stride, 2*stride, ...
  and a last one aligned to the end, so the union covers [0, length) (one tile, padded, when
  length < tile).
* `LineAssembler` keeps a ring buffer of lines and cuts "bands": a band is one row of tiles
  across the width, at strip lines [y0, y0 + tile_h); consecutive bands are `stride_h` lines
  apart (stride < tile height -> overlap, so a defect on a seam is whole in some tile). Each
  band *owns* the lines it is the first to cover (the first band of a segment owns all its
  rows; later ones own `stride_h` new lines): the pipeline's per-line accounting uses that.
  A segment ends at a gap in the line indices or at the end of the stream; `flush()` emits a
  last band aligned to the segment's last line, so every line of a segment is in some band.
* `StripStitcher` takes per-tile anomaly maps band by band (in order), keeps their maximum
  over overlaps in strip coordinates, thresholds rows once no later band can touch them, and
  merges connected pixels (8-connectivity) across tile seams and band boundaries into one
  `DefectEvent` (line range, columns, area, peak score, millimetres when pitches are given).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np


def tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """Origins of tiles of size `tile` every `stride` covering [0, length); last one end-aligned."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be >= 1")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave gaps between tiles")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@dataclass
class Band:
    """One row of tiles across the strip width (what the pipeline batches for inference)."""

    seq: int                    # order of emission (all bands of a stream)
    segment: int                # contiguous-run id (a gap in line indices starts a new one)
    y0: int                     # strip line of the band's first row
    rows: int                   # valid rows (< tile_h only for a padded band)
    own0: int                   # first owned line
    own1: int                   # one past the last owned line
    x_starts: List[int]         # tile origins across the width
    t_ns: int                   # capture time of the band's newest line
    t_first_ns: int = 0         # capture time of the oldest owned line
    tiles: Optional[np.ndarray] = None  # uint8 (n_tiles, tile_h, tile_w, C)
    last_of_segment: bool = False
    frame: Optional[int] = None  # area cameras: the frame index
    t_queued_ns: int = 0        # when it last entered a stage queue (queue-wait histograms)

    @property
    def owned(self) -> int:
        return self.own1 - self.own0

    @property
    def n_tiles(self) -> int:
        return len(self.x_starts)

    def strip_rows(self, width: int) -> np.ndarray:
        """The band's valid rows across the strip (rows, width, C), put back together from its tiles."""
        tw = self.tiles.shape[2]
        rows = np.empty((self.rows, width, self.tiles.shape[3]), np.uint8)
        for i, x0 in enumerate(self.x_starts):
            ww = min(tw, width - x0)
            rows[:, x0:x0 + ww] = self.tiles[i, :self.rows, :ww]
        return rows


class RollingRows:
    """The newest `capacity` image rows of the strip, in a ring indexed by strip line (the live
    preview and the crops of event overlays)."""

    def __init__(self, capacity: int, width: int, channels: int):
        self.img = np.zeros((int(capacity), int(width), int(channels)), np.uint8)
        self.end = 0     # one past the newest line written

    @property
    def capacity(self) -> int:
        return self.img.shape[0]

    def write(self, y0: int, rows: np.ndarray) -> None:
        k = self.capacity
        if k == 0 or rows.shape[0] == 0:
            return
        self.img[np.arange(y0, y0 + rows.shape[0]) % k] = rows
        self.end = max(self.end, y0 + rows.shape[0])

    def rows(self, y0: int, y1: int) -> Optional[np.ndarray]:
        """Image rows [y0, y1) if all are still held, else None."""
        k = self.capacity
        if y1 - y0 > k or y0 < self.end - k or y1 > self.end or y1 <= y0:
            return None
        return self.img[np.arange(y0, y1) % k]

    def lines(self, lines: np.ndarray) -> Optional[np.ndarray]:
        """Image rows of the given strip lines (ascending) if all are still held, else None."""
        k = self.capacity
        if not len(lines) or lines[0] < self.end - k or lines[-1] >= self.end:
            return None
        return self.img[lines % k]


class LineAssembler:
    """Ring buffer of lines cut into overlapping bands of tiles (see module docstring)."""

    def __init__(self, width: int, channels: int, tile_h: int, tile_w: int,
                 stride_h: Optional[int] = None, stride_w: Optional[int] = None, capacity: int = 0):
        if width < 1 or channels not in (1, 3):
            raise ValueError(f"width {width} must be >= 1 and channels {channels} 1 or 3")
        self.width, self.channels = int(width), int(channels)
        self.tile_h, self.tile_w = int(tile_h), int(tile_w)
        self.stride_h = int(stride_h or tile_h)
        self.stride_w = int(stride_w or tile_w)
        if not (1 <= self.stride_h <= self.tile_h and 1 <= self.stride_w <= self.tile_w):
            raise ValueError(f"strides ({self.stride_h}, {self.stride_w}) must be in [1, tile] "
                             f"for tile ({self.tile_h}, {self.tile_w})")
        self.x_starts = tile_starts(self.width, self.tile_w, self.stride_w)
        self.capacity = max(int(capacity), 2 * self.tile_h)
        self._ring = np.zeros((self.capacity, self.width, self.channels), np.uint8)
        self._t = np.zeros(self.capacity, np.int64)
        self._base = 0          # strip line of ring row 0
        self._n = 0             # rows held
        self._seq = 0
        self._segment = -1
        self._seg_start = None  # first line of the current segment
        self._next_y0 = None    # origin of the next band
        self._owned_to = None   # lines < this are owned by an emitted band
        self.frame = None

    # -- state --------------------------------------------------------------------------
    @property
    def end(self) -> Optional[int]:
        """One past the last line held (None before the first line)."""
        return None if self._seg_start is None else self._base + self._n

    @property
    def unowned_lines(self) -> int:
        return 0 if self._seg_start is None else self.end - self._owned_to

    def _start_segment(self, line: int) -> None:
        self._segment += 1
        self._seg_start = self._base = self._next_y0 = self._owned_to = int(line)
        self._n = 0

    # -- input --------------------------------------------------------------------------
    def push(self, lines: np.ndarray, first_line: int, t_ns: int) -> List[Band]:
        """Append lines (uint8 (n, width[, C])) starting at strip line `first_line`.

        A discontinuity (first_line != end) flushes the current segment first. Returns the
        bands that became complete, in order.
        """
        if lines.ndim == 2:
            lines = lines[:, :, None]
        if lines.shape[1] != self.width or lines.shape[2] != self.channels:
            raise ValueError(f"lines of shape {lines.shape}; expected (n, {self.width}, {self.channels})")
        out: List[Band] = []
        if self._seg_start is None or first_line != self.end:
            out += self.flush()
            self._start_segment(first_line)
        pos = 0
        n = lines.shape[0]
        while pos < n:
            self._make_room()
            take = min(n - pos, self.capacity - self._n)
            self._ring[self._n:self._n + take] = lines[pos:pos + take]
            self._t[self._n:self._n + take] = t_ns
            self._n += take
            pos += take
            out += self._emit_ready()
        return out

    def _make_room(self) -> None:
        if self._n < self.capacity:
            return
        # keep the rows of the next band and the last tile_h rows (a flush band needs them);
        # the next band always starts after end - tile_h, so this keeps exactly tile_h rows
        keep_from = min(self._next_y0, self.end - self.tile_h) - self._base
        if keep_from <= 0:
            raise AssertionError("ring buffer full with no completed band")
        self._ring[:self._n - keep_from] = self._ring[keep_from:self._n]
        self._t[:self._n - keep_from] = self._t[keep_from:self._n]
        self._n -= keep_from
        self._base += keep_from

    def _band(self, y0: int, rows: int, own0: int, own1: int, last: bool) -> Band:
        r0 = y0 - self._base
        block = self._ring[r0:r0 + rows]
        if rows < self.tile_h:   # short segment: pad by mirroring its rows (looks like material)
            block = np.pad(block, ((0, self.tile_h - rows), (0, 0), (0, 0)), mode="symmetric")
        tiles = np.empty((len(self.x_starts), self.tile_h, self.tile_w, self.channels), np.uint8)
        for i, x0 in enumerate(self.x_starts):
            w = min(self.tile_w, self.width - x0)
            tiles[i, :, :w] = block[:, x0:x0 + w]
            if w < self.tile_w:   # camera narrower than a tile: mirror the columns
                tiles[i, :, w:] = np.pad(block[:, x0:x0 + w], ((0, 0), (0, self.tile_w - w), (0, 0)),
                                         mode="symmetric")[:, w:]
        t_new = int(self._t[r0 + rows - 1])
        t_old = int(self._t[own0 - self._base]) if own1 > own0 else t_new
        b = Band(self._seq, self._segment, y0, rows, own0, own1, list(self.x_starts), t_new, t_old,
                 tiles, last, self.frame)
        self._seq += 1
        return b

    def _emit_ready(self) -> List[Band]:
        out = []
        while self._next_y0 + self.tile_h <= self.end:
            y0 = self._next_y0
            own0, own1 = self._owned_to, y0 + self.tile_h
            out.append(self._band(y0, self.tile_h, own0, own1, False))
            self._owned_to = own1
            self._next_y0 = y0 + self.stride_h
        return out

    def flush(self) -> List[Band]:
        """End the current segment: a last band covers any line not yet owned."""
        if self._seg_start is None:
            return []
        out = []
        end = self.end
        if end > self._owned_to:
            y0 = max(self._seg_start, end - self.tile_h)
            out.append(self._band(y0, end - y0, self._owned_to, end, True))
            self._owned_to = end
        elif out == [] and end > self._seg_start:
            # segment ends exactly on a band: tell the stitcher with an empty marker band
            out.append(Band(self._seq, self._segment, end, 0, end, end, [], int(self._t[self._n - 1]),
                            int(self._t[self._n - 1]), None, True, self.frame))
            self._seq += 1
        self._seg_start = None
        self._n = 0
        return out

    def push_frame(self, frame: np.ndarray, frame_index: int, t_ns: int) -> List[Band]:
        """Area camera: tile one frame (its own segment) at strip lines frame_index * H ..."""
        h = frame.shape[0]
        self.frame = int(frame_index)
        out = self.flush()
        self._start_segment(int(frame_index) * h)
        out += self.push(frame, int(frame_index) * h, t_ns)
        out += self.flush()
        self.frame = None
        return out


# ------------------------------------------------------------------------------------------
# stitching and events
# ------------------------------------------------------------------------------------------
@dataclass
class DefectEvent:
    line_start: int
    line_end: int          # inclusive
    col_start: int
    col_end: int           # inclusive
    area_px: int
    peak_score: float
    peak_line: int
    peak_col: int
    segment: int
    frame: Optional[int] = None
    length_mm: Optional[float] = None
    width_mm: Optional[float] = None
    position_mm: Optional[float] = None   # distance along the strip of line_start
    truncated: bool = False               # split because it exceeded max_open_rows

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class StripStitcher:
    """Per-tile maps -> strip-coordinate map (max over overlaps) -> connected defect events.

    Feed bands in `seq` order with `add_band(band, maps)` (maps float (n_tiles, tile_h, tile_w)
    in tile pixels) or `add_band(band, None)` for a band that was dropped (its rows stay
    unscored unless another band covers them). Rows above the newest band's origin are final:
    they are thresholded (`>= threshold`) and labelled together with the still-open rows of
    defects that touch them, so a defect spanning several bands is one event.
    """

    def __init__(self, width: int, tile_h: int, tile_w: int, threshold: float, min_area: int = 1,
                 line_pitch_mm: Optional[float] = None, pixel_pitch_mm: Optional[float] = None,
                 max_open_rows: int = 8192, keep_rows: int = 0):
        self.width, self.tile_h, self.tile_w = int(width), int(tile_h), int(tile_w)
        self.threshold = float(threshold)
        self.min_area = int(min_area)
        self.line_pitch_mm = line_pitch_mm
        self.pixel_pitch_mm = pixel_pitch_mm if pixel_pitch_mm is not None else None
        self.max_open_rows = int(max_open_rows)
        self.keep_rows = int(keep_rows)     # recent final rows kept for a preview
        self._acc = np.full((0, self.width), -np.inf, np.float32)
        self._acc_y0 = 0                    # strip line of _acc row 0
        self._segment = None
        self._frame = None
        self._open = np.zeros((0, self.width), np.float32)   # final rows of still-open defects
        self._open_y0 = 0
        # ring of the last keep_rows final rows (row of line y at y % keep_rows, tagged with y)
        self._pv = np.full((self.keep_rows, self.width), -np.inf, np.float32)
        self._pv_line = np.full(self.keep_rows, -1, np.int64)
        self.preview_end = 0     # one past the newest final line
        self.rows_final = 0

    # -- input --------------------------------------------------------------------------
    def add_band(self, band: Band, maps: Optional[np.ndarray]) -> List[DefectEvent]:
        events: List[DefectEvent] = []
        if self._segment is not None and band.segment != self._segment:
            events += self.end_segment()
        if self._segment is None:
            self._segment = band.segment
            self._frame = band.frame
            self._acc_y0 = band.y0 if band.rows else band.own0
            self._acc = self._acc[:0]
            self._open = self._open[:0]
            self._open_y0 = self._acc_y0
        if band.rows:
            end = band.y0 + band.rows
            need = end - self._acc_y0 - self._acc.shape[0]
            if need > 0:
                self._acc = np.concatenate([self._acc, np.full((need, self.width), -np.inf, np.float32)])
            if maps is not None:
                r0 = band.y0 - self._acc_y0
                if r0 < 0:
                    raise ValueError(f"band {band.seq} starts at line {band.y0}, before final rows")
                region = self._acc[r0:r0 + band.rows]
                for i, x0 in enumerate(band.x_starts):
                    w = min(self.tile_w, self.width - x0)
                    np.maximum(region[:, x0:x0 + w], maps[i, :band.rows, :w], out=region[:, x0:x0 + w])
            # rows before this band's origin are final (later bands start at or after it)
            events += self._finalize(band.y0 - self._acc_y0)
        if band.last_of_segment:
            events += self.end_segment()
        return events

    def end_segment(self) -> List[DefectEvent]:
        """Finalize all rows of the current segment and close its defects."""
        if self._segment is None:
            return []
        events = self._finalize(self._acc.shape[0])
        events += self._close_open(all_rows=True)
        self._segment = None
        return events

    @property
    def first_open_line(self) -> int:
        """The first strip line whose thresholding is not settled yet (rows not final, or final
        rows of a defect still open): a new threshold applies from here."""
        return int(self._open_y0 if self._open.shape[0] else self._acc_y0)

    def map_rows(self, y0: int, y1: int) -> Optional[np.ndarray]:
        """Final map rows [y0, y1) from the preview ring (-inf for lines never scored), or
        None when they are not all held (too old or not final yet)."""
        if y1 <= y0:
            return None
        return self.map_lines(np.arange(y0, y1))

    def map_lines(self, lines: np.ndarray) -> Optional[np.ndarray]:
        """Final map rows of the given strip lines (ascending; -inf for lines never scored), or
        None when they are not all held."""
        k = self.keep_rows
        if k == 0 or not len(lines) or lines[0] < self.preview_end - k or lines[-1] >= self.preview_end:
            return None
        out = self._pv[lines % k]
        out[self._pv_line[lines % k] != lines] = -np.inf
        return out

    # -- internals ----------------------------------------------------------------------
    def _finalize(self, n: int) -> List[DefectEvent]:
        n = max(0, min(n, self._acc.shape[0]))
        if n == 0:
            return []
        rows = self._acc[:n]
        self._acc = self._acc[n:]
        if self.keep_rows:
            lines = np.arange(self._acc_y0, self._acc_y0 + n)[-self.keep_rows:]
            self._pv[lines % self.keep_rows] = rows[-self.keep_rows:]
            self._pv_line[lines % self.keep_rows] = lines
            self.preview_end = int(lines[-1]) + 1
        self._acc_y0 += n
        self.rows_final += n
        self._open = np.concatenate([self._open, rows]) if self._open.shape[0] else rows.copy()
        return self._close_open(all_rows=False)

    def _close_open(self, all_rows: bool) -> List[DefectEvent]:
        block = self._open
        if block.shape[0] == 0:
            return []
        mask = (block >= self.threshold).astype(np.uint8)
        if not mask.any():
            self._open = block[:0]
            self._open_y0 += block.shape[0]
            return []
        n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        last = block.shape[0] - 1
        forced = block.shape[0] > self.max_open_rows
        keep_from = block.shape[0]
        events = []
        touching = set(np.unique(labels[last][labels[last] > 0]).tolist())
        open_ids = touching if not (all_rows or forced) else set()
        for lab in range(1, n_lab):
            if lab in open_ids:
                keep_from = min(keep_from, int(stats[lab, cv2.CC_STAT_TOP]))
                continue
            events.append(self._event(lab, labels, stats, block, truncated=forced and lab in touching))
        if keep_from < block.shape[0]:
            kept = block[keep_from:].copy()
            lab_k = labels[keep_from:]
            closed = (lab_k > 0) & ~np.isin(lab_k, list(open_ids))
            kept[closed] = -np.inf      # already reported; must not come back with the open ones
            self._open = kept
            self._open_y0 += keep_from
        else:
            self._open = block[:0]
            self._open_y0 += block.shape[0]
        return [e for e in events if e.area_px >= self.min_area]

    def _event(self, lab, labels, stats, block, truncated=False) -> DefectEvent:
        x, y, w, h, area = (int(v) for v in stats[lab, :5])
        sub = labels[y:y + h, x:x + w] == lab
        vals = np.where(sub, block[y:y + h, x:x + w], -np.inf)
        py, px = np.unravel_index(int(np.argmax(vals)), vals.shape)
        line0 = self._open_y0 + y
        ev = DefectEvent(line0, line0 + h - 1, x, x + w - 1, area, float(vals[py, px]),
                         line0 + int(py), x + int(px), int(self._segment), self._frame, truncated=truncated)
        if self.line_pitch_mm:
            ev.length_mm = h * self.line_pitch_mm
            ev.position_mm = line0 * self.line_pitch_mm
        if self.pixel_pitch_mm:
            ev.width_mm = w * self.pixel_pitch_mm
        return ev


def stitch_reference(height: int, width: int, tiles: Sequence[Tuple[int, int, np.ndarray]]) -> np.ndarray:
    """Slow reference: max over tiles placed at (y0, x0) into a -inf (height, width) map."""
    out = np.full((height, width), -np.inf, np.float32)
    for y0, x0, m in tiles:
        h = min(m.shape[0], height - y0)
        w = min(m.shape[1], width - x0)
        for r in range(h):
            for c in range(w):
                if m[r, c] > out[y0 + r, x0 + c]:
                    out[y0 + r, x0 + c] = m[r, c]
    return out
