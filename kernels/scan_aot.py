"""Single-launch Triton selective scan with a fixed calling convention, for TensorRT's
ahead-of-time plugin form (`tensorrt.plugin.aot_impl`, TensorRT >= 10.9; docs/design.md section 2).

Same contract as `kernels.selective_scan` (mamba-ssm's `selective_scan_fn`), contiguous
tensors only (what TensorRT hands a plugin in LINEAR format):

    u, delta, z, y: (B, D, L)   A: (D, N) fp32   Bm, Cm: (B, G, N, L)   Dskip, delta_bias: (D,) fp32

Calling convention (the order TensorRT's AOT plugin launches a kernel with: input pointers,
extra scalar arguments, output pointers):

    u, delta, A, B, C, D, z, delta_bias,  dim, length, groups,  y

(the 8 inputs in the order of the `edgead::SelectiveScan` ONNX node, kernels/onnx_plugin.py),
then compile-time constants: D_STATE (N), BLOCK_N, BLOCK_D, BLOCK_L, HAS_D, HAS_Z, HAS_BIAS,
SOFTPLUS. Grid: (ceil(dim / BLOCK_D), batch); one program per (channel block, batch) walks L
in blocks of BLOCK_L: a `tl.associative_scan` over (decay, input) pairs inside the block, the
(BLOCK_D, N) state carried in registers in fp32 between blocks; exp2 with log2(e) folded into
A; delta bias, softplus, D skip and the z gate fused. One launch, no workspace.

Pieces:
- `selective_scan_aot(...)`: launches the kernel from Python (CUDA tensors, or CPU tensors
  under TRITON_INTERPRET=1 - how the tests run it).
- `compile_scan_ptx(sm, ...)`: Triton -> PTX for one SM, no GPU needed. Triton >= 3.3 appends
  hidden scratch-pointer parameters to every kernel; TensorRT passes only the arguments of the
  convention above, so when the kernel needs no scratch memory those unused declarations are
  removed from the PTX entry (refused otherwise).
- `scan_launch_params(batch, dim, ...)` / `scan_extra_args(...)`: grid, block and scalar
  arguments; only +, * and // are used, so they work on ints and on TensorRT's symbolic
  `SymInt32` shape expressions alike.

- `python -m kernels.scan_aot --sm 87 [--dtype fp16] [--out scan.ptx]`: the same from a shell.

Verified here (CPU only): the kernel under the Triton interpreter against a float64
sequential scan; PTX generation for sm_87 / sm_90 and its entry signature; the rewritten PTX
assembles with Triton's bundled ptxas (default blocks: ~166 registers, no spills). NOT
verified: a run on a GPU (the compiled PTX has never executed), a TensorRT engine with this
PTX embedded, its speed.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only installs
    triton = None
    tl = None

INPUT_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SCALAR_ARGS = ("dim", "length", "groups")
OUTPUT_ARGS = ("y",)
FP32_INPUTS = ("A", "D", "delta_bias")      # fp32 unless a per-argument dtype says otherwise
IO_DTYPES = ("fp32", "fp16", "bf16")
BLOCK_L = 16
NUM_WARPS = 4
MAX_STATIC_SHARED = 48 * 1024  # above this a launch needs cuFuncSetAttribute, which TensorRT does not do


def _require_triton():
    if triton is None:
        raise ImportError("the single-launch selective-scan kernel needs triton: pip install triton")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_sizes(d_state: int, block_d=None, block_l: int = BLOCK_L):
    """(BLOCK_N, BLOCK_D, BLOCK_L) for a state size: the (BLOCK_D, BLOCK_N, BLOCK_L) fp32 tile
    stays at ~2K elements (registers), independent of the channel count."""
    if d_state < 1:
        raise ValueError(f"selective scan: d_state must be >= 1, got {d_state}")
    block_n = _next_pow2(d_state)
    block_l = _next_pow2(block_l)
    if block_d is None:
        block_d = max(1, min(32, 2048 // (block_n * block_l)))
    if block_d & (block_d - 1):
        raise ValueError(f"selective scan: block_d must be a power of two, got {block_d}")
    return block_n, block_d, block_l


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _pair_combine(a_left, b_left, a_right, b_right):
        # (decay, input) pairs: applying left then right is h -> a_r * (a_l * h + b_l) + b_r
        return a_left * a_right, a_right * b_left + b_right

    @triton.jit
    def _softplus(x):
        # max(x, 0) + log1p(exp(-|x|)): no overflow, and log1p done accurately (Goldberg's
        # log(w) * e / (w - 1)); plain log(1 + exp(x)) in fp32 lost ~1e-4 relative in y
        e = tl.exp(-tl.abs(x))
        w = 1.0 + e
        exact = w == 1.0
        return tl.maximum(x, 0.0) + tl.where(exact, e, tl.log(w) * (e / tl.where(exact, 1.0, w - 1.0)))

    @triton.jit
    def _selective_scan_aot_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        dim, length, groups,
        y_ptr,
        D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_d = tl.program_id(0)
        batch_idx = tl.program_id(1).to(tl.int64)
        chan = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        state = tl.arange(0, BLOCK_N)
        chan_ok = chan < dim
        state_ok = state < D_STATE
        cs_ok = chan_ok[:, None] & state_ok[None, :]
        group = chan // (dim // groups)
        # row offsets (int64): (b, d) rows of the (B, D, L) tensors; (b, g, n) rows of B / C
        io_row = (batch_idx * dim + chan) * length
        bc_row = ((batch_idx * groups + group)[:, None] * D_STATE + state[None, :]) * length
        a_log2 = tl.load(A_ptr + chan[:, None] * D_STATE + state[None, :], mask=cs_ok,
                         other=0.0).to(tl.float32) * LOG2E
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
        if HAS_D:
            skip = tl.load(D_ptr + chan, mask=chan_ok, other=0.0).to(tl.float32)
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        is_last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
        for start in range(0, length, BLOCK_L):
            steps = start + tl.arange(0, BLOCK_L)
            step_ok = steps < length
            cl_ok = chan_ok[:, None] & step_ok[None, :]
            io = io_row[:, None] + steps[None, :]
            x = tl.load(u_ptr + io, mask=cl_ok, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + io, mask=cl_ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            dt = tl.where(cl_ok, dt, 0.0)  # steps past the end: decay 1, input 0 (identity)
            csl_ok = cs_ok[:, :, None] & step_ok[None, None, :]
            bc = bc_row[:, :, None] + steps[None, None, :]
            b_val = tl.load(B_ptr + bc, mask=csl_ok, other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, None, :] * a_log2[:, :, None])
            inp = (dt * x)[:, None, :] * b_val
            run_decay, run_inp = tl.associative_scan((decay, inp), 2, _pair_combine)
            hs = run_decay * h[:, :, None] + run_inp          # states at every step of the block
            h = tl.sum(tl.where(is_last, hs, 0.0), axis=2)
            c_val = tl.load(C_ptr + bc, mask=csl_ok, other=0.0).to(tl.float32)
            y = tl.sum(hs * c_val, axis=1)
            if HAS_D:
                y = y + x * skip[:, None]
            if HAS_Z:
                zv = tl.load(z_ptr + io, mask=cl_ok, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(y_ptr + io, y.to(y_ptr.dtype.element_ty), mask=cl_ok)


# ---------------------------------------------------------------------------------------------
# Launch parameters (ints or TensorRT SymInt32: only +, * and // with the symbol on the left)
# ---------------------------------------------------------------------------------------------
def scan_launch_params(batch, dim, *, block_d: int, num_warps: int = NUM_WARPS, shared: int = 0) -> dict:
    """Keyword arguments for `tensorrt.plugin.KernelLaunchParams` (and the grid of a Python
    launch): grid (ceil(dim / block_d), batch), 32 * num_warps threads, `shared` bytes."""
    return {"grid_x": (dim + (block_d - 1)) // block_d, "grid_y": batch, "grid_z": 1,
            "block_x": 32 * num_warps, "block_y": 1, "block_z": 1, "shared_mem": shared}


def scan_extra_args(dim, length, groups) -> tuple:
    """The scalar arguments, in the calling convention's order (`SCALAR_ARGS`)."""
    return (dim, length, groups)


