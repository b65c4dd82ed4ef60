"""Video files, RTSP streams, V4L2 devices and image folders through OpenCV (area sources).

  file.mp4[?rate=FPS] / rtsp://... / v4l2:///dev/video0 / DIR[?rate=FPS&loop=N] (images)

A recording is replayed like a camera when it is paced: a video file at its own frame rate by
default (rate=FPS overrides it, rate=0 reads as fast as the stream takes frames), an image folder
only when rate= is given. An unpaced recording is not live: the stream waits for it instead of
dropping frames. An image that cannot be decoded (empty, garbage, truncated) is a corrupt frame:
counted, not scored, and the folder goes on.
"""
from __future__ import annotations

import logging
import pathlib
import time
from typing import Optional
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from deploy.contract import IMAGE_SUFFIXES, image_files

from .base import (Buffer, CameraMeta, Source, SourceDisconnected, SourceError, format_param,
                   num_param, query_params, read_image, to_format)

log = logging.getLogger("runtime.sources")


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
        self._rate_given = "rate" in p
        self.camera = u.scheme in ("rtsp", "v4l2")
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
        self.first_index = 0
        self._cap = None
        self._i = 0
        self._t_last = None
        self._pending = None

    @property
    def live(self) -> bool:
        return self.camera or self.rate > 0

    def _first_image(self) -> np.ndarray:
        """The first decodable image of the folder (sets the frame size); damaged ones before it
        are still read, and counted as corrupt, by _read."""
        errors = []
        for f in self.files:
            try:
                return read_image(f)
            except SourceError as e:
                errors.append(str(e))
        raise SourceError(f"{self.uri}: no readable image in the folder (first: {errors[0]})")

    def _open(self) -> None:
        if self.files is not None:
            first = to_format(self._first_image(), self.pixel_format)
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
            if not self.camera and not self._rate_given and fps and 0 < fps < 10_000:
                self.rate = float(fps)     # a recording plays at its own frame rate
        self.meta = CameraMeta(self.pixel_format, int(first.shape[1]), int(first.shape[0]), "area",
                               self.rate or None, str(self.target))

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _pace(self) -> bool:
        """Wait for the next frame's time (rate > 0); False when interrupted."""
        if self.rate > 0 and not self.camera:
            now = time.monotonic()
            if self._t_last is not None:
                wait = self._t_last + 1.0 / self.rate - now
                if wait > 0 and self._interrupt.wait(wait):
                    return False
            self._t_last = time.monotonic()
        return True

    def _read(self) -> Optional[Buffer]:
        if not self._pace():
            return None
        i = self._i
        if self.files is not None:
            n = len(self.files)
            if i >= n * max(self.loop, 1):   # loop=N plays the folder N times
                return None
            self._i += 1
            try:
                img = read_image(self.files[i % n])
            except SourceError as e:      # one bad file is one corrupt frame, never the end
                log.warning("%s", e)
                return Buffer(None, i, self.meta.height, time.monotonic_ns(), "corrupt", str(e))
        else:
            if self._pending is not None:
                frame, self._pending = self._pending, None
                ok = True
            else:
                ok, frame = self._cap.read()
            if not ok:
                if self.camera:
                    raise SourceDisconnected(f"{self.uri}: no frame (stream lost)")
                return None
            self._i += 1
            img = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        img = to_format(img, self.pixel_format)
        t = time.monotonic_ns()
        if img.shape[:2] != (self.meta.height, self.meta.width):
            img = cv2.resize(img, (self.meta.width, self.meta.height), interpolation=cv2.INTER_AREA)
        return Buffer(np.ascontiguousarray(img), i, img.shape[0], t)
