"""Shared timing helpers for the benchmark scripts (latency, stream, kernels).

What they measure, and how:
  * wall time with `time.perf_counter_ns` on the host; on CUDA the work is bracketed by
    `torch.cuda.Event(enable_timing=True)` pairs and synchronised before the clock is read,
    so queued kernels are never mistaken for finished ones;
  * repetitions interleaved round-robin over the candidates (`interleaved`), so drift in
    clocks, thermals or neighbours' load hits every candidate alike; warm-up calls are run
    first and never recorded;
  * peak host memory as the rise of the process's resident set (Linux `VmHWM`, reset through
    `/proc/self/clear_refs`; else `ru_maxrss`, which cannot be reset; else tracemalloc, Python
    allocations only) - the method used is recorded next to the number;
  * peak device memory from torch's CUDA allocator and the device-wide free-memory drop
    (`cudaMemGetInfo`), the latter also covering ONNX Runtime / TensorRT allocations.
"""
from __future__ import annotations

import math
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


# ---- statistics ------------------------------------------------------------------------
def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if len(samples) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples_ms: Sequence[float], batch: int = 1) -> Dict[str, float]:
    """Median / p90 / p99 / mean / min / max latency (ms) and images per second at the median."""
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        raise ValueError("summarize: no samples")
    med = float(np.median(s))
    return {
        "n": int(s.size),
        "median_ms": med,
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
        "mean_ms": float(s.mean()),
        "min_ms": float(s.min()),
        "max_ms": float(s.max()),
        "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
        "images_per_s": (batch * 1000.0 / med) if med > 0 else float("inf"),
    }


# ---- clocks ----------------------------------------------------------------------------
def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class Clock:
    """Times one call on `device` ("cpu" or "cuda[:i]").

    CPU: perf_counter around the call. CUDA: synchronise, record a start event, call, record an
    end event, synchronise, and report the event time (GPU work) - the host perf_counter time is
    also kept (`last_host_ms`) since host-side launch overhead is part of what users wait for;
    the reported figure is the larger of the two, i.e. never less than the wall time seen.
    """

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.cuda = _is_cuda(device)
        self.last_host_ms = float("nan")
        self.last_device_ms = float("nan")
        if self.cuda:
            import torch

            self._torch = torch
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def sync(self):
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Run fn once; return its latency in milliseconds."""
        if self.cuda:
            self.sync()
            t0 = time.perf_counter_ns()
            self._start.record()
            fn()
            self._end.record()
            self.sync()
            self.last_host_ms = (time.perf_counter_ns() - t0) / 1e6
            self.last_device_ms = float(self._start.elapsed_time(self._end))
            return max(self.last_host_ms, self.last_device_ms)
        t0 = time.perf_counter_ns()
        fn()
        self.last_host_ms = (time.perf_counter_ns() - t0) / 1e6
        return self.last_host_ms


@dataclass
class Candidate:
    """One thing to time: `fn()` runs one repetition (e.g. one batch through one backend)."""

    name: str
    fn: Callable[[], object]
    device: str = "cpu"
    samples_ms: List[float] = field(default_factory=list)
    error: Optional[str] = None


def interleaved(candidates: Sequence[Candidate], reps: int, warmup: int = 2,
                progress: Optional[Callable[[int], None]] = None,
                min_time_s: float = 0.0) -> Sequence[Candidate]:
    """Warm every candidate up, then time `reps` rounds, each round one call per candidate.

    A candidate that raises is kept with `error` set and dropped from later rounds (its partial
    samples stay). `min_time_s` extends the run past `reps` rounds until every candidate has
    accumulated that much timed work (useful for very fast calls); `progress(round)` is called
    after each round.
    """
    clocks = {id(c): Clock(c.device) for c in candidates}
    for c in candidates:
        try:
            for _ in range(warmup):
                c.fn()
            clocks[id(c)].sync()
        except Exception as e:  # a backend failing at run time must not stop the others
            c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    r = 0
    while True:
        live = [c for c in candidates if c.error is None]
        if not live:
            break
        if r >= reps and all(sum(c.samples_ms) >= 1000 * min_time_s for c in live):
            break
        for c in live:
            try:
                c.samples_ms.append(clocks[id(c)].time(c.fn))
            except Exception as e:
                c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        r += 1
        if progress is not None:
            progress(r)
    return candidates


# ---- memory ----------------------------------------------------------------------------
def _status_kb(key: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> Optional[int]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def _reset_peak_rss() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class HostMemory:
    """Context manager: peak resident-set rise of this process during the block.

    `.peak_delta_bytes` (peak RSS inside the block minus RSS at entry) and `.method`
    ("vmhwm" exact on Linux; "ru_maxrss" when the peak cannot be reset, then only a rise above
    the process's earlier peak is seen; "tracemalloc" Python allocations only).
    """

    def __init__(self):
        self.peak_delta_bytes: Optional[int] = None
        self.peak_bytes: Optional[int] = None
        self.method = "unavailable"

    def __enter__(self):
        self._rss0 = rss_bytes()
        if self._rss0 is not None and _reset_peak_rss() and _status_kb("VmHWM") is not None:
            self.method = "vmhwm"
        elif sys.platform != "win32":
            self.method = "ru_maxrss"
            self._max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self._max0 *= 1 if sys.platform == "darwin" else 1024
            self._rss0 = self._rss0 if self._rss0 is not None else self._max0
        else:
            self.method = "tracemalloc"
            self._started_tm = not tracemalloc.is_tracing()
            if self._started_tm:
                tracemalloc.start()
            tracemalloc.reset_peak()
        return self

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.peak_bytes = _status_kb("VmHWM") * 1024
            self.peak_delta_bytes = max(0, self.peak_bytes - self._rss0)
        elif self.method == "ru_maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak *= 1 if sys.platform == "darwin" else 1024
            self.peak_bytes = peak
            self.peak_delta_bytes = max(0, peak - max(self._rss0, self._max0))
        elif self.method == "tracemalloc":
            _, peak = tracemalloc.get_traced_memory()
            self.peak_bytes = peak
            self.peak_delta_bytes = peak
            if self._started_tm:
                tracemalloc.stop()
        return False


class DeviceMemory:
    """Context manager: peak CUDA memory during the block (torch allocator + device-wide drop).

    `.torch_peak_bytes`: `torch.cuda.max_memory_allocated` after a reset (torch tensors only).
    `.device_used_delta_bytes`: drop of `cudaMemGetInfo` free memory from entry to exit (what
    other libraries such as ONNX Runtime or TensorRT kept allocated). On CPU both stay None and
    `.method` says why.
    """

    def __init__(self, device="cpu"):
        self.device = str(device)
        self.torch_peak_bytes: Optional[int] = None
        self.device_used_delta_bytes: Optional[int] = None
        self.method = "not a CUDA device" if not _is_cuda(device) else "torch.cuda"

    def __enter__(self):
        if _is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._free0 = torch.cuda.mem_get_info(self.device)[0]
        return self

    def __exit__(self, *exc):
        if _is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            self.torch_peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            free1 = torch.cuda.mem_get_info(self.device)[0]
            self.device_used_delta_bytes = int(max(0, self._free0 - free1))
        return False


def mib(n: Optional[float]) -> Optional[float]:
    return None if n is None or (isinstance(n, float) and math.isnan(n)) else n / 2 ** 20
