"""The live page: a Starlette app on uvicorn, in a thread of the stream, pushing server-sent events.

What the page reads (anyone who can reach the address):
  GET /                    the page (runtime/ui/static: HTML, JS, CSS shipped in the package)
  GET /api/state           identity (engine, artifact hashes), live figures, recent events, controls
  GET /api/stream          server-sent events: {"type": "status" | "event" | "control" | "strip", ...}
  GET /api/strip.jpg       the scrolling strip with the heat overlay (runtime.strip.WebStrip)
  GET /api/crop/SEQ.png    an event's crop with its heat map and box
  GET /metrics             the stream's Prometheus metrics (the same registry as --metrics-port)
What changes the stream needs the control token (`--ui-token`, else generated and printed at start),
sent as `Authorization: Bearer TOKEN`; a missing token is 401, a wrong one 403:
  POST /api/thresholds     {"pixel_threshold": x, "image_threshold": y, "clear_image_threshold": bool}
  POST /api/pause, /api/resume
  POST /api/save           the thresholds in force -> the artifact's signed runtime section
                           (deploy.artifacts.write_runtime_config; other keys such as calibration kept)

The server binds 127.0.0.1 unless another host is given; the port is bound when `UIServer` is built,
so a port in use stops the stream before anything starts.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import pathlib
import secrets
import socket
import threading
import time
from typing import Callable, Optional

import cv2
import numpy as np

from deploy.artifacts import ArtifactError, read_metadata, write_runtime_config

from ..config import parse_address
from ..control import wall_iso
from ..metrics import CONTENT_TYPE_LATEST, exposition
from ..sinks import Sink, heat_overlay

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:     # optional stack: pip install "edge-ad[ui]"
    uvicorn = None

log = logging.getLogger("runtime.ui")
STATIC = pathlib.Path(__file__).with_name("static")
KEEP_CROPS = 200          # newest event crops held for the page
STATUS_EVERY_S = 0.5      # live figures pushed to each page
STRIP_EVERY_S = 0.25      # the page is told about a new strip picture at most this often
POLL_S = 0.05             # each page's stream looks for new messages this often


def _require_ui():
    if uvicorn is None:
        raise ValueError('--ui needs starlette and uvicorn: pip install "edge-ad[ui]"')


def _jsonable(v):
    """Plain JSON for the page (non-finite numbers become null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return _jsonable(v.item())
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


class UIState:
    """Messages for the pages (a bounded log with sequence numbers) and the newest event crops."""

    def __init__(self, keep: int = 500):
        self.lock = threading.Lock()
        self.log: collections.deque = collections.deque(maxlen=keep)
        self.seq = 0
        self.crops: "collections.OrderedDict[int, bytes]" = collections.OrderedDict()

    def push(self, msg: dict, crop: Optional[bytes] = None) -> None:
        with self.lock:
            self.seq += 1
            self.log.append((self.seq, msg))
            if crop is not None:
                self.crops[msg["event"]["seq"]] = crop
                while len(self.crops) > KEEP_CROPS:
                    self.crops.popitem(last=False)

    def since(self, seq: int):
        with self.lock:
            return [(s, m) for s, m in self.log if s > seq], self.seq

    def recent(self, kind: str, n: int):
        with self.lock:
            return [m for _, m in self.log if m["type"] == kind][-n:]


class UISink(Sink):
    """Events (with a PNG crop) and control records for the pages; never blocks the stream."""

    name = "ui"
    accepts = ("event", "control")
    pixels = True
    queue_size = 512

    def __init__(self, state: UIState):
        self.state = state

    def write(self, record):
        if record["type"] == "control":
            self.state.push({"type": "control", "control": _jsonable(record["control"])})
            return
        ev, crop = record["event"], None
        if record.get("crop") is not None:
            y0, x0 = record["crop_origin"]
            pic = heat_overlay(record["crop"], record.get("map"), record["threshold"], record["map_low"])
            cv2.rectangle(pic, (ev["col_start"] - x0, ev["line_start"] - y0),
                          (ev["col_end"] - x0, ev["line_end"] - y0), (0, 255, 255), 1)
            ok, buf = cv2.imencode(".png", pic)
            crop = buf.tobytes() if ok else None
        self.state.push({"type": "event", "event": _jsonable(ev),
                         "crop": f"/api/crop/{ev['seq']}.png" if crop else None}, crop)


class UIServer:
    """The page's server (see module docstring): build (binds), `attach(...)`, `start()`, `close()`."""

    def __init__(self, address: str, token: Optional[str] = None, option: str = "--ui"):
        _require_ui()
        self.host, port = parse_address(address, option)
        if token is not None and len(token) < 8:
            raise ValueError("--ui-token: expected at least 8 characters")
        self.token = token or secrets.token_urlsafe(18)
        self.token_generated = token is None
        try:
            info = socket.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)[0]
            self.sock = socket.socket(info[0], socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(info[4])
            self.sock.listen(64)
        except (OSError, UnicodeError) as e:
            raise ValueError(f"{option} {address}: cannot listen on {self.host}:{port}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        self.port = self.sock.getsockname()[1]
        self.state = UIState()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[uvicorn.Server] = None
        self._strip_cache = (-1, b"", {})
        self._strip_lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def sink(self) -> UISink:
        return UISink(self.state)

    def attach(self, pipe, snapshot_fn: Callable[[], dict], info: dict, registry=None, strip=None,
               artifact: Optional[pathlib.Path] = None) -> "UIServer":
        """What the page shows and controls: the pipeline (controls, events), `snapshot_fn()` (the
        live figures with the sinks' counters), `info` (engine identity), the metrics registry, the
        WebStrip, and the artifact whose runtime section Save writes (None: Save is refused)."""
        self.pipe, self.snapshot_fn, self.info = pipe, snapshot_fn, _jsonable(info)
        self.registry, self.strip, self.artifact = registry, strip, artifact
        return self

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "UIServer":
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, ws="none")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve(sockets=[self.sock])),
                                        name="stream-ui", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=3)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=2)
        self.sock.close()

    # ---- the app -------------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [Route("/", self.index), Route("/api/state", self.api_state),
                  Route("/api/stream", self.api_stream), Route("/api/strip.jpg", self.api_strip),
                  Route("/api/crop/{seq:int}.png", self.api_crop), Route("/metrics", self.metrics),
                  Route("/api/thresholds", self.api_thresholds, methods=["POST"]),
                  Route("/api/pause", self.api_pause, methods=["POST"]),
                  Route("/api/resume", self.api_resume, methods=["POST"]),
                  Route("/api/save", self.api_save, methods=["POST"]),
                  Mount("/static", StaticFiles(directory=STATIC), name="static")]
        return Starlette(routes=routes)

    def _status(self) -> dict:
        return _jsonable(self.snapshot_fn())

    async def index(self, request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def api_state(self, request: Request):
        with self.pipe.control.lock:
            controls = list(self.pipe.control.records[-50:])
        _, seq = self.state.since(1 << 62)
        return JSONResponse({"info": self.info, "status": self._status(), "seq": seq,
                             "events": self.state.recent("event", 50), "controls": _jsonable(controls),
                             "strip": self._strip_meta(), "save_possible": self.artifact is not None})

    def _strip_meta(self) -> dict:
        st = self.strip
        return {} if st is None else {"ky": st.ky, "kx": st.kx, "lines": st.lines, "width": st.width,
                                      "line_pitch_mm": self.pipe.cfg.line_pitch_mm}

    async def api_stream(self, request: Request):
        try:       # the page passes the log position of its /api/state read: nothing in between is missed
            since = int(request.query_params.get("since", ""))
        except ValueError:
            since = None

        async def gen():
            seq = self.state.since(1 << 62)[1] if since is None else since
            yield "retry: 1000\n\n"
            last_status = last_strip = 0.0
            strip_v = -1
            while not self._closing:
                msgs, seq_now = self.state.since(seq)
                for s, m in msgs:
                    yield f"data: {json.dumps(m)}\n\n"
                    seq = s
                now = time.monotonic()
                if now - last_status >= STATUS_EVERY_S:
                    last_status = now
                    yield f"data: {json.dumps({'type': 'status', 'status': self._status()})}\n\n"
                if self.strip is not None and self.strip.version != strip_v and now - last_strip >= STRIP_EVERY_S:
                    strip_v, last_strip = self.strip.version, now
                    yield f"data: {json.dumps({'type': 'strip', 'v': strip_v})}\n\n"
                await asyncio.sleep(POLL_S)
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def api_strip(self, request: Request):      # sync: rendered in Starlette's thread pool
        if self.strip is None:
            return Response(status_code=404)
        with self._strip_lock:
            v, body, meta = self._strip_cache
            if v != self.strip.version:
                v = self.strip.version
                boxes = [e for e in list(self.pipe.events)[-100:]]
                pic, meta = self.strip.render(self.pipe.pixel_threshold, self.pipe.map_low, boxes)
                body = b"" if pic is None else cv2.imencode(".jpg", pic, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
                self._strip_cache = (v, body, meta)
        if not body:
            return Response(status_code=204)
        hdr = {"Cache-Control": "no-store", "X-Strip": json.dumps(_jsonable(meta))}
        return Response(body, media_type="image/jpeg", headers=hdr)

    async def api_crop(self, request: Request):
        with self.state.lock:
            body = self.state.crops.get(request.path_params["seq"])
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def metrics(self, request: Request):
        if self.registry is None:
            return Response(status_code=404)
        return Response(exposition(self.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- controls (token) ----------------------------------------------------------------
    def _refused(self, request: Request) -> Optional[Response]:
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given:
            return JSONResponse({"error": "this action needs the control token (--ui-token, or the one "
                                          "printed at start)"}, status_code=401)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"error": "wrong control token"}, status_code=403)
        return None

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ValueError("expected a JSON object") from None
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        return body

    async def api_thresholds(self, request: Request):
        if (r := self._refused(request)) is not None:
            return r
        try:
            b = await self._body(request)
            unknown = set(b) - {"pixel_threshold", "image_threshold", "clear_image_threshold"}
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            req = self.pipe.set_thresholds(b.get("pixel_threshold"), b.get("image_threshold"), by="ui",
                                           clear_image_threshold=bool(b.get("clear_image_threshold")))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(_jsonable(req))

    async def api_pause(self, request: Request):
        if (r := self._refused(request)) is not None:
            return r
        self.pipe.pause(by="ui")
        return JSONResponse({"paused": True})

    async def api_resume(self, request: Request):
        if (r := self._refused(request)) is not None:
            return r
        self.pipe.resume(by="ui")
        return JSONResponse({"paused": False})

    def api_save(self, request: Request):      # sync: file I/O in the thread pool
        if (r := self._refused(request)) is not None:
            return r
        if self.artifact is None:
            return JSONResponse({"error": "this engine has no artifact sidecar to save to (a remote "
                                          "engine or a checkpoint)"}, status_code=409)
        snap = self.pipe.control.snapshot()
        try:
            rt = dict(read_metadata(self.artifact, allow_rejected=True).get("runtime") or {})
            rt["pixel_threshold"] = snap["pixel_threshold"]
            if snap["image_threshold"] is None:
                rt.pop("image_threshold", None)
            else:
                rt["image_threshold"] = snap["image_threshold"]
            rt["set_by"] = {"tool": "runtime.stream --ui", "time": wall_iso()}
            side = write_runtime_config(self.artifact, rt)
        except (ArtifactError, ValueError, OSError) as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        self.pipe.record_control("save", None, "ui", pixel_threshold=snap["pixel_threshold"],
                                  image_threshold=snap["image_threshold"], sidecar=str(side))
        return JSONResponse({"saved": str(side), "runtime": _jsonable(rt)})
