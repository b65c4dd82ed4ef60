"""kernels.scan_aot: the single-launch Triton scan against the float64 sequential reference (under
the Triton interpreter here, on CUDA where present), its PTX for sm_87 / sm_90 (entry name and
parameter list = the TensorRT AOT calling convention; the rewritten PTX assembles with ptxas),
and the launch parameters on ints and on a symbolic stand-in with only SymInt32's operators."""
import itertools
import os
import re

import pytest
import torch

from kernels import scan_aot, selective_scan_ref
from kernels.testing import make_scan_inputs, to_double

if scan_aot.triton is None:
    pytest.skip("triton not installed", allow_module_level=True)

N_PARAMS = len(scan_aot.INPUT_ARGS) + len(scan_aot.SCALAR_ARGS) + len(scan_aot.OUTPUT_ARGS)


def _device():
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return "cpu"


def _ref(kw):
    return selective_scan_ref(**to_double({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}))


def _rel_err(a, ref):
    return ((a.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# every combination of D / z / delta_bias / softplus; shapes rotate so each combination also
# sees a different (batch, dim, odd length, d_state, groups); block_d=4 with 3 channels per group
# makes channel blocks straddle groups, length > block_l leaves a partial last block
COMBOS = list(itertools.product([True, False], repeat=4))
SHAPES = [(2, 6, 37, 5, 2), (1, 9, 19, 16, 3), (2, 4, 17, 3, 4), (1, 5, 33, 7, 1)]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(
    n for n, on in zip(("D", "z", "bias", "softplus"), c) if on) or "plain")
@pytest.mark.stack("cuda")
def test_matches_reference_every_option(combo):
    with_D, with_z, with_bias, softplus = combo
    shape = SHAPES[COMBOS.index(combo) % len(SHAPES)]
    kw = make_scan_inputs(*shape, seed=sum(shape) + COMBOS.index(combo), device=_device(), with_D=with_D,
                          with_z=with_z, with_bias=with_bias, softplus=softplus)
    y = scan_aot.selective_scan_aot(**kw, block_d=4, block_l=16)
    assert y.dtype == torch.float32 and y.shape == kw["u"].shape
    assert _rel_err(y, _ref(kw)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.stack("cuda")
def test_half_io_steep_decays(dtype):
    kw = make_scan_inputs(2, 6, 23, 8, 2, seed=41, dtype=dtype, steep=True, device=_device())
    kw["delta"] = kw["delta"] * 8  # with steep A: exp(delta * A) underflows to 0 for many channels
    y = scan_aot.selective_scan_aot(**kw)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    tol = 1e-2 if dtype == torch.float16 else 3e-2  # inputs identical; only y's rounding differs
    torch.testing.assert_close(y.cpu().float(), _ref(kw).to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.stack("cuda")
def test_very_steep_fp32_finite():
    kw = make_scan_inputs(1, 4, 29, 16, 2, seed=3, steep=True, device=_device())
    kw["delta"] = kw["delta"] * 30  # softplus(delta) up to ~100 -> exp(-1e6)
    y = scan_aot.selective_scan_aot(**kw)
    assert torch.isfinite(y).all() and _rel_err(y, _ref(kw)) <= 1e-5


@pytest.mark.stack("cuda")
def test_plugin_node_form_zeros_are_exact():
    """The ONNX plugin node always passes D and delta_bias (zeros when absent) and z = u with
    has_z = 0; the kernel must give the same answer as the call without them."""
    kw = make_scan_inputs(1, 6, 21, 4, 3, seed=8, device=_device(), with_D=False, with_z=False,
                          with_bias=False, softplus=True)
    zeros = torch.zeros(6, device=kw["u"].device)
    y_plain = scan_aot.selective_scan_aot(**kw)
    y_node = scan_aot.selective_scan_aot(**dict(kw, D=zeros, delta_bias=zeros))
    assert torch.equal(y_plain, y_node)
    assert _rel_err(y_plain, _ref(kw)) <= 1e-5


@pytest.mark.stack("cuda")
def test_non_contiguous_inputs():
    kw = make_scan_inputs(2, 4, 13, 5, 2, seed=12, device=_device())
    kw["B"] = kw["B"].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, L-major strides
    kw["u"] = kw["u"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not kw["B"].is_contiguous() and not kw["u"].is_contiguous()
    assert _rel_err(scan_aot.selective_scan_aot(**kw), _ref(kw)) <= 1e-5


@pytest.mark.parametrize("bad,field", [
    (dict(delta=torch.zeros(2, 6, 5)), "delta"),
    (dict(A=torch.zeros(5, 4)), "A must be"),
    (dict(B=torch.zeros(2, 2, 3, 9)), "B must be"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(B=torch.zeros(2, 4, 4, 9), C=torch.zeros(2, 4, 4, 9)), "not divisible by groups"),
])
def test_bad_shapes_name_the_field(bad, field):
    kw = make_scan_inputs(2, 6, 9, 4, 2, seed=0)
    with pytest.raises(ValueError, match=field):
        scan_aot.selective_scan_aot(**dict(kw, **bad))


# ---- launch parameters ------------------------------------------------------------------------
class _Sym:
    """A symbolic int with exactly the operators TensorRT's SymInt32 has (+, -, *, //, and the
    symbol on the left); anything else (int + sym, /, bool(), int()) raises."""

    def __init__(self, v):
        self.v = v

    def _o(self, other, f):
        if not isinstance(other, (int, _Sym)) or isinstance(other, bool):
            raise TypeError(f"unsupported operand {other!r}")
        return _Sym(f(self.v, other.v if isinstance(other, _Sym) else other))

    def __add__(self, o):
        return self._o(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._o(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._o(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._o(o, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError("a symbolic int has no truth value")

    def __index__(self):
        raise TypeError("a symbolic int has no value at build time")

    __int__ = __index__


@pytest.mark.parametrize("batch,dim,block_d,warps", [(1, 1, 8, 4), (3, 1024, 8, 4), (16, 1000, 8, 2),
                                                     (2, 7, 4, 1), (5, 64, 32, 8)])
def test_launch_params_ints_and_symbolic(batch, dim, block_d, warps):
    p = scan_aot.scan_launch_params(batch, dim, block_d=block_d, num_warps=warps, shared=1024)
    gx = p["grid_x"]
    assert (gx - 1) * block_d < dim <= gx * block_d          # every channel covered, no empty block
    assert p["grid_y"] == batch and p["grid_z"] == 1
    assert p["block_x"] == 32 * warps and p["block_y"] == p["block_z"] == 1 and p["shared_mem"] == 1024
    s = scan_aot.scan_launch_params(_Sym(batch), _Sym(dim), block_d=block_d, num_warps=warps, shared=1024)
    assert {k: (v.v if isinstance(v, _Sym) else v) for k, v in s.items()} == p
    args = scan_aot.scan_extra_args(_Sym(dim), _Sym(37), _Sym(2))
    assert len(args) == len(scan_aot.SCALAR_ARGS) and [a.v for a in args] == [dim, 37, 2]


# ---- PTX ISA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda", [(11, 8), (12, 0), (12, 4), (12, 5), (12, 6), (12, 9), (13, 0), (13, 1)])
def test_ptx_isa_for_cuda_matches_triton(cuda):
    """Against Triton's own table (triton.backends.nvidia.compiler.ptx_get_version)."""
    nv = pytest.importorskip("triton.backends.nvidia.compiler")
    assert scan_aot.ptx_isa_for_cuda(*cuda) == nv.ptx_get_version(f"{cuda[0]}.{cuda[1]}")


def test_choose_ptx_isa():
    assert scan_aot.choose_ptx_isa(85, 88) == 85      # JetPack-6-era driver, newer ptxas
    assert scan_aot.choose_ptx_isa(90, 88) == 88      # newer driver than Triton's ptxas
    assert scan_aot.choose_ptx_isa(None, 88) == 88 and scan_aot.choose_ptx_isa(None, None) is None
    with pytest.raises(ValueError, match="too old"):
        scan_aot.ptx_isa_for_cuda(10, 2)



# ---- PTX --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ptx_builds():
    """Two builds (each ~7 s: a child process without the interpreter): Orin-style sm_87 fp32 with
    PTX ISA 8.5 (CUDA 12.6 drivers), H100 sm_90 fp16 without softplus / z."""
    return {87: scan_aot.compile_scan_ptx(87, "fp32", 16, ptx_version=85),
            90: scan_aot.compile_scan_ptx(90, "fp16", 16, delta_softplus=False, has_z=False)}


@pytest.mark.parametrize("sm", [87, 90])
def test_ptx_entry_matches_calling_convention(ptx_builds, sm):
    k = ptx_builds[sm]
    name, params = scan_aot.ptx_entry_params(k.ptx)
    assert name == k.name and f".visible .entry {name}(" in k.ptx
    assert len(params) == N_PARAMS
    n_in, n_sc = len(scan_aot.INPUT_ARGS), len(scan_aot.SCALAR_ARGS)
    assert all(p.startswith(".param .u64 .ptr") for p in params[:n_in] + params[n_in + n_sc:])
    assert all(p.startswith(".param .u32 ") for p in params[n_in:n_in + n_sc])
    assert re.search(rf"\.target sm_{sm}a?\b", k.ptx)
    assert re.search(rf"\.reqntid {32 * k.num_warps}\b", k.ptx)  # block_x of the launch params
    assert k.removed_params and not any(re.search(rf"\b{p}\b", k.ptx) for p in k.removed_params)
    assert k.shared <= scan_aot.MAX_STATIC_SHARED
    assert dict(k.dtypes)["u"] == ("fp32" if sm == 87 else "fp16") and dict(k.dtypes)["A"] == "fp32"


def test_ptx_version_option(ptx_builds):
    assert ".version 8.5" in ptx_builds[87].ptx


@pytest.mark.parametrize("sm", [87, 90])
def test_rewritten_ptx_assembles_without_spills(ptx_builds, sm):
    cubin, info = scan_aot.assemble_ptx(ptx_builds[sm].ptx, sm)
    assert cubin[:4] == b"\x7fELF"
    # the (BLOCK_D, N, BLOCK_L) tiles of the default blocks fit in registers
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0 and 0 < info["registers"] <= 255


def test_hidden_param_in_use_is_refused():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_1\n)\n{\n\tld.param.b64 %rd1, [k_param_1];\n}\n")
    with pytest.raises(RuntimeError, match="k_param_1"):
        scan_aot._drop_hidden_params(ptx, 1)
    unused = ptx.replace("[k_param_1]", "[k_param_0]")
    out, removed = scan_aot._drop_hidden_params(unused, 1)
    assert removed == ("k_param_1",) and scan_aot.ptx_entry_params(out)[1] == [
        ".param .u64 .ptr .global .align 1 k_param_0"]


def test_pointer_dtypes():
    d = dict(scan_aot._pointer_dtypes("fp16"))
    assert d["u"] == d["delta"] == d["B"] == d["C"] == d["z"] == d["y"] == "fp16"
    assert d["A"] == d["D"] == d["delta_bias"] == "fp32"
    assert dict(scan_aot._pointer_dtypes({"u": "bf16", "A": "fp16"})) == dict(
        {n: "fp32" for n in scan_aot.INPUT_ARGS + scan_aot.OUTPUT_ARGS}, u="bf16", A="fp16")
    with pytest.raises(ValueError, match="int8"):
        scan_aot.compile_scan_ptx(87, "int8")
    with pytest.raises(ValueError, match="unknown argument"):
        scan_aot.compile_scan_ptx(87, {"x": "fp16"})


def test_cli_writes_ptx(ptx_builds, tmp_path, capsys):
    out = tmp_path / "scan.ptx"
    assert scan_aot.main(["--sm", "90", "--dtype", "fp16", "--no-softplus", "--no-z", "--out", str(out)]) == 0
    assert out.read_text() == ptx_builds[90].ptx  # same arguments as the fixture's sm_90 build
    assert "sm_90" in capsys.readouterr().out


@pytest.mark.stack("cuda")
def test_compiled_ptx_launched_with_tensorrt_argument_order():
    """On a GPU: the PTX itself (not Triton's launcher) loaded by the CUDA driver and launched the
    way TensorRT's AOT plugin does - (inputs..., dim, length, groups, y), grid / block / shared
    memory from the launch parameters - equals the float64 reference. Skips without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the PTX is loaded by the CUDA driver)")
    import ctypes

    drv = pytest.importorskip("cuda.bindings.driver", reason="needs cuda-python (cuda-bindings)")
    major, minor = torch.cuda.get_device_capability()
    sm = 10 * major + minor
    kw = make_scan_inputs(2, 6, 37, 16, 2, seed=19, device="cuda")
    k = scan_aot.compile_scan_ptx(sm, "fp32", 16, delta_softplus=True, has_z=True,
                                  ptx_version=scan_aot.choose_ptx_isa(scan_aot.driver_ptx_isa(),
                                                                      scan_aot.toolchain_ptx_isa(sm)))
    torch.zeros(1, device="cuda")  # make torch's primary context current
    err, mod = drv.cuModuleLoadData(k.ptx.encode() + b"\0")
    assert err == drv.CUresult.CUDA_SUCCESS, err
    err, fn = drv.cuModuleGetFunction(mod, k.name.encode())
    assert err == drv.CUresult.CUDA_SUCCESS, err
    ins = [kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"]]
    ins = [t.contiguous() for t in ins]
    y = torch.empty_like(kw["u"])
    batch, dim, length = y.shape
    p = k.launch_params(batch, dim)
    args = [t.data_ptr() for t in ins] + list(scan_aot.scan_extra_args(dim, length, kw["B"].shape[1])) + [y.data_ptr()]
    types = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    stream = drv.CUstream(torch.cuda.current_stream().cuda_stream)
    err, = drv.cuLaunchKernel(fn, p["grid_x"], p["grid_y"], p["grid_z"], p["block_x"], p["block_y"],
                              p["block_z"], p["shared_mem"], stream, (tuple(args), tuple(types)), 0)
    assert err == drv.CUresult.CUDA_SUCCESS, err
    torch.cuda.synchronize()
    assert _rel_err(y, _ref(kw)) <= 1e-5
