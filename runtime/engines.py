"""Inference engines behind one interface: uint8 NHWC frames in, numpy outputs out.

Every backend subclasses `Engine` and implements `_run(frames) -> dict`; `Engine.infer` adds
what all need (shape checks, padding / splitting for engines built with a fixed batch).
Backends (`BACKENDS`):

  ort-cpu / ort-cuda / ort-trt   an exported ONNX through ONNX Runtime (CPU, CUDA EP, TensorRT EP)
  tensorrt                        a TensorRT plan (`model.engine`), device buffers from runtime.cuda_buffers
                                  (pycuda, else cuda-python, else torch CUDA tensors)
  aoti                            an AOTInductor package (`model.pt2`), torch._inductor.aoti_load_package
  torch                           a checkpoint (`model.pt`) wrapped in models.deploy.DeployModule

`load_engine(path, backend=None)` picks the backend from the file suffix and what is installed
(`ort` = the best ONNX Runtime provider available). Metadata comes from
`export.artifacts.read_metadata` (ONNX metadata_props / sidecar JSON, checked against the
artifact's sha256); checkpoints carry their own.
"""
from __future__ import annotations

import pathlib
from typing import Dict, Optional, Tuple

import numpy as np

from . import cuda_buffers

try:  # optional: ONNX Runtime is a core dependency, but keep the runtime importable without it
    import onnxruntime as ort
except ImportError:  # pragma: no cover
    ort = None

try:  # optional compiled dependency
    import tensorrt as trt
except ImportError:
    trt = None

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "aoti", "torch")
SUFFIX_BACKEND = {".onnx": "ort", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".pt": "torch"}
OUTPUTS = ("anomaly_map", "score", "normalized_score")


class EngineError(ValueError):
    """An engine that cannot be loaded or used as asked; the message says what to do."""


def _require_ort():
    if ort is None:
        raise EngineError("ONNX engines need onnxruntime: pip install onnxruntime "
                          "(onnxruntime-gpu for the CUDA / TensorRT execution providers)")
    return ort


def _require_tensorrt():
    if trt is None:
        raise EngineError("TensorRT engines need the TensorRT Python package and an NVIDIA GPU: "
                          "pip install 'tensorrt>=10.3' (or pip install 'edge-ad[gpu]')")
    return trt


