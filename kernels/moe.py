"""Dense mixture-of-experts gating (DESIGN.md section 2).

moe_gate(gate_logits (B, M, H, W), experts (B, M, C, H, W)) -> (B, C, H, W)
    = sum_m softmax_m(gate_logits)[m] * experts[m]
Softmax and accumulation in fp32 (fp64 for fp64 inputs); output in the experts' dtype.
"""
from __future__ import annotations

import torch


def _check(gate_logits, experts):
    if gate_logits.dim() != 4 or experts.dim() != 5:
        raise ValueError("moe_gate: expected gate_logits (B, M, H, W) and experts (B, M, C, H, W), "
                         f"got {tuple(gate_logits.shape)} and {tuple(experts.shape)}")
    b, m, h, w = gate_logits.shape
    if experts.shape[:2] != (b, m) or experts.shape[3:] != (h, w):
        raise ValueError(f"moe_gate: experts shape {tuple(experts.shape)} does not match "
                         f"gate_logits {tuple(gate_logits.shape)} (want (B, M, C, H, W))")


def moe_gate_torch(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The standard-op lowering (CPU and ONNX export)."""
    acc = torch.promote_types(torch.promote_types(gate_logits.dtype, experts.dtype), torch.float32)
    weights = torch.softmax(gate_logits.to(acc), dim=1)
    out = (weights.unsqueeze(2) * experts.to(acc)).sum(1)
    return out.to(experts.dtype)


def moe_gate(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Softmax over M of the gate logits, weighted sum of the expert outputs."""
    _check(gate_logits, experts)
    return moe_gate_torch(gate_logits, experts)


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
