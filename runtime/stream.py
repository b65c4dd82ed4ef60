"""`python -m runtime.stream --engine ARTIFACT --source URI [options]`: stream a camera through an engine.

Library first: `run_stream(engine, source_uri, ...) -> summary dict`; `main()` only parses
arguments, installs Ctrl-C / SIGTERM handlers and calls it. Everything that can be checked is
checked before the camera, the engine or a file is opened (options, the output folder, the
metrics port, the webhook URL), then the source's parameters, the engine, their compatibility and
the memory the buffers need; a bad start prints one line, exits with code 2 and writes no summary.
At start the engine's hashes, versions and parity verdict are printed (and kept in the summary).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import pathlib
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, Union

from deploy import Engine, EngineError, load_engine
from deploy.contract import ENGINE_BACKENDS
from deploy.remote import RemoteEngine

from .accounting import format_status
from .calibrate import Calibration
from .calibrate import describe as describe_calibration
from .config import DEFAULT_LATENCY_BUDGET_MS
from .pipeline import Pipeline, StreamConfig
from .metrics import MetricsServer, metrics_registry
from .sinks import JsonlSink, OverlaySink, PreviewSink, SinkRunner, WebhookSink, check_http_url
from .sources import SourceError, open_source

STATUS_RECORD_S = 0.25     # live figures to the sinks that take them (MQTT status, OPC UA counters)


class StreamError(ValueError):
    """A user error that stops the stream at start (bad URI, missing engine, mismatch); its message
    is one line (line breaks in quoted user input are escaped)."""

    def __init__(self, message):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def prepare_out_dir(out_dir) -> Optional[pathlib.Path]:
    """The output folder, created and proven writable; StreamError (one line) otherwise."""
    if out_dir is None:
        return None
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StreamError(f"--out {out}: is a file, expected a folder (or a path to create one)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise StreamError(f"--out {out}: not a writable folder ({e.strerror or e})") from None
    for name in ("events.jsonl", "summary.json", "preview.png", "overlays"):
        if (out / name).exists() and (out / name).is_dir() != (name == "overlays"):
            raise StreamError(f"--out {out}: {name} exists and is a {'file' if name == 'overlays' else 'folder'}")
    return out


def describe_engine(pipe: Pipeline) -> List[str]:
    """The start lines: what runs (hashes, versions, parity verdict) and which thresholds apply."""
    eng = pipe.engine
    i = eng.integrity()
    short = lambda h: (str(h)[:16] + "...") if h else "-"   # noqa: E731
    vers = i.get("versions") or {}
    lines = [f"engine: {eng.path} ({eng.backend}, model {eng.meta.get('model')}) "
             f"sha256 {short(i.get('artifact_sha256') or i.get('weights_sha256'))} "
             f"metadata sha256 {short(i.get('metadata_sha256') or i.get('meta_sha256'))} "
             f"format_version {i.get('format_version')} parity {i.get('parity') or 'not recorded'}",
             "versions: " + (", ".join(f"{k} {v}" for k, v in sorted(vers.items())) or "not recorded")]
    img = "normalized_score >= 0.5" if pipe.image_threshold is None else f"score >= {pipe.image_threshold:g}"
    lines.append(f"thresholds: pixel {pipe.pixel_threshold:g} (from {pipe.threshold_source}), image {img}; "
                 f"latency budget {'none' if pipe.budget_ns is None else f'{pipe.budget_ns / 1e6:g} ms'}"
                 + ("" if pipe.live else " (recording: read as fast as taken, nothing dropped)"))
    cal = eng.runtime_config.get("calibration")
    if pipe.threshold_source == "runtime section" and isinstance(cal, dict):
        try:
            lines.append("calibration: " + describe_calibration(Calibration(**cal)))
        except (TypeError, KeyError, ValueError):   # written by another tool: shown as stored
            lines.append(f"calibration: {json.dumps(cal)[:300]}")
    return lines


def engine_info(pipe: Pipeline) -> dict:
    """Identity of what runs (the /metrics info metric and the live page)."""
    eng = pipe.engine
    i = eng.integrity()
    return {"backend": eng.backend, "model": eng.meta.get("model"), "path": str(eng.path),
            "artifact_sha256": i.get("artifact_sha256") or i.get("weights_sha256"),
            "metadata_sha256": i.get("metadata_sha256") or i.get("meta_sha256"),
            "format_version": i.get("format_version"), "parity": i.get("parity"),
            "threshold_source": pipe.threshold_source}


def run_stream(engine: Union[str, pathlib.Path, Engine], source_uri: str, *, backend: Optional[str] = None,
               config: Optional[StreamConfig] = None, duration_s: Optional[float] = None,
               out_dir=None, metrics_port: Optional[int] = None, metrics_host: str = "127.0.0.1",
               webhook: Optional[str] = None, console: Optional[Callable[[str], None]] = None,
               status_every_s: float = 1.0, stop_event: Optional[threading.Event] = None,
               threads: int = 0, device: str = "cpu", on_start: Optional[Callable[[Pipeline], None]] = None,
               buffers: str = "auto", allow_rejected: bool = False, ui: Optional[str] = None,
               ui_token: Optional[str] = None, ui_strip_lines: int = 100_000, mqtt: Optional[str] = None,
               mqtt_outbox: int = 10_000, opcua: Optional[str] = None, reject_offset_lines: int = 0,
               **config_kw) -> dict:
    """Stream `source_uri` through `engine` until the source ends, `duration_s` passes or
    `stop_event` is set. Writes events.jsonl, overlays/, preview.png and summary.json under
    `out_dir` when given; serves the live page (`ui` = "HOST:PORT", runtime.ui), publishes to MQTT
    (`mqtt` = "mqtt://HOST:PORT/TOPIC", runtime.mqtt) and OPC UA (`opcua` = "HOST:PORT",
    runtime.opcua) when asked. Returns the summary (see `Pipeline.summary`; "sinks" holds each
    sink's counters, "listening" every address the stream served on).

    Raises StreamError (one clear message) for anything wrong at start; nothing has been written
    to `out_dir` then.
    """
    try:
        cfg = config or StreamConfig(**config_kw)
        if duration_s is not None and not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s)
                                           and duration_s >= 0):
            raise ValueError(f"--duration {duration_s!r}: expected a finite number of seconds >= 0")
        if webhook:
            check_http_url(webhook)
        if mqtt:
            from .mqtt import parse_mqtt_url       # the plant and page modules load only when asked for
            parse_mqtt_url(mqtt)
        if isinstance(reject_offset_lines, bool) or not isinstance(reject_offset_lines, int) \
                or not 0 <= reject_offset_lines < 1 << 40:
            raise ValueError(f"--reject-offset-lines {reject_offset_lines!r}: expected an integer >= 0")
    except ValueError as e:
        raise StreamError(str(e)) from None
    out = prepare_out_dir(out_dir)
    servers = []       # bound before anything else starts, closed last
    source = eng = runner = metrics = page = plc = None
    try:
        metrics = MetricsServer(None, metrics_port, metrics_host) if metrics_port is not None else None
        servers.append(metrics)
        if ui:
            from .strip import WebStrip
            from .ui import UIServer
            page = UIServer(ui, ui_token)
        servers.append(page)
        if opcua:
            from .opcua import OpcUaSink
            plc = OpcUaSink(opcua, reject_offset_lines)
        source = open_source(source_uri)
        source.open()
        if not isinstance(engine, Engine):
            tile = cfg.tile
            eng = load_engine(engine, backend=backend,
                              frame_hw=(tile, cfg.tile_w or tile) if tile else None,
                              frame_channels=source.meta.channels, threads=threads, device=device,
                              buffers=buffers, allow_rejected=allow_rejected)
        else:
            eng = engine
        pipe = Pipeline(eng, source, cfg).setup()
        sinks = []
        if out is not None:
            sinks += [JsonlSink(out / "events.jsonl"), OverlaySink(out / "overlays"),
                      PreviewSink(out / "preview.png")]
        if webhook:
            sinks.append(WebhookSink(webhook))
        if mqtt:
            from .mqtt import MqttSink
            sinks.append(MqttSink(mqtt, outbox=mqtt_outbox, reject_offset_lines=reject_offset_lines))
        if plc is not None:
            sinks.append(plc)
        strip = None
        if page is not None:
            sinks.append(page.sink())
            strip = WebStrip(source.meta.width, source.meta.channels, lines=ui_strip_lines)
            pipe.on_band = strip.on_band(pipe)
        runner = SinkRunner(sinks).start() if sinks else None
        pipe.sinks = runner
        if console:
            for line in describe_engine(pipe):
                console(line)
        pipe.start()
    except (SourceError, EngineError, ValueError, OSError) as e:
        if runner is not None:
            runner.close(timeout=0.5)
        elif plc is not None:
            plc.close()
        if source is not None:
            source.close()
        if eng is not None and not isinstance(engine, Engine):
            eng.close()
        for srv in servers:
            if srv is not None:
                srv.close()
        raise StreamError(str(e) if not isinstance(e, OSError) else f"{getattr(e, 'filename', '')}: "
                          f"{e.strerror or e}") from None

    def snapshot() -> dict:
        d = pipe.snapshot()
        d["sinks"] = runner.snapshot() if runner is not None else {}
        return d

    listening = []
    try:
        info = engine_info(pipe)
        registry = metrics_registry(snapshot, pipe.stats.hist, info)
        if metrics is not None:
            metrics.registry = registry
            metrics.start()
            listening.append(f"http://{metrics.host}:{metrics.port}/metrics")
            if console:
                console(f"metrics: {listening[-1]}")
        if page is not None:
            artifact = eng.path if eng.backend not in ("torch", "remote") else None
            page.attach(pipe, snapshot, info, registry, strip, artifact).start()
            listening.append(page.url)
            if console:
                console(f"ui: {page.url}" + (f"#token={page.token}  (control token {page.token})"
                                             if page.token_generated else "  (control token from --ui-token)"))
        if plc is not None:
            listening.append(plc.endpoint)
            if console:
                console(f"opcua: {plc.endpoint}")
        if on_start is not None:
            on_start(pipe)
        t0 = time.monotonic()
        next_status = t0 + status_every_s
        next_record = t0
        while pipe.running():
            if stop_event is not None and stop_event.is_set():
                break
            if duration_s is not None and time.monotonic() - t0 >= duration_s:
                break
            pipe.wait(0.05)
            now = time.monotonic()
            if runner is not None and now >= next_record:
                runner.offer_status(snapshot())
                next_record = now + STATUS_RECORD_S
            if console and now >= next_status:
                console(format_status(snapshot()))
                next_status += status_every_s
    finally:
        summary = pipe.finish()
        if runner is not None:
            runner.offer_preview(pipe, force=True)
            runner.offer_status(summary)
            summary["sinks"] = runner.close()
        else:
            summary["sinks"] = {}
        summary["listening"] = listening
        if metrics is not None:
            summary["metrics_port"] = metrics.port
        for srv in servers:
            if srv is not None:
                srv.close()
        if not isinstance(engine, Engine):
            eng.close()
        if out is not None:
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if console:
        console(format_status(summary))
    return summary


def open_remote(uri: str):
    """A RemoteEngine (deploy.remote) for a served model; StreamError when unreachable."""
    try:
        return RemoteEngine.from_uri(uri)
    except ValueError as e:
        raise StreamError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block) and exits 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _budget(text: str) -> Optional[float]:
    v = float(text)
    return None if v == 0 else v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime.stream", description=__doc__.splitlines()[0])
    eng = p.add_mutually_exclusive_group(required=True)
    eng.add_argument("--engine", help="model.onnx | model.engine | model.pt2 | model.pt")
    eng.add_argument("--remote", help="a served engine: grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL "
                                      "(runtime.serve / Triton; see deploy.remote)")
    p.add_argument("--source", required=True, help="linesim://... genicam://X.cti aravis://IP pylon://emu "
                                                   "file.mp4 rtsp://... v4l2:///dev/video0 DIR")
    p.add_argument("--backend", default=None, help=f"auto (default), {', '.join(ENGINE_BACKENDS[:-1])}")
    p.add_argument("--allow-rejected", action="store_true",
                   help="run an artifact whose sidecar says the parity gate rejected it (refused otherwise)")
    p.add_argument("--tile", type=int, default=None, help="tile size (default: the engine's frame size)")
    p.add_argument("--stride", type=int, default=None, help="tile stride along the strip (default 3/4 tile)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--overload", choices=("drop-oldest", "block"), default="drop-oldest",
                   help="a live camera faster than the engine: evict the oldest queued buffers "
                        "(default) or wait (the camera's own buffers then overflow)")
    p.add_argument("--latency-budget-ms", type=_budget, default=DEFAULT_LATENCY_BUDGET_MS,
                   help="live sources: lines whose verdict cannot come within this many ms of their "
                        f"band's capture are dropped and counted as late (default {DEFAULT_LATENCY_BUDGET_MS:g}; "
                        "0 = no budget)")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until the source ends / Ctrl-C)")
    p.add_argument("--out", default=None, help="folder for events.jsonl, overlays/, preview.png, summary.json")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--line-pitch-mm", type=float, default=None, help="material travel per line (mm)")
    p.add_argument("--pixel-pitch-mm", type=float, default=None, help="pixel size across the width (mm)")
    p.add_argument("--pixel-threshold", type=float, default=None,
                   help="override the artifact's pixel threshold (runtime section, else score_stats.map_threshold)")
    p.add_argument("--image-threshold", type=float, default=None,
                   help="override the image threshold on the raw score (default: the runtime section, "
                        "else normalized_score >= 0.5)")
    p.add_argument("--min-area", type=int, default=1)
    p.add_argument("--webhook", default=None, help="POST each event as JSON to this URL (own queue, "
                                                   "2 s timeout, 3 retries; never stalls the stream)")
    g = p.add_argument_group("on the line: live page, MQTT, OPC UA (bound to 127.0.0.1 unless a host is given)")
    g.add_argument("--ui", default=None, metavar="HOST:PORT",
                   help="serve the live operator page (strip, events, live charts, thresholds, pause), e.g. 127.0.0.1:8080")
    g.add_argument("--ui-token", default=None, help="control token the page needs to change anything "
                                                    "(default: generated and printed at start)")
    g.add_argument("--ui-strip-lines", type=int, default=100_000, help="lines of web the page's strip shows")
    g.add_argument("--mqtt", default=None, metavar="mqtt://HOST:PORT/TOPIC",
                   help="publish events (TOPIC/event), status (TOPIC/status) and controls (TOPIC/control), QoS 1")
    g.add_argument("--mqtt-outbox", type=int, default=10_000, help="MQTT messages kept until the broker acknowledges "
                                                                 "them (full: dropped and counted)")
    g.add_argument("--opcua", default=None, metavar="HOST:PORT", help="serve an OPC UA server (last verdict, counters, "
                                                                     "last event, reject pulse), e.g. 127.0.0.1:4840")
    g.add_argument("--reject-offset-lines", type=int, default=0,
                   help="lines between the camera and the ejector: reject_line = event line_start + this")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = backend default)")
    p.add_argument("--device", default="cpu", help="torch / aoti backends: cpu or cuda[:N] (frames are "
                                                   "resized and normalised on that device, inside the engine)")
    p.add_argument("--buffers", default="auto", choices=("auto", "pycuda", "cuda-python", "torch"),
                   help="tensorrt backend: device buffers (auto = pycuda, else cuda-python, else torch)")
    p.add_argument("--quiet", action="store_true")
    return p


def keep_rss_at_working_set() -> bool:
    """glibc raises its mmap threshold to the largest block freed so far; from then on freed
    buffers (tiles, maps: hundreds of KB each) stay in the heap and a long stream's RSS ratchets up
    to its largest burst (a stall, a reconnect). A fixed threshold (glibc's initial 128 KiB) maps
    each large buffer and returns it when freed. For the CLI process only; False where there is no
    glibc mallopt."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024))    # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:      # --help, or a bad option (already reported in one line)
        return e.code
    keep_rss_at_working_set()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    remote = None
    try:
        if not 0 <= args.threads <= 1024:
            raise StreamError(f"--threads {args.threads}: expected 0 (backend default) .. 1024")
        cfg = StreamConfig(tile=args.tile, stride=args.stride, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, overload=args.overload,
                           pixel_threshold=args.pixel_threshold, image_threshold=args.image_threshold,
                           min_area=args.min_area, line_pitch_mm=args.line_pitch_mm,
                           pixel_pitch_mm=args.pixel_pitch_mm, latency_budget_ms=args.latency_budget_ms)
        console = None if args.quiet else (lambda s: print(s, flush=True))
        if args.remote:
            remote = open_remote(args.remote)
        summary = run_stream(remote or args.engine, args.source, backend=args.backend, config=cfg,
                             duration_s=args.duration, out_dir=args.out, metrics_port=args.metrics_port,
                             metrics_host=args.metrics_host, webhook=args.webhook, console=console,
                             stop_event=stop, threads=args.threads, device=args.device,
                             buffers=args.buffers, allow_rejected=args.allow_rejected, ui=args.ui,
                             ui_token=args.ui_token, ui_strip_lines=args.ui_strip_lines, mqtt=args.mqtt,
                             mqtt_outbox=args.mqtt_outbox, opcua=args.opcua,
                             reject_offset_lines=args.reject_offset_lines)
    except (StreamError, ValueError) as e:
        print(f"error: {StreamError(e)}", file=sys.stderr)
        return 2
    except OSError as e:      # e.g. the disk filled up while writing the summary
        print(f"error: {getattr(e, 'filename', None) or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if remote is not None:
            remote.close()
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
