"""Latency / throughput of one model on every backend present, side by side, in one run.

    python benchmarks/latency.py --ckpt model.pt [--backends torch,compile,ort,ort-cuda,ort-trt,trt,aoti]
        [--batch 1,8,32] [--precision fp32,fp16,int8] [--size 256] [--device cpu|cuda] [--reps N]
        [--quick] [--out DIR] [--compare OLD.json] [--make-bench] [--workdir DIR]

What one row measures: the deployed contract end to end - host uint8 frames (B, S, S, 3) NHWC in,
host numpy results out (anomaly map, score, normalised score, verdict, uint8 heat map): copy in,
preprocess (in the graph for exported artifacts), inference, postprocess, copy out.
Method (see benchmarks/timing.py): all (backend, precision, batch) candidates are loaded first,
warmed up (warm-up calls excluded; the first call, which includes lazy compilation, is reported as
`first_call_ms`), then timed in interleaved rounds - one call of every candidate per round - so
slow drift affects all alike. GPU calls are bracketed by CUDA events and synchronised. After
timing, a separate pass records the stage split and the peak host/device memory of one call.

Reference rows in the same run: PyTorch eager of the model (`torch`) and a PaDiM baseline on the
same frozen encoder (`padim`), so the cost of the decoder is visible. Backends that cannot run on
this machine are listed with the reason. Outputs: console table, JSON, CSV, PNG plot, Markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime as _dt
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):   # `python benchmarks/latency.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import timing

SCHEMA = "edge-ad-latency/1"
STAGES = ("copy_in", "preprocess", "infer", "postprocess", "copy_out")
# Every "ok" row carries all of these keys (values may be null where a quantity does not apply).
ROW_FIELDS = (
    "backend", "precision", "batch", "device", "status", "reason", "model", "role",
    "n", "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "images_per_s",
    "load_s", "first_call_ms", "host_load_mib", "host_first_call_mib", "host_infer_peak_mib",
    "host_mem_method",
    "device_load_mib", "device_torch_peak_mib", "device_used_delta_mib", "stages_ms", "stages_note",
    "score_max_abs_diff", "artifact", "notes",
)
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    description: str
    devices: Tuple[str, ...]
    precisions: Tuple[str, ...]


# One table drives validation, availability and the docs (ultralytics' export_formats habit).
BACKENDS: Dict[str, BackendSpec] = {b.name: b for b in (
    BackendSpec("torch", "PyTorch eager (reference)", ("cpu", "cuda"), ("fp32", "fp16")),
    BackendSpec("compile", "torch.compile (Inductor)", ("cpu", "cuda"), ("fp32", "fp16")),
    BackendSpec("ort", "ONNX Runtime, CPU execution provider", ("cpu",), ("fp32", "int8")),
    BackendSpec("ort-cuda", "ONNX Runtime, CUDA execution provider", ("cuda",), ("fp32",)),
    BackendSpec("ort-trt", "ONNX Runtime, TensorRT execution provider", ("cuda",), ("fp32", "fp16")),
    BackendSpec("trt", "TensorRT engine (export.trt)", ("cuda",), ("fp32", "fp16", "int8")),
    BackendSpec("aoti", "AOTInductor package (export.aoti)", ("cpu", "cuda"), ("fp32",)),
    BackendSpec("padim", "PaDiM baseline, PyTorch eager, same encoder (reference)", ("cpu", "cuda"),
                ("fp32", "fp16")),
)}
REFERENCE_BACKENDS = ("torch", "padim")
PRECISIONS = ("fp32", "fp16", "int8")


class BenchError(ValueError):
    """A user error in the benchmark's arguments or inputs (one clear message)."""


class Unavailable(Exception):
    """Raised by a runner's load(): this backend cannot run here; the message is the reason."""


