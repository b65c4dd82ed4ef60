"""The benchmark's backends: every row times `Engine.infer` of a deploy engine, the call runtime.stream
and runtime.serve make (uint8 frames in, numpy outputs out; pre-processing inside the graph).

A `Runner` only builds its engine (exporting the artifact first where one is needed) and hands
its `infer` to the timing loop; nothing is run that a deployment would not run.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from deploy import Engine, load_engine, read_metadata
from deploy.ort import PROVIDERS, OrtEngine, ort_session_options
from deploy.torch_engines import TorchEngine


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    devices: Tuple[str, ...]
    precisions: Tuple[str, ...]


# One table drives validation, availability and the docs. Names are the engine backends of
# deploy.contract.ENGINE_BACKENDS, plus torch-compile (a TorchEngine compiled by Inductor) and the
# PaDiM reference.
BACKENDS: Dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("torch", "PyTorch eager (reference)", ("cpu", "cuda"), ("fp32", "fp16")),
    BackendSpec("torch-compile", "torch.compile (Inductor)", ("cpu", "cuda"), ("fp32", "fp16")),
    BackendSpec("ort-cpu", "ONNX Runtime, CPU execution provider", ("cpu",), ("fp32", "int8")),
    BackendSpec("ort-cuda", "ONNX Runtime, CUDA execution provider", ("cuda",), ("fp32",)),
    BackendSpec("ort-trt", "ONNX Runtime, TensorRT execution provider", ("cuda",), ("fp32", "fp16")),
    BackendSpec("tensorrt", "TensorRT engine (export.trt)", ("cuda",), ("fp32", "fp16", "int8")),
    BackendSpec("aoti", "AOTInductor package (export.aoti)", ("cpu", "cuda"), ("fp32",)),
    BackendSpec("padim", "PaDiM baseline, PyTorch eager, same encoder (reference)", ("cpu", "cuda"),
                ("fp32", "fp16")),
)}
ALIASES = {"compile": "torch-compile", "ort": "ort-cpu", "trt": "tensorrt"}   # earlier CLI names
REFERENCE_BACKENDS = ("torch", "padim")


class Unavailable(Exception):
    """Raised by a runner's load(): this backend cannot run here; the message is the reason."""


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _has_cxx() -> bool:
    return bool(shutil.which("g++") or shutil.which("clang++"))


class Runner:
    """One (backend, precision): `load()` builds the engine, `run(frames)` is `engine.infer`."""

    def __init__(self, backend: str, precision: str, device: str, model, size: int, workdir,
                 max_batch: int = 32, ort_threads: int = 0):
        self.backend, self.precision, self.device = backend, precision, device
        self.model, self.size, self.workdir = model, size, pathlib.Path(workdir)
        self.max_batch, self.ort_threads = int(max_batch), int(ort_threads)
        self.artifact: Optional[str] = None
        self.notes: List[str] = []
        self.engine: Optional[Engine] = None

    def run(self, frames: np.ndarray) -> Dict[str, np.ndarray]:
        return self.engine.infer(frames)

    def load(self) -> None:
        cuda = self.device.startswith("cuda")
        if cuda and not _cuda_available():
            raise Unavailable("no CUDA device (torch.cuda.is_available() is False)")
        if self.backend in ("torch", "padim", "torch-compile"):
            self._load_torch()
        elif self.backend.startswith("ort"):
            self._load_ort()
        else:
            self._load_exported()

    # -- torch ---------------------------------------------------------------------------
    def _load_torch(self):
        compiled = self.backend == "torch-compile"
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise Unavailable("fp16 eager/compile is measured on CUDA only (CPU fp16 kernels are "
                              "emulated and not a deployment path)")
        if compiled and not self.device.startswith("cuda") and not _has_cxx():
            raise Unavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++), none found")
        self.engine = TorchEngine(self.model, frame_hw=(self.size, self.size), frame_channels=3,
                                  device=self.device, compiled=compiled, precision=self.precision)
        if self.precision == "fp16":
            self.notes.append("fp16 via torch.autocast")

    # -- ONNX Runtime ------------------------------------------------------------------------
    def onnx_fp32(self) -> pathlib.Path:
        """The deployed fp32 ONNX of the model (export.onnx, no gate: rows report score diffs)."""
        from export.onnx import export_onnx

        path = self.workdir / "model.onnx"
        if not path.is_file():
            export_onnx(self.model, path, frame_hw=(self.size, self.size), frame_channels=3, check=False,
                        quiet=True)
            self.notes.append("exported by export.onnx.export_onnx")
        return path

    def _load_ort(self):
        prov = PROVIDERS[self.backend][0]
        import onnxruntime as ort

        if prov not in ort.get_available_providers():
            raise Unavailable(f"onnxruntime {ort.__version__} has no {prov} "
                              f"(available: {', '.join(ort.get_available_providers())})")
        fp32 = self.onnx_fp32()
        path, meta = fp32, read_metadata(fp32)
        if self.precision == "int8":
            path = self._int8_graph(fp32)
            self.notes.append("int8: export.precision's static Q/DQ graph (min-max, per-channel), calibrated "
                              "on 16 seeded random textures: a speed figure (accuracy: benchmarks/precision.py)")
        opts = None
        if self.backend == "ort-trt":
            opts = {"trt_fp16_enable": self.precision == "fp16", "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(self.workdir / "ort_trt_cache")}
        if self.ort_threads:
            self.notes.append(f"{self.ort_threads} intra-op thread(s)")
        self.artifact = str(path)
        self.engine = OrtEngine(path, self.backend, threads=self.ort_threads, meta=meta, provider_options=opts)

    def _int8_graph(self, fp32: pathlib.Path) -> pathlib.Path:
        # the benchmark has no normal images, so it calibrates on seeded random textures - fine
        # for speed, not for accuracy (benchmarks/precision.py measures that on real data)
        from export.check import random_frames
        from export.precision import quantize_int8

        path = self.workdir / "model.int8.onnx"
        if not path.is_file():
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)   # the quantiser logs each tensor it leaves in float
            try:
                quantize_int8(fp32, path, random_frames(16, (self.size, self.size), 3, 0))
            finally:
                root.setLevel(level)
        return path

    # -- exported artifacts: AOTInductor, TensorRT ----------------------------------------------
    def _load_exported(self):
        cuda = self.device.startswith("cuda")
        if self.backend == "tensorrt":
            import importlib.util

            if importlib.util.find_spec("tensorrt") is None:
                raise Unavailable("tensorrt not importable (pip install edge-ad[gpu] on an NVIDIA host)")
            from export.trt import export_trt

            onnx_fp32 = self.workdir / "model.onnx"
            res = export_trt(self.model, self.workdir / f"trt_{self.precision}", precision=self.precision,
                             check=False, quiet=True, min_batch=1, opt_batch=min(8, self.max_batch),
                             max_batch=self.max_batch, frame_hw=(self.size, self.size), frame_channels=3,
                             onnx_fp32=onnx_fp32 if onnx_fp32.is_file() else None)
            path = res.engine
        else:
            if not cuda and not _has_cxx():
                raise Unavailable("AOTInductor on CPU needs a C++ compiler (g++ or clang++), none found")
            from export.aoti import export_aoti

            path = self.workdir / f"aoti_{self.device.replace(':', '')}_b{self.max_batch}" / "model.pt2"
            if path.is_file():   # left by an earlier run of the same model in latency.py --workdir
                self.notes.append("package reused from --workdir (load_s excludes its export)")
            else:
                export_aoti(self.model, path, frame_hw=(self.size, self.size), frame_channels=3,
                            max_batch=self.max_batch, device=self.device, check=False, quiet=True)
        self.artifact = str(path)
        self.engine = load_engine(path, backend=self.backend, device=self.device)


