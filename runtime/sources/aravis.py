"""aravis://ADDRESS: GigE Vision / USB3 Vision cameras through Aravis 0.8 (Debian's aravis-tools,
gir1.2-aravis-0.8 and PyGObject). Always name the camera's address: discovery broadcasts.

  aravis://127.0.0.1[?width=..&height=..&format=..&rate=..&mode=line|area]
"""
from __future__ import annotations

import time
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from .base import (Buffer, CameraMeta, IndexTracker, Source, SourceDisconnected, SourceError, format_param,
                   mode_param, num_param, query_params)


_Aravis = None     # the gi.repository module, imported once


def _require_aravis():
    global _Aravis
    if _Aravis is not None:
        return _Aravis
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as e:
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
        p = query_params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = format_param(p, uri, "Mono8")
        self.mode = mode_param(p, uri, "line")
        self.timeout = num_param(p, "timeout", uri, 2.0, float, 0.01, 60.0)
        self.n_buffers = num_param(p, "buffers", uri, 16, int, 2, 4096)
        for key, lo in (("width", 1), ("height", 1), ("x", 0), ("y", 0)):   # checked before any device I/O
            num_param(p, key, uri, 0, int, lo)
        self.rate = num_param(p, "rate", uri, 0.0, float, 0.0, 1e8)
        _require_aravis()
        self._cam = self._stream = None
        self._tracker = IndexTracker()
        self._end_number = None     # set at close from the buffers still queued in the driver

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = IndexTracker()
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
            w = num_param(p, "width", uri, w, int, 1)
            h = num_param(p, "height", uri, 64 if self.mode == "line" and "height" not in p else h, int, 1)
            cam.set_region(num_param(p, "x", uri, 0, int, 0), num_param(p, "y", uri, 0, int, 0), w, h)
            _, _, w, h = cam.get_region()
            rate = self.rate
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
        self._end_number = None

    def _close(self) -> None:
        try:
            if self._stream is not None and self._tracker.number >= 0:
                self._end_number = self._drain()
            if self._cam is not None:
                self._cam.stop_acquisition()
        finally:
            self._stream = None
            self._cam = None

    def _drain(self) -> int:
        """At close: the buffers the driver still holds were produced but never read; their frame
        ids say how far the camera got (end_index). Returns one past the last buffer number."""
        while True:
            buf = self._stream.try_pop_buffer()
            if buf is None:
                return self._tracker.number + 1
            self._tracker.next(int(buf.get_frame_id()))

    def end_index(self) -> Optional[int]:
        if self._end_number is None:
            return None
        return self._end_number * self.meta.height if self.mode == "line" else self._end_number

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
