"""Selective scan (Mamba S6) with mamba-ssm's `selective_scan_fn` semantics (DESIGN.md s. 1).

    delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_l   = exp(delta_l * A) * h_{l-1} + delta_l * B_l * u_l       (state (B, D, N), fp32)
    y_l   = sum_n h_l[n] * C_l[n];  y += D * u;  y *= silu(z)        (y in u's dtype)

u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L) (channels d of group g are the D/G
consecutive ones); D, delta_bias: (D,).

Lowerings, each checked against `selective_scan_ref` (the slow sequential oracle, tests only):
- `selective_scan_chunked`: standard ops only (CPU path, ONNX / torch.export lowering).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Chunked lowering in standard ops (CPU implementation and what ONNX / torch.export trace).
#
# With g_l = exp(delta_l * A) (the decay, in (0, 1] for A <= 0) and x_l = delta_l * B_l * u_l,
# the state is h_l = g_l * h_{l-1} + x_l. Split L into chunks of CHUNK steps:
#   1. inside each chunk, the local scan from a zero state and the running decay product are
#      computed by CHUNK unrolled steps on strided slices (a constant number of ops: no loop
#      and no unroll over L);
#   2. the chunk end states obey the same recurrence with the chunk's total decay as g, so the
#      carry between chunks is the same chunked scan applied to the chunk totals, recursively
#      (depth ceil(log_CHUNK L));
#   3. h = local state + running decay * state at the end of the previous chunk.
# Only products of decays appear - no exp of a raw (or negated) cumulative sum - so nothing
# can overflow: steep decays just underflow to 0, which is the right answer. Each level has a
# fixed op count, so an exported graph grows only with the number of levels.
# ---------------------------------------------------------------------------------------------
CHUNK = 4


def _scan_short(g, x):
    """Unrolled scan over a short last axis (<= CHUNK): (states, running decay products)."""
    h = [x[..., 0]]
    p = [g[..., 0]]
    for t in range(1, x.shape[-1]):
        h.append(g[..., t] * h[-1] + x[..., t])
        p.append(g[..., t] * p[-1])
    return torch.stack(h, -1), torch.stack(p, -1)


def _scan_chunked(g, x, chunk=CHUNK):
    """All states h_l = g_l * h_{l-1} + x_l (h_{-1} = 0) along the last axis, fp32."""
    length = x.shape[-1]
    if length <= chunk:
        return _scan_short(g, x)[0]
    nc = -(-length // chunk)
    pad = nc * chunk - length
    if pad:  # identity steps at the end: decay 1, input 0
        g = F.pad(g, (0, pad), value=1.0)
        x = F.pad(x, (0, pad))
    lead = x.shape[:-1]
    h_loc, g_run = _scan_short(g.reshape(*lead, nc, chunk), x.reshape(*lead, nc, chunk))
    ends = _scan_chunked(g_run[..., -1], h_loc[..., -1], chunk)       # (..., nc)
    carry = F.pad(ends[..., :-1], (1, 0))                              # state before each chunk
    h = (h_loc + g_run * carry[..., None]).reshape(*lead, nc * chunk)
    return h[..., :length] if pad else h


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False, chunk=CHUNK):
    """The chunked standard-op lowering (same contract as `selective_scan`)."""
    dtype_in = u.dtype
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    dg = dim // groups
    acc = torch.promote_types(u.dtype, torch.float32)  # fp32 state (fp64 for fp64 inputs)
    u = u.to(acc)
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dl = delta.reshape(batch, groups, dg, 1, length)
    g = torch.exp(dl * A.to(acc).reshape(1, groups, dg, n, 1))             # (b, G, dg, N, L)
    x = (dl * u.reshape(batch, groups, dg, 1, length)) * B.to(acc).reshape(batch, groups, 1, n, length)
    h = _scan_chunked(g, x, chunk)
    y = (h * C.to(acc).reshape(batch, groups, 1, n, length)).sum(3).reshape(batch, dim, length)
    if D is not None:
        y = y + u * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype_in)
    if return_last_state:
        return y, h[..., -1].reshape(batch, dim, n)
    return y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False):
    """Public op: returns y (B, D, L) [, last state (B, D, N) fp32]. Differentiable."""
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """Slow sequential reference (test oracle): one Python step per position of L."""
    dtype_in = u.dtype
    acc = torch.promote_types(u.dtype, torch.float32)  # fp32 state; fp64 inputs stay fp64
    u = u.to(acc)
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(acc)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    Bf = B.to(acc).repeat_interleave(dim // groups, dim=1)  # (B, D, N, L)
    Cf = C.to(acc).repeat_interleave(dim // groups, dim=1)
    A = A.to(acc)
    h = u.new_zeros(batch, dim, n)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * Bf[..., t] * u[:, :, t, None]
        ys.append((h * Cf[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None].to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
