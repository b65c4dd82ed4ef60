"""Serve an exported artifact on NVIDIA Triton Inference Server through PyTriton.

    python -m runtime.serve --engine model.onnx [--host 127.0.0.1] [--http-port 8000]
        [--grpc-port 8001] [--metrics-port 8002] [--max-batch 8] [--model-name edge_ad]

PyTriton starts a real `tritonserver` child process (HTTP, gRPC, metrics, dynamic batching);
requests are batched by Triton and handed to this process's engine. The wire contract:

    input   frames            UINT8  (-1, H, W, C)   raw camera frames, NHWC (batch first)
    outputs anomaly_map       FP32   (-1, 1, S, S)
            score             FP32   (-1, 1)         raw anomaly score
            normalized_score  FP32   (-1, 1)         0.5 = the artifact's threshold
            verdict           BOOL   (-1, 1)         normalized_score >= 0.5 (or score >= --threshold)
            [anomaly_map_full FP32   (-1, 1, H, W)]  when the artifact has it

A companion model `<model-name>_metadata` (no input batching) returns the artifact's metadata
JSON (output `edge_ad`, BYTES), so remote clients (`deploy.remote.RemoteEngine`) know the
frame shape, class names and score statistics.

Servers bind 127.0.0.1 unless told otherwise. SIGTERM / SIGINT stop the server cleanly: the
`tritonserver` child and its Python-backend stubs are stopped before this process exits (and
PyTriton sets PR_SET_PDEATHSIG on the child, so even a hard kill of this process takes it down).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import signal
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deploy import load_engine
from deploy.contract import (ENGINE_BACKENDS, FULL_MAP_NAME, INPUT_NAME, OUTPUT_NAMES, TRITON_METADATA_OUTPUT,
                             TRITON_METADATA_SUFFIX, VERDICT_NAME, verdict)

LOG = logging.getLogger("runtime.serve")

DEFAULT_MODEL_NAME = "edge_ad"

try:  # optional: the `serve` extra
    from pytriton.decorators import batch as _pytriton_batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
except ImportError:  # pragma: no cover - exercised only without the extra
    Triton = None


class ServeError(RuntimeError):
    """A user-facing serving problem (bad artifact, missing package, bad option)."""


def _require_pytriton():
    if Triton is None:
        raise ServeError("runtime.serve needs PyTriton: pip install 'edge-ad[serve]' "
                         "(nvidia-pytriton bundles Triton Inference Server; Linux x86-64/aarch64, glibc >= 2.35)")


# ---- engine loading ------------------------------------------------------------------------
def open_engine(path, backend: Optional[str] = None, threads: int = 0, frame_hw=None,
                frame_channels: Optional[int] = None, device: str = "cpu", allow_rejected: bool = False):
    """Load any exported artifact as an engine (`infer(frames) -> dict`, `.meta`) through
    `deploy.load_engine` (ONNX Runtime, TensorRT, AOTInductor, checkpoint).
    `frame_hw` / `frame_channels` / `device` only matter for a checkpoint (`.pt`); an artifact the
    parity gate rejected is refused unless `allow_rejected`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ServeError(f"{path}: artifact not found")
    return load_engine(path, backend=backend, threads=threads, frame_hw=frame_hw,
                       frame_channels=frame_channels, device=device, allow_rejected=allow_rejected)


# ---- the served model's I/O ------------------------------------------------------------------
def frame_shape(engine) -> Tuple[int, int, int]:
    """(H, W, C) of one input frame; -1 where the artifact leaves it open."""
    exp = (getattr(engine, "meta", None) or {}).get("export") or {}
    hw = getattr(engine, "frame_hw", None) or exp.get("frame_hw") or (-1, -1)
    ch = getattr(engine, "frame_channels", None) or exp.get("frame_channels") or -1
    return int(hw[0]), int(hw[1]), int(ch)


def output_spec(engine) -> List[Tuple[str, type, Tuple[int, ...]]]:
    """(name, numpy dtype, per-sample shape) for every served output."""
    meta = getattr(engine, "meta", None) or {}
    names = list(getattr(engine, "output_names", None) or (meta.get("export") or {}).get("outputs")
                 or OUTPUT_NAMES)
    s = (meta.get("preprocess") or {}).get("input_size")
    amap = (1, int(s), int(s)) if s else (1, -1, -1)
    spec = [("anomaly_map", np.float32, amap), ("score", np.float32, (1,)),
            ("normalized_score", np.float32, (1,)), (VERDICT_NAME, np.bool_, (1,))]
    if FULL_MAP_NAME in names:
        h, w, _ = frame_shape(engine)
        spec.append((FULL_MAP_NAME, np.float32, (1, h, w)))
    return spec


