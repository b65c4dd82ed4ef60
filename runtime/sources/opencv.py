"""Video files, RTSP streams, V4L2 devices and image folders through OpenCV (area sources).

  file.mp4 / rtsp://... / v4l2:///dev/video0 / DIR (images)
"""
from __future__ import annotations

import pathlib
import time
from typing import Optional
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from .base import (Buffer, CameraMeta, IMAGE_SUFFIXES, Source, SourceDisconnected, SourceError, format_param,
                   image_files, num_param, query_params, read_image, to_format)


class OpenCVSource(Source):
    """Area frames from OpenCV (video file, rtsp://, v4l2:///dev/videoN) or an image folder."""

    kind_name = "opencv"

    def __init__(self, uri: str, **overrides):
        super().__init__(uri)
        u = urlsplit(uri)
        q = "" if u.scheme == "rtsp" else u.query   # an rtsp URL's query belongs to the camera
        p = query_params(q, uri, ("format", "loop", "rate"))
        p.update({k: str(v) for k, v in overrides.items()})
        self.pixel_format = format_param(p, uri, "RGB8")
        self.loop = num_param(p, "loop", uri, 0, int, 0)
        self.rate = num_param(p, "rate", uri, 0.0, float, 0.0)
        if u.scheme == "rtsp":
            self.target, self.files = uri, None
        elif u.scheme == "v4l2":
            self.target, self.files = unquote(u.path), None
            if not self.target:
                raise SourceError(f"{uri}: expected v4l2:///dev/videoN")
        else:
            path = pathlib.Path(unquote(u.path))
            if path.is_dir():
                self.files = image_files(path)
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
            first = to_format(read_image(self.files[0]), self.pixel_format)
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
            img = read_image(self.files[self._i % n])
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
