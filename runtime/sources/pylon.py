"""pylon://: Basler cameras through pypylon (the `cameras` extra); pylon://emu uses pylon's camera
emulation (PYLON_CAMEMU).

  pylon://emu[?serial=..&width=..&height=..&images=DIR&fail=N&mode=..]
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Optional
from urllib.parse import unquote, urlsplit

import numpy as np

from .base import (Buffer, CameraMeta, IndexTracker, Source, SourceDisconnected, SourceError, format_param,
                   mode_param, num_param, query_params)


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
        p = query_params(u.query, uri, self.PARAMS)
        p.update({k: str(v) for k, v in overrides.items()})
        self.p = p
        self.pixel_format = format_param(p, uri, "Mono8")
        self.mode = mode_param(p, uri, "area")
        self.timeout = num_param(p, "timeout", uri, 2.0, float, 0.01, 60.0)
        self.fail = num_param(p, "fail", uri, 0, int, 0, 1 << 20)
        for key in ("width", "height"):           # checked before any device I/O
            num_param(p, key, uri, 0, int, 1)
        num_param(p, "rate", uri, 0.0, float, 0.0, 1e8)
        if p.get("images") and not pathlib.Path(unquote(p["images"])).is_dir():
            raise SourceError(f"{uri}: images={p['images']} is not a folder")
        self.pylon = _require_pylon(1 if self.host == "emu" else 0)
        self._cam = None
        self._tracker = IndexTracker(wrap=1 << 64)

    def _open(self) -> None:
        # a reopened device may restart its frame counter: number buffers afresh (the
        # pipeline estimates the gap across the reconnect from time and the line rate)
        self._tracker = IndexTracker(wrap=1 << 64)
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
                cam.Width.SetValue(num_param(p, "width", uri, 0, int, 1))
            if "height" in p:
                cam.Height.SetValue(num_param(p, "height", uri, 0, int, 1))
            if p.get("images"):
                cam.ImageFilename.SetValue(str(pathlib.Path(unquote(p["images"])).resolve()))
                cam.ImageFileMode.SetValue("On")
                try:   # the emulator's test pattern would otherwise win over the files
                    cam.TestImageSelector.SetValue("Off")
                except Exception:
                    pass
            rate = num_param(p, "rate", uri, 0.0, float, 0.0, 1e8)
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
