"""The web as an operator sees it: the last N lines of the strip, shrunk to fit a screen, with the
anomaly heat overlay (the live page's scrolling strip).

The pipeline's postprocess thread calls `update(pipe)` after every band (`Pipeline.on_band`): the
strip rows that became final since the last call are taken from the pipeline's own rolling buffers
(`RollingRows` for the image, `StripStitcher.map_lines` for the map), shrunk by `kx` across the web
and `ky` along it and written into a ring of display rows. Across the web the map is max-pooled (a
one-pixel-wide defect stays visible at any zoom); along it, up to SAMPLES_PER_ROW lines of each
display row are read and max-pooled (a defect shorter than ky / SAMPLES_PER_ROW lines may miss the
heat, never its event box), and the image is subsampled. That is a few rows per band; the colouring
and encoding happen in `render()`, on the page's thread, at most as often as the page asks.

Lines that were never scored (dropped, paused) keep no heat; a display row covers lines
[line, line + ky).
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

import cv2
import numpy as np

from .sinks import heat_overlay

SAMPLES_PER_ROW = 8     # strip lines read per display row (the map's maximum over them)


class WebStrip:
    def __init__(self, width: int, channels: int, lines: int = 100_000, display_w: int = 1024,
                 display_h: int = 600):
        if lines < 1 or display_w < 1 or display_h < 1:
            raise ValueError(f"--ui-strip-lines {lines!r}: expected a positive number of lines")
        self.width, self.channels = int(width), int(channels)
        self.kx = max(1, math.ceil(self.width / display_w))
        self.w = math.ceil(self.width / self.kx)
        self.h = int(display_h)
        self.ky = max(1, math.ceil(int(lines) / self.h))
        self.lines = self.ky * self.h
        self.row_step = max(1, self.ky // SAMPLES_PER_ROW)
        self._img = np.zeros((self.h, self.w, self.channels), np.uint8)
        self._map = np.full((self.h, self.w), -np.inf, np.float32)
        self._block = np.full(self.h, -1, np.int64)      # display row -> block index (line // ky)
        self._next = 0              # first strip line not taken yet
        self.lock = threading.Lock()
        self.version = 0            # bumped on every update that added rows
        self.newest_line = -1

    def update(self, pipe) -> None:
        """Take the strip rows that became final (postprocess thread). Of each display row's ky
        lines, every `row_step`-th is read (at most SAMPLES_PER_ROW of them): at 20 kHz x 4096 px
        that keeps this to a few rows per band."""
        st, pv = pipe.stitcher, pipe.preview
        y1 = st.preview_end
        y0 = max(self._next, y1 - st.keep_rows, pv.end - pv.capacity)
        if y1 <= y0:
            return
        self._next = y1
        lines = np.arange(y0, y1)
        lines = lines[(lines % self.ky) % self.row_step == 0]
        if not len(lines):
            return
        img, amap = pv.lines(lines), st.map_lines(lines)
        if img is None or amap is None:
            return
        pad = self.w * self.kx - self.width
        if pad:
            amap = np.pad(amap, ((0, 0), (0, pad)), constant_values=-np.inf)
        cols = amap[:, 0::self.kx].copy()             # max over each kx columns (strided: fast for small kx)
        for j in range(1, self.kx):
            np.maximum(cols, amap[:, j::self.kx], out=cols)
        blocks = lines // self.ky
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        pooled = np.maximum.reduceat(cols, starts, axis=0)
        ub = blocks[starts]
        if len(ub) > self.h:                          # more than a screen at once: keep the newest
            starts, pooled, ub = starts[-self.h:], pooled[-self.h:], ub[-self.h:]
        slots = ub % self.h
        with self.lock:
            fresh = self._block[slots] != ub
            self._map[slots[fresh]] = -np.inf
            self._img[slots[fresh]] = img[starts[fresh], ::self.kx][:, :self.w]
            self._map[slots] = np.maximum(self._map[slots], pooled)
            self._block[slots] = ub
            self.version += 1
            self.newest_line = y1 - 1

    def on_band(self, pipe):
        """A `Pipeline.on_band` callback bound to `pipe`, chained after `previous` when there is one."""
        previous = pipe.on_band

        def hook(band, rec):
            if previous is not None:
                previous(band, rec)
            self.update(pipe)
        return hook

    def view(self):
        """(image rows, map rows, first line of each row or -1), newest row first; a copy."""
        with self.lock:
            newest = int(self._block.max())
            order = np.arange(newest, newest - self.h, -1) % self.h
            blocks, img, amap = self._block[order], self._img[order].copy(), self._map[order].copy()
        valid = (blocks == np.arange(newest, newest - self.h, -1)) & (blocks >= 0)
        img[~valid] = 0
        amap[~valid] = -np.inf
        return img, amap, np.where(valid, blocks * self.ky, -1)

    def render(self, threshold: float, map_low: float, boxes=()) -> Tuple[Optional[np.ndarray], dict]:
        """BGR picture, newest lines at the top, and what it shows ({first_line, last_line, ky, kx,
        rows}); `boxes` are events (dicts with line/col ranges) drawn as yellow rectangles."""
        img, amap, lines = self.view()
        meta = {"first_line": None, "last_line": None, "ky": self.ky, "kx": self.kx, "rows": int((lines >= 0).sum())}
        if lines[0] < 0:
            return None, meta
        shown = int(np.flatnonzero(lines >= 0)[-1]) + 1      # down to the oldest row held
        pic = heat_overlay(img[:shown], amap[:shown], threshold, map_low)
        top = int(lines[0]) // self.ky
        for ev in boxes:
            r0, r1 = top - ev["line_end"] // self.ky, top - ev["line_start"] // self.ky
            if r1 < 0 or r0 >= shown:
                continue
            cv2.rectangle(pic, (ev["col_start"] // self.kx - 1, max(0, r0) - 1),
                          (ev["col_end"] // self.kx + 1, min(shown - 1, r1) + 1), (0, 255, 255), 1)
        meta.update(first_line=int(lines[lines >= 0].min()), last_line=self.newest_line)
        return pic, meta
