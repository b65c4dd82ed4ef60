"""Fused CPU selective-scan forward: a small C kernel, built on first use, called via ctypes.

Why: every standard-op form materialises per-step tensors; a fused loop keeps the (N,) state
of one channel in registers/L1 and reads u, delta, B, C once (docs/design.md section 2 "going far
below that needs fusion"). One OpenMP task per (batch, channel); inner loop over N is
`omp simd` so the compiler vectorises exp.

Build: plain C (no torch headers, ~1 s) with the system C compiler (`$CC`, else cc/gcc/clang)
into `$EDGE_AD_CACHE` or `~/.cache/edge_ad/kernels`, keyed by a hash of the source, flags and
CPU; written atomically. Where no compiler works, `available()` is False and callers use the
chunked standard-op lowering instead (the result is the same; only speed differs).
Forward only: the backward is the chunked analytic one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

_SRC = r"""
#include <math.h>
#include <stdint.h>

void edgead_selective_scan_fwd(
    const float* u, const float* delta, const float* A, const float* Bt, const float* Ct,
    const float* Dv, const float* z, const float* bias, float* y, float* last,
    int64_t nb, int64_t nd, int64_t nl, int64_t nn, int64_t ng, int softplus, int nthreads)
{
    const int64_t dg = nd / ng;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nb; ++b) {
        for (int64_t d = 0; d < nd; ++d) {
            float h[256], a[256];
            for (int64_t n = 0; n < nn; ++n) { h[n] = 0.f; a[n] = A[d * nn + n]; }
            const int64_t row = (b * nd + d) * nl;
            const float* bl = Bt + (b * ng + d / dg) * nl * nn;
            const float* cl = Ct + (b * ng + d / dg) * nl * nn;
            const float bi = bias ? bias[d] : 0.f;
            const float dsk = Dv ? Dv[d] : 0.f;
            for (int64_t l = 0; l < nl; ++l) {
                float dt = delta[row + l] + bi;
                if (softplus) dt = dt <= 20.f ? log1pf(expf(dt)) : dt;
                const float uu = u[row + l];
                const float du = dt * uu;
                const float* bb = bl + l * nn;
                const float* cc = cl + l * nn;
                float acc = 0.f;
                #pragma omp simd reduction(+:acc)
                for (int64_t n = 0; n < nn; ++n) {
                    h[n] = expf(dt * a[n]) * h[n] + du * bb[n];
                    acc += h[n] * cc[n];
                }
                float out = acc + dsk * uu;
                if (z) { const float zz = z[row + l]; out *= zz / (1.f + expf(-zz)); }
                y[row + l] = out;
            }
            for (int64_t n = 0; n < nn; ++n) last[(b * nd + d) * nn + n] = h[n];
        }
    }
}
"""
# -ffast-math on the compile step only: given to the link step as well, GCC (< 13) links
# crtfastmath.o into the library, whose constructor turns on flush-to-zero / denormals-are-zero for
# the whole process as soon as the kernel loads - every later float computation changes.
_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-march=native", "-fPIC"]
_LINK = ["-shared", "-fopenmp"]
MAX_STATE = 256
_lock = threading.Lock()
_lib = {}


def _cpu_key():
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build():
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    key = hashlib.sha256((_SRC + " ".join(_FLAGS + _LINK) + cc + _cpu_key()).encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("EDGE_AD_CACHE", pathlib.Path.home() / ".cache" / "edge_ad"))
    out = cache / "kernels" / f"selective_scan_cpu_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = pathlib.Path(tmp) / "scan.c"
            src.write_text(_SRC)
            obj, tmp_so = pathlib.Path(tmp) / "scan.o", pathlib.Path(tmp) / "scan.so"
            for cmd in ([cc, *_FLAGS, "-c", str(src), "-o", str(obj)], [cc, *_LINK, str(obj), "-o", str(tmp_so), "-lm"]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp_so, out)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(out))
    fn = lib.edgead_selective_scan_fwd
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_int]
    return fn


def _get():
    with _lock:
        if "fn" not in _lib and "error" not in _lib:
            try:
                _lib["fn"] = _build()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _lib["error"] = str(exc)
        return _lib.get("fn")


def available() -> bool:
    """True when the fused kernel is (or can be) built here. Builds it on first call."""
    if os.environ.get("EDGE_AD_NO_CPU_KERNEL"):
        return False
    return _get() is not None


def unavailable_reason() -> str | None:
    _get()
    return _lib.get("error")


def supports(u, A) -> bool:
    return (u.device.type == "cpu" and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and A.shape[1] <= MAX_STATE)


def selective_scan_cpu_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """Fused forward on CPU tensors: (y in u's dtype, last state fp32). Needs `available()`."""
    fn = _get()
    if fn is None:
        raise RuntimeError(f"fused CPU selective scan unavailable: {_lib.get('error')}")
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]

    def f32(t):
        return None if t is None else t.detach().to(torch.float32).contiguous()

    uf, df, af, dv, zf, bf = (f32(t) for t in (u, delta, A, D, z, delta_bias))
    bt = B.detach().to(torch.float32).transpose(-1, -2).contiguous()  # (b, G, L, N)
    ct = C.detach().to(torch.float32).transpose(-1, -2).contiguous()
    y = torch.empty((batch, dim, length), dtype=torch.float32)
    last = torch.empty((batch, dim, n), dtype=torch.float32)

    def ptr(t):
        return None if t is None else t.data_ptr()

    fn(ptr(uf), ptr(df), ptr(af), ptr(bt), ptr(ct), ptr(dv), ptr(zf), ptr(bf), ptr(y), ptr(last),
       batch, dim, length, n, groups, int(bool(delta_softplus)), max(1, torch.get_num_threads()))
    return y.to(u.dtype), last
