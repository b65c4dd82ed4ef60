"""RemoteEngine: an engine whose model runs on a Triton Inference Server (e.g. `runtime.serve`).

    engine = RemoteEngine.from_uri("grpc://127.0.0.1:8001/edge_ad")   # or http://host:8000/model
    out = engine.infer(frames)          # frames uint8 (B, H, W, C) -> anomaly_map, score, normalized_score
    fut = engine.infer_async(frames)    # concurrent.futures.Future of the same dict

Same interface as the local engines (`infer(frames) -> dict of numpy`, `.meta`), so a stream can
swap a local artifact for a remote model with one line. Batches larger than the model's
`max_batch_size` are split and sent concurrently; at most `max_inflight` requests are in flight
per engine (back-pressure), and Triton's dynamic batcher merges requests from many cameras.

URI: `grpc://host[:port]/model[/version]` (default port 8001) or `http://host[:port]/model[/version]`
(default port 8000). Needs `tritonclient` (the `serve` extra).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .contract import (FULL_MAP_NAME, INPUT_NAME, OUTPUT_NAMES, PER_IMAGE_OUTPUTS, TRITON_METADATA_OUTPUT,
                       TRITON_METADATA_SUFFIX)
from .engine import Engine, EngineError

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


class RemoteError(EngineError):
    """The remote model cannot be reached or used; the message names the URI and the problem."""


def _require(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as e:
        raise RemoteError(f"RemoteEngine over {protocol} needs tritonclient: "
                          f"pip install 'tritonclient[{protocol}]' (or edge-ad[serve]) ({e})") from None
    return client


@dataclass(frozen=True)
class RemoteURI:
    protocol: str
    host: str
    port: int
    model: str
    version: str = ""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        v = f"/{self.version}" if self.version else ""
        return f"{self.protocol}://{self.address}/{self.model}{v}"


def parse_uri(uri: str) -> RemoteURI:
    """`grpc://host:port/model[/version]` or `http://...` -> RemoteURI (ValueError when malformed)."""
    p = urllib.parse.urlsplit(str(uri))
    if p.scheme not in DEFAULT_PORTS:
        raise ValueError(f"remote URI {uri!r}: expected grpc://host:port/model or http://host:port/model")
    if not p.hostname:
        raise ValueError(f"remote URI {uri!r}: no host")
    parts = [s for s in p.path.split("/") if s]
    if not parts or len(parts) > 2:
        raise ValueError(f"remote URI {uri!r}: expected the model name (and optionally a version) as the path")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"remote URI {uri!r}: model version {parts[1]!r} is not a number")
    try:
        port = p.port or DEFAULT_PORTS[p.scheme]
    except ValueError:
        raise ValueError(f"remote URI {uri!r}: bad port") from None
    return RemoteURI(p.scheme, p.hostname, port, parts[0], parts[1] if len(parts) == 2 else "")


class RemoteEngine(Engine):
    """Engine interface (infer / infer_async / meta / close) backed by a Triton model."""

    backend = "remote"

    def __init__(self, uri, timeout_s: float = 30.0, max_inflight: int = 4,
                 outputs: Optional[Sequence[str]] = None, wait_ready_s: float = 10.0):
        self.uri = uri if isinstance(uri, RemoteURI) else parse_uri(uri)
        self.timeout_s = float(timeout_s)
        self.max_inflight = max(1, int(max_inflight))
        self._mod = _require(self.uri.protocol)
        self._local = threading.local()
        self._inflight = threading.BoundedSemaphore(self.max_inflight)
        self._pool = cf.ThreadPoolExecutor(max_workers=self.max_inflight,
                                           thread_name_prefix="remote-engine")
        self._closed = False
        try:
            self._connect(wait_ready_s, outputs)
        except Exception:
            self.close()
            raise

    @classmethod
    def from_uri(cls, uri: str, **kwargs) -> "RemoteEngine":
        return cls(uri, **kwargs)

    # ---- setup -----------------------------------------------------------------------
    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.uri.protocol == "grpc":
                c = self._mod.InferenceServerClient(self.uri.address)
            else:
                c = self._mod.InferenceServerClient(self.uri.address, connection_timeout=self.timeout_s,
                                                    network_timeout=self.timeout_s)
            self._local.client = c
            with _CLIENTS_LOCK:
                self._all_clients = getattr(self, "_all_clients", []) + [c]
        return c

    def _connect(self, wait_ready_s: float, outputs):
        c = self._client()
        deadline = time.monotonic() + max(0.0, wait_ready_s)
        last = None
        while True:
            try:
                if c.is_model_ready(self.uri.model, self.uri.version):
                    break
                last = "model not ready"
            except Exception as e:  # connection refused, DNS, ...
                last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if time.monotonic() >= deadline:
                raise RemoteError(f"{self.uri}: model not reachable/ready after {wait_ready_s:g} s ({last})")
            time.sleep(0.2)
        cfg = c.get_model_config(self.uri.model, self.uri.version)
        cfg = cfg.config if self.uri.protocol == "grpc" else cfg
        if self.uri.protocol == "grpc":
            max_batch = int(cfg.max_batch_size)
            inputs = [(i.name, list(i.dims)) for i in cfg.input]
            out_names = [o.name for o in cfg.output]
        else:
            max_batch = int(cfg.get("max_batch_size", 0))
            inputs = [(i["name"], [int(d) for d in i.get("dims", [])]) for i in cfg.get("input", [])]
            out_names = [o["name"] for o in cfg.get("output", [])]
        if not inputs or inputs[0][0] != INPUT_NAME:
            raise RemoteError(f"{self.uri}: model input is {[n for n, _ in inputs]}, expected {INPUT_NAME!r}")
        missing = [n for n in OUTPUT_NAMES if n not in out_names]
        if missing:
            raise RemoteError(f"{self.uri}: model lacks outputs {missing} (has {out_names})")
        self._server_max_batch = max_batch if max_batch > 0 else 0   # 0: the model does not batch
        dims = inputs[0][1]
        self.input_shape = tuple([-1] + [int(d) for d in dims]) if self._server_max_batch else \
            tuple(int(d) for d in dims)
        wanted = list(outputs) if outputs else list(OUTPUT_NAMES) + ([FULL_MAP_NAME] if FULL_MAP_NAME in out_names else [])
        bad = [n for n in wanted if n not in out_names]
        if bad:
            raise RemoteError(f"{self.uri}: requested outputs {bad} not served (has {out_names})")
        self.output_names = wanted
        meta = self._fetch_metadata(c)
        meta.setdefault("remote", {}).update({"uri": str(self.uri), "max_batch_size": self._server_max_batch})
        hwc = self.input_shape[1:] if self._server_max_batch else self.input_shape
        exp = meta.get("export") or {}
        frame_hw = tuple(hwc[:2]) if len(hwc) == 3 and min(hwc[:2]) > 0 else \
            (tuple(exp["frame_hw"]) if exp.get("frame_hw") else None)
        channels = int(hwc[2]) if len(hwc) == 3 and hwc[2] > 0 else int(exp.get("frame_channels") or 3)
        Engine.__init__(self, self.uri.model, meta, frame_hw, channels, None)
        # after the base initialiser (which derives its own limit from artifact metadata): the
        # server's max_batch_size is the limit that holds for this engine (None = unbatched model)
        self.max_batch = self._server_max_batch or None

    def _fetch_metadata(self, c) -> dict:
        name = self.uri.model + TRITON_METADATA_SUFFIX
        try:
            if not c.is_model_ready(name):
                return {}
            res = c.infer(name, [], client_timeout=self.timeout_s) if self.uri.protocol == "grpc" \
                else c.infer(name, [])
            raw = res.as_numpy(TRITON_METADATA_OUTPUT).reshape(-1)[0]
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except Exception:
            return {}

    # ---- inference -------------------------------------------------------------------
    def _request(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        c = self._client()
        m = self._mod
        inp = m.InferInput(INPUT_NAME, list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames)
        outs = [m.InferRequestedOutput(n) for n in self.output_names]
        try:
            if self.uri.protocol == "grpc":
                res = c.infer(self.uri.model, [inp], model_version=self.uri.version, outputs=outs,
                              client_timeout=self.timeout_s)
            else:
                res = c.infer(self.uri.model, [inp], model_version=self.uri.version, outputs=outs)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RemoteError(f"{self.uri}: inference failed: {msg}") from None
        b = frames.shape[0]
        out = {}
        for n in self.output_names:
            a = res.as_numpy(n)
            out[n] = a.reshape(b) if n in PER_IMAGE_OUTPUTS else a
        return out

    def _check(self, frames) -> np.ndarray:
        if self._closed:
            raise RemoteError(f"{self.uri}: engine is closed")
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
            raise RemoteError(f"{self.uri}: frames must be uint8 (B, H, W, C), got "
                              f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}")
        want = self.input_shape[1:] if self._server_max_batch else self.input_shape
        for got, exp in zip(frames.shape[1:], want):
            if exp > 0 and got != exp:
                raise RemoteError(f"{self.uri}: model takes frames (B, {', '.join(map(str, want))}), "
                                  f"got {tuple(frames.shape)}")
        return np.ascontiguousarray(frames)

    def _submit_chunk(self, chunk: np.ndarray) -> cf.Future:
        self._inflight.acquire()
        try:
            fut = self._pool.submit(self._request, chunk)
        except Exception:
            self._inflight.release()
            raise
        fut.add_done_callback(lambda _f: self._inflight.release())
        return fut

    def infer_async(self, frames) -> cf.Future:
        """Send `frames` (split into chunks of max_batch_size, sent concurrently); a Future of
        the merged output dict. Blocks only while `max_inflight` requests are outstanding."""
        frames = self._check(frames)
        step = self._server_max_batch or frames.shape[0]
        futs = [self._submit_chunk(frames[i:i + step]) for i in range(0, frames.shape[0], step)]
        if len(futs) == 1:
            return futs[0]
        result: cf.Future = cf.Future()
        remaining = [len(futs)]
        lock = threading.Lock()

        def done(_f):
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                try:
                    parts = [f.result() for f in futs]
                    result.set_result({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
                except Exception as e:
                    result.set_exception(e)

        for f in futs:
            f.add_done_callback(done)
        return result

    def infer(self, frames) -> Dict[str, np.ndarray]:
        return self.infer_async(frames).result()

    def _run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        return self.infer_async(frames).result()

    # ---- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        for c in getattr(self, "_all_clients", []):
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"RemoteEngine({str(self.uri)!r}, max_batch={getattr(self, '_server_max_batch', '?')})"


_CLIENTS_LOCK = threading.Lock()


def is_remote_uri(s: str) -> bool:
    return isinstance(s, str) and s.split("://", 1)[0] in DEFAULT_PORTS and "://" in s


__all__: List[str] = ["RemoteEngine", "RemoteError", "RemoteURI", "parse_uri", "is_remote_uri"]
