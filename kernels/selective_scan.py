"""Selective scan (Mamba S6) with mamba-ssm's `selective_scan_fn` semantics.

Placeholder lowering: the plain sequential reference. The kernels issue replaces
`selective_scan` with a registered custom op (chunked CPU path, Triton on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Slow sequential reference. u, delta: (B, D, L); A: (D, N); B, C: (B, G, N, L)."""
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    Bf = B.float().repeat_interleave(dim // groups, dim=1)  # (B, D, N, L)
    Cf = C.float().repeat_interleave(dim // groups, dim=1)
    A = A.float()
    h = u.new_zeros(batch, dim, n)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * Bf[..., t] * u[:, :, t, None]
        ys.append((h * Cf[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None].float()
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              return_last_state)
