"""kernels.selective_scan: the chunked standard-op lowering (and the public op) against the
slow sequential reference in float64, on fresh random inputs."""
import importlib.util

import pytest
import torch

from kernels import selective_scan, selective_scan_ref
from kernels.selective_scan import selective_scan_chunked
from kernels.testing import make_scan_inputs, to_double

# (batch, dim, length, d_state, groups): odd L, D not a power of two, G > 1, L at chunk edges
SHAPES = [(2, 6, 37, 5, 2), (1, 3, 1, 4, 1), (1, 5, 4, 3, 1), (2, 9, 5, 16, 3),
          (1, 12, 67, 7, 4), (1, 4, 300, 16, 2)]
FLAGS = [dict(with_D=True, with_z=True, with_bias=True, softplus=True),
         dict(with_D=False, with_z=False, with_bias=False, softplus=False),
         dict(with_D=True, with_z=False, with_bias=True, softplus=False),
         dict(with_D=False, with_z=True, with_bias=False, softplus=True)]


def _rel_err(a, ref):
    return ((a.cpu().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _on(fn, kw, device):
    """fn(**kw) with the tensors on `device` (on CUDA the public op runs the Triton kernel);
    (y, last state) back on the CPU."""
    y, h = fn(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()},
              return_last_state=True)
    assert y.device.type == h.device.type == torch.device(device).type
    return y.cpu(), h.cpu()


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan], ids=["chunked", "public"])
def test_matches_reference_fp32(fn, shape, flags, device):
    b, d, L, n, g = shape
    kw = make_scan_inputs(b, d, L, n, g, seed=L * 7 + d, **flags)
    y, h = _on(fn, kw, device)
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    assert y.dtype == torch.float32 and y.shape == (b, d, L) and h.shape == (b, d, n)
    assert _rel_err(y, y_ref) <= 1e-5
    assert _rel_err(h, h_ref) <= 1e-5


@pytest.mark.parametrize("length", [1, 13, 257])
@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan], ids=["chunked", "public"])
def test_large_decays_finite(fn, length, device):
    kw = make_scan_inputs(2, 6, length, 16, 2, seed=5, steep=True)
    kw["delta"] = kw["delta"] * 30  # softplus(delta) up to ~100 -> exp(-1e6): full underflow
    y, h = _on(fn, kw, device)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    assert _rel_err(y, y_ref) <= 1e-5 and _rel_err(h, h_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_fp32_state(dtype, device):
    kw = make_scan_inputs(1, 6, 41, 8, 2, seed=9, dtype=dtype)
    y, h = _on(selective_scan, kw, device)
    assert y.dtype == dtype and h.dtype == torch.float32
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    # inputs are identical; only the output rounding to half differs
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=1e-2, atol=1e-2)
    assert _rel_err(h, h_ref) <= 1e-5


@pytest.mark.parametrize("flags", FLAGS, ids=["all", "plain", "D-bias", "z-softplus"])
def test_gradients_match_reference(flags, device):
    """On CUDA the public op's forward is the Triton kernel and its backward the chunked
    standard-op form on the GPU."""
    kw = make_scan_inputs(2, 6, 23, 4, 2, seed=11, **flags)
    names = [k for k, v in kw.items() if torch.is_tensor(v)]

    def grads(fn, inputs, dev="cpu"):
        leaves = {k: inputs[k].detach().to(dev).requires_grad_(True) for k in names}
        y, h = fn(**{**inputs, **leaves}, return_last_state=True)
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dev, y.dtype)
        loss = (y * w).sum() + (h ** 2).sum()
        return [g.cpu() for g in torch.autograd.grad(loss, [leaves[k] for k in names])]

    g_ref = grads(selective_scan_ref, to_double(kw))
    for fn in (selective_scan_chunked, selective_scan):
        for k, a, r in zip(names, grads(fn, kw, device), g_ref):
            assert _rel_err(a, r) <= 1e-4, (fn.__name__, k)


def test_gradcheck_fp64():
    kw = to_double(make_scan_inputs(1, 4, 9, 3, 2, seed=13))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = [kw[k].requires_grad_(True) for k in names]

    def f(*t):
        return selective_scan(**dict(zip(names, t)), delta_softplus=True)

    assert torch.autograd.gradcheck(f, args)


def test_no_python_loop_over_length():
    """The traced chunked graph grows only with the number of chunk levels (log4 L), not L."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def count(length):
        kw = make_scan_inputs(1, 4, length, 4, 2, seed=0)
        names = [k for k, v in kw.items() if torch.is_tensor(v)]
        gm = make_fx(lambda *t: selective_scan_chunked(**dict(zip(names, t)), delta_softplus=True),
                     tracing_mode="fake")(*[kw[k] for k in names])
        return len(gm.graph.nodes)

    n16, n64, n4096 = count(16), count(64), count(4096)  # 1, 2 and 5 chunk levels
    per_level = n64 - n16
    assert 0 < per_level < 50
    assert n4096 - n64 == 3 * per_level
    assert n4096 < 300


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm not installed")
def test_matches_mamba_ssm_reference():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as mamba_ref
    kw = make_scan_inputs(2, 6, 37, 5, 2, seed=17)
    y, h = selective_scan(**kw, return_last_state=True)
    y_m, h_m = mamba_ref(**kw, return_last_state=True)
    assert _rel_err(y, y_m.double()) <= 1e-5 and _rel_err(h, h_m.double()) <= 1e-5


def _triton_device():
    from kernels.selective_scan import triton
    if triton is None:
        pytest.skip("triton not installed")
    if torch.cuda.is_available():
        return "cuda"
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return "cpu"


# tiny sizes: the Triton interpreter runs each program in numpy
@pytest.mark.parametrize("shape,flags,splits", [
    ((2, 6, 37, 5, 2), FLAGS[0], 1),
    ((1, 5, 70, 16, 5), FLAGS[1], 3),
    ((1, 3, 19, 4, 1), FLAGS[2], 2),
    ((2, 4, 9, 3, 2), FLAGS[3], None),
], ids=["all-1split", "plain-3splits", "D-bias-2splits", "z-softplus-auto"])
@pytest.mark.stack("cuda")
def test_triton_forward_matches_reference(shape, flags, splits):
    from kernels.selective_scan import _selective_scan_fwd
    dev = _triton_device()
    kw = make_scan_inputs(*shape, seed=shape[2], device=dev, **flags)
    y, h = _selective_scan_fwd(**kw, splits=splits, block_l=16)
    y_ref, h_ref = selective_scan_ref(**to_double({k: (v.cpu() if torch.is_tensor(v) else v)
                                                   for k, v in kw.items()}), return_last_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert _rel_err(y.cpu(), y_ref) <= 1e-5 and _rel_err(h.cpu(), h_ref) <= 1e-5


@pytest.mark.stack("cuda")
def test_triton_forward_half_and_steep_decays():
    from kernels.selective_scan import _selective_scan_fwd
    dev = _triton_device()
    kw = make_scan_inputs(1, 4, 21, 8, 2, seed=31, dtype=torch.float16, steep=True, device=dev)
    kw["delta"] = kw["delta"] * 8
    y, h = _selective_scan_fwd(**kw, block_l=16)
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = selective_scan_ref(**to_double({k: (v.cpu() if torch.is_tensor(v) else v)
                                                   for k, v in kw.items()}), return_last_state=True)
    torch.testing.assert_close(y.cpu(), y_ref.half(), rtol=1e-2, atol=1e-2)
    assert _rel_err(h.cpu(), h_ref) <= 1e-5
