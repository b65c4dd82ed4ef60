"""genicam://PRODUCER.cti: any GenTL producer through harvesters (the `cameras` extra).

  genicam://PATH.cti[?serial=..&width=..&height=..&format=..&mode=line|area]
"""
from __future__ import annotations

import pathlib
import time
from typing import Optional
from urllib.parse import unquote, urlsplit

import numpy as np

from .base import (Buffer, CameraMeta, IndexTracker, Source, SourceDisconnected, SourceError, format_param,
                   mode_param, num_param, query_params)


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
        p = query_params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = format_param(p, uri, "Mono8")
        self.timeout = num_param(p, "timeout", uri, 3.0, float, 0.01, 60.0)
        for key, lo in (("width", 1), ("height", 1), ("device", 0)):   # checked before any device I/O
            num_param(p, key, uri, 0, int, lo)
        self._h = self._ia = None
        self._tracker = IndexTracker(wrap=1 << 64)

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = IndexTracker(wrap=1 << 64)
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
            self._ia = self._h.create(num_param(p, "device", uri, 0, int, 0))
        nm = self._ia.remote_device.node_map
        if self.pixel_format not in tuple(nm.PixelFormat.symbolics):
            raise SourceError(f"{uri}: camera offers PixelFormat {tuple(nm.PixelFormat.symbolics)}, "
                              f"not {self.pixel_format}")
        _set_node(nm, "PixelFormat", self.pixel_format, uri)
        for key, node in (("width", "Width"), ("height", "Height")):
            if key in p:
                _set_node(nm, node, num_param(p, key, uri, 0, int, 1), uri)
        has_line_rate = hasattr(nm, "AcquisitionLineRate")
        mode = mode_param(p, uri, "line" if has_line_rate else "area")
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
