"""kernels.moe: the gating op equals a slow float64 reference."""
import pytest
import torch

from kernels import moe_gate, moe_gate_ref


@pytest.mark.parametrize("shape", [(1, 1, 3, 5, 7), (2, 4, 5, 3, 3), (3, 3, 6, 4, 9)])
def test_moe_gate_matches_reference(shape, device):
    """On CUDA the public op runs the Triton kernel."""
    b, m, c, h, w = shape
    torch.manual_seed(sum(shape))
    logits = torch.randn(b, m, h, w) * 4
    experts = torch.randn(b, m, c, h, w)
    out = moe_gate(logits.to(device), experts.to(device))
    assert out.shape == (b, c, h, w) and out.dtype == experts.dtype and out.device.type == device
    torch.testing.assert_close(out.cpu(), moe_gate_ref(logits, experts), rtol=1e-5, atol=1e-6)


def test_moe_gate_large_logits_finite(device):
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 3) * 1e4
    experts = torch.randn(2, 4, 5, 3, 3)
    out = moe_gate(logits.to(device), experts.to(device)).cpu()
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


def test_moe_gate_op_registration_and_backward(device):
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 4, 5).to(device).requires_grad_(True)
    experts = torch.randn(2, 3, 6, 4, 5).to(device).requires_grad_(True)
    torch.library.opcheck(torch.ops.edgead.moe_gate.default, (logits, experts))
    go = torch.randn(2, 6, 4, 5)
    g1 = torch.autograd.grad((moe_gate(logits, experts) * go.to(device)).sum(), (logits, experts))
    ld, ed = (t.detach().cpu().double().requires_grad_() for t in (logits, experts))
    g2 = torch.autograd.grad((moe_gate_ref(ld, ed) * go.double()).sum(), (ld, ed))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-6)


def test_moe_gate_exports_to_onnx_as_standard_ops():
    import numpy as np
    import onnxruntime as ort

    class Gate(torch.nn.Module):
        def forward(self, logits, experts):
            return moe_gate(logits, experts)

    torch.manual_seed(6)
    args = (torch.randn(1, 3, 5, 7), torch.randn(1, 3, 4, 5, 7))
    proto = torch.onnx.export(Gate().eval(), args, dynamo=True, verbose=False).model_proto
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
    np.testing.assert_allclose(out, moe_gate_ref(*args).numpy(), rtol=1e-5, atol=1e-6)


def _triton_device():
    import os

    from kernels import moe
    if moe.triton is None:
        pytest.skip("triton not installed")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return "cpu"


@pytest.mark.parametrize("shape,dtype", [((2, 4, 5, 3, 7), torch.float32),
                                         ((1, 3, 33, 5, 5), torch.float32),
                                         ((1, 8, 6, 4, 4), torch.float16)])
@pytest.mark.stack("cuda")
def test_triton_moe_gate_matches_reference(shape, dtype):
    from kernels.moe import _moe_gate_fwd
    dev = _triton_device()
    b, m, c, h, w = shape
    torch.manual_seed(c)
    logits = (torch.randn(b, m, h, w) * 3).to(dtype).to(dev)
    experts = torch.randn(b, m, c, h, w).to(dtype).to(dev)
    out = _moe_gate_fwd(logits, experts, block_c=8)
    assert out.dtype == dtype and out.shape == (b, c, h, w)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.cpu(), moe_gate_ref(logits.cpu(), experts.cpu()), rtol=tol, atol=tol)
