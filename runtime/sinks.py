"""Where verdicts go: JSON-lines events, PNG overlays, a rolling strip preview, a webhook, /metrics.

Sinks are context managers with one `write(record)` method; a record is a dict with "type"
("event" or "preview"). `SinkRunner` owns a thread and a bounded queue so that slow disks or
a slow webhook never stall the postprocess stage: events wait (with timeouts), previews are
dropped when the queue is full. `MetricsServer` serves Prometheus text on 127.0.0.1 by default.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import queue
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional, Sequence

import cv2
import numpy as np

from deploy.contract import map_unit

log = logging.getLogger("runtime.sinks")


class Sink:
    """Base: a context manager with one write method."""

    def write(self, record: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlSink(Sink):
    """One JSON object per defect event, flushed per line."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record):
        if record["type"] == "event":
            self._f.write(json.dumps(record["event"], sort_keys=True) + "\n")
            self._f.flush()

    def close(self):
        self._f.close()


def heat_overlay(image: np.ndarray, amap: Optional[np.ndarray], threshold: float, map_low: float = 0.0) -> np.ndarray:
    """BGR uint8 picture: the image with the anomaly map blended in red, from halfway between the
    normal level and the pixel threshold (faint) to half a span above the threshold (full)."""
    img = image if image.ndim == 3 else image[:, :, None]
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if amap is None:
        return bgr
    m = np.nan_to_num(amap.astype(np.float32), neginf=float(map_low))
    a = np.clip(2.0 * map_unit(m, map_low, threshold) - 0.5, 0.0, 1.0)[:, :, None] * 0.6
    red = np.zeros_like(bgr)
    red[:, :, 2] = 255
    return (bgr * (1 - a) + red * a).astype(np.uint8)


class OverlaySink(Sink):
    """PNG per event: the strip around the defect with the map and its box (at most max_files)."""

    def __init__(self, folder, max_files: int = 500):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_files = int(max_files)
        self.written = 0

    def write(self, record):
        if record["type"] != "event" or record.get("crop") is None or self.written >= self.max_files:
            return
        ev, (y0, x0) = record["event"], record["crop_origin"]
        pic = heat_overlay(record["crop"], record.get("map"), record["threshold"], record["map_low"])
        cv2.rectangle(pic, (ev["col_start"] - x0, ev["line_start"] - y0),
                      (ev["col_end"] - x0, ev["line_end"] - y0), (0, 255, 255), 1)
        name = f"event_{ev['line_start']:010d}_{ev['col_start']:05d}.png"
        cv2.imwrite(str(self.folder / name), pic)
        self.written += 1


class PreviewSink(Sink):
    """A rolling strip preview (recent lines, map overlaid), replaced atomically."""

    def __init__(self, path, max_width: int = 1024):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_width = int(max_width)

    def write(self, record):
        if record["type"] != "preview":
            return
        pic = heat_overlay(record["image"], record.get("map"), record["threshold"], record["map_low"])
        if pic.shape[1] > self.max_width:
            f = self.max_width / pic.shape[1]
            pic = cv2.resize(pic, (self.max_width, max(1, int(pic.shape[0] * f))), interpolation=cv2.INTER_AREA)
        tmp = self.path.with_name(self.path.stem + ".tmp.png")
        cv2.imwrite(str(tmp), pic)
        os.replace(tmp, self.path)


