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

URIs (one module per source family; `open_source` picks it by the URI's scheme, SOURCES):
  linesim://?width=4096&rate=20000&lines=64&images=DIR&defects=L:C:R;...&drop=P&corrupt=P
            &stall=LINE:SECONDS&disconnect=LINE[,LINE]&total=N&format=Mono8|RGB8&seed=0&kind=texture
  genicam://PATH.cti[?serial=..&width=..&height=..&format=..&mode=line|area]   (harvesters)
  aravis://127.0.0.1[?width=..&height=..&format=..&rate=..&mode=line|area]      (Aravis 0.8)
  pylon://emu[?serial=..&width=..&height=..&images=DIR&fail=N&mode=..]          (pypylon)
  file.mp4 / rtsp://... / v4l2:///dev/video0 / DIR (images)                     (OpenCV)
"""
from __future__ import annotations

import os
from typing import Callable, Dict
from urllib.parse import urlsplit

from deploy.contract import IMAGE_SUFFIXES

from .aravis import AravisSource
from .base import (Buffer, CameraMeta, Source, SourceDisconnected, SourceError,
                   VIDEO_SUFFIXES, to_format)
from .genicam import GenICamSource, genicam_simulator_cti
from .linesim import InjectedDefect, LineSimSource
from .opencv import OpenCVSource
from .pylon import PylonSource

SOURCES: Dict[str, Callable[..., Source]] = {
    "linesim": LineSimSource,
    "genicam": GenICamSource,
    "aravis": AravisSource,
    "pylon": PylonSource,
    "rtsp": OpenCVSource,
    "v4l2": OpenCVSource,
    "file": OpenCVSource,
    "": OpenCVSource,          # a path: video file or image folder
}


def open_source(uri: str, **overrides) -> Source:
    """Build (not yet open) the source for `uri`; raises SourceError with one clear message."""
    if not isinstance(uri, str) or not uri:
        raise SourceError(f"source URI: expected a non-empty string, got {uri!r}")
    scheme = urlsplit(uri).scheme.lower()
    if len(scheme) == 1 and os.name == "nt":     # a drive letter, not a scheme
        scheme = ""
    if scheme not in SOURCES:
        raise SourceError(f"{uri}: unknown source scheme {scheme!r}; expected linesim://, genicam://, "
                          "aravis://, pylon://, rtsp://, v4l2://, a video file or an image folder")
    return SOURCES[scheme](uri, **overrides)


__all__ = ["SOURCES", "open_source", "Source", "Buffer", "CameraMeta", "SourceError", "SourceDisconnected",
           "to_format", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "LineSimSource", "InjectedDefect", "OpenCVSource",
           "GenICamSource", "genicam_simulator_cti", "AravisSource", "PylonSource"]