# ---------------------------------------------------------------------------------------------
# Python launch (CUDA, or CPU under the Triton interpreter)
# ---------------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective scan: delta has shape {tuple(delta.shape)}, expected {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (dim={dim}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n or t.shape[3] != length:
            raise ValueError(f"selective scan: {name} must be (batch={batch}, groups, d_state={n}, "
                             f"length={length}), got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"selective scan: B {tuple(B.shape)} and C {tuple(C.shape)} differ")
    if dim % B.shape[1]:
        raise ValueError(f"selective scan: dim={dim} is not divisible by groups={B.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective scan: {name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z has shape {tuple(z.shape)}, expected {tuple(u.shape)}")


def selective_scan_aot(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       *, block_d=None, block_l: int = BLOCK_L, num_warps: int = NUM_WARPS):
    """One launch of the single-launch kernel; returns y (B, D, L) in u's dtype."""
    _require_triton()
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    n = A.shape[1]
    block_n, block_d, block_l = block_sizes(n, block_d, block_l)
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    A = A.float().contiguous()
    dummy = u.new_zeros(1, dtype=torch.float32)
    y = torch.empty_like(u)
    if batch == 0 or dim == 0 or length == 0:
        return y
    p = scan_launch_params(batch, dim, block_d=block_d, num_warps=num_warps)
    _selective_scan_aot_kernel[(p["grid_x"], p["grid_y"])](
        u, delta, A, B, C,
        D.float().contiguous() if D is not None else dummy,
        z.contiguous() if z is not None else u,
        delta_bias.float().contiguous() if delta_bias is not None else dummy,
        *scan_extra_args(dim, length, B.shape[1]),
        y,
        D_STATE=n, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), num_warps=num_warps)
    return y


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation to PTX (no GPU needed)
# ---------------------------------------------------------------------------------------------
def ptx_isa_for_cuda(major: int, minor: int) -> int:
    """Highest PTX ISA (e.g. 85 = 8.5) that a CUDA `major.minor` driver or ptxas handles."""
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor - (1 if minor >= 6 else 0)  # 12.6 -> 8.5, 12.9 -> 8.8
    if major == 11:
        return 70 + minor
    raise ValueError(f"CUDA {major}.{minor} is too old for the AOT kernel (needs >= 11)")