# ------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------
def read_engine_metadata(path) -> dict:
    """The artifact's metadata via export.artifacts.read_metadata (raises EngineError)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise EngineError(f"{path}: engine file not found")
    try:
        from export.artifacts import read_metadata, ArtifactError
    except ImportError:
        raise EngineError(f"{path}: reading artifact metadata needs export.artifacts "
                          "(part of this toolkit; is the installation complete?)") from None
    try:
        meta = read_metadata(path)
    except ArtifactError as e:
        raise EngineError(str(e)) from None
    if not isinstance(meta, dict):
        raise EngineError(f"{path}: metadata is not a JSON object")
    return meta


def _export_info(meta: dict, path) -> Tuple[Optional[Tuple[int, int]], int, Optional[int]]:
    ex = meta.get("export") or {}
    hw = ex.get("frame_hw")
    ch = ex.get("frame_channels")
    if ch not in (1, 3):
        raise EngineError(f"{path}: metadata export.frame_channels={ch!r}; expected 1 or 3")
    if hw is not None:
        try:
            hw = (int(hw[0]), int(hw[1]))
        except (TypeError, ValueError, IndexError):
            raise EngineError(f"{path}: metadata export.frame_hw={hw!r}; expected [height, width]") from None
    batch = ex.get("batch")
    batch = int(batch) if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else None
    return hw, int(ch), batch


def _max_batch(meta: dict) -> Optional[int]:
    """export.max_batch: the largest batch a dynamic-batch engine was built for (AOTI, TensorRT)."""
    ex = meta.get("export") if isinstance(meta, dict) else None
    mb = ex.get("max_batch") if isinstance(ex, dict) else None
    return int(mb) if isinstance(mb, int) and not isinstance(mb, bool) and mb > 0 else None


# ------------------------------------------------------------------------------------------
# base
# ------------------------------------------------------------------------------------------
class Engine:
    """Base class: `infer(frames uint8 (B, H, W, C)) -> {name: numpy array}`; a context manager.

    Attributes: `meta` (artifact metadata: model, preprocess, score_stats, class_names,
    export), `frame_hw` ((H, W) the engine takes, or None when any size works),
    `frame_channels` (1 or 3), `static_batch` (None = any batch), `backend`, `path`.
    """

    backend = "?"

    def __init__(self, path, meta: dict, frame_hw, frame_channels: int, static_batch: Optional[int] = None):
        self.path = pathlib.Path(path)
        self.meta = meta
        self.frame_hw = tuple(frame_hw) if frame_hw is not None else None
        self.frame_channels = int(frame_channels)
        self.static_batch = static_batch
        self.max_batch = static_batch or _max_batch(meta)   # None = no limit known

    # -- metadata conveniences ----------------------------------------------------------
    @property
    def score_stats(self) -> dict:
        return dict(self.meta.get("score_stats") or {})

    @property
    def map_threshold(self) -> float:
        return float(self.score_stats.get("map_threshold", 1.0))

    @property
    def pixel_format(self) -> str:
        return "Mono8" if self.frame_channels == 1 else "RGB8"

    def describe(self) -> dict:
        return {"backend": self.backend, "path": str(self.path), "model": self.meta.get("model"),
                "frame_hw": self.frame_hw, "frame_channels": self.frame_channels,
                "static_batch": self.static_batch, "max_batch": self.max_batch}

    # -- inference ----------------------------------------------------------------------
    def infer(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
            raise EngineError(f"{self.path.name}: frames must be uint8 (B, H, W, C), got "
                              f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}")
        if frames.shape[3] != self.frame_channels:
            raise EngineError(f"{self.path.name}: engine takes {self.frame_channels}-channel frames, got {frames.shape[3]}")
        if self.frame_hw is not None and tuple(frames.shape[1:3]) != self.frame_hw:
            raise EngineError(f"{self.path.name}: engine takes {self.frame_hw[0]}x{self.frame_hw[1]} frames, "
                              f"got {frames.shape[1]}x{frames.shape[2]}")
        frames = np.ascontiguousarray(frames)
        b = frames.shape[0]
        if self.static_batch is None:
            if self.max_batch is None or b <= self.max_batch:
                return self._run(frames)
            outs = [self._run(frames[i:i + self.max_batch]) for i in range(0, b, self.max_batch)]
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        if b == self.static_batch:
            return self._run(frames)
        # fixed-batch engine: run in chunks of static_batch, padding the last one
        sb, outs = self.static_batch, []
        for i in range(0, b, sb):
            chunk = frames[i:i + sb]
            n = chunk.shape[0]
            if n < sb:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], sb - n, axis=0)])
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
# ONNX Runtime
# ------------------------------------------------------------------------------------------
_ORT_PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"],
                  "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                  "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def ort_session_options(threads: int = 0, profile_prefix: Optional[str] = None):
    """The ONNX Runtime session settings of every ORT path here (OrtEngine, the benchmark's ORT
    rows), so a benchmark measures what a deployment runs:
    - all graph optimisations (constant folding, Conv + BatchNorm/activation fusion, NCHWc
      layout), said explicitly rather than relied on as the Python default;
    - sequential execution (ORT_PARALLEL with two inter-op threads was ~2x slower on the 256 px
      DVAD at batch 1);
    - `threads`: intra-op threads; 0 = ONNX Runtime's default (one per physical core);
    - `profile_prefix`: ONNX Runtime's per-node profiler on (JSON written by end_profiling()).
    """
    _require_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


class OrtEngine(Engine):
    def __init__(self, path, backend: str = "ort-cpu", threads: int = 0, meta: Optional[dict] = None):
        _require_ort()
        meta = meta if meta is not None else read_engine_metadata(path)
        hw, ch, batch = _export_info(meta, path)
        providers = _ORT_PROVIDERS[backend]
        if providers[0] not in ort.get_available_providers():
            raise EngineError(f"{path}: backend {backend} needs ONNX Runtime's {providers[0]}, not in this "
                              f"install ({ort.get_available_providers()}); pip install onnxruntime-gpu")
        so = ort_session_options(threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:
            raise EngineError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None
        inp = self.session.get_inputs()[0]
        if inp.name != "frames" or len(inp.shape) != 4:
            raise EngineError(f"{path}: expected one input 'frames' (B, H, W, C), found {inp.name} {inp.shape}")
        b, h, w, c = inp.shape
        if isinstance(c, int) and c != ch:
            raise EngineError(f"{path}: graph input has {c} channels but metadata says {ch}")
        graph_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        if graph_hw is not None and hw is not None and graph_hw != hw:
            raise EngineError(f"{path}: graph input is {graph_hw} but metadata frame_hw is {hw}")
        super().__init__(path, meta, graph_hw, ch, b if isinstance(b, int) else None)
        self.backend = backend
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = set(OUTPUTS) - set(self.output_names)
        if missing:
            raise EngineError(f"{path}: outputs {self.output_names} lack {sorted(missing)}")

    def _run(self, frames):
        outs = self.session.run(self.output_names, {"frames": frames})
        return dict(zip(self.output_names, outs))


# ------------------------------------------------------------------------------------------
# TensorRT (plan file + sidecar metadata)
# ------------------------------------------------------------------------------------------
def _register_plugin_for(meta: dict, path) -> Optional[str]:
    """An engine built with the JIT form of the `edgead::SelectiveScan` plugin (sidecar
    `export.plugin_form == "jit"`) calls back into Python at run time: the plugin must be
    registered in this process before the plan is deserialised. AOT-form engines embed the
    kernel (TensorRT >= 10.9) and need nothing here. Returns the form registered, if any."""
    form = (meta.get("export") or {}).get("plugin_form")
    if form != "jit":
        return None
    try:
        from export.trt_plugin import register_selective_scan_plugin
        return register_selective_scan_plugin()
    except Exception as e:  # noqa: BLE001 - one clear message for any registration failure
        raise EngineError(f"{path}: built with the JIT SelectiveScan plugin, which must be registered "
                          f"at run time, and registering it failed: {e}") from None


class TensorRTEngine(Engine):
    """A TensorRT plan run with `execute_async_v3`. Device buffers come from
    `runtime.cuda_buffers` (DESIGN.md section 7): `buffers="auto"` takes pycuda when installed,
    else cuda-python, else torch CUDA tensors; name one of them to force it, or pass an open
    `DeviceBuffers` (the caller then owns and closes it). Input and output buffers are kept
    between calls and grow with the batch. Not run on a GPU in this repository's CI."""

    backend = "tensorrt"

    def __init__(self, path, meta: Optional[dict] = None, buffers="auto", device: int = 0):
        if not isinstance(buffers, cuda_buffers.DeviceBuffers):
            try:
                cuda_buffers.check_preference(buffers)
            except ValueError as e:
                raise EngineError(f"{path}: {e}") from None
        _require_tensorrt()
        self._own_buffers = not isinstance(buffers, cuda_buffers.DeviceBuffers)
        self._bufs: Dict[str, object] = {}
        self.buffers = None
        if self._own_buffers:
            try:
                self.buffers = cuda_buffers.select_buffers(buffers, device=device)
            except cuda_buffers.BuffersUnavailable as e:
                raise EngineError(f"{path}: TensorRT needs an NVIDIA GPU and CUDA device buffers; {e}") from None
        else:
            self.buffers = buffers
        try:
            self._open(path, meta)
        except BaseException:
            self.close()
            raise

    def _open(self, path, meta):
        meta = meta if meta is not None else read_engine_metadata(path)
        hw, ch, batch = _export_info(meta, path)
        _register_plugin_for(meta, path)
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(pathlib.Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: not a TensorRT plan for this TensorRT version / GPU (rebuild it here)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if self.inputs != ["frames"]:
            raise EngineError(f"{path}: expected one input 'frames', found {self.inputs}")
        shape = tuple(self.engine.get_tensor_shape("frames"))
        super().__init__(path, meta, tuple(shape[1:3]) if min(shape[1:3]) > 0 else hw, ch,
                         shape[0] if shape[0] > 0 else None)
        self.outputs = [n for n in self.names if n not in self.inputs]
        np_types = {trt.float32: np.float32, trt.float16: np.float16}
        self.out_dtypes = {}
        for n in self.outputs:
            dt = self.engine.get_tensor_dtype(n)
            if dt not in np_types:
                raise EngineError(f"{path}: output {n!r} has TensorRT dtype {dt}; expected float32 or float16")
            self.out_dtypes[n] = np_types[dt]

    def describe(self) -> dict:
        d = super().describe()
        d["buffers"] = self.buffers.name if self.buffers is not None else None
        return d

    def _buffer(self, name: str, nbytes: int):
        """The device buffer kept for tensor `name`, reallocated when `nbytes` outgrows it."""
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.buffers.free(buf)
            buf = self._bufs[name] = self.buffers.alloc(max(int(nbytes), 1))
        return buf

    def _run(self, frames):
        cb, ctx = self.buffers, self.context
        try:
            if not ctx.set_input_shape("frames", tuple(frames.shape)):
                raise EngineError(f"{self.path.name}: TensorRT rejected input shape {tuple(frames.shape)} "
                                  "(outside the engine's optimisation profile?)")
            inp = self._buffer("frames", frames.nbytes)
            cb.upload(inp, frames)
            ctx.set_tensor_address("frames", inp.ptr)
            outs = {}
            for n in self.outputs:
                outs[n] = np.empty(tuple(ctx.get_tensor_shape(n)), self.out_dtypes[n])
                ctx.set_tensor_address(n, self._buffer(n, outs[n].nbytes).ptr)
            if not ctx.execute_async_v3(cb.stream_handle):
                raise EngineError(f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
            for n, arr in outs.items():
                cb.download(self._bufs[n], arr)
            cb.synchronize()
        except cuda_buffers.CudaBuffersError as e:
            raise EngineError(f"{self.path.name}: {e}") from None
        return {k: v.astype(np.float32, copy=False) for k, v in outs.items()}

    def close(self) -> None:
        cb, self.buffers = self.buffers, None
        if cb is None:
            return
        bufs, self._bufs = self._bufs, {}
        if self._own_buffers:
            cb.close()
        elif not cb.closed:
            for b in bufs.values():
                cb.free(b)


def _to_device(torch, frames: np.ndarray, device: str):
    """uint8 frames to the engine's device: through pinned memory for CUDA (an async copy of
    the raw uint8 bytes; resize and normalisation then run on the GPU inside the engine)."""
    x = torch.from_numpy(frames)
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)
    return x


# ------------------------------------------------------------------------------------------
# AOTInductor package
# ------------------------------------------------------------------------------------------
class AOTIEngine(Engine):
    backend = "aoti"

    def __init__(self, path, meta: Optional[dict] = None, device: str = "cpu"):
        import torch

        meta = meta if meta is not None else read_engine_metadata(path)
        hw, ch, batch = _export_info(meta, path)
        try:
            from torch._inductor import aoti_load_package
        except ImportError:  # pragma: no cover - torch >= 2.6 has it
            raise EngineError("AOTInductor packages need torch >= 2.6 (torch._inductor.aoti_load_package)") from None
        try:
            self.runner = aoti_load_package(str(path))
        except Exception as e:
            raise EngineError(f"{path}: cannot load AOTInductor package: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        super().__init__(path, meta, hw, ch, batch)
        self.torch, self.device = torch, device
        self.output_names = list((meta.get("export") or {}).get("outputs") or OUTPUTS)

    def _run(self, frames):
        torch = self.torch
        with torch.inference_mode():
            outs = self.runner(_to_device(torch, frames, self.device))
        if isinstance(outs, torch.Tensor):
            outs = [outs]
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs)}


