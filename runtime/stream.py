"""`python -m runtime.stream --engine ARTIFACT --source URI [options]`: stream a camera through an engine.

Library first: `run_stream(engine, source_uri, ...) -> summary dict`; `main()` only parses
arguments, installs Ctrl-C / SIGTERM handlers and calls it. A bad URI, a missing engine or an
engine / camera mismatch prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Callable, Optional, Union

from deploy import Engine, EngineError, load_engine
from deploy.contract import ENGINE_BACKENDS
from deploy.remote import RemoteEngine

from .accounting import format_status
from .pipeline import Pipeline, StreamConfig
from .sinks import JsonlSink, MetricsServer, OverlaySink, PreviewSink, SinkRunner, WebhookSink
from .sources import SourceError, open_source


class StreamError(ValueError):
    """A user error that stops the stream at start (bad URI, missing engine, mismatch)."""


def run_stream(engine: Union[str, pathlib.Path, Engine], source_uri: str, *, backend: Optional[str] = None,
               config: Optional[StreamConfig] = None, duration_s: Optional[float] = None,
               out_dir=None, metrics_port: Optional[int] = None, metrics_host: str = "127.0.0.1",
               webhook: Optional[str] = None, console: Optional[Callable[[str], None]] = None,
               status_every_s: float = 1.0, stop_event: Optional[threading.Event] = None,
               threads: int = 0, device: str = "cpu", on_start: Optional[Callable[[Pipeline], None]] = None,
               buffers: str = "auto", **config_kw) -> dict:
    """Stream `source_uri` through `engine` until the source ends, `duration_s` passes or
    `stop_event` is set. Writes events.jsonl, overlays/, preview.png and summary.json under
    `out_dir` when given. Returns the summary (see `Pipeline.summary`).

    Raises StreamError (one clear message) for a bad URI, a missing engine or a mismatch.
    """
    cfg = config or StreamConfig(**config_kw)
    try:
        source = open_source(source_uri)
        source.open()
    except SourceError as e:
        raise StreamError(str(e)) from None
    try:
        if not isinstance(engine, Engine):
            tile = cfg.tile
            eng = load_engine(engine, backend=backend,
                              frame_hw=(tile, cfg.tile_w or tile) if tile else None,
                              frame_channels=source.meta.channels, threads=threads, device=device,
                              buffers=buffers)
        else:
            eng = engine
        sinks = []
        out = pathlib.Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            sinks += [JsonlSink(out / "events.jsonl"), OverlaySink(out / "overlays"),
                      PreviewSink(out / "preview.png")]
        if webhook:
            sinks.append(WebhookSink(webhook))
        runner = SinkRunner(sinks).start() if sinks else None
        pipe = Pipeline(eng, source, cfg, sinks=runner)
        pipe.start()
    except (SourceError, EngineError, ValueError) as e:
        source.close()
        raise StreamError(str(e)) from None
    metrics = None
    try:
        if metrics_port is not None:
            metrics = MetricsServer(pipe.snapshot, metrics_port, metrics_host).start()
            if console:
                console(f"metrics: http://{metrics.host}:{metrics.port}/metrics")
        if on_start is not None:
            on_start(pipe)
        t0 = time.monotonic()
        next_status = t0 + status_every_s
        while pipe.running():
            if stop_event is not None and stop_event.is_set():
                break
            if duration_s is not None and time.monotonic() - t0 >= duration_s:
                break
            pipe.wait(0.05)
            if console and time.monotonic() >= next_status:
                console(format_status(pipe.snapshot()))
                next_status += status_every_s
    finally:
        summary = pipe.finish()
        if runner is not None:
            runner.offer_preview(pipe, force=True)
            runner.close()
            summary["sinks"] = {"dropped_previews": runner.dropped_previews,
                                "dropped_events": runner.dropped_events}
            for s in runner.sinks:
                if isinstance(s, WebhookSink):
                    summary["sinks"]["webhook"] = {"sent": s.sent, "failed": s.failed}
        if metrics is not None:
            summary["metrics_port"] = metrics.port
            metrics.close()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.stream", description=__doc__.splitlines()[0])
    eng = p.add_mutually_exclusive_group(required=True)
    eng.add_argument("--engine", help="model.onnx | model.engine | model.pt2 | model.pt")
    eng.add_argument("--remote", help="a served engine: grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL "
                                      "(runtime.serve / Triton; see deploy.remote)")
    p.add_argument("--source", required=True, help="linesim://... genicam://X.cti aravis://IP pylon://emu "
                                                   "file.mp4 rtsp://... v4l2:///dev/video0 DIR")
    p.add_argument("--backend", default=None, help=f"auto (default), {', '.join(ENGINE_BACKENDS[:-1])}")
    p.add_argument("--tile", type=int, default=None, help="tile size (default: the engine's frame size)")
    p.add_argument("--stride", type=int, default=None, help="tile stride along the strip (default 3/4 tile)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--overload", choices=("drop-oldest", "block"), default="drop-oldest")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until the source ends / Ctrl-C)")
    p.add_argument("--out", default=None, help="folder for events.jsonl, overlays/, preview.png, summary.json")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--line-pitch-mm", type=float, default=None, help="material travel per line (mm)")
    p.add_argument("--pixel-pitch-mm", type=float, default=None, help="pixel size across the width (mm)")
    p.add_argument("--pixel-threshold", type=float, default=None, help="override metadata map_threshold")
    p.add_argument("--min-area", type=int, default=1)
    p.add_argument("--webhook", default=None, help="POST each event as JSON to this URL")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = backend default)")
    p.add_argument("--device", default="cpu", help="torch / aoti backends: cpu or cuda[:N] (frames are "
                                                   "resized and normalised on that device, inside the engine)")
    p.add_argument("--buffers", default="auto", choices=("auto", "pycuda", "cuda-python", "torch"),
                   help="tensorrt backend: device buffers (auto = pycuda, else cuda-python, else torch)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    remote = None
    try:
        cfg = StreamConfig(tile=args.tile, stride=args.stride, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, overload=args.overload,
                           pixel_threshold=args.pixel_threshold, min_area=args.min_area,
                           line_pitch_mm=args.line_pitch_mm, pixel_pitch_mm=args.pixel_pitch_mm)
        console = None if args.quiet else (lambda s: print(s, flush=True))
        if args.remote:
            remote = open_remote(args.remote)
        summary = run_stream(remote or args.engine, args.source, backend=args.backend, config=cfg,
                             duration_s=args.duration, out_dir=args.out, metrics_port=args.metrics_port,
                             metrics_host=args.metrics_host, webhook=args.webhook, console=console,
                             stop_event=stop, threads=args.threads, device=args.device,
                             buffers=args.buffers)
    except (StreamError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if remote is not None:
            remote.close()
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