def choose_ptx_isa(driver: Optional[int], toolchain: Optional[int]) -> Optional[int]:
    """The PTX ISA to emit: what both the driver (loads the PTX) and Triton's ptxas know; None
    (Triton's default) when neither is known."""
    known = [v for v in (driver, toolchain) if v is not None]
    return min(known) if known else None


def driver_ptx_isa() -> Optional[int]:
    """Highest PTX ISA the installed CUDA driver loads; None without a driver (no libcuda)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return ptx_isa_for_cuda(v.value // 1000, (v.value % 1000) // 10)


def toolchain_ptx_isa(sm: int) -> Optional[int]:
    """Highest PTX ISA Triton's bundled ptxas knows (its default); None when unknown."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        major, minor = str(get_ptxas(sm).version).split(".")[:2]
        return ptx_isa_for_cuda(int(major), int(minor))
    except Exception:  # noqa: BLE001 - unknown toolchain: let Triton choose
        return None


@dataclass(frozen=True)
class ScanPTX:
    name: str            # the .entry name TensorRT launches
    ptx: str             # PTX text, entry parameters exactly INPUT_ARGS + SCALAR_ARGS + OUTPUT_ARGS
    num_warps: int
    shared: int          # dynamic shared memory per program, bytes
    block_d: int
    block_l: int
    sm: int
    dtypes: tuple        # ((arg name, triton dtype), ...) of the pointer arguments
    removed_params: tuple = ()  # hidden Triton parameters dropped from the entry
    constexprs: tuple = ()      # ((name, value), ...) compiled in: launch a Python copy with these

    def launch_params(self, batch, dim) -> dict:
        return scan_launch_params(batch, dim, block_d=self.block_d, num_warps=self.num_warps,
                                  shared=self.shared)


def _pointer_dtypes(dtype) -> tuple:
    """Per-pointer Triton dtypes: `dtype` is one of IO_DTYPES for u, delta, B, C, z and y (A, D,
    delta_bias fp32), or a mapping {arg name: dtype} (missing names fp32). The kernel converts
    every load to fp32, so any of IO_DTYPES works for any argument."""
    spec = dict(dtype) if not isinstance(dtype, str) else {}
    unknown = set(spec) - set(INPUT_ARGS + OUTPUT_ARGS)
    if unknown:
        raise ValueError(f"selective scan: unknown argument(s) {sorted(unknown)} in dtype mapping")
    out = []
    for name in INPUT_ARGS + OUTPUT_ARGS:
        default = dtype if isinstance(dtype, str) and name not in FP32_INPUTS else "fp32"
        d = spec.get(name, default)
        if d not in IO_DTYPES:
            raise ValueError(f"selective scan: unsupported dtype {d!r} for {name} (expected one of {IO_DTYPES})")
        out.append((name, d))
    return tuple(out)


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)