def machine_lacks(backend: str) -> List[str]:
    """What this machine misses for `backend` whatever the flags (to make reasons complete)."""
    import importlib.util

    lacks = []
    if BACKENDS[backend].devices == ("cuda",) and not _cuda_available():
        lacks.append("a CUDA device")
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        lacks.append("tensorrt (not importable)")
    if backend in PROVIDERS and backend != "ort-cpu":
        import onnxruntime as ort

        if PROVIDERS[backend][0] not in ort.get_available_providers():
            lacks.append(f"onnxruntime's {PROVIDERS[backend][0]} (pip install onnxruntime-gpu)")
    return lacks


def make_runner(backend, precision, device, model, ref_model, size, workdir, max_batch=32,
                ort_threads: int = 0) -> Runner:
    """A Runner, or Unavailable when the backend cannot run on `device` / in `precision`."""
    spec = BACKENDS[backend]
    if not any(device.startswith(d) for d in spec.devices):
        lacks = machine_lacks(backend)
        raise Unavailable(f"{spec.description} runs on {'/'.join(spec.devices)}, not --device {device}"
                          + (f"; this machine also lacks: {', '.join(lacks)}" if lacks else ""))
    if precision not in spec.precisions:
        raise Unavailable(f"{precision} not offered by {backend} (offers {', '.join(spec.precisions)})")
    return Runner(backend, precision, device, ref_model if backend == "padim" else model, size, workdir,
                  max_batch, ort_threads)


def ort_op_profile(path, frames: np.ndarray, runs: int = 10, threads: int = 0, top: int = 0) -> dict:
    """Where ONNX Runtime (CPU) spends its time in the graph `path` (any ONNX, fed `frames` as its
    one input): a fresh session with the deployed settings (deploy.ort.ort_session_options) and
    its profiler on, 2 warm-up calls, then `runs` calls whose kernel time is summed per op type.
    Returns {"runs", "threads", "kernel_ms" (per call), "ops": [{"op", "ms" (per call), "nodes",
    "share"}]} sorted by time (the first `top` when top > 0). Op types are those ORT runs after
    its graph optimisations (e.g. fused Conv, the NCHWc Reorder* nodes)."""
    warmup = 2
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edge_ad_ortprof_") as tmp:
        so = ort_session_options(threads, profile_prefix=str(pathlib.Path(tmp) / "ort"))
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: frames}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(pathlib.Path(sess.end_profiling()).read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = calls[warmup][0]              # timed calls only (warm-up calls excluded)
    ms: Dict[str, float] = {}
    nodes: Dict[str, int] = {}
    for e in events:
        if (e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                and e["ts"] >= start):
            op = e.get("args", {}).get("op_name", "?")
            ms[op] = ms.get(op, 0.0) + e["dur"] / 1000.0
            nodes[op] = nodes.get(op, 0) + 1
    total = sum(ms.values())
    ops = [{"op": op, "ms": v / runs, "nodes": nodes[op] // runs, "share": v / total if total else 0.0}
           for op, v in sorted(ms.items(), key=lambda kv: -kv[1])]
    return {"runs": runs, "threads": threads, "kernel_ms": total / runs, "ops": ops[:top] if top else ops}
