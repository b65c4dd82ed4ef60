"""Prometheus metrics of a stream, in prometheus-client's exposition format.

Two sources, one registry per stream (never the process-global one, so several streams - or tests -
in one process do not collide):
  * `StreamHistograms`: latency histograms observed by the pipeline's threads as bands pass
    (line-to-verdict, engine call, queue waits). prometheus-client's Histogram is thread-safe and
    costs about a microsecond per observation.
  * `SnapshotCollector`: counters and gauges read at scrape time from one plain dict - the
    pipeline's `snapshot()` plus "sinks" (`SinkRunner.snapshot()`) - so the pipeline never depends
    on the exposition format.

`MetricsServer` serves `GET /metrics` on 127.0.0.1 unless told otherwise; the UI (runtime.ui)
mounts the same registry. docs/grafana-dashboard.json plots these names.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUES = ("capture", "inference", "post")
SINK_OUTCOMES = ("written", "dropped", "failed", "abandoned")


class StreamHistograms:
    """The histograms one stream observes (not registered anywhere until `metrics_registry`)."""

    def __init__(self):
        self.line_to_verdict = Histogram(
            "edge_ad_line_to_verdict_seconds", "Capture of a band's newest line to its verdict",
            buckets=LATENCY_BUCKETS, registry=None)
        self.engine_call = Histogram("edge_ad_engine_call_seconds", "One batched inference call",
                                     buckets=LATENCY_BUCKETS, registry=None)
        self.queue_wait = Histogram("edge_ad_queue_wait_seconds", "Time an item waited in a stage queue",
                                    ["queue"], buckets=LATENCY_BUCKETS, registry=None)
        self._waits = {q: self.queue_wait.labels(queue=q) for q in QUEUES}

    def wait(self, queue: str, seconds: float) -> None:
        self._waits[queue].observe(max(0.0, seconds))

    def collect(self):
        for h in (self.line_to_verdict, self.engine_call, self.queue_wait):
            yield from h.collect()


class SnapshotCollector:
    """Counters and gauges from `snapshot_fn()` at scrape time (see module docstring)."""

    def __init__(self, snapshot_fn: Callable[[], dict], info: Optional[Dict[str, str]] = None):
        self.snapshot_fn = snapshot_fn
        self.info = {k: str(v) for k, v in (info or {}).items() if v is not None}

    def collect(self):
        s = self.snapshot_fn()
        if not s:
            return

        def counter(name, help_, value, labels=None, samples=None):
            c = CounterMetricFamily(name, help_, labels=list(labels or ()))
            for lab, v in (samples if samples is not None else [((), value)]):
                c.add_metric(list(lab), float(v))
            return c

        def gauge(name, help_, value=None, labels=None, samples=None):
            g = GaugeMetricFamily(name, help_, labels=list(labels or ()))
            for lab, v in (samples if samples is not None else [((), value)]):
                g.add_metric(list(lab), float("nan") if v is None else float(v))
            return g

        if self.info:
            i = InfoMetricFamily("edge_ad_engine", "What runs: engine, model and artifact hashes")
            i.add_metric([], self.info)
            yield i
        yield counter("edge_ad_lines_in", "Lines produced by the camera", s["lines_in"])
        yield counter("edge_ad_lines_scored", "Lines scored", s["lines_scored"])
        yield counter("edge_ad_lines_dropped", "Lines dropped, by reason", None, ["reason"],
                      [((r,), v) for r, v in s["dropped"].items()])
        yield counter("edge_ad_tiles_scored", "Tiles inferred", s["tiles_scored"])
        yield counter("edge_ad_tiles_anomalous", "Tiles over the image threshold", s["tiles_anomalous"])
        yield counter("edge_ad_events", "Defect events", s["events"])
        yield counter("edge_ad_engine_calls", "Inference calls", s["engine_calls"])
        yield counter("edge_ad_engine_errors", "Failed inference calls", s["engine_errors"])
        yield counter("edge_ad_reconnects", "Camera reconnects", s["reconnects"])
        yield gauge("edge_ad_queue_depth", "Items waiting per stage queue", labels=["queue"],
                    samples=[((k,), v) for k, v in s["queues"].items()])
        yield gauge("edge_ad_lines_per_second", "Scored lines per second since start", s["lines_per_s"])
        if "pixel_threshold" in s:
            yield gauge("edge_ad_pixel_threshold", "Pixel threshold in force (raw map scale)", s["pixel_threshold"])
            yield gauge("edge_ad_image_threshold", "Image threshold in force (raw score; NaN = the graph's "
                        "normalized_score >= 0.5)", s.get("image_threshold"))
            yield gauge("edge_ad_paused", "1 while scoring is paused", float(bool(s.get("paused"))))
        sinks = s.get("sinks") or {}
        rec = CounterMetricFamily("edge_ad_sink_records", "Records per sink, by outcome", labels=["sink", "outcome"])
        for name, c in sinks.items():
            for k, v in c.items():
                if k in SINK_OUTCOMES or k in c.get("extra_counters", ()):
                    rec.add_metric([name, k], float(v))
        yield rec
        yield counter("edge_ad_sink_retries", "Write attempts retried per sink", None, ["sink"],
                      [((n,), c["retries"]) for n, c in sinks.items()])
        yield gauge("edge_ad_sink_queue_depth", "Records waiting per sink", labels=["sink"],
                    samples=[((n,), c["queued"]) for n, c in sinks.items()])


def metrics_registry(snapshot_fn: Callable[[], dict], histograms: Optional[StreamHistograms] = None,
                     info: Optional[Dict[str, str]] = None) -> CollectorRegistry:
    """A registry of one stream: its snapshot's counters and gauges, and its histograms."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snapshot_fn, info))
    if histograms is not None:
        reg.register(histograms)
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class MetricsServer:
    """`GET /metrics` from `registry` (or from `snapshot_fn()` alone); binds 127.0.0.1 unless told
    otherwise. The port is bound when built (a port in use fails before anything else starts) and
    served after `start()`; `registry` may be set until then."""

    def __init__(self, snapshot_fn: Optional[Callable[[], dict]] = None, port: int = 0, host: str = "127.0.0.1",
                 registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else metrics_registry(snapshot_fn or dict)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = exposition(owner.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"--metrics-port {port!r}: expected a TCP port 0..65535 (0 = any free port)")
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except (OSError, OverflowError, UnicodeError) as e:
            raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="stream-metrics", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def close(self):
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