def ptx_entry_params(ptx: str):
    """(entry name, [parameter declaration lines]) of the single kernel in `ptx`."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise ValueError(f"expected one .entry in the PTX, found {len(entries)}")
    name, body = entries[0]
    return name, [p.strip() for p in body.split(",") if p.strip()]


def _drop_hidden_params(ptx: str, keep: int):
    """Remove entry parameters after the first `keep` (Triton's hidden scratch pointers);
    refuses when any of them is referenced in the kernel body."""
    m = _ENTRY.search(ptx)
    name, params = m.group(1), [p.strip() for p in m.group(2).split(",") if p.strip()]
    extra = params[keep:]
    if not extra:
        return ptx, ()
    names = tuple(p.split()[-1] for p in extra)
    rest = ptx[:m.start()] + ptx[m.end():]
    used = [n for n in names if re.search(rf"\b{re.escape(n)}\b", rest)]
    if used:
        raise RuntimeError(f"PTX entry {name}: hidden parameters {used} are used by the kernel; "
                           "it cannot be launched with TensorRT's AOT calling convention")
    new_decl = f".entry {name}(\n\t" + ",\n\t".join(params[:keep]) + "\n)"
    return ptx[:m.start()] + new_decl + ptx[m.end():], names


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_in_child(args: dict) -> ScanPTX:
    """Under TRITON_INTERPRET=1 every `@triton.jit` function (Triton's own `tl.sum` included) is
    an interpreter wrapper that `triton.compile` cannot lower: compile in a child process with
    the interpreter off (same code as the in-process path)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-m", "kernels.scan_aot", "--json", json.dumps(args)], env=env,
                       cwd=str(root), capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the selective-scan kernel failed:\n{r.stderr.strip()[-2000:]}")
    d = json.loads(r.stdout)
    d["dtypes"] = tuple(tuple(p) for p in d["dtypes"])
    d["removed_params"] = tuple(d["removed_params"])
    d["constexprs"] = tuple(tuple(p) for p in d["constexprs"])
    return ScanPTX(**d)


@functools.lru_cache(maxsize=64)
def _compile(sm, dtypes, d_state, delta_softplus, has_z, has_d, has_bias, block_d, block_l,
             num_warps, ptx_version):
    _require_triton()
    if _interpreting():
        return _compile_in_child(dict(sm=sm, dtype=dict(dtypes), d_state=d_state, delta_softplus=delta_softplus,
                                      has_z=has_z, has_d=has_d, has_bias=has_bias, block_d=block_d,
                                      block_l=block_l, num_warps=num_warps, ptx_version=ptx_version))
    from triton.backends.compiler import GPUTarget

    block_n, block_d, block_l = block_sizes(d_state, block_d, block_l)
    types = (["*" + d for _, d in dtypes[:len(INPUT_ARGS)]] + ["i32"] * len(SCALAR_ARGS)
             + ["*" + d for _, d in dtypes[len(INPUT_ARGS):]])
    kernel = _selective_scan_aot_kernel
    sig = dict(zip(kernel.arg_names, types))  # kernel parameter names, in order
    consts = {"D_STATE": d_state, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_L": block_l,
              "HAS_D": bool(has_d), "HAS_Z": bool(has_z), "HAS_BIAS": bool(has_bias),
              "SOFTPLUS": bool(delta_softplus)}
    sig.update({k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    opts = {"num_warps": num_warps}
    if ptx_version is not None:
        opts["ptx_version"] = int(ptx_version)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(sm), 32), options=opts)
    md = compiled.metadata
    scratch = int(getattr(md, "global_scratch_size", 0) or 0) + int(getattr(md, "profile_scratch_size", 0) or 0)
    if scratch:
        raise RuntimeError(f"selective-scan kernel needs {scratch} bytes of Triton scratch memory; "
                           "TensorRT's AOT plugin cannot provide it")
    if md.shared > MAX_STATIC_SHARED:
        raise RuntimeError(f"selective-scan kernel needs {md.shared} bytes of shared memory "
                           f"(> {MAX_STATIC_SHARED}): use a smaller block_d / block_l")
    ptx, removed = _drop_hidden_params(compiled.asm["ptx"], len(INPUT_ARGS + SCALAR_ARGS + OUTPUT_ARGS))
    return ScanPTX(name=md.name, ptx=ptx, num_warps=md.num_warps, shared=md.shared, block_d=block_d,
                   block_l=block_l, sm=int(sm), dtypes=dtypes, removed_params=removed,
                   constexprs=tuple(consts.items()))


def compile_scan_ptx(sm: int, dtype="fp32", d_state: int = 16, *, delta_softplus: bool = True,
                     has_z: bool = True, has_d: bool = True, has_bias: bool = True, block_d=None,
                     block_l: int = BLOCK_L, num_warps: int = NUM_WARPS, ptx_version=None) -> ScanPTX:
    """Compile the kernel for compute capability `sm` (e.g. 87 for Orin, 90 for H100) to PTX.

    `dtype`: "fp32" / "fp16" / "bf16" for u, delta, B, C, z and y (A, D, delta_bias fp32), or a
    mapping per argument name. `ptx_version` (e.g. 85 for CUDA 12.6 drivers): the PTX ISA
    to emit; default: the newest that Triton's bundled ptxas knows, which an older driver may
    refuse to load. Results are cached per argument set. Needs no GPU."""
    if isinstance(dtype, dict):
        dtype = tuple(sorted(dtype.items()))
    return _compile(int(sm), _pointer_dtypes(dtype), int(d_state), bool(delta_softplus), bool(has_z),
                    bool(has_d), bool(has_bias), block_d, block_l, int(num_warps), ptx_version)


def assemble_ptx(ptx: str, sm: int):
    """Assemble PTX to a cubin with Triton's bundled ptxas (a CPU-side check that the PTX handed
    to TensorRT is valid); returns (cubin bytes, {"registers", "spill_stores", "spill_loads"}
    from `ptxas -v`). Raises RuntimeError with ptxas' message on failure."""
    _require_triton()
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        r = subprocess.run([get_ptxas(sm).path, "-v", f"-arch={arch}", str(src), "-o", str(out)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed for {arch}: {r.stderr.strip()}")
        info = {}
        for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                             ("spill_loads", r"(\d+) bytes spill loads")):
            m = re.search(pattern, r.stderr)
            info[key] = int(m.group(1)) if m else None
        return out.read_bytes(), info


def main(argv=None) -> int:
    """`python -m kernels.scan_aot --sm 87 [--dtype fp16] [--d-state 16] [--out k.ptx]`: write the
    PTX (or, with --json ARGS, print the compile result of compile_scan_ptx(**ARGS) as JSON)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kernels.scan_aot", description=main.__doc__)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--sm", type=int, default=87, help="compute capability, e.g. 87 (Orin) or 90 (H100)")
    p.add_argument("--dtype", default="fp32", choices=IO_DTYPES)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--no-softplus", action="store_true")
    p.add_argument("--no-z", action="store_true")
    p.add_argument("--ptx-version", type=int, default=None, help="PTX ISA, e.g. 85 for CUDA 12.6 drivers")
    p.add_argument("--out", default=None, help="PTX file to write (default: print a summary only)")
    a = p.parse_args(argv)
    if a.json is not None:
        print(json.dumps(asdict(compile_scan_ptx(**json.loads(a.json)))))
        return 0
    k = compile_scan_ptx(a.sm, a.dtype, a.d_state, delta_softplus=not a.no_softplus, has_z=not a.no_z,
                         ptx_version=a.ptx_version)
    _, info = assemble_ptx(k.ptx, k.sm)
    if a.out:
        Path(a.out).write_text(k.ptx)
    print(f"{k.name}: sm_{k.sm}, {k.num_warps} warps, {k.shared} B shared, block_d {k.block_d}, "
          f"block_l {k.block_l}; ptxas: {info['registers']} registers, {info['spill_stores']} B spill stores"
          + (f"; wrote {a.out}" if a.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
