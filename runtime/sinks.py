"""Where verdicts go: JSON-lines events, PNG overlays, a rolling strip preview, a webhook (and, in
their own modules, MQTT, OPC UA and the live page).

A `Sink` has two methods: `write(record)` (a dict with "type": "event", "preview", "status" or
"control"; it may block or raise) and `close()`; `accepts` names the record types it wants. `SinkRunner` gives every sink
its own bounded queue and thread, so no sink can stall the pipeline or another sink: `offer_*`
never waits - a full queue drops the record and counts it; a write that raises is retried with
backoff (`retries`, `backoff_s`) and then counted as failed; `close()` gives the queues a deadline
and counts what is still queued as `abandoned`. `SinkRunner.snapshot()` is one plain dict of
counters per sink (the summary and /metrics read it). A sink with a bounded outbox of its own
(MQTT) raises `SinkOverflow` when it is full: the record is counted `dropped`, not retried; a
sink's `counters()` adds its own figures (e.g. acknowledged deliveries) to its entry.

Record types: "event" (a defect: the event dict with its sequence number and capture / verdict
times, a crop and its map), "preview" (the newest strip rows and their map, at most every
`preview_every_s` of each sink), "status" (the pipeline snapshot, from the stream's main loop),
"control" (a threshold change, pause or resume, runtime.control).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlsplit

import cv2
import numpy as np

from deploy.contract import map_unit

log = logging.getLogger("runtime.sinks")


class SinkOverflow(Exception):
    """Raised by a sink whose own bounded outbox is full: the record is dropped and counted."""


class Sink:
    """Base: `write(record)` and `close()`; a context manager. Class attributes say how the runner
    treats it: `accepts` (record types), `pixels` (event records with the crop around the defect
    and its map; others get the event alone, so a stuck sink's full queue stays small), `queue_size`,
    `retries` / `backoff_s` (a write that raises is tried again after backoff_s, 2 x backoff_s, ...),
    `preview_every_s` (preview records at most this often)."""

    name = "sink"
    accepts = ("event",)
    pixels = False          # event records carry the strip crop and its map ("crop", "map")
    queue_size = 256
    retries = 0
    backoff_s = 0.2
    preview_every_s = 1.0

    def write(self, record: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def counters(self) -> Dict[str, int]:
        """The sink's own counters (added to its snapshot entry and to /metrics)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class JsonlSink(Sink):
    """One JSON object per defect event, flushed per line; operator actions (threshold changes,
    pause, resume) as lines with a "control" key."""

    name = "events.jsonl"

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    accepts = ("event", "control")

    def write(self, record):
        self._f.write(json.dumps(record["event" if record["type"] == "event" else "control"], sort_keys=True) + "\n")
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

    name = "overlays"
    pixels = True

    def __init__(self, folder, max_files: int = 500):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_files = int(max_files)
        self.written = 0

    def write(self, record):
        if record.get("crop") is None or self.written >= self.max_files:
            return
        ev, (y0, x0) = record["event"], record["crop_origin"]
        pic = heat_overlay(record["crop"], record.get("map"), record["threshold"], record["map_low"])
        cv2.rectangle(pic, (ev["col_start"] - x0, ev["line_start"] - y0),
                      (ev["col_end"] - x0, ev["line_end"] - y0), (0, 255, 255), 1)
        name = f"event_{ev['line_start']:010d}_{ev['col_start']:05d}.png"
        if not cv2.imwrite(str(self.folder / name), pic):
            raise OSError(f"cannot write {self.folder / name}")
        self.written += 1


class PreviewSink(Sink):
    """A rolling strip preview (recent lines, map overlaid), replaced atomically."""

    name = "preview"
    accepts = ("preview",)
    queue_size = 2          # only the newest pictures matter

    def __init__(self, path, max_width: int = 1024):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_width = int(max_width)

    def write(self, record):
        pic = heat_overlay(record["image"], record.get("map"), record["threshold"], record["map_low"])
        if pic.shape[1] > self.max_width:
            f = self.max_width / pic.shape[1]
            pic = cv2.resize(pic, (self.max_width, max(1, int(pic.shape[0] * f))), interpolation=cv2.INTER_AREA)
        tmp = self.path.with_name(self.path.stem + ".tmp.png")
        if not cv2.imwrite(str(tmp), pic):
            raise OSError(f"cannot write {tmp}")
        os.replace(tmp, self.path)


def check_http_url(url: str, option: str = "--webhook") -> str:
    """An http(s)://HOST[:PORT]/... URL, or ValueError naming the option."""
    try:
        u = urlsplit(url)
        u.port                   # raises for a port that is not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"{option} {url!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{option} {url!r}: expected an http:// or https:// URL with a host")
    return url


class WebhookSink(Sink):
    """HTTP POST of each event as JSON, `timeout_s` per attempt, retried with backoff."""

    name = "webhook"
    retries = 3
    backoff_s = 0.25

    def __init__(self, url: str, timeout_s: float = 2.0):
        self.url, self.timeout_s = check_http_url(url), float(timeout_s)

    def write(self, record):
        body = json.dumps(record["event"]).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            r.read()


COUNTERS = ("written", "dropped", "failed", "retries", "abandoned")


class _Lane:
    """One sink's bounded queue, thread and counters. Every record offered ends in exactly one
    counter: written, failed, dropped (queue full) or abandoned (still queued or being written when
    the runner closed); the lock makes taking a record and closing exclusive, so none is lost
    between them."""

    def __init__(self, sink: Sink, stop: threading.Event):
        self.sink, self.stop = sink, stop
        self.size = max(1, int(sink.queue_size))
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.taken = 0              # records taken off the queue by the thread
        self.done = 0               # of those, records whose outcome is counted
        self.closed = False
        self.last_error: Optional[str] = None
        self.thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def offer(self, rec: dict) -> None:
        with self.cond:
            if self.closed or len(self.items) >= self.size:
                self.counts["dropped"] += 1
                return
            self.items.append(rec)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.items or self.stop.is_set(), timeout=0.25)
                if self.closed or (not self.items and self.stop.is_set()):
                    return
                if not self.items:
                    continue
                rec = self.items.popleft()
                self.taken += 1
            outcome = self._write(rec)
            with self.cond:
                if self.closed:       # counted as abandoned when the runner closed
                    return
                self.counts[outcome] += 1
                self.done += 1

    def _write(self, rec: dict) -> str:
        sink = self.sink
        for attempt in range(sink.retries + 1):
            try:
                sink.write(rec)
                return "written"
            except SinkOverflow:
                return "dropped"
            except Exception as e:   # a failing sink is counted and retried; it never stops others
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt == sink.retries or self.stop.wait(sink.backoff_s * 2 ** attempt):
                    break
                self.counts["retries"] += 1
        if self.counts["failed"] % 100 == 0:   # the first failure and every 100th, not one line per event
            log.warning("sink %s: write failed (%s)", sink.name, self.last_error)
        return "failed"

    def close(self) -> None:
        """Stop counting: what is queued or being written now is abandoned."""
        with self.cond:
            self.closed = True
            in_flight = self.taken - self.done
            self.counts["abandoned"] += len(self.items) + in_flight
            self.items.clear()
            self.cond.notify_all()

    def snapshot(self) -> dict:
        try:
            extra = dict(self.sink.counters())
        except Exception as e:   # a sink's own figures must never break the snapshot
            extra = {"counters_error": f"{type(e).__name__}: {e}"}
        with self.cond:
            d = {**self.counts, "queued": len(self.items), "last_error": self.last_error, **extra}
        if extra:
            d["extra_counters"] = sorted(k for k, v in extra.items() if isinstance(v, (int, float)))
        return d


