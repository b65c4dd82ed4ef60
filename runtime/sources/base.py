"""The source interface (`Source`, `Buffer`, `CameraMeta`, the errors) and the helpers every
source family shares (URI parameters, memory estimates, pixel formats, image files, camera frame
counters).
"""
from __future__ import annotations

import math
import os
import pathlib
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qsl

import cv2
import numpy as np

from deploy.contract import PIXEL_FORMATS, channels_of

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
        return channels_of(self.pixel_format)


@dataclass
class Buffer:
    data: Optional[np.ndarray]  # uint8 (lines, width) or (lines, width, 3); None when corrupt
    index: int                  # first line index (line camera) or frame index (area camera)
    lines: int                  # number of lines (rows) this buffer stands for
    t_ns: int                   # time.monotonic_ns() when the buffer was captured / arrived
    status: str = "ok"          # "ok" or "corrupt"
    info: str = ""


# ---- URI parameters ------------------------------------------------------------------------
def query_params(query: str, uri: str, allowed) -> Dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SourceError(f"{uri}: unknown parameter(s) {unknown}; expected some of {sorted(allowed)}")
    return params


def num_param(params, key, uri, default, cast=int, lo=None, hi=None):
    """params[key] as `cast` (default when absent); floats must be finite; lo <= value <= hi."""
    if key not in params:
        return default
    try:
        v = cast(params[key])
    except (ValueError, OverflowError):
        raise SourceError(f"{uri}: parameter {key}={params[key]!r} is not a valid {cast.__name__}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise SourceError(f"{uri}: parameter {key}={params[key]!r} must be a finite number")
    if lo is not None and v < lo:
        raise SourceError(f"{uri}: parameter {key}={v} must be >= {lo}")
    if hi is not None and v > hi:
        raise SourceError(f"{uri}: parameter {key}={v} must be <= {hi}")
    return v


def prob_param(params, key, uri) -> float:
    """A probability: a finite number in [0, 1] (0 when absent)."""
    return num_param(params, key, uri, 0.0, float, 0.0, 1.0)


# ---- memory estimates ------------------------------------------------------------------------
MEMORY_FRACTION = 0.8     # of the memory available at start that buffers may claim


def available_memory() -> int:
    """Bytes available to new allocations (Linux MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62     # unknown: do not refuse


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def check_fits(parts: List[Tuple[str, int]], where: str) -> int:
    """Refuse (SourceError naming each part's size) buffers that cannot fit in memory; returns
    the total. `parts`: (what, bytes) pairs."""
    need = sum(int(b) for _, b in parts)
    have = available_memory()
    if need > MEMORY_FRACTION * have:
        detail = ", ".join(f"{what} {fmt_bytes(b)}" for what, b in parts)
        raise SourceError(f"{where}: needs {fmt_bytes(need)} of buffers ({detail}) but only "
                          f"{fmt_bytes(have)} of memory is available; use a smaller width, fewer lines "
                          "per buffer or shorter queues")
    return need


def format_param(params, uri, default="Mono8"):
    f = params.get("format", default)
    if f not in PIXEL_FORMATS:
        raise SourceError(f"{uri}: format={f!r}; expected one of {PIXEL_FORMATS}")
    return f


def mode_param(params, uri, default):
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


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"          # the IEND chunk type and its fixed CRC


def damaged_image(data: bytes) -> Optional[str]:
    """Why an encoded image is incomplete, or None. Decoders fill a truncated JPEG with grey and
    only warn, so the end markers are checked: a JPEG's last scan must be followed by its
    end-of-image marker, a PNG must hold its IEND chunk."""
    if not data:
        return "empty file"
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "truncated JPEG (no end-of-image marker after its last scan)"
    if data[:8] == _PNG_MAGIC and _PNG_IEND not in data:
        return "truncated PNG (no IEND chunk)"
    return None


def read_image(path: pathlib.Path) -> np.ndarray:
    """uint8 gray (H, W) or RGB (H, W, 3); SourceError for an unreadable, damaged or truncated file."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot be read ({e.strerror or e})") from None
    why = damaged_image(data)
    if why:
        raise SourceError(f"{path}: {why}")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise SourceError(f"{path}: cannot be decoded as an image")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    if img.ndim == 2:
        return img
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class IndexTracker:
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


# ---- the interface -------------------------------------------------------------------------
class Source:
    """Iterator of `Buffer`s; a context manager. Subclasses implement `_open`, `_close`, `_read`.

    `_read()` returns the next Buffer, or None at the end of the source; it raises
    `SourceDisconnected` when the device is lost. `reopen()` is what the pipeline calls after
    a disconnect: the line/frame indices go on from where the camera is now, so the gap is
    visible as a jump in `index`.
    """

    kind_name = "source"
    # the camera's own counter: index of the first line / frame after acquisition start, when the
    # family knows it (lines lost before the first buffer are then counted); None = unknown
    first_index: Optional[int] = None

    def __init__(self, uri: str):
        self.uri = uri
        self.meta: Optional[CameraMeta] = None
        self.is_open = False
        self.buffers_read = 0
        self._interrupt = threading.Event()

    @property
    def live(self) -> bool:
        """True when the source produces at its own pace (a camera: what the reader does not take
        in time is lost); False when it waits for the reader (a file read as fast as taken)."""
        return True

    def end_index(self) -> Optional[int]:
        """One past the last line (line camera) / frame (area camera) index the camera has produced,
        when it can tell (after close: at acquisition stop); None = unknown. Lines lost after the
        last buffer read are counted from it."""
        return None

    def interrupt(self) -> None:
        """Wake a read that is waiting on pacing or a stall (the stream is stopping); reads that
        would wait return None from then on."""
        self._interrupt.set()

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
