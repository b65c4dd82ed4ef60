"""Dense mixture-of-experts gating (docs/design.md section 3).

moe_gate(gate_logits (B, M, H, W), experts (B, M, C, H, W)) -> (B, C, H, W)
    = sum_m softmax_m(gate_logits)[m] * experts[m]
Softmax and accumulation in fp32 (fp64 for fp64 inputs); output in the experts' dtype.

Lowerings: `_moe_gate_fwd` (Triton, CUDA: the softmax stays in registers and each expert
output is read once), `moe_gate_torch` (standard ops: CPU and every export), registered as the
op `edgead::moe_gate` (fake impl + analytic backward in standard ops); `moe_gate_ref` is the
slow float64 oracle for tests.
"""
from __future__ import annotations

import torch

from .lowering import resolve_lowering

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only installs
    triton = None
    tl = None


if triton is not None:
    @triton.jit
    def _moe_gate_fwd_kernel(g_ptr, e_ptr, out_ptr, n_exp, n_ch, n_pix,
                             s_gb, s_gm, s_eb, s_em, s_ec, s_ob, s_oc,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """One program per (batch, block of pixels): softmax over M in registers, then the
        weighted sum for every channel block. Pixels (H*W) must be contiguous (stride 1)."""
        pid_b = tl.program_id(0)
        pid_p = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_m = offs_m < n_exp
        mask_p = offs_p < n_pix
        logits = tl.load(g_ptr + pid_b * s_gb + offs_m[:, None] * s_gm + offs_p[None, :],
                         mask=mask_m[:, None] & mask_p[None, :], other=-float("inf")).to(tl.float32)
        logits = tl.where(mask_m[:, None], logits, -float("inf"))
        mx = tl.max(logits, axis=0)
        mx = tl.where(mask_p, mx, 0.0)
        w = tl.exp(logits - mx[None, :])
        w = tl.where(mask_m[:, None] & mask_p[None, :], w, 0.0)
        w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)[None, :]
        for c0 in range(0, n_ch, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_ch
            mask3 = mask_m[:, None, None] & mask_c[None, :, None] & mask_p[None, None, :]
            e = tl.load(e_ptr + pid_b * s_eb + offs_m[:, None, None] * s_em
                        + offs_c[None, :, None] * s_ec + offs_p[None, None, :],
                        mask=mask3, other=0.0).to(tl.float32)
            out = tl.sum(e * w[:, None, :], axis=0)
            tl.store(out_ptr + pid_b * s_ob + offs_c[:, None] * s_oc + offs_p[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def _moe_gate_fwd(gate_logits, experts, block_p=None, block_c=None):
    """Launch the Triton gating kernel; returns (B, C, H, W) in the experts' dtype."""
    if triton is None:
        raise ImportError("the Triton MoE gating kernel needs triton: pip install triton")
    b, m, h, w = gate_logits.shape
    c = experts.shape[2]
    g = gate_logits.reshape(b, m, h * w).contiguous()
    e = experts.reshape(b, m, c, h * w).contiguous()
    out = experts.new_empty((b, c, h * w))
    block_m = triton.next_power_of_2(m)
    block_p = block_p or min(128, triton.next_power_of_2(h * w))
    block_c = block_c or max(1, min(triton.next_power_of_2(c), 4096 // (block_m * block_p)))
    grid = (b, triton.cdiv(h * w, block_p))
    _moe_gate_fwd_kernel[grid](g, e, out, m, c, h * w, g.stride(0), g.stride(1), e.stride(0),
                               e.stride(1), e.stride(2), out.stride(0), out.stride(1),
                               BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_P=block_p)
    return out.reshape(b, c, h, w)


def _acc(*tensors):
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def moe_gate_torch(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The standard-op lowering (CPU and ONNX / torch.export)."""
    acc = _acc(gate_logits, experts)
    weights = torch.softmax(gate_logits.to(acc), dim=1)
    out = (weights.unsqueeze(2) * experts.to(acc)).sum(1)
    return out.to(experts.dtype)


@torch.library.custom_op("edgead::moe_gate", mutates_args=())
def _moe_gate_op(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return moe_gate_torch(gate_logits, experts)


@_moe_gate_op.register_kernel("cuda")
def _moe_gate_op_cuda(gate_logits, experts):
    if triton is None:
        return moe_gate_torch(gate_logits, experts)
    return _moe_gate_fwd(gate_logits, experts)


@_moe_gate_op.register_fake
def _moe_gate_op_fake(gate_logits, experts):
    b, _, c, h, w = experts.shape
    return experts.new_empty((b, c, h, w))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate_logits, experts = ctx.saved_tensors
    acc = _acc(gate_logits, experts)
    w = torch.softmax(gate_logits.to(acc), dim=1)                      # (B, M, H, W)
    go = grad_out.to(acc).unsqueeze(1)                                 # (B, 1, C, H, W)
    g_experts = (w.unsqueeze(2) * go).to(experts.dtype)
    s = (go * experts.to(acc)).sum(2)                                  # (B, M, H, W)
    g_logits = (w * (s - (w * s).sum(1, keepdim=True))).to(gate_logits.dtype)
    return g_logits, g_experts


_moe_gate_op.register_autograd(_backward, setup_context=_setup_context)


def _check(gate_logits, experts):
    if gate_logits.dim() != 4 or experts.dim() != 5:
        raise ValueError("moe_gate: expected gate_logits (B, M, H, W) and experts (B, M, C, H, W), "
                         f"got {tuple(gate_logits.shape)} and {tuple(experts.shape)}")
    b, m, h, w = gate_logits.shape
    if tuple(experts.shape[:2]) != (b, m) or tuple(experts.shape[3:]) != (h, w):
        raise ValueError(f"moe_gate: experts shape {tuple(experts.shape)} does not match "
                         f"gate_logits {tuple(gate_logits.shape)} (want (B, M, C, H, W))")


def moe_gate(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Softmax over M of the gate logits, weighted sum of the expert outputs. Differentiable.

    The registered op `edgead::moe_gate` (Triton on CUDA); standard ops while exporting or
    under `kernels.export_mode("chunked")`."""
    _check(gate_logits, experts)
    if resolve_lowering() in ("chunked", "plugin"):
        return moe_gate_torch(gate_logits, experts)
    return torch.ops.edgead.moe_gate(gate_logits, experts)


def moe_gate_ref(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Slow reference for tests: explicit max-shifted softmax, loop over experts, float64."""
    g = gate_logits.double()
    m = g.shape[1]
    gmax = g.max(dim=1, keepdim=True).values
    e = torch.exp(g - gmax)
    denom = e.sum(dim=1)
    out = torch.zeros_like(experts[:, 0], dtype=torch.float64)
    for i in range(m):
        out = out + (e[:, i] / denom).unsqueeze(1) * experts[:, i].double()
    return out.to(experts.dtype)
