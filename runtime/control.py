"""Run-time controls of a stream: thresholds changed while it runs, pause / resume of scoring, and
the record of every change.

Any thread (the live page, a test, a script) calls `Controls.set_thresholds` / `pause` / `resume`;
they only validate and queue. The pipeline's own threads apply them: a threshold change at the start
of the next band the postprocess thread handles - the stitcher's pixel threshold for every strip row
not yet final and the image threshold for that band's tiles, i.e. from the next tile on - and a pause
in the tiling thread (what it already holds is scored; buffers that arrive while paused are counted
`paused` and the camera keeps running). Each applied change becomes a control record:

    {"control": "thresholds" | "pause" | "resume" | "save", "time": ISO-8601 UTC, "t_unix": the same
     in Unix seconds, "t_s": seconds since the
     stream started, "by": who asked, "from_line": first strip line it applies to,
     "pixel_threshold": ..., "image_threshold": ..., "previous": {...} (thresholds only)}

kept in the summary's `controls`, written to events.jsonl and published by the MQTT sink and the page.
"""
from __future__ import annotations

import datetime
import math
import threading
import time
from typing import List, Optional

MAX_RECORDS = 1000     # the summary keeps the newest records (a change every second for 15 min)


def wall_iso(t: Optional[float] = None) -> str:
    """ISO-8601 UTC with milliseconds."""
    return datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc) \
        .isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _threshold(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} {v!r}: expected a finite number")
    return float(v)


class Controls:
    """Thread-safe requests and their record (see module docstring)."""

    def __init__(self, pixel_threshold: float, image_threshold: Optional[float], t_start: float):
        self.lock = threading.Lock()
        self.pixel_threshold = float(pixel_threshold)
        self.image_threshold = None if image_threshold is None else float(image_threshold)
        self.t_start = t_start                 # time.monotonic() of the stream's start
        self._pending: Optional[dict] = None   # a threshold change not yet applied
        self._pause_wanted = False
        self.paused = False                    # as the tiling thread applies it
        self.records: List[dict] = []
        self.n_records = 0

    # -- requests (any thread) -----------------------------------------------------------
    def set_thresholds(self, pixel_threshold=None, image_threshold=None, by: str = "api",
                       clear_image_threshold: bool = False) -> dict:
        """Ask for new thresholds (raw map / score scale; None keeps one; `clear_image_threshold`
        returns the image verdict to the graph's normalized_score >= 0.5). ValueError for a
        non-finite value. Returns the request; its record appears once a band applied it."""
        with self.lock:
            cur_p = self._pending["pixel_threshold"] if self._pending else self.pixel_threshold
            cur_i = self._pending["image_threshold"] if self._pending else self.image_threshold
        pix = cur_p if pixel_threshold is None else _threshold("pixel_threshold", pixel_threshold)
        img = None if clear_image_threshold else (
            cur_i if image_threshold is None else _threshold("image_threshold", image_threshold))
        req = {"control": "thresholds", "by": str(by)[:64], "requested": wall_iso(),
               "pixel_threshold": pix, "image_threshold": img}
        with self.lock:
            self._pending = req
        return dict(req)

    def pause(self, by: str = "api") -> None:
        with self.lock:
            self._pause_wanted = True
            self._pause_by = str(by)[:64]

    def resume(self, by: str = "api") -> None:
        with self.lock:
            self._pause_wanted = False
            self._pause_by = str(by)[:64]

    # -- applied by the pipeline's threads ----------------------------------------------
    def take_thresholds(self) -> Optional[dict]:
        with self.lock:
            req, self._pending = self._pending, None
        return req

    def pause_change(self) -> Optional[str]:
        """"pause" / "resume" when the wanted state differs from the applied one, else None."""
        with self.lock:
            if self._pause_wanted == self.paused:
                return None
            return "pause" if self._pause_wanted else "resume"

    def record(self, kind: str, from_line: Optional[int], by: str = "api", **fields) -> dict:
        """Store (and return) the record of a change the pipeline just applied."""
        now = time.time()
        rec = {"control": kind, "time": wall_iso(now), "t_unix": round(now, 6), "t_s": round(time.monotonic() - self.t_start, 4),
               "by": by, "from_line": from_line, **fields}
        with self.lock:
            if kind == "thresholds":
                rec["previous"] = {"pixel_threshold": self.pixel_threshold,
                                   "image_threshold": self.image_threshold}
                self.pixel_threshold = fields["pixel_threshold"]
                self.image_threshold = fields["image_threshold"]
            elif kind in ("pause", "resume"):
                self.paused = kind == "pause"
                rec["by"] = getattr(self, "_pause_by", by)
            self.records.append(rec)
            del self.records[:-MAX_RECORDS]
            self.n_records += 1
        return rec

    def snapshot(self) -> dict:
        with self.lock:
            return {"pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold,
                    "paused": self.paused, "controls": self.n_records}
