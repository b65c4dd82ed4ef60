"""Camera and file sources behind one small interface.

A source is opened from a URI (`open_source(uri)`) and iterated: it yields `Buffer`s, small
dataclasses holding the pixels (uint8, (lines, width) for Mono8 or (lines, width, 3) for RGB8),
the index of the first line (line-scan) or the frame index (area camera), and the capture time
(`time.monotonic_ns()` on this host when the buffer arrived). `meta` (a `CameraMeta`) says the
pixel format, width, lines per buffer / frame height and whether the camera is a line or an
area camera.

Indices are what the pipeline's accounting is built on: for a line camera, consecutive buffers
have consecutive line ranges; a jump means lines the camera produced that never reached us
(the pipeline counts them as dropped). A buffer the driver delivered incomplete comes with
`status="corrupt"` (counted, not scored). A lost connection raises `SourceDisconnected`; the
pipeline closes and reopens the source with backoff.

URIs:
  linesim://?width=4096&rate=20000&lines=64&images=DIR&defects=L:C:R;...&drop=P&corrupt=P
            &stall=LINE:SECONDS&disconnect=LINE[,LINE]&total=N&format=Mono8|RGB8&seed=0&kind=texture
  genicam://PATH.cti[?serial=..&width=..&height=..&format=..&mode=line|area]   (harvesters)
  aravis://127.0.0.1[?width=..&height=..&format=..&rate=..&mode=line|area]      (Aravis 0.8)
  pylon://emu[?serial=..&width=..&height=..&images=DIR&fail=N&mode=..]          (pypylon)
  file.mp4 / rtsp://... / v4l2:///dev/video0 / DIR (images)                     (OpenCV)
"""
from __future__ import annotations

import os
import pathlib
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

import cv2
import numpy as np

PIXEL_FORMATS = ("Mono8", "RGB8")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


class SourceError(ValueError):
    """A source that cannot be opened as asked (bad URI, missing package, no device)."""


class SourceDisconnected(RuntimeError):
    """The camera went away mid-stream; the pipeline reopens it with backoff."""


@dataclass
class CameraMeta:
    pixel_format: str          # "Mono8" or "RGB8"
    width: int
    height: int                # lines per buffer (line camera) or frame height (area camera)
    kind: str = "line"         # "line" or "area"
    rate_hz: Optional[float] = None   # line rate (line camera) or frame rate (area camera)
    name: str = ""

    @property
    def channels(self) -> int:
        return 1 if self.pixel_format == "Mono8" else 3


@dataclass
class Buffer:
    data: Optional[np.ndarray]  # uint8 (lines, width) or (lines, width, 3); None when corrupt
    index: int                  # first line index (line camera) or frame index (area camera)
    lines: int                  # number of lines (rows) this buffer stands for
    t_ns: int                   # time.monotonic_ns() when the buffer was captured / arrived
    status: str = "ok"          # "ok" or "corrupt"
    info: str = ""


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _params(query: str, uri: str, allowed) -> Dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SourceError(f"{uri}: unknown parameter(s) {unknown}; expected some of {sorted(allowed)}")
    return params


def _num(params, key, uri, default, cast=int, lo=None):
    if key not in params:
        return default
    try:
        v = cast(params[key])
    except ValueError:
        raise SourceError(f"{uri}: parameter {key}={params[key]!r} is not a valid {cast.__name__}") from None
    if lo is not None and v < lo:
        raise SourceError(f"{uri}: parameter {key}={v} must be >= {lo}")
    return v


def _fmt(params, uri, default="Mono8"):
    f = params.get("format", default)
    if f not in PIXEL_FORMATS:
        raise SourceError(f"{uri}: format={f!r}; expected one of {PIXEL_FORMATS}")
    return f


def _mode(params, uri, default):
    m = params.get("mode", default)
    if m not in ("line", "area"):
        raise SourceError(f"{uri}: mode={m!r}; expected 'line' or 'area'")
    return m