def make_infer_fn(engine, threshold: Optional[float] = None) -> Callable:
    """Batched inference callable: frames (B, H, W, C) uint8 -> the served outputs.

    verdict = normalized_score >= 0.5 (the artifact's threshold) or score >= `threshold`."""
    want_full = any(n == FULL_MAP_NAME for n, _, _ in output_spec(engine))

    def infer(frames: np.ndarray) -> Dict[str, np.ndarray]:
        out = engine.infer(frames)
        b = frames.shape[0]
        score = np.asarray(out["score"], dtype=np.float32).reshape(b, 1)
        norm = np.asarray(out["normalized_score"], dtype=np.float32).reshape(b, 1)
        res = {"anomaly_map": np.asarray(out["anomaly_map"], dtype=np.float32),
               "score": score, "normalized_score": norm,
               VERDICT_NAME: (score >= threshold) if threshold is not None else verdict(norm)}
        if want_full:
            res[FULL_MAP_NAME] = np.asarray(out[FULL_MAP_NAME], dtype=np.float32)
        return res

    return infer


# ---- the tritonserver bundled with PyTriton (local development and tests) ---------------------
def bundled_tritonserver(work_dir) -> Optional[Tuple[pathlib.Path, pathlib.Path, Dict[str, str]]]:
    """(tritonserver binary, backend directory with the Python backend, environment) from the
    nvidia-pytriton wheel, or None when it is not installed / ships no Python backend.

    The wheel keeps one backend stub per Python version; Triton wants it beside the backend
    library, so a backend directory is assembled under `work_dir`."""
    try:
        import pytriton
    except ImportError:
        return None
    root = pathlib.Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    lib = root / "backends" / "python" / "libtriton_python.so"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not (binary.is_file() and lib.is_file() and stub.is_file()):
        return None
    be = pathlib.Path(work_dir) / "backends" / "python"
    be.mkdir(parents=True, exist_ok=True)
    for f in (lib, root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(f, be / f.name)
    libs = [str(pathlib.Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"),
            sysconfig.get_config_var("LIBDIR") or ""]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs + env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return binary, be.parent, env


# ---- server ----------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    engine: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    instances: int = 1
    model_name: str = DEFAULT_MODEL_NAME
    threshold: Optional[float] = None
    backend: Optional[str] = None
    threads: int = 0
    frame_hw: Optional[Tuple[int, int]] = None      # checkpoints only
    frame_channels: Optional[int] = None            # checkpoints only
    device: str = "cpu"                             # checkpoints / AOTInductor
    verbose: bool = False
    allow_rejected: bool = False                    # serve an artifact the parity gate rejected

    def validate(self) -> "ServeConfig":
        for f in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, f)
            if not 0 < int(v) < 65536:
                raise ServeError(f"{f}: expected a TCP port 1-65535, got {v}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ServeError("http_port, grpc_port and metrics_port must differ")
        if int(self.max_batch) < 1:
            raise ServeError(f"max_batch: expected >= 1, got {self.max_batch}")
        if int(self.instances) < 1:
            raise ServeError(f"instances: expected >= 1, got {self.instances}")
        if int(self.max_queue_delay_us) < 0:
            raise ServeError(f"max_queue_delay_us: expected >= 0, got {self.max_queue_delay_us}")
        import re

        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.model_name or ""):
            raise ServeError(f"model_name: letters, digits, '.', '_', '-' only, got {self.model_name!r}")
        return self


def ensure_python_libdir_on_ld_path() -> None:
    """The bundled Python-backend stub links libpython; make the running interpreter's copy
    findable by the `tritonserver` child (a no-op when it already is)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not os.path.isdir(libdir):
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir not in parts:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + parts)


def check_ports_free(host: str, ports: Dict[str, int]) -> None:
    """ServeError naming the first port something already listens on (Triton itself would only
    time out after a minute)."""
    import socket

    for name, port in ports.items():
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ServeError(f"host {host!r}: cannot resolve ({e})") from None
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind(addr)
            except OSError as e:
                raise ServeError(f"{name} {port} on {host} is not available ({e.strerror}); "
                                 f"pick another with --{name.replace('_', '-')}") from None


class Server:
    """A running Triton server for one engine (context manager; `start()` returns when ready)."""

    def __init__(self, engine, config: ServeConfig):
        _require_pytriton()
        self.engine = engine
        self.config = config.validate()
        self._triton = None

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.config.host}:{self.config.grpc_port}"

    def start(self) -> "Server":
        c = self.config
        check_ports_free(c.host, {"http_port": c.http_port, "grpc_port": c.grpc_port,
                                  "metrics_port": c.metrics_port})
        ensure_python_libdir_on_ld_path()
        tc = TritonConfig(http_address=c.host, http_port=c.http_port, grpc_address=c.host,
                          grpc_port=c.grpc_port, metrics_address=c.host, metrics_port=c.metrics_port,
                          log_verbose=1 if c.verbose else 0)
        self._triton = Triton(config=tc)
        infer = make_infer_fn(self.engine, c.threshold)
        h, w, ch = frame_shape(self.engine)
        fns = [_pytriton_batch(infer) for _ in range(int(c.instances))]
        # The metadata model is bound (and so loaded) first: once the main model is ready,
        # so is its metadata.
        meta_blob = json.dumps(getattr(self.engine, "meta", None) or {}).encode()

        def metadata(requests):  # unbatched PyTriton callable: one response per request
            return [{TRITON_METADATA_OUTPUT: np.array([meta_blob], dtype=np.object_)} for _ in requests]

        self._triton.bind(
            model_name=c.model_name + TRITON_METADATA_SUFFIX, infer_func=metadata,
            inputs=[Tensor(name="request", dtype=np.int32, shape=(1,), optional=True)],
            outputs=[Tensor(name=TRITON_METADATA_OUTPUT, dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        self._triton.bind(
            model_name=c.model_name,
            infer_func=fns if len(fns) > 1 else fns[0],
            inputs=[Tensor(name=INPUT_NAME, dtype=np.uint8, shape=(h, w, ch))],
            outputs=[Tensor(name=n, dtype=dt, shape=shape) for n, dt, shape in output_spec(self.engine)],
            config=ModelConfig(max_batch_size=int(c.max_batch),
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(c.max_queue_delay_us))),
            strict=True,
        )
        try:
            self._triton.run()
        except Exception as e:
            self.stop()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ServeError(f"Triton Inference Server did not start: {type(e).__name__}: {first} "
                             "(run with --verbose for the server log)") from None
        LOG.info("serving %s as model %r: HTTP %s, gRPC %s (max batch %d, dynamic batching)",
                 c.engine, c.model_name, self.http_url, self.grpc_url, c.max_batch)
        return self

    def is_alive(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def stop(self) -> None:
        if self._triton is not None:
            self._triton.stop()
            self._triton = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(config: ServeConfig, stop_event: Optional[threading.Event] = None, poll_s: float = 1.0) -> int:
    """Load the artifact, serve it until SIGTERM/SIGINT (or `stop_event`), stop cleanly."""
    config.validate()
    _require_pytriton()
    engine = open_engine(config.engine, backend=config.backend, threads=config.threads,
                         frame_hw=config.frame_hw, frame_channels=config.frame_channels, device=config.device,
                         allow_rejected=config.allow_rejected)
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    try:
        with Server(engine, config) as server:
            print(f"runtime.serve: model {config.model_name!r} ready on {server.http_url} and "
                  f"{server.grpc_url}", file=sys.stderr, flush=True)
            while not stop.wait(poll_s):
                if not server.is_alive():
                    LOG.error("Triton server or model proxy died; stopping")
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close = getattr(engine, "close", None)
        if callable(close):
            close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="exported artifact (model.onnx, model.engine, model.pt2, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=8, help="largest batch Triton forms (dynamic batching)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long Triton may hold a request to grow a batch")
    p.add_argument("--instances", type=int, default=1, help="model instances (parallel executions)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--threshold", type=float, default=None,
                   help="raw-score threshold for `verdict` (default: the artifact's, normalized_score >= 0.5)")
    p.add_argument("--backend", default=None,
                   help=f"engine backend ({', '.join(ENGINE_BACKENDS[:-1])}; default auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the engine (0 = library default)")
    p.add_argument("--frame-size", default=None, help="checkpoint (.pt) only: frame HxW (default: the model input size)")
    p.add_argument("--frame-channels", type=int, choices=(1, 3), default=None,
                   help="checkpoint (.pt) only: 1 (Mono8) or 3 (RGB8) frames (default 3)")
    p.add_argument("--device", default="cpu", help="checkpoint / AOTInductor device (cpu, cuda)")
    p.add_argument("--allow-rejected", action="store_true",
                   help="serve an artifact whose sidecar says the parity gate rejected it (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    frame_hw = None
    if args.frame_size:
        try:
            h, w = (int(v) for v in args.frame_size.lower().split("x"))
            if h < 1 or w < 1:
                raise ValueError
        except ValueError:
            print(f"runtime.serve: error: --frame-size {args.frame_size!r}: expected HxW, e.g. 256x256",
                  file=sys.stderr)
            return 2
        frame_hw = (h, w)
    cfg = ServeConfig(engine=args.engine, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                      metrics_port=args.metrics_port, max_batch=args.max_batch,
                      max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                      model_name=args.model_name, threshold=args.threshold, backend=args.backend,
                      threads=args.threads, frame_hw=frame_hw, frame_channels=args.frame_channels,
                      device=args.device, verbose=args.verbose, allow_rejected=args.allow_rejected)
    try:
        return serve(cfg)
    except (ServeError, ValueError, FileNotFoundError) as e:
        print(f"runtime.serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
