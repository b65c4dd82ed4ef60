"""Line accounting and latency statistics of a stream (shared by the pipeline, the console line,
/metrics and the summary).

The invariant: lines_in == lines_scored + sum(dropped.values()), each dropped line under one
reason of DROP_REASONS (runtime/pipeline.py says when each applies).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Dict, Optional

import numpy as np

from .metrics import StreamHistograms

DROP_REASONS = ("camera_drop", "reconnect_gap", "corrupt", "overload", "late", "engine_error", "paused",
                "shutdown")


class Latencies:
    """Bounded reservoir of latency samples (ms) for percentiles: `cap` samples in an array
    allocated (and touched) up front, so a long stream's memory does not creep while it fills."""

    def __init__(self, cap: int = 100_000, seed: int = 0):
        self.cap, self.n = cap, 0
        self._buf = np.full(cap, np.nan)
        self.recent = collections.deque(maxlen=2048)
        self.rng = np.random.default_rng(seed)

    @property
    def samples(self) -> np.ndarray:
        return self._buf[:min(self.n, self.cap)]

    def add(self, v: float) -> None:
        self.recent.append(v)
        if self.n < self.cap:
            self._buf[self.n] = v
        else:
            j = int(self.rng.integers(0, self.n + 1))
            if j < self.cap:
                self._buf[j] = v
        self.n += 1

    @staticmethod
    def pct(values, qs=(50, 95, 99)) -> Dict[str, Optional[float]]:
        if not len(values):
            return {f"p{q}": None for q in qs}
        a = np.asarray(values, dtype=np.float64)
        return {f"p{q}": float(np.percentile(a, q)) for q in qs}


class Stats:
    """Counters shared by the stages (one lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines_in = 0
        self.lines_scored = 0
        self.dropped = {r: 0 for r in DROP_REASONS}
        self.buffers_in = 0
        self.frames_in = 0
        self.tiles_scored = 0
        self.bands_scored = 0
        self.tiles_anomalous = 0
        self.events = 0
        self.engine_errors = 0
        self.engine_calls = 0
        self.engine_time_s = 0.0
        self.reconnects = 0
        self.corrupt_buffers = 0
        self.late_after_inference = 0     # lines counted `late` after their band was inferred
        self.latency = Latencies()        # capture of a band's newest line -> verdict
        self.age = Latencies(seed=1)      # capture of a band's oldest owned line -> verdict
        self.hist = StreamHistograms()    # the same times (and engine calls, queue waits) for /metrics
        self.t_start = time.monotonic()
        self.t_end = None

    def drop(self, reason: str, lines: int) -> None:
        if lines:
            with self.lock:
                self.dropped[reason] += int(lines)

    @property
    def lines_dropped(self) -> int:
        return sum(self.dropped.values())


def format_status(s: dict) -> str:
    """One console line from `Pipeline.snapshot()`."""
    lat = s["latency_ms"]
    f = lambda v: "-" if v is None else f"{v:.0f}"   # noqa: E731
    drops = " ".join(f"{k}={v}" for k, v in s["dropped"].items() if v)
    q = s["queues"]
    return (f"[{s['elapsed_s']:6.1f}s] {s['lines_per_s']:9.0f} lines/s {s['tiles_per_s']:7.1f} tiles/s | "
            f"latency p50/p95/p99 {f(lat['p50'])}/{f(lat['p95'])}/{f(lat['p99'])} ms | "
            f"q cap/inf/post {q['capture']}/{q['inference']}/{q['post']} | "
            f"in {s['lines_in']} scored {s['lines_scored']} dropped {s['lines_dropped']}"
            + (f" ({drops})" if drops else "") + f" | events {s['events']}")