# ------------------------------------------------------------------------------------------
# torch checkpoint (reference path; adapts to any frame size / channels)
# ------------------------------------------------------------------------------------------
class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, path, frame_hw=None, frame_channels: int = 3, device: str = "cpu",
                 threads: int = 0):
        import torch

        from models.checkpoint import CheckpointError, load_checkpoint
        from models.deploy import DeployModule

        try:
            model = load_checkpoint(path, map_location=device)
        except CheckpointError as e:
            raise EngineError(str(e)) from None
        meta = dict(getattr(model, "checkpoint_meta", {}))
        size = int(model.preprocess.input_size)
        hw = tuple(frame_hw) if frame_hw is not None else (size, size)
        meta["export"] = {"format": "checkpoint", "frame_hw": list(hw), "frame_channels": int(frame_channels),
                          "batch": None, "outputs": list(OUTPUTS)}
        super().__init__(path, meta, hw, frame_channels, None)
        self.torch, self.device = torch, device
        if threads:
            torch.set_num_threads(int(threads))
        self.module = DeployModule(model, frame_hw=hw, frame_channels=frame_channels).to(device).eval()

    def _run(self, frames):
        torch = self.torch
        with torch.inference_mode():
            outs = self.module(_to_device(torch, frames, self.device))
        return {n: o.float().cpu().numpy() for n, o in zip(OUTPUTS, outs)}