class SinkRunner:
    """Each sink behind its own bounded queue and thread; `offer_*` never blocks."""

    def __init__(self, sinks: Sequence[Sink], preview_rows: int = 512):
        self.sinks = list(sinks)
        self.stop_event = threading.Event()
        self.lanes: List[_Lane] = [_Lane(s, self.stop_event) for s in self.sinks]
        self.preview_rows = int(preview_rows)
        self._last_preview = {id(lane): 0.0 for lane in self.lanes}

    def start(self):
        for lane in self.lanes:
            lane.thread.start()
        return self

    def _wants(self, kind: str) -> List[_Lane]:
        return [lane for lane in self.lanes if kind in lane.sink.accepts]

    # called from the postprocess thread ---------------------------------------------------
    def offer_event(self, pipe, ev, event: Optional[dict] = None) -> None:
        """`ev` the DefectEvent, `event` its dict as published (the pipeline adds seq and times;
        default ev.to_dict())."""
        lanes = self._wants("event")
        if not lanes:
            return
        lean = {"type": "event", "event": ev.to_dict() if event is None else event}
        for lane in lanes:
            if not lane.sink.pixels:
                lane.offer(lean)
        lanes = [lane for lane in lanes if lane.sink.pixels]
        if not lanes:
            return
        rec = {**lean, "threshold": pipe.pixel_threshold, "map_low": pipe.map_low, "crop": None}
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
        for lane in lanes:
            lane.offer(rec)

    def offer_preview(self, pipe, force: bool = False) -> None:
        now = time.monotonic()
        lanes = [lane for lane in self._wants("preview")
                 if force or now - self._last_preview[id(lane)] >= lane.sink.preview_every_s]
        if not lanes:
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
        for lane in lanes:
            self._last_preview[id(lane)] = now
            lane.offer(rec)

    def offer_status(self, snapshot: dict) -> None:
        """The pipeline's live figures (from the stream's main loop, not the pipeline's threads)."""
        for lane in self._wants("status"):
            lane.offer({"type": "status", "status": snapshot})

    def offer_control(self, control: dict) -> None:
        """An operator action as the pipeline recorded it (runtime.control)."""
        for lane in self._wants("control"):
            lane.offer({"type": "control", "control": control})

    # counters and shutdown -----------------------------------------------------------------
    def snapshot(self) -> Dict[str, dict]:
        """{sink name: {written, dropped, failed, retries, abandoned, queued, last_error}}."""
        out: Dict[str, dict] = {}
        for lane in self.lanes:
            name, k = lane.sink.name, 2
            while name in out:
                name, k = f"{lane.sink.name}#{k}", k + 1
            out[name] = lane.snapshot()
        return out

    def close(self, timeout: float = 1.0) -> Dict[str, dict]:
        """Let the sinks finish what is queued for at most `timeout` s (retries stop waiting),
        count what is left as abandoned, close the sinks whose thread ended; the final counters."""
        self.stop_event.set()
        for lane in self.lanes:
            with lane.cond:
                lane.cond.notify_all()
        deadline = time.monotonic() + timeout
        for lane in self.lanes:
            if lane.thread.is_alive():
                lane.thread.join(max(0.0, deadline - time.monotonic()))
        for lane in self.lanes:
            lane.close()
            if lane.thread.is_alive():   # stuck in a write (a peer that never answers): leave it
                log.warning("sink %s still busy at close; %d records abandoned", lane.sink.name,
                            lane.counts["abandoned"])
                continue
            try:
                lane.sink.close()
            except Exception as e:
                log.warning("closing sink %s failed: %s", lane.sink.name, e)
        return self.snapshot()
