"""linesim://: a simulated line-scan camera (textures or replayed images, injected defects,
drops, corrupt buffers, stalls, disconnects), paced at a line rate or as fast as possible.

  linesim://?width=4096&rate=20000&lines=64&images=DIR&defects=L:C:R;...&drop=P&corrupt=P
            &stall=LINE:SECONDS&disconnect=LINE[,LINE]&total=N&format=Mono8|RGB8&seed=0&kind=texture
            &once=1&max_mb=2048

images=DIR replays every image of the folder (sorted by path), each resized to the camera width,
one after another; the strip then starts over unless once=1 ends it after one pass (so a labelled
folder is replayed exactly once). The decoded strip is held in memory: a folder whose strip would
exceed max_mb (MB, default 2048) is refused with its size, never silently cut short.
"""
from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from deploy.contract import IMAGE_SUFFIXES, image_files

from .base import (Buffer, CameraMeta, Source, SourceDisconnected, SourceError, check_fits,
                   format_param, num_param, prob_param, query_params, read_image, to_format)


@dataclass
class InjectedDefect:
    line: int       # centre line (strip coordinate)
    col: int        # centre column
    radius: int     # disc radius in pixels
    value: int = 0  # pixel value painted (dark hole by default)

    @property
    def box(self) -> Tuple[int, int, int, int]:
        """(line_start, line_end, col_start, col_end), inclusive."""
        return (self.line - self.radius, self.line + self.radius,
                self.col - self.radius, self.col + self.radius)


