"""What machine a benchmark ran on: host facts (CPU, versions, GPU, load) and, on a Jetson, the power
mode, clocks and tegrastats samples taken during the run."""
from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
import threading
from typing import List, Sequence

import numpy as np


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