class WebhookSink(Sink):
    """HTTP POST of each event as JSON. Failures are counted and logged, never fatal."""

    def __init__(self, url: str, timeout_s: float = 2.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--webhook {url!r}: expected an http:// or https:// URL")
        self.url, self.timeout_s = url, float(timeout_s)
        self.sent = self.failed = 0

    def write(self, record):
        if record["type"] != "event":
            return
        body = json.dumps(record["event"]).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                r.read()
            self.sent += 1
        except (urllib.error.URLError, OSError) as e:
            self.failed += 1
            log.warning("webhook %s failed: %s", self.url, e)


class SinkRunner:
    """Runs sinks on their own thread behind a bounded queue."""

    def __init__(self, sinks: Sequence[Sink], queue_size: int = 256, preview_every_s: float = 1.0,
                 preview_rows: int = 512):
        self.sinks = list(sinks)
        self.q: queue.Queue = queue.Queue(queue_size)
        self.stop_event = threading.Event()
        self.preview_every_s = float(preview_every_s)
        self.preview_rows = int(preview_rows)
        self._last_preview = 0.0
        self.dropped_previews = 0
        self.dropped_events = 0
        self._thread = threading.Thread(target=self._run, name="stream-sinks", daemon=True)

    def start(self):
        self._thread.start()
        return self

    # called from the postprocess thread ---------------------------------------------------
    def offer_event(self, pipe, ev) -> None:
        d = ev.to_dict()
        rec = {"type": "event", "event": d, "threshold": pipe.pixel_threshold, "map_low": pipe.map_low, "crop": None}
        pad = 32
        y0, y1 = ev.line_start - pad, ev.line_end + 1 + pad
        x0, x1 = max(0, ev.col_start - pad), min(pipe.assembler.width, ev.col_end + 1 + pad)
        st = pipe.stitcher
        # rows held by both rolling buffers (image and final map); the event's rows are final
        ya = max(y0, 0, pipe.preview.end - pipe.preview.capacity, st.preview_end - st.keep_rows)
        yb = min(y1, pipe.preview.end, st.preview_end)
        rows = pipe.preview.rows(ya, yb)
        if rows is not None:
            rec["crop"] = rows[:, x0:x1].copy()
            rec["crop_origin"] = (ya, x0)
            m = st.map_rows(ya, yb)
            if m is not None:
                rec["map"] = m[:, x0:x1]
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not self.stop_event.is_set():
            try:
                self.q.put(rec, timeout=0.05)
                return
            except queue.Full:
                continue
        self.dropped_events += 1

    def offer_preview(self, pipe, force: bool = False) -> None:
        now = time.monotonic()
        if not any(isinstance(s, PreviewSink) for s in self.sinks):
            return
        if not force and now - self._last_preview < self.preview_every_s:
            return
        st = pipe.stitcher
        y1 = st.preview_end
        n = min(self.preview_rows, st.keep_rows, y1)
        if n <= 0:
            return
        img = pipe.preview.rows(y1 - n, y1)
        amap = st.map_rows(y1 - n, y1)
        if img is None or amap is None:
            return
        rec = {"type": "preview", "image": img.copy(), "map": amap, "threshold": pipe.pixel_threshold,
               "map_low": pipe.map_low}
        try:
            self.q.put(rec, timeout=1.0) if force else self.q.put_nowait(rec)
            self._last_preview = now
        except queue.Full:
            self.dropped_previews += 1

    # sink thread ---------------------------------------------------------------------------
    def _run(self):
        while not (self.stop_event.is_set() and self.q.empty()):
            try:
                rec = self.q.get(timeout=0.05)
            except queue.Empty:
                continue
            for s in self.sinks:
                try:
                    s.write(rec)
                except Exception as e:  # one bad sink must not stop the others
                    log.warning("sink %s failed: %s", type(s).__name__, e)

    def close(self, timeout: float = 10.0):
        self.stop_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:
                log.warning("closing sink %s failed: %s", type(s).__name__, e)


# ------------------------------------------------------------------------------------------
# Prometheus /metrics
# ------------------------------------------------------------------------------------------
def prometheus_text(s: dict) -> str:
    """Prometheus exposition text from a pipeline snapshot."""
    out: List[str] = []

    def metric(name, typ, help_, samples):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {typ}")
        for labels, v in samples:
            lab = "" if not labels else "{" + ",".join(f'{k}="{v2}"' for k, v2 in labels.items()) + "}"
            out.append(f"{name}{lab} {float('nan') if v is None else v}")

    metric("edge_ad_lines_in_total", "counter", "Lines produced by the camera", [({}, s["lines_in"])])
    metric("edge_ad_lines_scored_total", "counter", "Lines scored", [({}, s["lines_scored"])])
    metric("edge_ad_lines_dropped_total", "counter", "Lines dropped, by reason",
           [({"reason": r}, v) for r, v in s["dropped"].items()])
    metric("edge_ad_tiles_scored_total", "counter", "Tiles inferred", [({}, s["tiles_scored"])])
    metric("edge_ad_events_total", "counter", "Defect events", [({}, s["events"])])
    metric("edge_ad_engine_errors_total", "counter", "Failed inference calls", [({}, s["engine_errors"])])
    metric("edge_ad_reconnects_total", "counter", "Camera reconnects", [({}, s["reconnects"])])
    metric("edge_ad_latency_ms", "summary", "Capture to verdict latency (recent bands)",
           [({"quantile": q}, s["latency_ms"][k]) for q, k in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))])
    metric("edge_ad_queue_depth", "gauge", "Items waiting per queue",
           [({"queue": k}, v) for k, v in s["queues"].items()])
    metric("edge_ad_lines_per_second", "gauge", "Scored lines per second since start", [({}, s["lines_per_s"])])
    return "\n".join(out) + "\n"


class MetricsServer:
    """`GET /metrics` in Prometheus text format; binds 127.0.0.1 unless told otherwise."""

    def __init__(self, snapshot_fn: Callable[[], dict], port: int = 0, host: str = "127.0.0.1"):
        fn = snapshot_fn

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = prometheus_text(fn()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        try:
            self.server = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as e:
            raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port}: {e}") from None
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="stream-metrics", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