# ------------------------------------------------------------------------------------------
# factory
# ------------------------------------------------------------------------------------------
def available_backends() -> Tuple[str, ...]:
    out = []
    if ort is not None:
        prov = ort.get_available_providers()
        out += [b for b, p in _ORT_PROVIDERS.items() if p[0] in prov]
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        torch, cuda = None, False
    if trt is not None and (cuda or cuda_buffers.usable() is not None):
        out.append("tensorrt")
    if torch is not None:
        out += ["aoti", "torch"]
    return tuple(out)


def choose_backend(path, backend: Optional[str] = None) -> str:
    path = pathlib.Path(path)
    kind = SUFFIX_BACKEND.get(path.suffix.lower())
    if kind is None:
        raise EngineError(f"{path}: unknown engine type {path.suffix!r}; expected one of "
                          f"{sorted(SUFFIX_BACKEND)} (ONNX, TensorRT plan, AOTInductor package, checkpoint)")
    avail = available_backends()
    if backend in (None, "", "auto"):
        if kind == "ort":
            for b in ("ort-trt", "ort-cuda", "ort-cpu"):
                if b in avail:
                    return b
            _require_ort()
        return kind
    if backend not in BACKENDS and backend != "ort":
        raise EngineError(f"--backend {backend!r}; expected one of {BACKENDS} or auto")
    if backend == "ort":
        return choose_backend(path, None)
    ok = {"ort": ("ort-cpu", "ort-cuda", "ort-trt")}.get(kind, (kind,))
    if backend not in ok:
        raise EngineError(f"{path}: a {path.suffix} file runs on {', '.join(ok)}, not --backend {backend}")
    return backend


