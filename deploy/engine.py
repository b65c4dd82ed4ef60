"""Inference engines behind one interface: uint8 NHWC frames in, numpy outputs out.

Every backend subclasses `Engine` and implements `_run(frames) -> dict`; `Engine.infer` adds what
all need (shape checks, splitting batches larger than the engine takes, padding for engines
built with a fixed batch). Backends (deploy.contract.ENGINE_BACKENDS):

  ort-cpu / ort-cuda / ort-trt   an exported ONNX through ONNX Runtime          deploy/ort.py
  tensorrt                        a TensorRT plan (`model.engine`)                deploy/tensorrt.py
  aoti                            an AOTInductor package (`model.pt2`)            deploy/torch_engines.py
  torch                           a checkpoint (`model.pt`) or a model object     deploy/torch_engines.py
  remote                          a model served by Triton (`grpc://...`)         deploy/remote.py

`load_engine(path, backend=None)` picks the backend from the file suffix and what is installed
(`ort` = the best ONNX Runtime provider available). This module and the ONNX / TensorRT / remote
engines import neither torch nor `models`: an edge box running an ONNX or TensorRT artifact needs
only numpy, onnxruntime (or tensorrt) and opencv. Metadata comes from
`deploy.artifacts.read_metadata` (sidecar JSON checked against the artifact's sha256).
"""
from __future__ import annotations

import importlib.util
import pathlib
from typing import Dict, Optional, Tuple

import numpy as np

from .artifacts import ArtifactError, read_metadata
from .contract import ENGINE_BACKENDS, ORT_BACKENDS, SUFFIX_KIND, pixel_format


class EngineError(ValueError):
    """An engine that cannot be loaded or used as asked; the message says what to do."""