def to_format(img: np.ndarray, pixel_format: str) -> np.ndarray:
    """uint8 gray (H, W) / (H, W, 1) or RGB (H, W, 3) -> the requested pixel format."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if pixel_format == "Mono8":
        return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)


def _image_files(folder: pathlib.Path) -> List[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_rgb(path: pathlib.Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SourceError(f"{path}: cannot be read as an image")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    if img.ndim == 2:
        return img
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class _IndexTracker:
    """Turns a camera's frame counter (which may wrap at 2**16 and restart on reopen) into
    monotonically increasing buffer numbers."""

    def __init__(self, wrap: int = 1 << 16):
        self.wrap = wrap
        self.last_id: Optional[int] = None
        self.number = -1

    def next(self, frame_id: Optional[int]) -> int:
        if frame_id is None or self.last_id is None:
            self.number += 1
        else:
            d = int(frame_id) - self.last_id
            if d <= 0:
                d = d % self.wrap if self.last_id > self.wrap // 2 else 1
            self.number += max(d, 1)
        self.last_id = None if frame_id is None else int(frame_id)
        return self.number


# ------------------------------------------------------------------------------------------
# base class
# ------------------------------------------------------------------------------------------
class Source:
    """Iterator of `Buffer`s; a context manager. Subclasses implement `_open`, `_close`, `_read`.

    `_read()` returns the next Buffer, or None at the end of the source; it raises
    `SourceDisconnected` when the device is lost. `reopen()` is what the pipeline calls after
    a disconnect: the line/frame indices go on from where the camera is now, so the gap is
    visible as a jump in `index`.
    """

    kind_name = "source"

    def __init__(self, uri: str):
        self.uri = uri
        self.meta: Optional[CameraMeta] = None
        self.is_open = False
        self.buffers_read = 0

    # -- lifecycle ----------------------------------------------------------------------
    def open(self) -> "Source":
        if not self.is_open:
            self._open()
            self.is_open = True
        return self

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            try:
                self._close()
            except Exception:  # closing a lost device may fail; nothing to do about it
                pass

    def reopen(self) -> None:
        self.close()
        self.open()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __iter__(self) -> Iterator[Buffer]:
        self.open()
        while True:
            buf = self._read()
            if buf is None:
                return
            self.buffers_read += 1
            yield buf

    def read(self) -> Optional[Buffer]:
        """Next buffer or None at the end (the pipeline's capture thread calls this)."""
        buf = self._read()
        if buf is not None:
            self.buffers_read += 1
        return buf

    # -- subclass hooks -----------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _read(self) -> Optional[Buffer]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# linesim: a simulated line camera
# ------------------------------------------------------------------------------------------
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

    Lines come from a folder of images (each resized to the camera width, scrolled along the
    strip one after another, cycling) or from `models.synthetic.render_sample` pages when no
    folder is given. Line `i` of the strip is the same pixels whatever the buffering, so the
    ground truth of injected defects (`self.defects`, strip coordinates) is exact.

    Pacing: buffer k (lines [k*lines, (k+1)*lines)) is due at t0 + (k+1)*lines/rate. A consumer
    that falls more than `queue` buffers behind loses the oldest ones, as a camera whose driver
    runs out of buffers does (the index jumps: camera drops). rate=0 means as fast as read.

    Faults: drop=P drops a buffer with probability P (index jump); corrupt=P delivers an
    incomplete buffer; stall=LINE:SECONDS pauses delivery once before that line (nothing lost:
    the buffers arrive late); disconnect=LINE raises SourceDisconnected once when that line is
    reached; after reopen the camera has kept running, so the lines in between are a gap.
    """

    kind_name = "linesim"
    PARAMS = ("width", "rate", "lines", "images", "defects", "drop", "corrupt", "stall",
              "disconnect", "total", "format", "seed", "kind", "queue", "page", "pages")
    MAX_PAGES = 64

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        p = _params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.width = _num(p, "width", uri, 4096, int, 1)
        self.rate = _num(p, "rate", uri, 20000.0, float, 0.0)
        self.lines = _num(p, "lines", uri, 64, int, 1)
        self.total = _num(p, "total", uri, 0, int, 0)          # 0 = endless
        self.drop_p = _num(p, "drop", uri, 0.0, float, 0.0)
        self.corrupt_p = _num(p, "corrupt", uri, 0.0, float, 0.0)
        self.seed = _num(p, "seed", uri, 0, int)
        self.queue = _num(p, "queue", uri, 16, int, 1)
        self.page = _num(p, "page", uri, 0, int, 0)            # synthetic page height (0 = width)
        self.pixel_format = _fmt(p, uri, "Mono8")
        self.synthetic_kind = p.get("kind", "texture")
        self.images_dir = pathlib.Path(unquote(p["images"])) if p.get("images") else None
        if self.images_dir is not None:
            if not self.images_dir.is_dir():
                raise SourceError(f"{uri}: images={self.images_dir} is not a folder")
            self.image_files = _image_files(self.images_dir)
            if not self.image_files:
                raise SourceError(f"{uri}: images={self.images_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        else:
            self.image_files = []
            try:
                from models.synthetic import KINDS
            except ImportError:  # pragma: no cover - models.synthetic is part of this package
                raise SourceError(f"{uri}: no images= folder given and models.synthetic is missing") from None
            if self.synthetic_kind not in KINDS:
                raise SourceError(f"{uri}: kind={self.synthetic_kind!r}; expected one of {KINDS}")
        self.defects = self._parse_defects(p.get("defects", ""), uri)
        self.stalls = self._parse_pairs(p.get("stall", ""), uri, "stall")
        try:
            self.disconnects = sorted(int(x) for x in p.get("disconnect", "").split(",") if x.strip())
        except ValueError:
            raise SourceError(f"{uri}: disconnect= expects line indices separated by ','") from None
        self.meta = CameraMeta(self.pixel_format, self.width, self.lines, "line",
                               self.rate or None, f"linesim {self.width}px")
        self.n_pages = _num(p, "pages", uri, 4, int, 1)
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
            if len(vals) not in (3, 4) or vals[2] < 1:
                raise SourceError(f"{uri}: defects entry {part!r}; expected LINE:COL:RADIUS[:VALUE]")
            out.append(InjectedDefect(*vals))
        return out

    @staticmethod
    def _parse_pairs(text: str, uri: str, name: str) -> List[Tuple[int, float]]:
        out = []
        for part in filter(None, (s.strip() for s in text.replace(",", ";").split(";"))):
            try:
                a, b = part.split(":")
                out.append((int(a), float(b)))
            except ValueError:
                raise SourceError(f"{uri}: {name} entry {part!r}; expected LINE:SECONDS") from None
        return out

    # -- content ------------------------------------------------------------------------
    def _load_pages(self) -> None:
        """Decode / render the page cycle once, before the clock starts (no stalls later)."""
        pages = []
        if self.image_files:
            for f in self.image_files[:self.MAX_PAGES]:
                img = _read_rgb(f)
                h = max(1, int(round(img.shape[0] * self.width / img.shape[1])))
                img = cv2.resize(img, (self.width, h), interpolation=cv2.INTER_AREA
                                 if img.shape[1] > self.width else cv2.INTER_LINEAR)
                pages.append(to_format(img, self.pixel_format))
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
    def _open(self) -> None:
        if self._pages is None:
            self._load_pages()
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
                return None
            n = self.lines if not self.total else min(self.lines, self.total - start)
            for line in self.disconnects:
                if line not in self._disc_done and start <= line < start + n:
                    self._disc_done.add(line)
                    raise SourceDisconnected(f"{self.uri}: simulated disconnect at line {line}")
            for line, secs in self.stalls:
                if line not in self._stall_done and start <= line < start + n:
                    self._stall_done.add(line)
                    time.sleep(secs)
                    # a stall delays delivery; the camera buffers what it can (queue) and
                    # loses the rest (handled by the lateness check below)
            if self.rate > 0:
                now = time.monotonic_ns()
                due = self._due_ns(k)
                if now < due:
                    time.sleep((due - now) * 1e-9)
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


# ------------------------------------------------------------------------------------------
# OpenCV: video files, rtsp://, v4l2://, image folders
# ------------------------------------------------------------------------------------------
class OpenCVSource(Source):
    """Area frames from OpenCV (video file, rtsp://, v4l2:///dev/videoN) or an image folder."""

    kind_name = "opencv"

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        q = "" if u.scheme == "rtsp" else u.query   # an rtsp URL's query belongs to the camera
        p = _params(q, uri, ("format", "loop", "rate"))
        p.update({k: str(v) for k, v in overrides.items()})
        self.pixel_format = _fmt(p, uri, "RGB8")
        self.loop = _num(p, "loop", uri, 0, int, 0)
        self.rate = _num(p, "rate", uri, 0.0, float, 0.0)
        if u.scheme == "rtsp":
            self.target, self.files = uri, None
        elif u.scheme == "v4l2":
            self.target, self.files = unquote(u.path), None
            if not self.target:
                raise SourceError(f"{uri}: expected v4l2:///dev/videoN")
        else:
            path = pathlib.Path(unquote(u.path))
            if path.is_dir():
                self.files = _image_files(path)
                if not self.files:
                    raise SourceError(f"{uri}: folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
                self.target = path
            elif path.is_file():
                self.target, self.files = path, None
            else:
                raise SourceError(f"{uri}: no such file or folder")
        self._cap = None
        self._i = 0
        self._t_last = None

    def _open(self) -> None:
        if self.files is not None:
            first = to_format(_read_rgb(self.files[0]), self.pixel_format)
        else:
            src = self.target
            if isinstance(src, str) and src.startswith("/dev/video"):
                self._cap = cv2.VideoCapture(src, cv2.CAP_V4L2)
            else:
                self._cap = cv2.VideoCapture(str(src))
            if not self._cap.isOpened():
                raise SourceError(f"{self.uri}: OpenCV cannot open it")
            ok, frame = self._cap.read()
            if not ok:
                raise SourceError(f"{self.uri}: OpenCV opened it but read no frame")
            self._pending = frame
            first = to_format(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), self.pixel_format)
            fps = self._cap.get(cv2.CAP_PROP_FPS)
            self.rate = self.rate or 0.0
            self._fps = fps if fps and fps > 0 else None
        self.meta = CameraMeta(self.pixel_format, int(first.shape[1]), int(first.shape[0]), "area",
                               self.rate or None, str(self.target))

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _pace(self):
        if self.rate > 0:
            now = time.monotonic()
            if self._t_last is not None:
                wait = self._t_last + 1.0 / self.rate - now
                if wait > 0:
                    time.sleep(wait)
            self._t_last = time.monotonic()

    def _read(self) -> Optional[Buffer]:
        self._pace()
        if self.files is not None:
            n = len(self.files)
            if self._i >= n * max(self.loop, 1):   # loop=N plays the folder N times
                return None
            img = _read_rgb(self.files[self._i % n])
        else:
            if getattr(self, "_pending", None) is not None:
                frame, self._pending = self._pending, None
                ok = True
            else:
                ok, frame = self._cap.read()
            if not ok:
                if isinstance(self.target, str) and (self.target.startswith("rtsp") or self.target.startswith("/dev/")):
                    raise SourceDisconnected(f"{self.uri}: no frame (stream lost)")
                return None
            img = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        img = to_format(img, self.pixel_format)
        i = self._i
        self._i += 1
        t = time.monotonic_ns()
        if img.shape[:2] != (self.meta.height, self.meta.width):
            img = cv2.resize(img, (self.meta.width, self.meta.height), interpolation=cv2.INTER_AREA)
        return Buffer(np.ascontiguousarray(img), i, img.shape[0], t)


# ------------------------------------------------------------------------------------------
# GenTL producers via harvesters
# ------------------------------------------------------------------------------------------
def _require_harvesters():
    """The optional GenTL stack, imported on first use (it is slow to import)."""
    try:
        from harvesters.core import Harvester
    except ImportError:
        raise SourceError("genicam:// sources need harvesters and genicam: "
                          "pip install 'harvesters>=1.4' 'genicam>=1.4'  (or pip install 'edge-ad[cameras]')") from None
    return Harvester


def genicam_simulator_cti() -> Optional[pathlib.Path]:
    """The `viky.cti` GenTL simulator shipped inside the `genicam` wheel, if installed."""
    try:
        import genicam
    except ImportError:
        return None
    p = pathlib.Path(genicam.__file__).parent / "viky.cti"
    return p if p.is_file() else None


def _set_node(nm, name, value, uri):
    try:
        node = getattr(nm, name)
    except Exception:
        raise SourceError(f"{uri}: the camera has no feature {name}") from None
    try:
        node.value = value
    except Exception as e:
        raise SourceError(f"{uri}: cannot set {name}={value!r}: {e}") from None


class GenICamSource(Source):
    """Any GenTL producer (.cti) through harvesters. `mode=line`: Height = lines per buffer."""

    kind_name = "genicam"
    PARAMS = ("serial", "device", "width", "height", "format", "mode", "timeout", "rate")

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        self._Harvester = _require_harvesters()
        u = urlsplit(uri)
        self.cti = pathlib.Path(unquote(u.netloc + u.path))
        if self.cti.suffix != ".cti":
            raise SourceError(f"{uri}: expected genicam://PATH/TO/producer.cti")
        if not self.cti.is_file():
            raise SourceError(f"{uri}: GenTL producer {self.cti} not found")
        p = _params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = _fmt(p, uri, "Mono8")
        self.timeout = _num(p, "timeout", uri, 3.0, float, 0.01)
        self._h = self._ia = None
        self._tracker = _IndexTracker(wrap=1 << 64)

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = _IndexTracker(wrap=1 << 64)
        uri, p = self.uri, self.p
        self._h = self._Harvester()
        self._h.add_file(str(self.cti))
        self._h.update()
        if not self._h.device_info_list:
            raise SourceError(f"{uri}: the producer lists no device")
        if "serial" in p:
            try:
                self._ia = self._h.create({"serial_number": p["serial"]})
            except Exception:
                serials = [d.serial_number for d in self._h.device_info_list]
                raise SourceError(f"{uri}: no device with serial {p['serial']!r}; devices: {serials}") from None
        else:
            self._ia = self._h.create(_num(p, "device", uri, 0, int, 0))
        nm = self._ia.remote_device.node_map
        if self.pixel_format not in tuple(nm.PixelFormat.symbolics):
            raise SourceError(f"{uri}: camera offers PixelFormat {tuple(nm.PixelFormat.symbolics)}, "
                              f"not {self.pixel_format}")
        _set_node(nm, "PixelFormat", self.pixel_format, uri)
        for key, node in (("width", "Width"), ("height", "Height")):
            if key in p:
                _set_node(nm, node, _num(p, key, uri, 0, int, 1), uri)
        has_line_rate = hasattr(nm, "AcquisitionLineRate")
        mode = _mode(p, uri, "line" if has_line_rate else "area")
        rate = None
        try:
            rate = float((nm.AcquisitionLineRate if mode == "line" and has_line_rate
                          else nm.AcquisitionFrameRate).value)
        except Exception:
            pass
        if mode == "line" and rate is not None and not has_line_rate:
            rate = rate * int(nm.Height.value)
        self.meta = CameraMeta(self.pixel_format, int(nm.Width.value), int(nm.Height.value), mode, rate,
                               f"GenTL {self.cti.name}")
        self._ia.start()

    def _close(self) -> None:
        try:
            if self._ia is not None:
                self._ia.stop()
                self._ia.destroy()
        finally:
            self._ia = None
            if self._h is not None:
                self._h.reset()
                self._h = None

    def _read(self) -> Optional[Buffer]:
        try:
            with self._ia.fetch(timeout=self.timeout) as buf:
                t = time.monotonic_ns()
                fid = None
                try:
                    fid = int(buf.frame_id)
                except Exception:
                    pass
                number = self._tracker.next(fid)
                comp = buf.payload.components[0] if buf.payload and buf.payload.components else None
                h, w = self.meta.height, self.meta.width
                if comp is None or comp.data is None or comp.data.size != h * w * self.meta.channels:
                    return Buffer(None, self._index(number), h, t, "corrupt", "incomplete payload")
                data = np.array(comp.data, dtype=np.uint8).reshape((h, w) if self.meta.channels == 1 else (h, w, 3))
                return Buffer(data, self._index(number), h, t)
        except Exception as e:
            if "Timeout" in type(e).__name__ or "timeout" in str(e).lower():
                raise SourceDisconnected(f"{self.uri}: no buffer within {self.timeout} s") from None
            raise SourceDisconnected(f"{self.uri}: {type(e).__name__}: {e}") from None

    def _index(self, number: int) -> int:
        return number * self.meta.height if self.meta.kind == "line" else number


# ------------------------------------------------------------------------------------------
# Aravis (GigE Vision / USB3 Vision); tests use its fake GigE camera on 127.0.0.1
# ------------------------------------------------------------------------------------------
_Aravis = None
_aravis_error = None


def _require_aravis():
    global _Aravis, _aravis_error
    if _Aravis is not None:
        return _Aravis
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as e:
        _aravis_error = e
        raise SourceError("aravis:// sources need Aravis 0.8 and PyGObject: apt-get install "
                          "gir1.2-aravis-0.8 aravis-tools libgirepository1.0-dev libcairo2-dev "
                          f"pkg-config && pip install 'PyGObject<3.51'  ({e})") from None
    _Aravis = Aravis
    return Aravis


class AravisSource(Source):
    """A GigE Vision camera through Aravis at an explicit address (never broadcast discovery).

    `mode=line` (default): Height = lines per buffer; line index = buffer number * Height.
    """

    kind_name = "aravis"
    PARAMS = ("width", "height", "format", "rate", "mode", "timeout", "buffers", "x", "y")

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        self.address = u.hostname or ""
        if not self.address:
            raise SourceError(f"{uri}: expected aravis://IP-ADDRESS (an explicit address, e.g. 127.0.0.1)")
        import ipaddress

        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise SourceError(f"{uri}: {self.address!r} is not an IP address; aravis:// needs an explicit address") from None
        p = _params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = _fmt(p, uri, "Mono8")
        self.mode = _mode(p, uri, "line")
        self.timeout = _num(p, "timeout", uri, 2.0, float, 0.01)
        self.n_buffers = _num(p, "buffers", uri, 16, int, 2)
        _require_aravis()
        self._cam = self._stream = None
        self._tracker = _IndexTracker()

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = _IndexTracker()
        Aravis = _require_aravis()
        uri, p = self.uri, self.p
        try:
            self._cam = Aravis.Camera.new(self.address)
        except Exception as e:
            raise SourceError(f"{uri}: no GigE Vision camera answers at {self.address}: {e}") from None
        cam = self._cam
        try:
            formats = list(cam.dup_available_pixel_formats_as_strings())
            if self.pixel_format not in formats:
                raise SourceError(f"{uri}: camera offers PixelFormat {formats}, not {self.pixel_format}")
            cam.set_pixel_format_from_string(self.pixel_format)
            x, y, w, h = cam.get_region()
            w = _num(p, "width", uri, w, int, 1)
            h = _num(p, "height", uri, 64 if self.mode == "line" and "height" not in p else h, int, 1)
            cam.set_region(_num(p, "x", uri, 0, int, 0), _num(p, "y", uri, 0, int, 0), w, h)
            _, _, w, h = cam.get_region()
            rate = _num(p, "rate", uri, 0.0, float, 0.0)
            if rate:
                # line mode: rate is the line rate; the fake camera paces frames
                cam.set_frame_rate(rate / h if self.mode == "line" else rate)
            fr = cam.get_frame_rate()
            payload = cam.get_payload()
            self._stream = cam.create_stream(None, None)
            for _ in range(self.n_buffers):
                self._stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            cam.start_acquisition()
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{uri}: camera setup failed: {e}") from None
        self.meta = CameraMeta(self.pixel_format, int(w), int(h), self.mode,
                               fr * h if self.mode == "line" else fr, f"aravis {cam.get_model_name()}")
        self._consecutive_timeouts = 0

    def _close(self) -> None:
        try:
            if self._cam is not None:
                self._cam.stop_acquisition()
        finally:
            self._stream = None
            self._cam = None

    def _read(self) -> Optional[Buffer]:
        Aravis = _Aravis
        buf = self._stream.timeout_pop_buffer(int(self.timeout * 1e6))
        if buf is None:
            raise SourceDisconnected(f"{self.uri}: no buffer within {self.timeout} s")
        t = time.monotonic_ns()
        try:
            number = self._tracker.next(int(buf.get_frame_id()))
            h, w = self.meta.height, self.meta.width
            idx = number * h if self.mode == "line" else number
            if buf.get_status() != Aravis.BufferStatus.SUCCESS:
                return Buffer(None, idx, h, t, "corrupt", str(buf.get_status().value_nick))
            raw = buf.get_data()
            need = h * w * self.meta.channels
            if len(raw) < need:
                return Buffer(None, idx, h, t, "corrupt", f"payload {len(raw)} < {need} bytes")
            arr = np.frombuffer(raw, dtype=np.uint8, count=need)
            data = arr.reshape((h, w) if self.meta.channels == 1 else (h, w, 3)).copy()
            return Buffer(data, idx, h, t)
        finally:
            self._stream.push_buffer(buf)


# ------------------------------------------------------------------------------------------
# Basler pylon (pypylon); tests use PYLON_CAMEMU emulated cameras
# ------------------------------------------------------------------------------------------
def _require_pylon(emulated: int = 0):
    if emulated and "PYLON_CAMEMU" not in os.environ:
        os.environ["PYLON_CAMEMU"] = str(emulated)   # read when pylon's transport layers load
    try:
        from pypylon import pylon
    except ImportError:
        raise SourceError("pylon:// sources need pypylon: pip install 'pypylon>=4.0' "
                          "(or pip install 'edge-ad[cameras]')") from None
    return pylon


class PylonSource(Source):
    """A Basler camera via pypylon; `pylon://emu` opens a pylon camera emulation device.

    images=DIR replays image files (ImageFilename / ImageFileMode); fail=N forces N failed
    buffers right after start (ForceFailedBufferCount) - they arrive as corrupt buffers.
    """

    kind_name = "pylon"
    PARAMS = ("serial", "width", "height", "format", "images", "fail", "mode", "timeout", "rate")

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        self.host = u.hostname or ""
        p = _params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = _fmt(p, uri, "Mono8")
        self.mode = _mode(p, uri, "area")
        self.timeout = _num(p, "timeout", uri, 2.0, float, 0.01)
        self.fail = _num(p, "fail", uri, 0, int, 0)
        if p.get("images") and not pathlib.Path(unquote(p["images"])).is_dir():
            raise SourceError(f"{uri}: images={p['images']} is not a folder")
        self.pylon = _require_pylon(1 if self.host == "emu" else 0)
        self._cam = None
        self._tracker = _IndexTracker(wrap=1 << 64)

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = _IndexTracker(wrap=1 << 64)
        pylon, uri, p = self.pylon, self.uri, self.p
        tl = pylon.TlFactory.GetInstance()
        devs = [d for d in tl.EnumerateDevices()
                if (self.host != "emu" or d.GetDeviceClass() == "BaslerCamEmu")
                and ("serial" not in p or d.GetSerialNumber() == p["serial"])]
        if not devs:
            raise SourceError(f"{uri}: no matching pylon device"
                              + (" (for emulation set PYLON_CAMEMU=1 before start)" if self.host == "emu" else ""))
        try:
            cam = pylon.InstantCamera(tl.CreateDevice(devs[0]))
            cam.Open()
        except Exception as e:
            raise SourceError(f"{uri}: cannot open {devs[0].GetFriendlyName()}: {e}") from None
        self._cam = cam
        try:
            fmt = {"Mono8": "Mono8", "RGB8": "RGB8Packed"}[self.pixel_format]
            if fmt not in cam.PixelFormat.GetSymbolics() and self.pixel_format == "RGB8":
                fmt = "RGB8"
            cam.PixelFormat.SetValue(fmt)
            if "width" in p:
                cam.Width.SetValue(_num(p, "width", uri, 0, int, 1))
            if "height" in p:
                cam.Height.SetValue(_num(p, "height", uri, 0, int, 1))
            if p.get("images"):
                cam.ImageFilename.SetValue(str(pathlib.Path(unquote(p["images"])).resolve()))
                cam.ImageFileMode.SetValue("On")
                try:   # the emulator's test pattern would otherwise win over the files
                    cam.TestImageSelector.SetValue("Off")
                except Exception:
                    pass
            rate = _num(p, "rate", uri, 0.0, float, 0.0)
            if rate:
                fr = rate / cam.Height.GetValue() if self.mode == "line" else rate
                node = cam.AcquisitionFrameRateAbs if hasattr(cam, "AcquisitionFrameRateAbs") else cam.AcquisitionFrameRate
                try:
                    cam.AcquisitionFrameRateEnable.SetValue(True)
                except Exception:
                    pass
                node.SetValue(fr)
            w, h = int(cam.Width.GetValue()), int(cam.Height.GetValue())
            cam.StartGrabbing(pylon.GrabStrategy_OneByOne)
            if self.fail:
                cam.ForceFailedBufferCount.SetValue(self.fail)
                cam.ForceFailedBuffer.Execute()
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{uri}: camera setup failed: {e}") from None
        self.meta = CameraMeta(self.pixel_format, w, h, self.mode, None, f"pylon {devs[0].GetFriendlyName()}")

    def _close(self) -> None:
        if self._cam is not None:
            try:
                self._cam.StopGrabbing()
            finally:
                self._cam.Close()
                self._cam = None

    def _read(self) -> Optional[Buffer]:
        pylon = self.pylon
        if not self._cam.IsGrabbing():
            raise SourceDisconnected(f"{self.uri}: camera stopped grabbing")
        try:
            r = self._cam.RetrieveResult(int(self.timeout * 1000), pylon.TimeoutHandling_Return)
        except Exception as e:  # device removal surfaces as a runtime exception
            raise SourceDisconnected(f"{self.uri}: {e}") from None
        if r is None or not r.IsValid():
            raise SourceDisconnected(f"{self.uri}: no buffer within {self.timeout} s")
        try:
            t = time.monotonic_ns()
            number = self._tracker.next(int(r.GetBlockID()))
            h, w = self.meta.height, self.meta.width
            idx = number * h if self.mode == "line" else number
            if not r.GrabSucceeded():
                return Buffer(None, idx, h, t, "corrupt", r.GetErrorDescription())
            arr = r.GetArray()
            if arr.shape[:2] != (h, w):
                return Buffer(None, idx, h, t, "corrupt", f"shape {arr.shape} != {(h, w)}")
            return Buffer(np.array(arr, dtype=np.uint8), idx, h, t)
        finally:
            r.Release()


# ------------------------------------------------------------------------------------------
# factory
# ------------------------------------------------------------------------------------------
def open_source(uri: str, **overrides) -> Source:
    """Build (not yet open) the source for `uri`; raises SourceError with one clear message."""
    if not isinstance(uri, str) or not uri:
        raise SourceError(f"source URI: expected a non-empty string, got {uri!r}")
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "linesim":
        return LineSimSource(uri, **overrides)
    if scheme == "genicam":
        return GenICamSource(uri, **overrides)
    if scheme == "aravis":
        return AravisSource(uri, **overrides)
    if scheme == "pylon":
        return PylonSource(uri, **overrides)
    if scheme in ("rtsp", "v4l2", "file", "") or (len(scheme) == 1 and os.name == "nt"):
        return OpenCVSource(uri, **overrides)
    raise SourceError(f"{uri}: unknown source scheme {scheme!r}; expected linesim://, genicam://, "
                      "aravis://, pylon://, rtsp://, v4l2://, a video file or an image folder")