# =============================================================================================
# environment
# =============================================================================================
def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(device: str) -> dict:
    import torch

    info = {
        "hostname": platform.node(), "platform": platform.platform(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "cuda_available": bool(torch.cuda.is_available()),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    if torch.cuda.is_available():
        idx = torch.device(device).index or 0 if str(device).startswith("cuda") else 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def _run_tool(cmd: Sequence[str], timeout: float = 10.0) -> str:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {type(e).__name__}: {e}"
    out = (p.stdout + p.stderr).strip()
    return out if p.returncode == 0 else f"exit {p.returncode}: {out}"


class JetsonProbe:
    """nvpmodel / jetson_clocks state and tegrastats samples during the run, when those exist."""

    def __init__(self, interval_ms: int = 500, max_samples: int = 400):
        self.present = bool(shutil.which("tegrastats") or shutil.which("nvpmodel")
                            or pathlib.Path("/etc/nv_tegra_release").is_file())
        self.interval_ms, self.max_samples = interval_ms, max_samples
        self.samples: List[str] = []
        self._proc = None
        self._thread = None

    def __enter__(self):
        if self.present and shutil.which("tegrastats"):
            try:
                self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read, daemon=True)
                self._thread.start()
            except OSError:
                self._proc = None
        return self

    def _read(self):
        for line in self._proc.stdout:
            if len(self.samples) < self.max_samples:
                self.samples.append(line.strip())

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return False

    def report(self):
        if not self.present:
            return "not available"
        return {
            "nv_tegra_release": (pathlib.Path("/etc/nv_tegra_release").read_text().strip()
                                 if pathlib.Path("/etc/nv_tegra_release").is_file() else "not available"),
            "nvpmodel": _run_tool(["nvpmodel", "-q"]) if shutil.which("nvpmodel") else "not available",
            "jetson_clocks": (_run_tool(["jetson_clocks", "--show"]) if shutil.which("jetson_clocks")
                              else "not available"),
            "tegrastats": self.samples if shutil.which("tegrastats") else "not available",
        }


# =============================================================================================
# runners: load() once per (backend, precision); run(frames, stages) per call
# =============================================================================================
def _null_stage(_name):
    return contextlib.nullcontext()


def postprocess(anomaly_map, score, normalized, stats):
    """What a deployment does after inference: verdict and an 8-bit heat map (torch or numpy)."""
    span = max(float(stats.map_threshold) - float(stats.map_low), 1e-12)
    scaled = (anomaly_map - float(stats.map_low)) * (127.5 / span)
    if isinstance(scaled, np.ndarray):
        heat = np.clip(scaled, 0, 255).astype(np.uint8)
    else:
        import torch

        heat = scaled.clamp(0, 255).to(torch.uint8)
    return {"anomaly_map": anomaly_map, "score": score, "normalized_score": normalized,
            "verdict": normalized >= 0.5, "heat": heat}


class Runner:
    """Base: subclasses set `stages_note` and implement load() and run()."""

    stages_note = ""

    def __init__(self, backend: str, precision: str, device: str, model, size: int, workdir,
                 max_batch: int = 32):
        self.backend, self.precision, self.device = backend, precision, device
        self.max_batch = int(max_batch)
        self.model, self.size, self.workdir = model, size, pathlib.Path(workdir)
        self.artifact: Optional[str] = None
        self.notes: List[str] = []

    def load(self) -> None:
        raise NotImplementedError

    def run(self, frames: np.ndarray, stage: Callable = _null_stage) -> dict:
        raise NotImplementedError


def _deploy(model, size):
    from models.deploy import DeployModule

    return DeployModule(model, frame_hw=(size, size), frame_channels=3).eval()


class TorchRunner(Runner):
    """Eager (or torch.compile'd) DeployModule. Eager splits all five stages; compiled runs the
    preprocess inside the compiled graph."""

    def __init__(self, *a, compiled: bool = False, **k):
        super().__init__(*a, **k)
        self.compiled = compiled
        self.stages_note = ("preprocess runs inside the compiled graph (counted in infer)" if compiled
                            else "all stages split (CUDA: synchronised at each boundary)")

    def load(self):
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise Unavailable("no CUDA device (torch.cuda.is_available() is False)")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise Unavailable("fp16 eager/compile is measured on CUDA only (CPU fp16 kernels are "
                              "emulated and not a deployment path)")
        if self.compiled:
            from torch._inductor import cpp_builder  # noqa: F401  (fails early if Inductor is absent)

            if not self.device.startswith("cuda") and not (shutil.which("g++") or shutil.which("clang++")):
                raise Unavailable("torch.compile on CPU needs a C++ compiler (g++ or clang++), none found")
        model = self.model if self.device == "cpu" else copy.deepcopy(self.model)   # exporters get a CPU model
        self.deploy = _deploy(model, self.size).to(self.device)
        self.graph = torch.compile(self.deploy, dynamic=False) if self.compiled else None
        self.notes.append("fp16 via torch.autocast" if self.precision == "fp16" else "")
        self.stats = self.model.score_stats

    def _autocast(self):
        import torch

        if self.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def run(self, frames, stage=_null_stage):
        import torch

        with torch.inference_mode(), self._autocast():
            with stage("copy_in"):
                t = torch.from_numpy(frames).to(self.device, non_blocking=True)
            if self.compiled:
                with stage("infer"):
                    amap, score, norm = self.graph(t)
            else:
                with stage("preprocess"):
                    x = self.deploy.preprocess(t)
                with stage("infer"):
                    amap, score = self.deploy.model(x)
            with stage("postprocess"):
                amap, score = amap.float(), score.float()
                if not self.compiled:
                    norm = self.stats.normalize(score)
                out = postprocess(amap, score, norm, self.stats)
            with stage("copy_out"):
                out = {k: v.cpu().numpy() for k, v in out.items()}
        return out


def _call_exporter(fn, model, out: pathlib.Path, **kw):
    """Call an export.* library function with the keyword arguments it takes (others dropped:
    the exporters validate their own argument tables). Parity gates are left to the exporters'
    own tests - the benchmark reports `score_max_abs_diff` against eager for every row."""
    import inspect

    params = inspect.signature(fn).parameters
    return fn(model, out, **{k: v for k, v in kw.items() if k in params})


def _export_onnx(model, size: int, path: pathlib.Path) -> str:
    """The deployed ONNX (uint8 frames in) from export.onnx.export_onnx."""
    try:
        from export.onnx import export_onnx
    except ImportError as e:
        raise Unavailable(f"export.onnx not importable ({e})") from None
    _call_exporter(export_onnx, model, path, frame_hw=(size, size), frame_channels=3, check=False,
                   quiet=True)
    return "export.onnx.export_onnx"


class OrtRunner(Runner):
    """ONNX Runtime on the exported artifact. Preprocess is in the graph; CUDA/TensorRT EPs use
    I/O binding so copy in / copy out are separate stages. Session settings are the deployed
    ones (runtime.engines.ort_session_options); `threads` = intra-op threads (0 = its default)."""

    PROVIDERS = {"ort": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-trt": "TensorrtExecutionProvider"}
    threads = 0

    def load(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise Unavailable("onnxruntime not importable (pip install onnxruntime or onnxruntime-gpu)") from None
        prov = self.PROVIDERS[self.backend]
        if prov not in ort.get_available_providers():
            raise Unavailable(f"onnxruntime {ort.__version__} has no {prov} "
                              f"(available: {', '.join(ort.get_available_providers())})")
        self.ort = ort
        fp32 = self.workdir / "model.onnx"
        if not fp32.is_file():
            self.notes.append(f"exported by {_export_onnx(self.model, self.size, fp32)}")
        path = fp32
        if self.precision == "int8":
            # the deployed INT8 artifact: export.trt's explicit Q/DQ graph (static ranges); the
            # benchmark has no normal images, so it calibrates on seeded random textures - fine for
            # speed, not for accuracy (benchmarks/precision.py measures that on real data)
            from export.check import random_frames
            from export.trt import quantize_int8

            path = self.workdir / "model.int8.onnx"
            if not path.is_file():
                root = logging.getLogger()
                level = root.level
                root.setLevel(logging.ERROR)   # the quantiser logs each tensor it leaves in float
                try:
                    quantize_int8(fp32, path, random_frames(16, (self.size, self.size), 3, 0))
                finally:
                    root.setLevel(level)
            self.notes.append("int8: export.trt's static Q/DQ graph (min-max, per-channel), calibrated "
                              "on 16 seeded random textures: a speed figure (accuracy: benchmarks/precision.py)")
        self.artifact = str(path)
        from runtime.engines import ort_session_options

        opts = ort_session_options(self.threads)
        opts.log_severity_level = 3
        if self.threads:
            self.notes.append(f"{self.threads} intra-op thread(s)")
        providers = [prov] if prov == "CPUExecutionProvider" else [prov, "CPUExecutionProvider"]
        if self.backend == "ort-trt":
            providers = [(prov, {"trt_fp16_enable": self.precision == "fp16",
                                 "trt_engine_cache_enable": True,
                                 "trt_engine_cache_path": str(self.workdir / "ort_trt_cache")}),
                         "CUDAExecutionProvider", "CPUExecutionProvider"]
        self.sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.out_names = [o.name for o in self.sess.get_outputs()][:3]
        self.stats = self.model.score_stats
        self.on_gpu = prov != "CPUExecutionProvider"
        self.stages_note = ("preprocess in the graph (counted in infer); I/O binding on the device"
                            if self.on_gpu else
                            "preprocess in the graph (counted in infer); CPU EP: inputs/outputs are "
                            "host arrays, copy in/out are not separate work (null)")

    def run(self, frames, stage=_null_stage):
        if not self.on_gpu:
            with stage("infer"):
                amap, score, norm = self.sess.run(self.out_names, {"frames": frames})
            with stage("postprocess"):
                return postprocess(amap, score, norm, self.stats)
        io = self.sess.io_binding()
        with stage("copy_in"):
            val = self.ort.OrtValue.ortvalue_from_numpy(frames, "cuda", 0)
            io.bind_ortvalue_input("frames", val)
            for n in self.out_names:
                io.bind_output(n, "cuda")
        with stage("infer"):
            self.sess.run_with_iobinding(io)
        with stage("copy_out"):
            amap, score, norm = io.copy_outputs_to_cpu()[:3]
        with stage("postprocess"):
            return postprocess(amap, score, norm, self.stats)


def ort_op_profile(path, frames: np.ndarray, runs: int = 10, threads: int = 0, top: int = 0) -> dict:
    """Where ONNX Runtime (CPU) spends its time: a fresh session with the deployed settings and
    its profiler on, 2 warm-up calls, then `runs` calls whose kernel time is summed per op type.
    Returns {"runs", "threads", "kernel_ms" (per call), "ops": [{"op", "ms" (per call), "nodes",
    "share"}]} sorted by time (the first `top` when top > 0). Op types are those ORT runs after
    its graph optimisations (e.g. fused Conv, the NCHWc Reorder* nodes)."""
    import onnxruntime as ort

    from runtime.engines import ort_session_options

    warmup = 2
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


def _probe(module: str, names: Sequence[str]):
    """First attribute of `module` among `names`, or raise Unavailable naming what is missing."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"{module} not importable ({e})") from None
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    raise Unavailable(f"{module} has none of {', '.join(names)}")


class EngineRunner(Runner):
    """An artifact built by the export library, run through runtime.engines (the deployed path):
    `aoti` (export.aoti -> model.pt2) and `trt` (export.trt -> model.engine). Engine.infer does copy
    in, the graph (preprocess included) and copy out in one call."""

    stages_note = "copy in, preprocess and copy out happen inside runtime Engine.infer (counted in infer)"
    EXPORTERS = {"aoti": ("export.aoti", ("export_aoti",), "model.pt2", "aoti"),
                 "trt": ("export.trt", ("export_trt", "export_tensorrt", "build_engine"), "model.engine",
                         "tensorrt")}

    def load(self):
        import torch

        cuda = self.device.startswith("cuda")
        if self.backend == "trt":
            try:
                import tensorrt  # noqa: F401
            except ImportError:
                raise Unavailable("tensorrt not importable (pip install edge-ad[gpu] on an NVIDIA host)") from None
        if cuda and not torch.cuda.is_available():
            raise Unavailable("no CUDA device (torch.cuda.is_available() is False)")
        if not cuda and not (shutil.which("g++") or shutil.which("clang++")):
            raise Unavailable("AOTInductor on CPU needs a C++ compiler (g++ or clang++), none found")
        module, names, file_name, engine_backend = self.EXPORTERS[self.backend]
        export_fn = _probe(module, names)
        load_engine = _probe("runtime.engines", ("load_engine",))
        path = self.workdir / f"{self.precision}.{self.device.replace(':', '')}.b{self.max_batch}.{file_name}"
        onnx_fp32 = self.workdir / "model.onnx"
        if path.is_file():   # left in --workdir by an earlier run of the same model
            self.notes.append("artifact reused from --workdir (load_s excludes its export)")
        else:
            _call_exporter(export_fn, self.model, path, frame_hw=(self.size, self.size), frame_channels=3,
                           precision=self.precision, device=self.device, check=False, quiet=True,
                           min_batch=1, opt_batch=min(8, self.max_batch), max_batch=self.max_batch,
                           onnx_fp32=onnx_fp32 if onnx_fp32.is_file() else None)
        self.artifact = str(path)
        self.engine = load_engine(path, backend=engine_backend, device=self.device)
        self.stats = self.model.score_stats

    def run(self, frames, stage=_null_stage):
        with stage("infer"):
            out = self.engine.infer(frames)
        with stage("postprocess"):
            return postprocess(out["anomaly_map"], out["score"], out["normalized_score"], self.stats)


def _machine_lacks(backend: str) -> List[str]:
    """What this machine misses for `backend` whatever the flags (to make reasons complete)."""
    import importlib.util

    import torch

    lacks = []
    if "cuda" in BACKENDS[backend].devices and BACKENDS[backend].devices == ("cuda",) \
            and not torch.cuda.is_available():
        lacks.append("a CUDA device")
    if backend == "trt" and importlib.util.find_spec("tensorrt") is None:
        lacks.append("tensorrt (not importable)")
    if backend in OrtRunner.PROVIDERS and backend != "ort":
        try:
            import onnxruntime as ort

            if OrtRunner.PROVIDERS[backend] not in ort.get_available_providers():
                lacks.append(f"onnxruntime's {OrtRunner.PROVIDERS[backend]} (pip install onnxruntime-gpu)")
        except ImportError:
            lacks.append("onnxruntime")
    return lacks


def make_runner(backend, precision, device, model, ref_model, size, workdir, max_batch=32) -> Runner:
    spec = BACKENDS[backend]
    if not any(device.startswith(d) for d in spec.devices):
        lacks = _machine_lacks(backend)
        raise Unavailable(f"{spec.description} runs on {'/'.join(spec.devices)}, not --device {device}"
                          + (f"; this machine also lacks: {', '.join(lacks)}" if lacks else ""))
    if precision not in spec.precisions:
        raise Unavailable(f"{precision} not offered by {backend} (offers {', '.join(spec.precisions)})")
    args = (backend, precision, device, ref_model if backend == "padim" else model, size, workdir, max_batch)
    if backend in ("torch", "padim"):
        return TorchRunner(*args)
    if backend == "compile":
        return TorchRunner(*args, compiled=True)
    if backend.startswith("ort"):
        return OrtRunner(*args)
    if backend in EngineRunner.EXPORTERS:
        return EngineRunner(*args)
    raise BenchError(f"--backends: unknown backend {backend!r}")  # pragma: no cover (validated earlier)


# =============================================================================================
# models
# =============================================================================================
def _small_dvad_config(size: int) -> dict:
    return {"input_size": size}


def build_models(ckpt: Optional[str], size: Optional[int], train: bool, model_name: str = "dvad",
                 log=print):
    """(model, padim reference, description of where the model came from).

    The reference PaDiM uses the model's encoder architecture; its encoder weights are random and
    its Gaussians fitted on random images - it is a timing reference, not a detector here."""
    import torch
    from models import create_model

    if ckpt:
        from models.checkpoint import CheckpointError, load_checkpoint

        try:
            model = load_checkpoint(ckpt)
        except CheckpointError as e:
            raise BenchError(f"--ckpt: {e}") from None
        source = f"checkpoint {ckpt}"
    else:
        size = size or 256
        model, source = None, None
        if train:
            model, source = _train_small(size, log)
        if model is None:
            cfg = _small_dvad_config(size) if model_name == "dvad" else {"input_size": size}
            try:
                model = create_model(model_name, pretrained=False, **cfg)
            except (ImportError, ValueError) as e:
                raise BenchError(f"--model {model_name}: cannot be built ({e})") from None
            source = (f"freshly initialised {model_name} (untrained, random encoder weights: "
                      f"timings only, scores meaningless)")
    model = model.eval()
    in_size = model.preprocess.input_size
    enc = getattr(model.config, "encoder", "efficientnet_lite0")
    ref = create_model("padim", pretrained=False, input_size=in_size, encoder=enc).eval()
    g = torch.Generator().manual_seed(0)
    ref.prepare([torch.randn(4, 3, in_size, in_size, generator=g) for _ in range(2)])
    return model, ref, source


def _train_small(size: int, log):
    """A small DVAD trained for a tiny budget on synthetic data (models.train.train), or (None, None)."""
    try:
        from models.synthetic import generate_dataset
        from models.train import train
    except ImportError as e:
        log(f"[bench] models.train not available ({e}); using a freshly initialised model")
        return None, None
    root = pathlib.Path(tempfile.mkdtemp(prefix="edge_ad_bench_"))
    epochs, n_train = 2, 16
    try:
        generate_dataset(root / "data", classes=("texture",), n_train=n_train, n_test_good=2,
                         n_test_defect=2, size=size)
        model, _summary = train(root / "data", model="dvad", epochs=epochs, batch_size=8,
                                config=_small_dvad_config(size), progress=False,
                                log=lambda msg: log(f"[bench] train: {msg}"))
        return model, (f"small DVAD (default config, {size}px) trained {epochs} epochs on {n_train} "
                       f"synthetic 'texture' images by models.train.train")
    except Exception as e:   # a mismatch with train()'s signature must not stop the benchmark
        log(f"[bench] models.train.train could not be used ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]}); using a freshly initialised model")
        return None, None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _param_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# =============================================================================================
# the benchmark
# =============================================================================================
@dataclass
class Settings:
    backends: Tuple[str, ...] = ("torch", "compile", "ort", "ort-cuda", "ort-trt", "trt", "aoti")
    batches: Tuple[int, ...] = (1, 8, 32)
    precisions: Tuple[str, ...] = ("fp32",)
    size: Optional[int] = None
    device: str = "cpu"
    reps: int = 20
    warmup: int = 3
    stage_reps: int = 5
    quick: bool = False
    skip: Dict[str, str] = field(default_factory=dict)   # backend -> reason it is not run
    ort_threads: int = 0     # intra-op threads of the ORT sessions (0 = the engine default)
    ort_profile: int = 0     # profiled calls per ORT CPU row after timing (0 = no profile)


def _blank_row(backend, precision, batch, device, role, model_name) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(backend=backend, precision=precision, batch=batch, device=device, role=role,
               model=model_name, notes="")
    return row


def run_benchmark(model, ref_model, settings: Settings, workdir, log=print, progress=True) -> dict:
    """Time every (backend, precision, batch); returns the result dict (schema SCHEMA)."""
    from tqdm import tqdm

    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    size = settings.size or model.preprocess.input_size
    device = settings.device
    rows: List[dict] = []
    runners: Dict[Tuple[str, str], Runner] = {}
    backends = list(dict.fromkeys(list(REFERENCE_BACKENDS[:1]) + list(settings.backends)
                                  + list(REFERENCE_BACKENDS[1:])))
    load_info: Dict[Tuple[str, str], dict] = {}
    for backend in backends:
        for precision in settings.precisions:
            role = "reference" if backend in REFERENCE_BACKENDS else "backend"
            name = ref_model.model_name if backend == "padim" else model.model_name
            key = (backend, precision)
            reason = None
            try:
                r = make_runner(backend, precision, device, model, ref_model, size, workdir,
                                max_batch=max(settings.batches))
            except Unavailable as e:
                reason = str(e)
            else:
                if isinstance(r, OrtRunner):
                    r.threads = settings.ort_threads
            reason = reason or settings.skip.get(backend)
            if reason is None:
                try:
                    log(f"[bench] loading {backend} {precision} ...")
                    with timing.HostMemory() as hm, timing.DeviceMemory(device) as dm:
                        t0 = time.perf_counter()
                        r.load()
                        load_s = time.perf_counter() - t0
                    runners[key] = r
                    load_info[key] = dict(load_s=load_s, host_load_mib=timing.mib(hm.peak_delta_bytes),
                                          host_mem_method=hm.method,
                                          device_load_mib=timing.mib(dm.device_used_delta_bytes))
                except Unavailable as e:
                    reason = str(e)
                except Exception as e:   # a backend that breaks must not stop the others
                    reason = f"load failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            if reason is not None:
                row = _blank_row(backend, precision, None, device, role, name)
                row.update(status="unavailable", reason=reason)
                rows.append(row)
                log(f"[bench] {backend} {precision}: unavailable - {reason}")

    rng = np.random.default_rng(0)
    frames = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in settings.batches}

    candidates: List[timing.Candidate] = []
    meta: Dict[int, dict] = {}
    for key, r in runners.items():
        for b in settings.batches:
            f = frames[b]
            c = timing.Candidate(name=f"{key[0]}/{key[1]}/b{b}", fn=(lambda r=r, f=f: r.run(f)), device=device)
            meta[id(c)] = dict(runner=r, key=key, batch=b, first_call_ms=None, host_first_call_mib=None)
            # first call (lazy compilation, allocator growth, engine setup) is reported on its own
            try:
                with timing.HostMemory() as hm:
                    meta[id(c)]["first_call_ms"] = timing.Clock(device).time(c.fn)
                meta[id(c)]["host_first_call_mib"] = timing.mib(hm.peak_delta_bytes)
            except Exception as e:
                c.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            candidates.append(c)
    live = [c for c in candidates if c.error is None]
    bar = tqdm(total=settings.reps, desc="timing rounds", unit="round", disable=not progress)
    with JetsonProbe() as jetson:
        timing.interleaved(live, reps=settings.reps, warmup=max(settings.warmup - 1, 0),
                           progress=lambda r: bar.update(1))
    bar.close()

    # the fp32 eager outputs of the same frames, for score_max_abs_diff (after timing: the first
    # calls above stay real first calls)
    reference_scores = {}
    if ("torch", "fp32") in runners:
        for b in settings.batches:
            try:
                reference_scores[b] = runners[("torch", "fp32")].run(frames[b])["score"].astype(np.float64)
            except Exception:   # its own row reports the error
                pass
    for c in candidates:
        m = meta[id(c)]
        r, (backend, precision), b = m["runner"], m["key"], m["batch"]
        role = "reference" if backend in REFERENCE_BACKENDS else "backend"
        row = _blank_row(backend, precision, b, device, role, r.model.model_name)
        row.update(load_info[(backend, precision)])
        row.update(first_call_ms=m["first_call_ms"], host_first_call_mib=m["host_first_call_mib"],
                   artifact=r.artifact, stages_note=r.stages_note, notes="; ".join(n for n in r.notes if n))
        if c.error is not None or not c.samples_ms:
            row.update(status="error", reason=c.error or "no samples")
            rows.append(row)
            continue
        row.update(status="ok", reason="")
        row.update(timing.summarize(c.samples_ms, batch=b))
        # stage split, then memory of one call (both after timing, never inside it)
        st = timing.StageTimer(device)
        try:
            for _ in range(settings.stage_reps):
                out = r.run(frames[b], st.stage)
            with timing.HostMemory() as hm, timing.DeviceMemory(device) as dm:
                r.run(frames[b])
        except Exception as e:   # timed fine but failed later: keep the timings, say what failed
            row.update(status="error", reason=f"after timing: {type(e).__name__}: "
                                              f"{(str(e).strip().splitlines() or [''])[0]}")
            rows.append(row)
            continue
        med = st.medians()
        row["stages_ms"] = {s: med.get(s) for s in STAGES}
        row.update(host_infer_peak_mib=timing.mib(hm.peak_delta_bytes), host_mem_method=hm.method,
                   device_torch_peak_mib=timing.mib(dm.torch_peak_bytes),
                   device_used_delta_mib=timing.mib(dm.device_used_delta_bytes))
        if b in reference_scores and backend != "padim":
            row["score_max_abs_diff"] = float(np.max(np.abs(out["score"].astype(np.float64)
                                                            - reference_scores[b])))
        rows.append(row)
    ort_profiles = {}
    if settings.ort_profile:   # after all timing: where ONNX Runtime spends its time, per op type
        for (backend, precision), r in runners.items():
            if isinstance(r, OrtRunner) and not r.on_gpu:
                for b in settings.batches:
                    try:
                        ort_profiles[f"{backend}/{precision}/b{b}"] = ort_op_profile(
                            r.artifact, frames[b], runs=settings.ort_profile, threads=settings.ort_threads)
                    except Exception as e:   # a profile that fails must not lose the timings
                        log(f"[bench] ORT profile of {backend} {precision} b{b} failed: {type(e).__name__}: {e}")
    return {
        "schema": SCHEMA,
        "ort_profiles": ort_profiles,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": dict(host_info(device), loadavg_at_start=load_before),
        "jetson": jetson.report(),
        "settings": {"backends": list(backends), "batches": list(settings.batches),
                     "precisions": list(settings.precisions), "size": size, "device": device,
                     "reps": settings.reps, "warmup": settings.warmup, "stage_reps": settings.stage_reps,
                     "quick": settings.quick, "interleaved": True},
        "model": {"name": model.model_name, "params": _param_count(model),
                  "config": model.config.to_dict()},
        "reference_model": {"name": ref_model.model_name, "params": _param_count(ref_model),
                            "config": ref_model.config.to_dict()},
        "rows": rows,
    }


# =============================================================================================
# comparison and outputs
# =============================================================================================
def _row_key(row) -> Tuple:
    return (row["backend"], row["precision"], row["batch"], row["device"])


def compare_results(new: dict, old: dict) -> List[dict]:
    """Match ok rows by (backend, precision, batch, device): latency ratio new/old, speedup old/new."""
    old_rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    out = []
    for r in new.get("rows", []):
        o = old_rows.get(_row_key(r))
        if r.get("status") != "ok" or o is None:
            continue
        out.append({
            "backend": r["backend"], "precision": r["precision"], "batch": r["batch"], "device": r["device"],
            "old_median_ms": o["median_ms"], "new_median_ms": r["median_ms"],
            "latency_ratio": r["median_ms"] / o["median_ms"],
            "speedup": o["median_ms"] / r["median_ms"],
            "throughput_ratio": r["images_per_s"] / o["images_per_s"],
            "p99_ratio": r["p99_ms"] / o["p99_ms"],
        })
    return out


def _fmt(v, nd=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _table_rows(result) -> Tuple[List[str], List[List[str]]]:
    head = ["backend", "precision", "batch", "median ms", "p90 ms", "p99 ms", "img/s", "load s",
            "first call ms", "host MiB", "dev MiB", "score diff"]
    body = []
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        dev = r["device_torch_peak_mib"] if r["device_torch_peak_mib"] is not None else r["device_used_delta_mib"]
        host = sum(v for v in (r["host_load_mib"], r["host_first_call_mib"], r["host_infer_peak_mib"])
                   if v is not None)
        body.append([r["backend"] + (" (ref)" if r["role"] == "reference" else ""), r["precision"],
                     str(r["batch"]), _fmt(r["median_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                     _fmt(r["images_per_s"], 1), _fmt(r["load_s"]), _fmt(r["first_call_ms"], 0),
                     _fmt(host, 1), _fmt(dev, 1),
                     "-" if r["score_max_abs_diff"] is None else f"{r['score_max_abs_diff']:.1e}"])
    return head, body


def format_table(result) -> str:
    head, body = _table_rows(result)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    stage_lines = []
    for r in result["rows"]:
        if r["status"] == "ok" and r["stages_ms"]:
            parts = ", ".join(f"{s} {_fmt(v)}" for s, v in r["stages_ms"].items())
            stage_lines.append(f"  {r['backend']}/{r['precision']}/b{r['batch']}: {parts}")
    if stage_lines:
        lines += ["", "stage split (median ms; '-' = not a separate stage, see JSON stages_note):"] + stage_lines
    un = [r for r in result["rows"] if r["status"] != "ok"]
    if un:
        lines += ["", "not run:"]
        lines += [f"  {r['backend']} {r['precision']}" + (f" b{r['batch']}" if r["batch"] else "")
                  + f": {r['status']} - {r['reason']}" for r in un]
    return "\n".join(lines)


def format_markdown(result, command: str) -> str:
    h = result["host"]
    m = result["model"]
    head, body = _table_rows(result)
    lines = [
        f"Machine: {h['cpu']} ({h['cpu_count']} cores, {h['torch_threads']} torch threads, load average "
        f"{_fmt((h.get('loadavg_at_start') or [None])[0])} at start)"
        + (f", GPU {h['gpu']}" if h.get("gpu") else "") + f"; torch {h['torch']}, onnxruntime "
        f"{h.get('onnxruntime')}; {result['created']}.",
        f"Model: {m['name']} ({m['params'] / 1e6:.2f} M parameters; {result.get('model_source', '')}), "
        f"reference PaDiM {result['reference_model']['params'] / 1e6:.2f} M; input "
        f"{result['settings']['size']}x{result['settings']['size']} uint8 frames, device "
        f"{result['settings']['device']}, {result['settings']['reps']} interleaved rounds after warm-up.",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", "Latency per batch call, uint8 frames in, numpy results out. first call = lazy compile / "
              "set-up; host MiB = rise of the process's peak resident memory while loading, during the "
              "first call and during a later call (backends share one process: weights loaded once count "
              "once); score diff = max |score - PyTorch eager fp32 score| on the same frames."]
    un = [r for r in result["rows"] if r["status"] != "ok"]
    if un:
        lines += ["", "Not run here:"]
        lines += [f"- {r['backend']} {r['precision']}: {r['reason']}" for r in un]
    return "\n".join(lines) + "\n"


def write_csv(result, path):
    cols = [c for c in ROW_FIELDS if c != "stages_ms"] + [f"stage_{s}_ms" for s in STAGES]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in result["rows"]:
            d = {k: r.get(k) for k in cols if k in r and k != "stages_ms"}
            for s in STAGES:
                d[f"stage_{s}_ms"] = (r.get("stages_ms") or {}).get(s)
            w.writerow(d)


def write_plot(result, path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): no plot"
    series: Dict[str, List[Tuple[int, float, float]]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['backend']} {r['precision']}", []).append(
                (r["batch"], r["median_ms"], r["images_per_s"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in sorted(series.items()):
        pts.sort()
        b = [p[0] for p in pts]
        a1.plot(b, [p[1] for p in pts], marker="o", label=name)
        a2.plot(b, [p[2] for p in pts], marker="o", label=name)
    batches = sorted({p[0] for pts in series.values() for p in pts})
    for ax, yl, t in ((a1, "median latency per batch (ms)", "latency vs batch"),
                      (a2, "images / s", "throughput vs batch")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(yl)
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8)
    h = result["host"]
    fig.suptitle(f"{result['model']['name']} {result['settings']['size']}px, {result['settings']['device']}: "
                 f"{h.get('gpu') or h['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(result, out_dir, command: str) -> Dict[str, str]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latency.json", "csv": out / "latency.csv", "png": out / "latency.png",
             "md": out / "latency.md"}
    result["command"] = command
    plot_err = write_plot(result, paths["png"])
    if plot_err:
        result.setdefault("warnings", []).append(plot_err)
        del paths["png"]
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_csv(result, paths["csv"])
    paths["md"].write_text(format_markdown(result, command))
    return {k: str(v) for k, v in paths.items()}


# =============================================================================================
# CLI
# =============================================================================================
def _csv_list(text: str, what: str, allowed=None, cast=str) -> Tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"--{what}: expected a comma-separated list, got {text!r}")
    out = []
    for t in items:
        try:
            v = cast(t)
        except ValueError:
            raise BenchError(f"--{what}: {t!r} is not a valid {cast.__name__}") from None
        if allowed is not None and v not in allowed:
            raise BenchError(f"--{what}: unknown value {t!r}; expected some of {', '.join(allowed)}")
        if cast is int and v < 1:
            raise BenchError(f"--{what}: expected positive integers, got {t!r}")
        out.append(v)
    return tuple(dict.fromkeys(out))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="model checkpoint (model.pt); default: a small DVAD (see --make-bench)")
    p.add_argument("--model", default="dvad",
                   help="registered model built when no --ckpt is given (default dvad)")
    p.add_argument("--backends", default=None,
                   help=f"comma list from {','.join(b for b in BACKENDS if b != 'padim')} "
                        "(default: all; torch and the padim reference are always added)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8,32)")
    p.add_argument("--precision", default=None,
                   help="comma list from fp32,fp16,int8 (default fp32; --make-bench fp32,int8)")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default: the model's input size)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 20; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per candidate (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="seconds on CPU: tiny model (64 px), batch 1, torch + ort + padim, few rounds")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/out)")
    p.add_argument("--compare", help="an earlier latency.json: print new/old ratios")
    p.add_argument("--make-bench", action="store_true",
                   help="what `make bench` runs: small DVAD (trained briefly on synthetic data when "
                        "models.train is available), the CPU set, benchmarks/out/latency.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workdir", default=None,
                   help="keep exported artifacts here and reuse those an earlier run of the same model left "
                        "(default: a temporary folder, removed afterwards)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="intra-op threads of the ONNX Runtime sessions (default 0: the engine's default)")
    p.add_argument("--ort-profile", type=int, default=0, metavar="N",
                   help="after timing, N profiled calls per ORT CPU row: kernel time per op type "
                        "(console and JSON 'ort_profiles')")
    return p.parse_args(argv)


def settings_from_args(a) -> Settings:
    import torch

    if a.size is not None and a.size < 16:
        raise BenchError(f"--size: expected >= 16 pixels, got {a.size}")
    for name in ("reps", "warmup"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "reps" else 0):
            raise BenchError(f"--{name}: expected a positive number, got {v}")
    device = a.device or ("cuda" if torch.cuda.is_available() and not (a.quick or a.make_bench) else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BenchError(f"--device: expected cpu or cuda[:i], got {device!r}")
    s = Settings(device=device)
    names = tuple(b for b in BACKENDS if b != "padim")
    skip = {}
    if a.quick:   # every backend is listed; the slow-to-build ones say why they did not run
        s.batches, s.reps, s.warmup, s.stage_reps = (1,), 5, 1, 2
        skip = {b: "skipped by --quick (build/compile takes minutes; run without --quick)"
                for b in ("compile", "aoti", "trt", "ort-trt")}
    elif a.make_bench:   # the CPU set on a small model: minutes on 2 cores
        s.backends = ("torch", "compile", "ort", "aoti")
        s.batches, s.reps, s.stage_reps = (1, 4), 8, 3
    if a.backends:
        s.backends = _csv_list(a.backends, "backends", allowed=names + ("padim",))
    if a.batch:
        s.batches = _csv_list(a.batch, "batch", cast=int)
    default_precision = "fp32,int8" if a.make_bench and not a.quick else "fp32"
    s.precisions = _csv_list(a.precision or default_precision, "precision", allowed=PRECISIONS)
    s.size = a.size
    s.reps = a.reps if a.reps is not None else s.reps
    s.warmup = a.warmup if a.warmup is not None else s.warmup
    s.quick = a.quick
    s.skip = {b: r for b, r in skip.items() if b in s.backends}
    for name in ("ort_threads", "ort_profile"):
        if getattr(a, name) < 0:
            raise BenchError(f"--{name.replace('_', '-')}: expected 0 or a positive number, got {getattr(a, name)}")
    s.ort_threads, s.ort_profile = a.ort_threads, a.ort_profile
    return s


RESULTS_MD = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
BLOCK_START, BLOCK_END = "<!-- make-bench:start -->", "<!-- make-bench:end -->"


def refresh_results_block(results_md: pathlib.Path, table_md: str) -> pathlib.Path:
    """Replace the text between the make-bench markers of RESULTS.md with `table_md` (the markers
    and a heading are appended when the file has none); everything else is left as it was."""
    text = results_md.read_text() if results_md.exists() else "# Results\n"
    block = f"{BLOCK_START}\n{table_md.strip()}\n{BLOCK_END}"
    if BLOCK_START in text and BLOCK_END in text and text.index(BLOCK_START) < text.index(BLOCK_END):
        head, rest = text.split(BLOCK_START, 1)
        text = head + block + rest.split(BLOCK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## `make bench` (latest run)\n\n" + block + "\n"
    results_md.write_text(text)
    return results_md


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        s = settings_from_args(a)
        old = None
        if a.compare:
            try:
                old = json.loads(pathlib.Path(a.compare).read_text())
            except (OSError, ValueError) as e:
                raise BenchError(f"--compare {a.compare}: not a readable latency JSON ({e})") from None
            if old.get("schema") != SCHEMA:
                raise BenchError(f"--compare {a.compare}: schema {old.get('schema')!r}, expected {SCHEMA!r}")
        size = a.size
        if not a.ckpt and size is None:
            size = 64 if a.quick else 128 if a.make_bench else 256
        model, ref, source = build_models(a.ckpt, size, train=a.make_bench and not a.ckpt,
                                          model_name=a.model)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[bench] model: {source}")
    with contextlib.ExitStack() as stack:
        if a.workdir:
            work = pathlib.Path(a.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="edge_ad_latency_"))
        result = run_benchmark(model, ref, s, work, progress=not a.no_progress)
    result["model_source"] = source
    if old is not None:
        result["compare"] = {"against": str(a.compare), "rows": compare_results(result, old)}
    paths = write_outputs(result, a.out, command)
    if a.make_bench and not a.quick:
        paths["results"] = str(refresh_results_block(RESULTS_MD, pathlib.Path(paths["md"]).read_text()))
    print()
    print(format_table(result))
    for key, prof in result.get("ort_profiles", {}).items():
        print(f"\nONNX Runtime profile {key} ({prof['runs']} calls, threads {prof['threads'] or 'default'}): "
              f"kernel time {prof['kernel_ms']:.2f} ms per call")
        for o in prof["ops"][:12]:
            print(f"  {o['op']:<24}{o['ms']:>9.2f} ms {o['nodes']:>5} nodes {100 * o['share']:>6.1f} %")
    if old is not None:
        print(f"\ncompared with {a.compare} (latency ratio new/old; < 1 is faster):")
        for c in result["compare"]["rows"]:
            print(f"  {c['backend']:>8} {c['precision']} b{c['batch']:<3} median {c['old_median_ms']:.2f} -> "
                  f"{c['new_median_ms']:.2f} ms  x{c['latency_ratio']:.3f} (speedup {c['speedup']:.2f})")
        if not result["compare"]["rows"]:
            print("  no rows in common")
    print("\nwritten: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