class LineSimSource(Source):
    """A line camera simulator paced in real time.

    Lines come from a folder of images (all of them, each resized to the camera width, scrolled
    along the strip one after another, cycling unless once=1) or from
    `models.synthetic.render_sample` pages when no folder is given. Line `i` of the strip is the same pixels whatever the buffering, so the
    ground truth of injected defects (`self.defects`, strip coordinates) is exact.

    Pacing: buffer k (lines [k*lines, (k+1)*lines)) is due at t0 + (k+1)*lines/rate. A consumer
    that falls more than `queue` buffers behind loses the oldest ones, as a camera whose driver
    runs out of buffers does (the index jumps: camera drops). rate=0 means as fast as read.

    Faults: drop=P drops a buffer with probability P (index jump); corrupt=P delivers an
    incomplete buffer; stall=LINE:SECONDS pauses delivery once before that line (nothing lost:
    the buffers arrive late); disconnect=LINE raises SourceDisconnected once when that line is
    reached (or passed: a late reader that skips it still sees the fault); after reopen the
    camera has kept running, so the lines in between are a gap.

    Ground truth for the accounting: line ids start at 0 (`first_index`) and `end_index()` is the
    camera's line counter (after close: where acquisition stopped), so lines lost before the
    first or after the last buffer read are countable. Parameters are validated at construction
    (probabilities in [0, 1], finite rates, the memory synthetic pages and a buffer need).
    """

    kind_name = "linesim"
    PARAMS = ("width", "rate", "lines", "images", "defects", "drop", "corrupt", "stall",
              "disconnect", "total", "format", "seed", "kind", "queue", "page", "pages", "once", "max_mb")
    MAX_SYNTH_PAGES = 64
    MIN_RATE, MAX_RATE = 1e-3, 1e8      # lines/s (0 = as fast as read)
    MAX_STALL_S = 3600.0

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        p = query_params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.width = num_param(p, "width", uri, 4096, int, 1)
        self.rate = num_param(p, "rate", uri, 20000.0, float, 0.0, self.MAX_RATE)
        if 0 < self.rate < self.MIN_RATE:
            raise SourceError(f"{uri}: parameter rate={self.rate:g} must be 0 (as fast as read) or "
                              f">= {self.MIN_RATE:g} lines/s")
        self.lines = num_param(p, "lines", uri, 64, int, 1)
        self.total = num_param(p, "total", uri, 0, int, 0)          # 0 = endless
        self.drop_p = prob_param(p, "drop", uri)
        self.corrupt_p = prob_param(p, "corrupt", uri)
        self.seed = num_param(p, "seed", uri, 0, int, 0)
        # the camera's buffer queue: 16 buffers, and never under 1024 lines (1-line buffers)
        self.queue = num_param(p, "queue", uri, max(16, -(-1024 // self.lines)), int, 1, 1 << 20)
        self.page = num_param(p, "page", uri, 0, int, 0)            # synthetic page height (0 = width)
        self.pixel_format = format_param(p, uri, "Mono8")
        self.synthetic_kind = p.get("kind", "texture")
        self.images_dir = pathlib.Path(unquote(p["images"])) if p.get("images") else None
        self.n_pages = num_param(p, "pages", uri, 4, int, 1, self.MAX_SYNTH_PAGES)
        row = self.width * (3 if self.pixel_format == "RGB8" else 1)
        check_fits([("one buffer", self.lines * row)] if self.images_dir is not None else
                   [(f"{self.n_pages} pages", self.n_pages * (self.page or self.width) * row),
                    ("one buffer", self.lines * row)], uri)
        if self.images_dir is not None:
            if not self.images_dir.is_dir():
                raise SourceError(f"{uri}: images={self.images_dir} is not a folder")
            self.image_files = image_files(self.images_dir)
            if not self.image_files:
                raise SourceError(f"{uri}: images={self.images_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        else:
            self.image_files = []
            from models.synthetic import KINDS

            if self.synthetic_kind not in KINDS:
                raise SourceError(f"{uri}: kind={self.synthetic_kind!r}; expected one of {KINDS}")
        self.defects = self._parse_defects(p.get("defects", ""), uri)
        self.stalls = self._parse_pairs(p.get("stall", ""), uri, "stall")
        try:
            self.disconnects = sorted(int(x) for x in p.get("disconnect", "").split(",") if x.strip())
        except ValueError:
            raise SourceError(f"{uri}: disconnect= expects line indices separated by ','") from None
        if any(x < 0 for x in self.disconnects):
            raise SourceError(f"{uri}: disconnect= line indices must be >= 0")
        self.meta = CameraMeta(self.pixel_format, self.width, self.lines, "line",
                               self.rate or None, f"linesim {self.width}px")
        self.first_index = 0
        self._stopped_at = None     # the line counter frozen at close (acquisition stop)
        self._ended = False         # the strip ended (total reached)
        self.once = bool(num_param(p, "once", uri, 0, int, 0))
        if self.once and self.images_dir is None:
            raise SourceError(f"{uri}: once=1 replays an images= folder once; give images=DIR")
        self.max_mb = num_param(p, "max_mb", uri, 2048.0, float, 1.0, 1e9)
        self._pages = None
        self._rng = np.random.default_rng(self.seed)
        self._t0 = None
        self._next_buffer = 0
        self._stall_done = set()
        self._disc_done = set()
        # ground truth counters (independent of the pipeline's accounting)
        self.lines_emitted = 0      # lines in buffers handed out (ok or corrupt)
        self.lines_lost = 0         # lines the simulated camera dropped (index jumps)
        self.lines_corrupt = 0

    # -- URI parsing --------------------------------------------------------------------
    @staticmethod
    def _parse_defects(text: str, uri: str) -> List[InjectedDefect]:
        out = []
        for part in filter(None, (s.strip() for s in text.replace(",", ";").split(";"))):
            bits = part.split(":")
            try:
                vals = [int(b) for b in bits]
            except ValueError:
                vals = []
            if len(vals) not in (3, 4) or vals[2] < 1 or (len(vals) == 4 and not 0 <= vals[3] <= 255):
                raise SourceError(f"{uri}: defects entry {part!r}; expected LINE:COL:RADIUS[:VALUE] "
                                  "(RADIUS >= 1, VALUE 0..255)")
            out.append(InjectedDefect(*vals))
        return out

    @staticmethod
    def _parse_pairs(text: str, uri: str, name: str) -> List[Tuple[int, float]]:
        out = []
        for part in filter(None, (s.strip() for s in text.replace(",", ";").split(";"))):
            try:
                a, b = part.split(":")
                line, secs = int(a), float(b)
            except ValueError:
                raise SourceError(f"{uri}: {name} entry {part!r}; expected LINE:SECONDS") from None
            if line < 0 or not 0 <= secs <= LineSimSource.MAX_STALL_S:
                raise SourceError(f"{uri}: {name} entry {part!r}; expected LINE >= 0 and "
                                  f"0 <= SECONDS <= {LineSimSource.MAX_STALL_S:g}")
            out.append((line, secs))
        return out

    # -- content ------------------------------------------------------------------------
    def _load_pages(self) -> None:
        """Decode / render the page cycle once, before the clock starts (no stalls later)."""
        pages = []
        if self.image_files:
            budget, used = self.max_mb * 1e6, 0
            for i, f in enumerate(self.image_files):
                img = read_image(f)
                h = max(1, int(round(img.shape[0] * self.width / img.shape[1])))
                img = cv2.resize(img, (self.width, h), interpolation=cv2.INTER_AREA
                                 if img.shape[1] > self.width else cv2.INTER_LINEAR)
                pages.append(to_format(img, self.pixel_format))
                used += pages[-1].nbytes
                if used > budget:
                    raise SourceError(
                        f"{self.uri}: images={self.images_dir}: {len(self.image_files)} images; the first {i + 1} "
                        f"already take {used / 1e6:.0f} MB at width {self.width} (max_mb={self.max_mb:g}); "
                        "replay a smaller folder or raise max_mb")
        else:
            from models.synthetic import render_sample

            size = int(min(max(self.width, 16), 512))
            for k in range(self.n_pages):
                img, _ = render_sample(self.synthetic_kind, size=size,
                                       rng=np.random.default_rng([self.seed, k]))
                img = cv2.resize(img, (self.width, self.page or self.width), interpolation=cv2.INTER_LINEAR)
                pages.append(to_format(img, self.pixel_format))
        self._pages = pages
        self._starts = np.cumsum([0] + [pg.shape[0] for pg in pages])
        if self.once:
            self.total = int(self._starts[-1]) if not self.total else min(self.total, int(self._starts[-1]))

    def page_starts(self) -> np.ndarray:
        """Strip line where each page (image, in replay order) starts, plus the cycle length."""
        if self._pages is None:
            self._load_pages()
        return self._starts.copy()

    def strip_lines(self, start: int, n: int) -> np.ndarray:
        """Lines [start, start+n) of the strip, defects included (deterministic)."""
        if self._pages is None:
            self._load_pages()
        cycle = int(self._starts[-1])
        rows = []
        line = start
        while line < start + n:
            r = line % cycle
            k = int(np.searchsorted(self._starts, r, side="right")) - 1
            off = r - int(self._starts[k])
            page = self._pages[k]
            take = min(page.shape[0] - off, start + n - line)
            rows.append(page[off:off + take])
            line += take
        out = np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0].copy()
        for d in self.defects:
            l0, l1, c0, c1 = d.box
            if l1 < start or l0 >= start + n:
                continue
            r0, r1 = max(l0, start), min(l1, start + n - 1)
            q0, q1 = max(c0, 0), min(c1, self.width - 1)
            yy, xx = np.ogrid[r0:r1 + 1, q0:q1 + 1]
            disc = (yy - d.line) ** 2 + (xx - d.col) ** 2 <= d.radius ** 2
            out[r0 - start:r1 - start + 1, q0:q1 + 1][disc] = d.value
        return out

    def defect_mask(self, start: int, n: int) -> np.ndarray:
        """Ground-truth mask (bool (n, width)) of the injected defects on lines [start, start+n)."""
        m = np.zeros((n, self.width), bool)
        for d in self.defects:
            l0, l1, c0, c1 = d.box
            r0, r1 = max(l0, start), min(l1, start + n - 1)
            q0, q1 = max(c0, 0), min(c1, self.width - 1)
            if r0 > r1 or q0 > q1:
                continue
            yy, xx = np.ogrid[r0:r1 + 1, q0:q1 + 1]
            m[r0 - start:r1 - start + 1, q0:q1 + 1] |= (yy - d.line) ** 2 + (xx - d.col) ** 2 <= d.radius ** 2
        return m

    # -- streaming ----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.rate > 0

    def _counter(self) -> int:
        """The camera's line counter now: lines produced (read, lost or waiting in its queue)."""
        if self._t0 is None:
            return 0                      # acquisition starts with the first read
        done = self._next_buffer
        if self.rate > 0 and not self._ended:
            done = max(done, int((time.monotonic_ns() - self._t0) * 1e-9 * self.rate) // self.lines)
        line = done * self.lines
        return min(line, self.total) if self.total else line

    def end_index(self) -> Optional[int]:
        return self._stopped_at if self._stopped_at is not None else self._counter()

    @property
    def lines_produced(self) -> int:
        """Ground truth: lines the simulated camera produced until now / until it was closed."""
        return self.end_index()

    def _close(self) -> None:
        self._stopped_at = self._counter()

    def _open(self) -> None:
        if self._pages is None:
            self._load_pages()
        self._stopped_at = None
        now = time.monotonic_ns()
        if self._t0 is not None:
            # the camera kept running while we were away: resume at the current line
            if self.rate > 0:
                due = int((now - self._t0) * 1e-9 * self.rate) // self.lines
                if self.total:
                    due = min(due, -(-self.total // self.lines))
                if due > self._next_buffer:
                    end = min(due * self.lines, self.total) if self.total else due * self.lines
                    self.lines_lost += end - self._next_buffer * self.lines
                    self._next_buffer = due

    def _due_ns(self, k: int) -> int:
        return self._t0 + int((k + 1) * self.lines / self.rate * 1e9)

    def _read(self) -> Optional[Buffer]:
        if self._t0 is None:    # acquisition starts with the first read (like a camera's AcquisitionStart)
            self._t0 = time.monotonic_ns()
        while True:
            k = self._next_buffer
            start = k * self.lines
            if self.total and start >= self.total:
                self._ended = True
                return None
            n = self.lines if not self.total else min(self.lines, self.total - start)
            # faults fire at their line, or at the first buffer after it when a late reader's
            # lost buffers skipped it
            for line in self.disconnects:
                if line not in self._disc_done and line < start + n:
                    self._disc_done.add(line)
                    raise SourceDisconnected(f"{self.uri}: simulated disconnect at line {line}")
            for line, secs in self.stalls:
                if line not in self._stall_done and line < start + n:
                    self._stall_done.add(line)
                    if self._interrupt.wait(secs):
                        return None
                    # a stall delays delivery; the camera buffers what it can (queue) and
                    # loses the rest (handled by the lateness check below)
            if self.rate > 0:
                now = time.monotonic_ns()
                due = self._due_ns(k)
                if now < due:
                    if self._interrupt.wait((due - now) * 1e-9):
                        return None
                else:
                    # buffers that are more than `queue` buffers late were overwritten
                    behind = int((now - self._t0) * 1e-9 * self.rate) // self.lines - k
                    if behind > self.queue:
                        skip = behind - self.queue
                        if self.total:
                            skip = min(skip, max(0, -(-(self.total - start) // self.lines)))
                        self.lines_lost += min(skip * self.lines, (self.total - start) if self.total else skip * self.lines)
                        self._next_buffer += skip
                        continue
            self._next_buffer += 1
            if self.drop_p and self._rng.random() < self.drop_p:
                self.lines_lost += n
                continue
            t = time.monotonic_ns()
            self.lines_emitted += n
            if self.corrupt_p and self._rng.random() < self.corrupt_p:
                self.lines_corrupt += n
                return Buffer(None, start, n, t, "corrupt", "simulated incomplete buffer")
            return Buffer(self.strip_lines(start, n), start, n, t)
