"""kernels.moe: the gating op equals a slow float64 reference."""
import pytest
import torch

from kernels import moe_gate, moe_gate_ref


@pytest.mark.parametrize("shape", [(1, 1, 3, 5, 7), (2, 4, 5, 3, 3), (3, 3, 6, 4, 9)])
def test_moe_gate_matches_reference(shape):
    b, m, c, h, w = shape
    torch.manual_seed(sum(shape))
    logits = torch.randn(b, m, h, w) * 4
    experts = torch.randn(b, m, c, h, w)
    out = moe_gate(logits, experts)
    assert out.shape == (b, c, h, w) and out.dtype == experts.dtype
    torch.testing.assert_close(out, moe_gate_ref(logits, experts), rtol=1e-5, atol=1e-6)


def test_moe_gate_large_logits_finite():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 3) * 1e4
    experts = torch.randn(2, 4, 5, 3, 3)
    out = moe_gate(logits, experts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, moe_gate_ref(logits, experts), rtol=1e-5, atol=1e-6)


def test_moe_gate_gradients():
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    experts = torch.randn(2, 3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe_gate, (logits, experts))


def test_moe_gate_shape_errors():
    with pytest.raises(ValueError, match="experts"):
        moe_gate(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 4, 3, 3))
