"""OPC UA server (`runtime.stream --opcua 127.0.0.1:4840`, asyncua): verdicts where the PLC listens.

Endpoint opc.tcp://HOST:PORT/edge-ad/ (no security: keep it on 127.0.0.1 or a plant network behind a
gateway), namespace "urn:edge-ad:stream", object Objects/Stream with read-only variables:

  LastVerdict (Boolean), LastVerdictLine (Int64), LastScore (Double)   the newest scored band
  LinesIn, LinesScored, LinesDropped, Events (UInt64), DroppedByReason (String, JSON)
  Paused (Boolean), PixelThreshold, ImageThreshold (Double; NaN = the graph's normalized_score >= 0.5)
  LastEvent (String, JSON of the event), LastEventSeq (UInt64)
  RejectLine (Int64)    the line index at which an ejector --reject-offset-lines downstream of the
                        camera must fire for the newest event: line_start + offset
  RejectLength (Int64)  lines the defect spans (line_end - line_start + 1)
  RejectSeq (UInt64)    the event's seq: a new pulse even when RejectLine repeats
  RecentEvents (String[], JSON) the newest `recent` events: a client that was away reads the ones it
                        missed by seq (events are numbered 1, 2, ... per stream)

Events update LastEvent*/Reject* at once (in order, one write each); counters and the last verdict
come with the status records (4 per second). A client that must see every event subscribes to
LastEvent with a queue (queuesize >= events per publishing interval) and fills gaps from RecentEvents.
The server runs its own asyncio loop in a thread; `write()` waits for the update (2 s at most).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading

from .sinks import Sink
from .config import parse_address

try:
    from asyncua import Server, ua
except ImportError:   # optional stack: pip install "edge-ad[plant]"
    Server = ua = None

log = logging.getLogger("runtime.opcua")
NAMESPACE = "urn:edge-ad:stream"


def _require_asyncua():
    if Server is None:
        raise ValueError('--opcua needs asyncua: pip install "edge-ad[plant]"')


class OpcUaSink(Sink):
    name = "opcua"
    accepts = ("event", "status", "control")
    queue_size = 1024
    retries = 1

    def __init__(self, address: str, reject_offset_lines: int = 0, recent: int = 100):
        _require_asyncua()
        self.host, port = parse_address(address, "--opcua")
        self.reject_offset_lines, self.recent_n = int(reject_offset_lines), int(recent)
        self.recent = []
        for noisy in ("asyncua", "asyncua.server", "asyncua.server.address_space"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stream-opcua", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(port), timeout=30)
        except Exception as e:
            self._stop_loop()
            raise ValueError(f"--opcua {address}: cannot serve OPC UA on {self.host}:{port}: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def _call(self, coro, timeout: float = 2.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, port: int) -> None:
        s = Server()
        await s.init()
        s.set_endpoint(f"opc.tcp://{self.host}:{port}/edge-ad/")
        s.set_server_name("edge-ad stream")
        s.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await s.register_namespace(NAMESPACE)
        obj = await s.nodes.objects.add_object(idx, "Stream")
        V = ua.VariantType
        spec = {"LastVerdict": (False, V.Boolean), "LastVerdictLine": (-1, V.Int64), "LastScore": (math.nan, V.Double),
                "LinesIn": (0, V.UInt64), "LinesScored": (0, V.UInt64), "LinesDropped": (0, V.UInt64),
                "Events": (0, V.UInt64), "DroppedByReason": ("{}", V.String), "Paused": (False, V.Boolean),
                "PixelThreshold": (math.nan, V.Double), "ImageThreshold": (math.nan, V.Double),
                "LastEvent": ("", V.String), "LastEventSeq": (0, V.UInt64), "RejectLine": (-1, V.Int64),
                "RejectLength": (0, V.Int64), "RejectSeq": (0, V.UInt64), "RecentEvents": ([], V.String)}
        self.types = {k: t for k, (_, t) in spec.items()}
        self.nodes = {}
        for name, (value, vt) in spec.items():
            self.nodes[name] = await obj.add_variable(idx, name, ua.Variant(value, vt, is_array=name == "RecentEvents"))
        await s.start()
        self.server = s
        self.port = port if port else s.bserver._server.sockets[0].getsockname()[1]
        self.endpoint = f"opc.tcp://{self.host}:{self.port}/edge-ad/"

    async def _set(self, values: dict) -> None:
        for k, v in values.items():
            vt = self.types[k]
            await self.nodes[k].write_value(ua.Variant(v, vt, is_array=k == "RecentEvents"))

    def write(self, record):
        kind = record["type"]
        if kind == "event":
            ev = dict(record["event"])
            ev["reject_line"] = ev["line_start"] + self.reject_offset_lines
            text = json.dumps(ev, default=str)
            self.recent = (self.recent + [text])[-self.recent_n:]
            self._call(self._set({"LastEvent": text, "LastEventSeq": int(ev["seq"]), "RejectLine": ev["reject_line"],
                                  "RejectLength": ev["line_end"] - ev["line_start"] + 1, "RejectSeq": int(ev["seq"]),
                                  "RecentEvents": list(self.recent)}))
        elif kind == "status":
            s = record["status"]
            vals = {"LinesIn": s["lines_in"], "LinesScored": s["lines_scored"], "LinesDropped": s["lines_dropped"],
                    "Events": s["events"], "DroppedByReason": json.dumps(s["dropped"]),
                    "Paused": bool(s.get("paused")), "PixelThreshold": float(s.get("pixel_threshold", math.nan))}
            it = s.get("image_threshold")
            vals["ImageThreshold"] = math.nan if it is None else float(it)
            lv = s.get("last_verdict")
            if lv:
                vals.update(LastVerdict=bool(lv["anomalous"]), LastVerdictLine=int(lv["line"]),
                            LastScore=float(lv["max_score"]))
            self._call(self._set(vals))
        elif kind == "control" and record["control"]["control"] in ("thresholds", "pause", "resume"):
            c = record["control"]
            vals = {"Paused": c["control"] == "pause"} if c["control"] != "thresholds" else {
                "PixelThreshold": float(c["pixel_threshold"]),
                "ImageThreshold": math.nan if c["image_threshold"] is None else float(c["image_threshold"])}
            self._call(self._set(vals))

    def _stop_loop(self) -> None:
        async def cancel_rest():
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        try:
            self._call(cancel_rest(), timeout=5)
        except Exception:   # a task that would not end: the loop stops anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def close(self):
        try:
            if getattr(self, "server", None) is not None:
                self._call(self.server.stop(), timeout=5)
        except Exception as e:
            log.warning("opcua: stopping the server failed: %s", e)
        finally:
            self._stop_loop()
