"""Selective-scan benchmark (not a test): every CPU lowering against the sequential reference
at MambaAD's decoder shapes, plus the MoE gate; GPU rows only where CUDA is present.

Shapes (docs/design.md section 4): decoder stages dim 512/256/128/64 at 8x8/16x16/32x32/64x64, so
L = 64, 256, 1024, 4096; expand 2 and 8 scan directions stacked as groups give
D = 16 * dim channels (8192, 4096, 2048, 1024), G = 8, N = 16, batch 1, delta softplus with
bias, D skip, no z (MambaAD gates outside the scan).

Rows per shape:
  ref          kernels.selective_scan_ref (the tests' oracle: one Python step per position)
  ref_mamba    mamba-ssm's `selective_scan_ref` algorithm (exp(delta A) and delta B u
               precomputed, then a Python loop over L), re-implemented here because mamba-ssm
               is not a dependency; `mamba_ssm` row too when the package is installed
  chunked      kernels.selective_scan_chunked, eager
  compiled     torch.compile(selective_scan_chunked) (compile time reported separately)
  fused_c      kernels.cpu_scan: the fused C forward (what the op runs on CPU by default)
  onnx_ort     the exported chunked graph (torch.onnx.export(dynamo=True)) in ONNX Runtime CPU
  triton       (CUDA only) the Triton kernel; chunked_cuda: the chunked path on the GPU
Speed-ups are against `ref` and `ref_mamba`; errors are max |a - ref| / max |ref| against a
float64 run of the reference on a slice of channels (the full float64 run would take minutes).

    python benchmarks/kernels.py                      # all four shapes
    python benchmarks/kernels.py --lengths 64 256 --channel-div 4 --reps 3

Writes a table to stdout and JSON to --json (default benchmarks/out/kernels.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

if __package__ in (None, ""):  # allow `python benchmarks/kernels.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import kernels  # noqa: E402
from kernels.moe import moe_gate_ref, moe_gate_torch  # noqa: E402
from kernels.selective_scan import selective_scan_chunked, selective_scan_ref  # noqa: E402
from kernels.testing import make_scan_inputs  # noqa: E402

STAGE_DIM = {64: 512, 256: 256, 1024: 128, 4096: 64}  # L -> decoder dim at that resolution


def ref_mamba_style(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's reference algorithm (precomputed decays and inputs, loop over L)."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    groups = B.shape[1]
    Bf = B.float().repeat_interleave(dim // groups, dim=1)             # (b, D, N, L)
    Cf = C.float().repeat_interleave(dim // groups, dim=1)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bf, u)
    x = A.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, Cf[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def _timeit(fn, reps, warmup=1, sync=None):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def _rel_err(a, ref):
    a = torch.as_tensor(a).double()
    return float((a - ref).abs().max() / ref.abs().max())


class _ScanModule(torch.nn.Module):
    def __init__(self, kw):
        super().__init__()
        self.A = torch.nn.Parameter(kw["A"])
        self.D = torch.nn.Parameter(kw["D"])
        self.bias = torch.nn.Parameter(kw["delta_bias"])

    def forward(self, u, delta, B, C):
        return kernels.selective_scan(u, delta, self.A, B, C, self.D, None, self.bias,
                                      delta_softplus=True)


def bench_scan(length, dim, args, rows):
    kw = make_scan_inputs(1, dim, length, 16, 8, seed=length, with_z=False)
    # float64 oracle on the first group's channels (1/8 of D: representative, and it keeps
    # the float64 Python loop short)
    n_slice = dim // 8
    sl = {k: (v[:, :n_slice] if k in ("u", "delta") else v[:n_slice] if k in ("A", "D", "delta_bias")
              else v) for k, v in kw.items()}
    sl["B"], sl["C"] = kw["B"][:, :1], kw["C"][:, :1]
    with torch.no_grad():
        y64 = selective_scan_ref(**{k: (v.double() if torch.is_tensor(v) else v) for k, v in sl.items()})

    def err(y):
        return _rel_err(torch.as_tensor(y)[:, :n_slice], y64)

    base = dict(L=length, D=dim, N=16, G=8, batch=1)
    results = {}

    def add(name, secs, times, y=None, **extra):
        row = dict(base, method=name, seconds=secs, times=times, **extra)
        if y is not None:
            row["rel_err_vs_fp64_ref"] = err(y)
        results[name] = row
        rows.append(row)

    with torch.no_grad():
        if length <= args.ref_max_length:
            out = {}
            s, t = _timeit(lambda: out.__setitem__("y", selective_scan_ref(**kw)), args.ref_reps, warmup=0)
            add("ref", s, t, out["y"])
            s, t = _timeit(lambda: out.__setitem__("y", ref_mamba_style(**kw)), args.ref_reps, warmup=0)
            add("ref_mamba", s, t, out["y"])
            if importlib.util.find_spec("mamba_ssm") is not None:
                from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as mref
                s, t = _timeit(lambda: out.__setitem__("y", mref(**kw)), args.ref_reps, warmup=0)
                add("mamba_ssm", s, t, out["y"])
        out = {}
        s, t = _timeit(lambda: out.__setitem__("y", selective_scan_chunked(**kw)), args.reps)
        add("chunked", s, t, out["y"])
        from kernels import cpu_scan
        if cpu_scan.available():
            s, t = _timeit(lambda: out.__setitem__("y", cpu_scan.selective_scan_cpu_fwd(**kw)[0]),
                           args.reps)
            add("fused_c", s, t, out["y"])
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = torch.compile(selective_scan_chunked)
            t0 = time.perf_counter()
            compiled(**kw)
            compile_s = time.perf_counter() - t0
            s, t = _timeit(lambda: out.__setitem__("y", compiled(**kw)), args.reps)
            add("compiled", s, t, out["y"], compile_seconds=compile_s)
    if not args.no_onnx:
        import onnxruntime as ort
        model = _ScanModule(kw).eval()
        inputs = (kw["u"], kw["delta"], kw["B"], kw["C"])
        t0 = time.perf_counter()
        proto = torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
        export_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), inputs)}
        out = {}
        s, t = _timeit(lambda: out.__setitem__("y", sess.run(None, feeds)[0]), args.reps)
        add("onnx_ort", s, t, out["y"], export_seconds=export_s, onnx_nodes=len(proto.graph.node),
            onnx_bytes=proto.ByteSize())
    if torch.cuda.is_available() and not args.no_gpu:
        from kernels.selective_scan import _selective_scan_fwd
        ck = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
        sync = torch.cuda.synchronize
        out = {}
        with torch.no_grad():
            s, t = _timeit(lambda: out.__setitem__("y", _selective_scan_fwd(**ck)[0]), args.reps * 5,
                           warmup=2, sync=sync)
            moved = sum(v.numel() * v.element_size() for k, v in ck.items()
                        if torch.is_tensor(v) and k in ("u", "delta", "B", "C")) + ck["u"].numel() * 4
            add("triton", s, t, out["y"].cpu(), device=torch.cuda.get_device_name(),
                gbytes_per_s=moved / s / 1e9)
            s, t = _timeit(lambda: out.__setitem__("y", selective_scan_chunked(**ck)), args.reps * 5,
                           warmup=2, sync=sync)
            add("chunked_cuda", s, t, out["y"].cpu(), device=torch.cuda.get_device_name())
    for name, row in results.items():
        for b in ("ref", "ref_mamba"):
            if b in results and name != b:
                row[f"speedup_vs_{b}"] = results[b]["seconds"] / row["seconds"]


def bench_moe(args, rows):
    """MoE gate at DVAD's largest map: M = 4 experts, 64x64, C = 128 (2 x decoder dim 64)."""
    torch.manual_seed(0)
    logits, experts = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 128, 64, 64)
    ref = moe_gate_ref(logits, experts).double()
    with torch.no_grad():
        out = {}
        s, t = _timeit(lambda: out.__setitem__("y", moe_gate_torch(logits, experts)), args.reps * 3)
        rows.append(dict(op="moe_gate", method="torch", seconds=s, times=t, shape=[1, 4, 128, 64, 64],
                         rel_err_vs_fp64_ref=_rel_err(out["y"], ref)))


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    print(f"\n{'L':>5} {'D':>5} {'method':<12} {'seconds':>9} {'x ref':>8} {'x ref_mamba':>11} "
          f"{'rel err':>9}  notes")
    for r in rows:
        if "L" not in r:
            continue
        notes = []
        if "compile_seconds" in r:
            notes.append(f"compile {r['compile_seconds']:.1f}s")
        if "onnx_nodes" in r:
            notes.append(f"{r['onnx_nodes']} nodes, {r['onnx_bytes'] / 1e3:.0f} kB, export "
                         f"{r['export_seconds']:.1f}s")
        if "gbytes_per_s" in r:
            notes.append(f"{r['gbytes_per_s']:.0f} GB/s on {r['device']}")
        print(f"{r['L']:>5} {r['D']:>5} {r['method']:<12} {r['seconds']:>9.4f} "
              f"{_fmt(r.get('speedup_vs_ref'), '8.1f'):>8} {_fmt(r.get('speedup_vs_ref_mamba'), '11.1f'):>11} "
              f"{_fmt(r.get('rel_err_vs_fp64_ref'), '9.1e'):>9}  {'; '.join(notes)}")
    for r in rows:
        if r.get("op") == "moe_gate":
            print(f"\nmoe_gate {r['shape']} torch: {r['seconds'] * 1e3:.2f} ms, "
                  f"rel err {r['rel_err_vs_fp64_ref']:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096],
                   choices=sorted(STAGE_DIM))
    p.add_argument("--channel-div", type=int, default=1,
                   help="divide MambaAD's channel counts by this (a multiple of 8 must remain)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--ref-reps", type=int, default=1,
                   help="timed repetitions of the slow sequential references (no warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch / ORT threads (default: all)")
    p.add_argument("--ref-max-length", type=int, default=4096,
                   help="skip the sequential references above this L")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "out", "kernels.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for length in tqdm(args.lengths, desc="shapes", unit="shape"):
        dim = 16 * STAGE_DIM[length] // args.channel_div
        if dim < 8 or dim % 8:
            p.error(f"--channel-div {args.channel_div} leaves D={dim}; need a multiple of 8")
        bench_scan(length, dim, args, rows)
    bench_moe(args, rows)
    print_table(rows)
    if not torch.cuda.is_available():
        print("\nGPU: not measured (no CUDA device on this machine)")
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None,
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                channel_div=args.channel_div, reps=args.reps, ref_reps=args.ref_reps,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