def load_engine(path, backend: Optional[str] = None, frame_hw=None, frame_channels: Optional[int] = None,
                device: str = "cpu", threads: int = 0, buffers="auto") -> Engine:
    """Open an engine file. `frame_hw` / `frame_channels` only shape a checkpoint's DeployModule
    (exported engines carry theirs in metadata); `buffers` picks the TensorRT runner's device
    buffers (runtime.cuda_buffers: auto, pycuda, cuda-python, torch)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: engine file not found")
    b = choose_backend(path, backend)
    if b.startswith("ort"):
        return OrtEngine(path, b, threads=threads)
    if b == "tensorrt":
        return TensorRTEngine(path, buffers=buffers)
    if b == "aoti":
        return AOTIEngine(path, device=device)
    return TorchEngine(path, frame_hw=frame_hw, frame_channels=frame_channels or 3, device=device,
                       threads=threads)


def check_compatible(engine: Engine, camera, tile_hw: Tuple[int, int]) -> None:
    """Fail at start, with one message, when engine and camera cannot work together."""
    eng_fmt = engine.pixel_format
    if camera.pixel_format != eng_fmt:
        raise EngineError(
            f"{engine.path.name}: engine expects {eng_fmt} frames ({engine.frame_channels} channel"
            f"{'s' if engine.frame_channels > 1 else ''}) but the camera delivers {camera.pixel_format}; "
            f"set the source's format={eng_fmt} or export the engine with frame_channels="
            f"{1 if camera.pixel_format == 'Mono8' else 3}")
    if engine.frame_hw is not None and tuple(tile_hw) != tuple(engine.frame_hw):
        raise EngineError(f"{engine.path.name}: engine takes {engine.frame_hw[0]}x{engine.frame_hw[1]} tiles; "
                          f"--tile {tile_hw[0]}x{tile_hw[1]} does not match (omit --tile or export for that size)")
