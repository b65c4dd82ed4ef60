"""Kernel speed on the GPU: the Triton selective scan against the chunked standard-op form (eager
and `torch.compile`) at MambaAD's decoder shapes, in GB/s against the device's copy bandwidth
measured in the same run (the roofline of a memory-bound op), plus the MoE gate.

    python benchmarks/gpu_kernels.py [--device cuda] [--lengths 256 1024 4096] [--batches 1 8]
        [--reps 30] [--no-compile] [--deadline SECONDS] [--json FILE] [--dry-run]

Scan shapes (benchmarks/kernels.py's STAGE_DIM): L = H*W of a decoder stage, D = 16 x its width
(expand 2, 8 scan directions as groups), G = 8, N = 16, fp32, delta softplus + bias + D skip, no z.
Methods per shape:
  triton      kernels.selective_scan._selective_scan_fwd (what the op runs on CUDA)
  triton_aot  kernels.scan_aot.selective_scan_aot (the single-launch kernel of the TensorRT plugin)
  chunked     kernels.selective_scan_chunked in eager PyTorch
  compiled    torch.compile(selective_scan_chunked, dynamic=False); compile time reported apart
MoE gate (DVAD's largest map, M = 4 experts, C = 128, 64 x 64): the Triton kernel, the standard-op
form eager and compiled.

Bytes are the fewest any implementation must move: every input read once, the output written
once (scan: u, delta, B, C, A, D, delta_bias, y; gate: logits, experts, out). Copy bandwidth: a
device-to-device copy of 1 GiB, bytes read + written. Timing: CUDA events around each call,
back to back, after warm-up; the inputs rotate over enough copies to exceed 3x the L2 cache; the
median of --reps. Error: max |y - ref| / max |ref| against the float64 sequential reference (scan:
batch 0, the first group's channels; gate: all). `--dry-run`: tiny shapes on the CPU (the Triton
kernels under TRITON_INTERPRET=1), same code paths; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

if __package__ in (None, ""):   # `python benchmarks/gpu_kernels.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.kernels import STAGE_DIM  # noqa: E402
from kernels import moe, scan_aot  # noqa: E402
from kernels.moe import moe_gate_ref, moe_gate_torch  # noqa: E402
from kernels.selective_scan import _selective_scan_fwd, selective_scan_chunked, selective_scan_ref  # noqa: E402
from kernels.testing import make_scan_inputs  # noqa: E402

SCHEMA = "edge-ad-gpu-kernels/1"
N_STATE, GROUPS = 16, 8
SCAN_TENSORS = ("u", "delta", "B", "C", "A", "D", "delta_bias")


def time_calls(fn, sets, device: str, reps: int, warmup: int = 3):
    """Per-call milliseconds of fn(set) for `reps` calls rotating over `sets` (CUDA: events
    around each call, launched back to back; CPU: perf_counter)."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    if device.startswith("cuda"):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(ev):
            a.record()
            fn(sets[i % len(sets)])
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in ev]
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(sets[i % len(sets)])
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def _l2_bytes(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def _rotation(bytes_per_set: int, device: str, cap: int = 8) -> int:
    """Input copies to rotate over so that one pass exceeds 3x the L2 cache (1 on the CPU)."""
    l2 = _l2_bytes(device)
    return 1 if l2 == 0 else max(1, min(cap, math.ceil(3 * l2 / max(bytes_per_set, 1))))


def copy_bandwidth(device: str, nbytes: int, reps: int) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_(-1, 1)
    dst = torch.empty_like(src)
    ms = time_calls(lambda s: dst.copy_(s), [src], device, reps)
    med = float(np.median(ms))
    moved = 2 * src.numel() * 4
    assert torch.equal(dst, src)
    return {"bytes": moved, "median_ms": med, "gbytes_per_s": moved / med / 1e6,
            "what": "device-to-device copy, bytes read + written"}


def _rel_err(y, ref) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _fresh_copy(kw, gen):
    """Another valid input set with new random values (same shapes, device, A / D / bias)."""
    out = dict(kw)
    for k in ("u", "delta", "B", "C"):
        out[k] = torch.randn(kw[k].shape, generator=gen, device=kw[k].device, dtype=kw[k].dtype)
    return out


def scan_methods(compile_ok: bool):
    m = {"triton": lambda kw: _selective_scan_fwd(**kw)[0],
         "triton_aot": lambda kw: scan_aot.selective_scan_aot(**kw),
         "chunked": lambda kw: selective_scan_chunked(**kw)}
    if compile_ok:
        compiled = torch.compile(selective_scan_chunked, dynamic=False)
        m["compiled"] = lambda kw: compiled(**kw)
    return m


def measure(row: dict, fn, sets, device: str, reps: int, warmup: int, deadline: float, error_of) -> None:
    """Fill `row`: the first call on sets[0] (timed; its output checked by `error_of`), then
    `reps` timed calls rotating over `sets`; a failure is recorded, never raised."""
    if time.monotonic() > deadline:
        row.update(status="not reached", reason="--deadline passed")
        return
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            y = fn(sets[0])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["rel_err_vs_fp64_ref"] = error_of(y)
            ms = time_calls(fn, sets, device, reps, warmup)
    except Exception as e:   # one method failing must not lose the others
        row.update(status="error", reason=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        return
    med = float(np.median(ms))
    row.update(status="ok", median_ms=med, p90_ms=float(np.percentile(ms, 90)), n=len(ms),
               gbytes_per_s=row["bytes"] / med / 1e6)


def bench_scan(length, dim, batch, device, reps, warmup, methods, rows, deadline):
    kw = make_scan_inputs(batch, dim, length, N_STATE, GROUPS, seed=length + batch, with_z=False, device=device)
    nbytes = sum(kw[k].numel() * kw[k].element_size() for k in SCAN_TENSORS) + kw["u"].numel() * kw["u"].element_size()
    gen = torch.Generator(device=device).manual_seed(length * 31 + batch)
    sets = [kw] + [_fresh_copy(kw, gen) for _ in range(_rotation(nbytes, device) - 1)]
    ch = dim // GROUPS   # float64 oracle on batch 0, the first group's channels
    sl = {k: (v[:1, :ch] if k in ("u", "delta") else v[:ch] if k in ("A", "D", "delta_bias")
              else v[:1, :1] if k in ("B", "C") else v) for k, v in kw.items()}
    with torch.no_grad():
        ref = selective_scan_ref(**{k: (v.double() if torch.is_tensor(v) else v) for k, v in sl.items()})
    base = dict(op="selective_scan", L=length, D=dim, N=N_STATE, G=GROUPS, batch=batch, dtype="fp32",
                bytes=nbytes, rotation=len(sets))
    for name, fn in methods.items():
        row = dict(base, method=name)
        rows.append(row)
        measure(row, fn, sets, device, reps, warmup, deadline, lambda y: _rel_err(y[:1, :ch], ref))
        if name == "compiled":
            row["note"] = "first_call_s includes the compile"


def bench_moe(shape, device, reps, warmup, compile_ok, rows, deadline):
    b, m, c, h, w = shape
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(b, m, h, w, generator=gen) * 3).to(device)
    experts = torch.randn(b, m, c, h, w, generator=gen).to(device)
    ref = moe_gate_ref(logits.cpu(), experts.cpu())
    nbytes = (logits.numel() + experts.numel() + b * c * h * w) * 4
    sets = [(logits, experts)] + [(torch.randn_like(logits), torch.randn_like(experts))
                                  for _ in range(_rotation(nbytes, device) - 1)]
    methods = {"torch": moe_gate_torch}
    if moe.triton is not None:
        methods = {"triton": moe._moe_gate_fwd, **methods}
    if compile_ok:
        methods["compiled"] = torch.compile(moe_gate_torch, dynamic=False)
    for name, fn in methods.items():
        row = dict(op="moe_gate", shape=list(shape), batch=b, dtype="fp32", bytes=nbytes, method=name,
                   rotation=len(sets))
        rows.append(row)
        measure(row, lambda s, fn=fn: fn(*s), sets, device, reps, warmup, deadline, lambda y: _rel_err(y, ref))


def verdicts(rows, copy_gbps: float) -> list:
    """Per scan shape: the Triton scan's share of the copy bandwidth and whether it beats the best
    standard-op form (the issue's goals: >= 50 % at L = 4096 batch 8, faster at every shape)."""
    out = []
    shapes = sorted({(r["L"], r["batch"]) for r in rows if r["op"] == "selective_scan"})
    for length, batch in shapes:
        got = {r["method"]: r for r in rows if r["op"] == "selective_scan" and r["L"] == length
               and r["batch"] == batch and r.get("status") == "ok"}
        std = [got[k]["median_ms"] for k in ("chunked", "compiled") if k in got]
        v = {"L": length, "batch": batch}
        if "triton" in got:
            v["triton_share_of_copy_bw"] = got["triton"]["gbytes_per_s"] / copy_gbps if copy_gbps else None
            v["triton_vs_best_standard_op"] = (min(std) / got["triton"]["median_ms"]) if std else None
        out.append(v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_kernels.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when visible) or cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=None, choices=sorted(STAGE_DIM),
                   help="default 256 1024 4096 (dry run: 16, with D = 8)")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=None, help="timed calls per row (default 30; dry run 3)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--deadline", type=float, default=None, help="seconds: rows not started by then are skipped")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every shape)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; timings mean nothing")
    a = p.parse_args(argv)
    device = a.device or ("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    # dry run: the Triton interpreter takes seconds per call even at these sizes
    lengths = a.lengths or ([16] if a.dry_run else [256, 1024, 4096])
    batches = a.batches or ([1, 2] if a.dry_run else [1, 8])
    reps, warmup = a.reps or (2 if a.dry_run else 30), 1 if a.dry_run else 3
    moe_shapes = [(b, 4, 8, 16, 16) if a.dry_run else (b, 4, 128, 64, 64) for b in batches]
    deadline = time.monotonic() + (a.deadline if a.deadline else float("inf"))
    compile_ok = not a.no_compile
    torch.manual_seed(0)
    res = {"schema": SCHEMA, "device": device, "dry_run": a.dry_run,
           "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
           "torch": torch.__version__, "python": platform.python_version(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "reps": reps,
           "copy": None, "rows": [], "verdicts": []}

    def save():
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps(res, indent=1) + "\n")

    res["copy"] = copy_bandwidth(device, (16 if a.dry_run else 1024) << 20, max(reps, 10))
    print(f"copy bandwidth: {res['copy']['gbytes_per_s']:.0f} GB/s ({device})", flush=True)
    save()
    methods = scan_methods(compile_ok)
    for length in lengths:
        for batch in batches:
            dim = GROUPS if a.dry_run else 16 * STAGE_DIM[length]
            bench_scan(length, dim, batch, device, reps, warmup, methods, res["rows"], deadline)
            res["verdicts"] = verdicts(res["rows"], res["copy"]["gbytes_per_s"])
            save()
    for shape in moe_shapes:
        bench_moe(shape, device, reps, warmup, compile_ok, res["rows"], deadline)
        save()
    for r in res["rows"]:
        what = f"L={r['L']} D={r['D']}" if r["op"] == "selective_scan" else f"moe {r['shape']}"
        tail = (f"{r['median_ms']:9.3f} ms {r['gbytes_per_s']:8.1f} GB/s err {r['rel_err_vs_fp64_ref']:.1e}"
                if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}")
        print(f"{what:<22} b{r['batch']:<2} {r['method']:<11} {tail}")
    return 0 if all(r.get("status") == "ok" for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
