"""The source interface (`Source`, `Buffer`, `CameraMeta`, the errors) and the helpers every
source family shares (URI parameters, pixel formats, image files, camera frame counters).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional
from urllib.parse import parse_qsl

import cv2
import numpy as np

from deploy.contract import PIXEL_FORMATS, channels_of

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


def num_param(params, key, uri, default, cast=int, lo=None):
    if key not in params:
        return default
    try:
        v = cast(params[key])
    except ValueError:
        raise SourceError(f"{uri}: parameter {key}={params[key]!r} is not a valid {cast.__name__}") from None
    if lo is not None and v < lo:
        raise SourceError(f"{uri}: parameter {key}={v} must be >= {lo}")
    return v


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


def image_files(folder: pathlib.Path) -> List[pathlib.Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image(path: pathlib.Path) -> np.ndarray:
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