def read_engine_metadata(path, allow_rejected: bool = False) -> dict:
    """The artifact's validated metadata (deploy.artifacts.read_metadata), as an EngineError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise EngineError(f"{path}: engine file not found")
    try:
        return read_metadata(path, allow_rejected=allow_rejected)
    except ArtifactError as e:
        raise EngineError(str(e)) from None


def export_info(meta: dict, path) -> Tuple[Optional[Tuple[int, int]], int, Optional[int]]:
    """(frame_hw or None, frame_channels, fixed batch or None) from metadata["export"]."""
    ex = meta.get("export") or {}
    hw = ex.get("frame_hw")
    ch = ex.get("frame_channels")
    if ch not in (1, 3):
        raise EngineError(f"{path}: metadata export.frame_channels={ch!r}; expected 1 or 3")
    if hw is not None:
        try:
            if not isinstance(hw, (list, tuple)) or len(hw) != 2:
                raise TypeError
            hw = (int(hw[0]), int(hw[1]))
        except (TypeError, ValueError, OverflowError):
            raise EngineError(f"{path}: metadata export.frame_hw={hw!r}; expected [height, width]") from None
    return hw, int(ch), _positive_int(ex.get("batch"))


def _positive_int(v) -> Optional[int]:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class Engine:
    """Base class: `infer(frames uint8 (B, H, W, C)) -> {name: numpy array}`; a context manager.

    Attributes: `meta` (artifact metadata: model, preprocess, score_stats, class_names,
    export), `frame_hw` ((H, W) the engine takes, or None when any size works),
    `frame_channels` (1 or 3), `static_batch` (None = any batch), `max_batch` (largest batch
    per call, None = no limit known), `backend`, `path`.
    """

    backend = "?"

    def __init__(self, path, meta: dict, frame_hw, frame_channels: int, static_batch: Optional[int] = None):
        self.path = pathlib.Path(path)
        self.meta = meta
        self.frame_hw = tuple(frame_hw) if frame_hw is not None else None
        self.frame_channels = int(frame_channels)
        self.static_batch = static_batch
        self.max_batch = static_batch or _positive_int((meta.get("export") or {}).get("max_batch"))

    # -- metadata conveniences ----------------------------------------------------------
    @property
    def score_stats(self) -> dict:
        return dict(self.meta.get("score_stats") or {})

    @property
    def map_threshold(self) -> float:
        return float(self.score_stats.get("map_threshold", 1.0))

    @property
    def pixel_format(self) -> str:
        return pixel_format(self.frame_channels)

    @property
    def runtime_config(self) -> dict:
        """The artifact's runtime section (thresholds chosen after export; docs/design.md section 5)."""
        return dict(self.meta.get("runtime") or {})

    def integrity(self) -> dict:
        """What identifies the artifact and its verdict-deciding metadata: hashes, format and
        versions, the parity gate's verdict (printed at stream start, kept in the summary)."""
        parity = self.meta.get("parity")
        return {"artifact_sha256": self.meta.get("artifact_sha256"),
                "metadata_sha256": self.meta.get("metadata_sha256"),
                "format_version": self.meta.get("format_version"),
                "versions": self.meta.get("versions"),
                "parity": None if not isinstance(parity, dict) else ("passed" if parity.get("passed") else "REJECTED")}

    def describe(self) -> dict:
        return {"backend": self.backend, "path": str(self.path), "model": self.meta.get("model"),
                "frame_hw": self.frame_hw, "frame_channels": self.frame_channels,
                "static_batch": self.static_batch, "max_batch": self.max_batch, **self.integrity()}

    # -- inference ----------------------------------------------------------------------
    def check_frames(self, frames) -> np.ndarray:
        """Contiguous uint8 (B, H, W, C) frames of this engine's size, or EngineError."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
            raise EngineError(f"{self.path.name}: frames must be uint8 (B, H, W, C), got "
                              f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}")
        if frames.shape[3] != self.frame_channels:
            raise EngineError(f"{self.path.name}: engine takes {self.frame_channels}-channel frames, got {frames.shape[3]}")
        if self.frame_hw is not None and tuple(frames.shape[1:3]) != self.frame_hw:
            raise EngineError(f"{self.path.name}: engine takes {self.frame_hw[0]}x{self.frame_hw[1]} frames, "
                              f"got {frames.shape[1]}x{frames.shape[2]}")
        return np.ascontiguousarray(frames)

    def infer(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        frames = self.check_frames(frames)
        b = frames.shape[0]
        step = self.static_batch or self.max_batch
        if step is None or b == step or (self.static_batch is None and b <= step):
            return self._run(frames)
        outs = []
        for i in range(0, b, step):
            chunk = frames[i:i + step]
            n = chunk.shape[0]
            if self.static_batch and n < step:   # fixed-batch engine: pad with the last frame
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            outs.append({k: v[:n] for k, v in self._run(chunk).items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def _run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------
# factory
# ------------------------------------------------------------------------------------------
def _torch_cuda() -> Tuple[bool, bool]:
    """(torch importable, CUDA available) without importing torch when it is not installed."""
    try:
        if importlib.util.find_spec("torch") is None:
            return False, False
        import torch
    except ImportError:   # present but unusable (a broken or blocked install): as if absent
        return False, False
    return True, bool(torch.cuda.is_available())


def available_backends() -> Tuple[str, ...]:
    from . import cuda_buffers, ort, tensorrt

    out = list(ort.available_backends())
    has_torch, cuda = _torch_cuda()
    if tensorrt.trt is not None and (cuda or cuda_buffers.usable() is not None):
        out.append("tensorrt")
    if has_torch:
        out += ["aoti", "torch"]
    return tuple(out)


def choose_backend(path, backend: Optional[str] = None) -> str:
    path = pathlib.Path(path)
    kind = SUFFIX_KIND.get(path.suffix.lower())
    if kind is None:
        raise EngineError(f"{path}: unknown engine type {path.suffix!r}; expected one of "
                          f"{sorted(SUFFIX_KIND)} (ONNX, TensorRT plan, AOTInductor package, checkpoint)")
    if backend in (None, "", "auto", "ort"):
        if kind == "ort":
            from . import ort

            return ort.best_backend()
        if backend == "ort":
            raise EngineError(f"{path}: a {path.suffix} file does not run on ONNX Runtime")
        return kind
    if backend not in ENGINE_BACKENDS or backend == "remote":
        raise EngineError(f"--backend {backend!r}; expected one of {ENGINE_BACKENDS[:-1]} or auto")
    ok = ORT_BACKENDS if kind == "ort" else (kind,)
    if backend not in ok:
        raise EngineError(f"{path}: a {path.suffix} file runs on {', '.join(ok)}, not --backend {backend}")
    return backend


def load_engine(path, backend: Optional[str] = None, frame_hw=None, frame_channels: Optional[int] = None,
                device: str = "cpu", threads: int = 0, buffers="auto", meta: Optional[dict] = None,
                allow_rejected: bool = False) -> Engine:
    """Open an engine file (.onnx, .engine/.plan, .pt2, .pt). `frame_hw` / `frame_channels` only
    shape a checkpoint's graph (exported engines carry theirs in metadata); `buffers` picks the
    TensorRT runner's device buffers (deploy.cuda_buffers); `meta` replaces the artifact's own
    metadata (for a graph written without a sidecar, e.g. an intermediate quantised ONNX);
    `allow_rejected` opens an artifact the parity gate rejected (refused otherwise)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise EngineError(f"{path}: is a folder; pass the artifact file inside it "
                          f"(one of {', '.join(sorted(SUFFIX_KIND))})")
    if not path.is_file():
        raise EngineError(f"{path}: engine file not found")
    b = choose_backend(path, backend)
    if meta is None and b not in ("torch", "tensorrt"):
        meta = read_engine_metadata(path, allow_rejected=allow_rejected)
    if b in ORT_BACKENDS:
        from .ort import OrtEngine

        return OrtEngine(path, b, threads=threads, meta=meta)
    if b == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(path, meta=meta, buffers=buffers, allow_rejected=allow_rejected)
    try:
        from .torch_engines import AOTIEngine, TorchEngine
    except ImportError as e:   # the torch-free edge install: say what the artifact needs
        raise EngineError(f"{path}: {b} engines need torch: pip install 'edge-ad[train]' "
                          f"(or run an exported .onnx / .engine artifact) [{e}]") from None
    if b == "aoti":
        return AOTIEngine(path, meta=meta, device=device)
    return TorchEngine(path, frame_hw=frame_hw, frame_channels=frame_channels or 3, device=device,
                       threads=threads)
