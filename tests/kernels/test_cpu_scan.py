"""kernels.cpu_scan: the fused C forward equals the float64 sequential reference; the op
falls back to the chunked lowering when the kernel is unavailable or switched off."""
import pytest
import torch

import kernels
from kernels import cpu_scan, selective_scan, selective_scan_ref
from kernels.testing import make_scan_inputs, to_double

FLAGS = [dict(with_D=True, with_z=True, with_bias=True, softplus=True),
         dict(with_D=False, with_z=False, with_bias=False, softplus=False),
         dict(with_D=True, with_z=False, with_bias=True, softplus=False)]


@pytest.fixture(scope="module")
def fused():
    if not cpu_scan.available():
        pytest.skip(f"fused CPU kernel unavailable: {cpu_scan.unavailable_reason()}")
    return cpu_scan.selective_scan_cpu_fwd


def _rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("flags", FLAGS, ids=["all", "plain", "D-bias"])
@pytest.mark.parametrize("shape", [(2, 6, 37, 5, 2), (1, 3, 1, 4, 1), (2, 9, 67, 16, 3),
                                   (1, 4, 11, 256, 2)], ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference(fused, shape, flags):
    kw = make_scan_inputs(*shape, seed=shape[2] + 3, **flags)
    y, h = fused(**kw)
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert _rel_err(y, y_ref) <= 1e-5 and _rel_err(h, h_ref) <= 1e-5


def test_fused_steep_decays_and_half(fused):
    kw = make_scan_inputs(2, 6, 50, 16, 2, seed=41, steep=True, dtype=torch.bfloat16)
    kw["delta"] = kw["delta"] * 30
    y, h = fused(**kw)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all() and torch.isfinite(h).all()
    y_ref, h_ref = selective_scan_ref(**to_double(kw), return_last_state=True)
    torch.testing.assert_close(y, y_ref.to(torch.bfloat16), rtol=2e-2, atol=2e-2)
    assert _rel_err(h, h_ref) <= 1e-5


def test_op_uses_fused_and_switches(fused):
    """The op's CPU output is bit-identical to the fused kernel's by default and to the
    chunked lowering's after set_cpu_kernel("chunked") (the two differ in rounding)."""
    from kernels.selective_scan import selective_scan_chunked
    kw = make_scan_inputs(1, 6, 29, 8, 3, seed=43)
    y_fused, y_chunked = fused(**kw)[0], selective_scan_chunked(**kw)
    assert not torch.equal(y_fused, y_chunked)
    assert torch.equal(selective_scan(**kw), y_fused)
    kernels.set_cpu_kernel("chunked")
    try:
        assert torch.equal(selective_scan(**kw), y_chunked)
    finally:
        kernels.set_cpu_kernel("fused")
    with pytest.raises(ValueError, match="kind"):
        kernels.set_cpu_kernel("avx")


def test_falls_back_when_build_failed(monkeypatch):
    """Fault injection: a failed build (no compiler) leaves the op correct via chunked."""
    monkeypatch.setattr(cpu_scan, "_lib", {"error": "no C compiler found"})
    assert not cpu_scan.available() and "compiler" in cpu_scan.unavailable_reason()
    kw = make_scan_inputs(1, 6, 29, 8, 3, seed=44)
    assert _rel_err(selective_scan(**kw), selective_scan_ref(**to_double(kw))) <= 1e-5
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_scan.selective_scan_cpu_fwd(**kw)


def test_state_size_limit_uses_chunked():
    kw = make_scan_inputs(1, 2, 5, cpu_scan.MAX_STATE + 1, 1, seed=45)
    assert not cpu_scan.supports(kw["u"], kw["A"])
    assert _rel_err(selective_scan(**kw), selective_scan_ref(**to_double(kw))) <= 1e-5


def test_loading_the_kernel_keeps_subnormal_floats(fused, tmp_path):
    """The library must not switch the process to flush-to-zero (what linking with -ffast-math does
    through crtfastmath.o): a fresh interpreter builds and loads it, then halves the smallest normal."""
    import os
    import subprocess
    import sys

    code = ("from kernels import cpu_scan; assert cpu_scan.available(), cpu_scan.unavailable_reason(); "
            "tiny = 2.2250738585072014e-308; print(tiny / 4 > 0)")
    env = {**os.environ, "EDGE_AD_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
