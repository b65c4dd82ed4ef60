"""Selective scan (Mamba S6) with mamba-ssm's `selective_scan_fn` semantics (docs/design.md section 2).

    delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_l   = exp(delta_l * A) * h_{l-1} + delta_l * B_l * u_l       (state (B, D, N), fp32)
    y_l   = sum_n h_l[n] * C_l[n];  y += D * u;  y *= silu(z)        (y in u's dtype)

u, delta, z: (B, D, L); A: (D, N); B, C: (B, G, N, L) (channels d of group g are the D/G
consecutive ones); D, delta_bias: (D,).

(Over 500 lines on purpose, mamba-ssm's habit: the op's kernels, lowerings, autograd wrapper and
reference live in one file, in that order, so each lowering is read next to the oracle it must equal.)

Lowerings, each checked against `selective_scan_ref` (the slow sequential oracle, tests only):
- `selective_scan_chunked`: standard ops only (CPU path, ONNX / torch.export lowering).
- `_selective_scan_fwd`: Triton forward kernel (CUDA path).
- `kernels.cpu_scan.selective_scan_cpu_fwd`: fused C forward kernel (CPU path when it builds).
- `kernels.onnx_plugin.selective_scan_plugin`: one custom ONNX node (TensorRT plugin).
The public `selective_scan` is the registered op `edgead::selective_scan` (fake impl +
autograd; analytic backward in standard ops: a reverse chunked scan).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_scan
from .lowering import get_cpu_kernel, resolve_lowering

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU-only installs
    triton = None
    tl = None


def _acc_dtype(dtype):
    """Accumulation dtype: fp32 state (fp64 for fp64 inputs)."""
    return torch.promote_types(dtype, torch.float32)

# ---------------------------------------------------------------------------------------------
# Triton forward kernel (CUDA path). One program per (batch, block of channels, split of L);
# inside, L is walked in blocks of BLOCK_L with a tl.associative_scan over (decay, input)
# pairs and the (BLOCK_D, N) state carried in registers in fp32. exp2 with log2(e) folded into
# A; delta bias, softplus, D skip and the z gate are fused. With SPLITS > 1 (too few
# batch x channel-block programs to fill the GPU), a first pass writes each split's total
# decay and end state, a tiny scan over splits gives each split its initial state, and the
# output pass starts from it.
# ---------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _scan_combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr,
        y_ptr, state_ptr, decay_ptr,
        dim, length, n_state, dim_per_group, split_len,
        s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_ad, s_an,
        s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_zb, s_zd, s_zl,
        s_yb, s_yd, s_yl,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_Y: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        n_splits = tl.num_programs(2)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < dim
        mask_n = offs_n < n_state
        mask_dn = mask_d[:, None] & mask_n[None, :]
        grp = offs_d // dim_per_group
        LOG2E: tl.constexpr = 1.4426950408889634
        A2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=mask_dn,
                     other=0.0).to(tl.float32) * LOG2E
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_D:
            dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        # state index: ((b * n_splits + s) * dim + d) * n_state + n
        st_offs = ((pid_b * n_splits + pid_s) * dim + offs_d[:, None]) * n_state + offs_n[None, :]
        if HAS_INIT:
            h = tl.load(init_ptr + st_offs, mask=mask_dn, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        decay_tot = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32) + 1.0
        l_start = pid_s * split_len
        l_end = tl.minimum(l_start + split_len, length)
        for l0 in range(l_start, l_end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < l_end
            mask_dl = mask_d[:, None] & mask_l[None, :]
            u = tl.load(u_ptr + pid_b * s_ub + offs_d[:, None] * s_ud + offs_l[None, :] * s_ul,
                        mask=mask_dl, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + pid_b * s_db + offs_d[:, None] * s_dd + offs_l[None, :] * s_dl,
                         mask=mask_dl, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias[:, None]
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(mask_dl, dt, 0.0)  # padded steps: decay 1, input 0 (identity)
            mask3 = mask_dn[:, :, None] & mask_l[None, None, :]
            bc_offs = grp[:, None, None] * s_bg + offs_n[None, :, None] * s_bn + offs_l[None, None, :] * s_bl
            Bv = tl.load(B_ptr + pid_b * s_bb + bc_offs, mask=mask3, other=0.0).to(tl.float32)
            dA = tl.exp2(dt[:, None, :] * A2[:, :, None])
            dBu = (dt * u)[:, None, :] * Bv
            aa, bb = tl.associative_scan((dA, dBu), 2, _scan_combine)
            hs = aa * h[:, :, None] + bb
            last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
            h = tl.sum(tl.where(last, hs, 0.0), axis=2)
            decay_tot = decay_tot * tl.sum(tl.where(last, aa, 0.0), axis=2)
            if WRITE_Y:
                cc_offs = grp[:, None, None] * s_cg + offs_n[None, :, None] * s_cn + offs_l[None, None, :] * s_cl
                Cv = tl.load(C_ptr + pid_b * s_cb + cc_offs, mask=mask3, other=0.0).to(tl.float32)
                y = tl.sum(hs * Cv, axis=1)
                if HAS_D:
                    y = y + u * dskip[:, None]
                if HAS_Z:
                    zv = tl.load(z_ptr + pid_b * s_zb + offs_d[:, None] * s_zd + offs_l[None, :] * s_zl,
                                 mask=mask_dl, other=0.0).to(tl.float32)
                    y = y * zv * tl.sigmoid(zv)
                tl.store(y_ptr + pid_b * s_yb + offs_d[:, None] * s_yd + offs_l[None, :] * s_yl,
                         y.to(y_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(state_ptr + st_offs, h, mask=mask_dn)
        if not WRITE_Y:
            tl.store(decay_ptr + st_offs, decay_tot, mask=mask_dn)


def _selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False, splits=None, block_d=None, block_l=None):
    """Launch the Triton forward; returns (y (B, D, L) in u's dtype, last state (B, D, N) fp32).

    `splits` (parallel chunks of L) defaults to enough programs to fill the device."""
    if triton is None:
        raise ImportError("the Triton selective-scan kernel needs triton: pip install triton")
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    block_n = triton.next_power_of_2(n)
    if block_l is None:
        block_l = max(16, min(32, triton.next_power_of_2(length)))
    if block_d is None:  # keep each (BLOCK_D, N, BLOCK_L) fp32 tile at ~2K elements
        block_d = max(1, min(triton.next_power_of_2(dim), 2048 // (block_n * block_l)))
    d_blocks = triton.cdiv(dim, block_d)
    if splits is None:
        programs = batch * d_blocks
        target = 4 * (torch.cuda.get_device_properties(u.device).multi_processor_count
                      if u.is_cuda else 1)
        splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(length, 4 * block_l)))
    split_len = triton.cdiv(triton.cdiv(length, splits), block_l) * block_l
    splits = triton.cdiv(length, split_len)
    y = torch.empty_like(u)
    dummy = u.new_empty(1, dtype=torch.float32)
    opt = dict(D=D if D is not None else dummy, z=z if z is not None else u,
               bias=delta_bias if delta_bias is not None else dummy)
    zz = opt["z"]

    def launch(init, write_y, state, decay):
        grid = (batch, d_blocks, splits)
        _selective_scan_fwd_kernel[grid](
            u, delta, A, B, C, opt["D"], zz, opt["bias"], init if init is not None else dummy,
            y, state, decay if decay is not None else dummy,
            dim, length, n, dim // groups, split_len,
            u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
            A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2), B.stride(3),
            C.stride(0), C.stride(1), C.stride(2), C.stride(3), zz.stride(0), zz.stride(1), zz.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_INIT=init is not None, WRITE_Y=write_y,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l)

    if splits == 1:
        state = u.new_empty((batch, 1, dim, n), dtype=torch.float32)
        launch(None, True, state, None)
        return y, state[:, 0]
    ends = u.new_empty((batch, splits, dim, n), dtype=torch.float32)
    decays = torch.empty_like(ends)
    launch(None, False, ends, decays)
    # state entering split s = scan over splits of (decay, end state), shifted by one
    carried = _chunk_states(decays.transpose(1, 2), ends.transpose(1, 2))  # (b, dim, splits, n)
    init = F.pad(carried[..., :-1, :], (0, 0, 1, 0)).transpose(1, 2).contiguous()
    state = torch.empty_like(ends)
    launch(init, True, state, None)
    return y, state[:, -1]


# ---------------------------------------------------------------------------------------------
# Chunked lowering in standard ops (CPU implementation and what ONNX / torch.export trace).
#
# With g_l = exp(delta_l * A) (the decay, in (0, 1] for A <= 0) and x_l = delta_l * B_l * u_l,
# the state is h_l = g_l * h_{l-1} + x_l. L is split into chunks of CHUNK steps; the carry
# between chunks is the same scan applied to the chunk totals, recursively. Two forms of it
# (`selective_scan_chunked(form=...)`): "inductor" (`_chunked_inductor`, step-major
# (chunk, ..., chunks, N) tensors; what eager, torch.compile and torch.export / AOTInductor
# run) and "ort" (`_chunked_ort`, what torch.onnx.export traces), described here: every
# (B, D, L, N)-sized quantity is handled as CHUNK step tensors of layout (b, G, N, dg, chunks):
#   1. per step t, g_t and x_t are made from the step's N-independent slices of delta, delta*u
#      (b, G, 1, dg, chunks) and of B (b, G, N, 1, chunks) by broadcasting;
#   2. one sweep over the CHUNK steps (Horner form) gives every chunk's end state from a zero
#      start; the chunk ends obey the same recurrence with the chunk's total decay
#      exp(A * sum(delta)), so the carry between chunks is the same scan along the chunk axis
#      (`_scan_last`), recursively (depth ceil(log_CHUNK L), each level CHUNK times smaller);
#   3. a second sweep starts every chunk from its carried state and reduces y_t = sum_n C h
#      at once.
# No exp of a growing cumulative sum appears anywhere (every exp argument is <= 0): steep decays
# underflow to 0, which is the right answer. Constant node count in L (no Loop, no unroll).
# Why this shape (ONNX Runtime CPU profile of the 256 px DVAD, batch 1; the step-major
# "inductor" form was 2.3x slower there):
# - no Transpose of anything N-sized: the layout changes are Split/Reshape of small
#   N-independent tensors. ORT's transpose optimizer pushes a Transpose through the following
#   element-wise ops onto the (B, D, L, N)-sized products, where it costs a full copy each;
# - N is not the innermost axis, so broadcasts run over long contiguous rows (chunks) and the
#   reduction over N is a fast middle-axis ReduceSum;
# - no Softplus node (ORT's is scalar, ~6x the cost of Log): `_softplus_ops`;
# - two sweeps over the steps and no per-step decay products (chunk totals come from delta).
# ---------------------------------------------------------------------------------------------
CHUNK = 4


def _scan_short(g, x):
    """Unrolled scan along dim -2 of length <= CHUNK, layout (..., L, N): all states."""
    h = [x[..., 0, :]]
    for t in range(1, x.shape[-2]):
        h.append(torch.addcmul(x[..., t, :], g[..., t, :], h[-1]))
    return torch.stack(h, -2)


def _chunk_states(g, x, chunk=CHUNK):
    """All states h_l = g_l * h_{l-1} + x_l (h_{-1} = 0) along dim -2, layout (..., L, N)
    (the "inductor" form's carry, the backward pass, the Triton launcher's split carry)."""
    length, n = x.shape[-2], x.shape[-1]
    if length <= chunk:
        return _scan_short(g, x)
    nc = -(-length // chunk)
    pad = nc * chunk - length
    if pad:  # identity steps at the end: decay 1, input 0
        g = F.pad(g, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad))
    lead = x.shape[:-2]
    g = g.reshape(*lead, nc, chunk, n)
    x = x.reshape(*lead, nc, chunk, n)
    hs, ps = [x[..., 0, :]], [g[..., 0, :]]
    for t in range(1, chunk):
        hs.append(torch.addcmul(x[..., t, :], g[..., t, :], hs[-1]))
        ps.append(ps[-1] * g[..., t, :])
    ends = _chunk_states(ps[-1], hs[-1], chunk)                         # (..., nc, N)
    carry = F.pad(ends[..., :-1, :], (0, 0, 1, 0))                      # state before chunk
    h = torch.stack([torch.addcmul(h_t, p_t, carry) for h_t, p_t in zip(hs, ps)], -2)
    h = h.reshape(*lead, nc * chunk, n)
    return h[..., :length, :] if pad else h


def _scan_last(g, x, chunk=CHUNK):
    """All states h_l = g_l * h_{l-1} + x_l (h_{-1} = 0) along the LAST axis; g, x (..., L).
    Chunks of `chunk` steps: a Horner sweep for the chunk ends, the carry by recursion on the
    chunk totals, a second sweep from the carried states. Slices are Splits along the last
    axis (no Transpose)."""
    length = x.shape[-1]
    if length <= chunk:
        gs, xs = g.split(1, -1), x.split(1, -1)
        h = [xs[0]]
        for t in range(1, length):
            h.append(xs[t] + gs[t] * h[-1])
        return torch.cat(h, -1) if length > 1 else h[0]
    nc = -(-length // chunk)
    pad = nc * chunk - length
    if pad:  # identity steps at the end: decay 1, input 0
        g = F.pad(g, (0, pad), value=1.0)
        x = F.pad(x, (0, pad))
    lead = x.shape[:-1]
    gs = g.reshape(*lead, nc, chunk).split(1, -1)
    xs = x.reshape(*lead, nc, chunk).split(1, -1)
    end, tot = xs[0], gs[0]
    for t in range(1, chunk):
        end = xs[t] + gs[t] * end
        tot = tot * gs[t]
    ends = _scan_last(tot.reshape(*lead, nc), end.reshape(*lead, nc), chunk)
    carry = F.pad(ends[..., :-1], (1, 0)).unsqueeze(-1)                  # state before chunk
    h = [xs[0] + gs[0] * carry]
    for t in range(1, chunk):
        h.append(xs[t] + gs[t] * h[-1])
    h = torch.cat(h, -1).reshape(*lead, nc * chunk)
    return h[..., :length] if pad else h


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    acc = _acc_dtype(u.dtype)
    u = u.to(acc)
    dl = delta.to(acc)
    if delta_bias is not None:
        dl = dl + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dl = F.softplus(dl)
    return acc, u, dl


def _softplus_ops(x):
    """softplus(x) = relu(x) + log1p(exp(-|x|)) in element-wise ops, with log1p(e) computed as
    log(u) - ((u - 1) - e) / u, u = 1 + e (the rounding of u corrected; 2e-7 relative error
    over all x). ONNX Runtime's Softplus kernel is scalar: ~3x the cost of these, plus the Where
    that torch's threshold adds."""
    e = torch.exp(-x.abs())
    u = 1.0 + e
    return torch.relu(x) + (torch.log(u) - ((u - 1.0) - e) / u)


def _chunked_ort(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False, chunk=CHUNK):
    """ONNX Runtime form (see the notes above): step tensors (b, G, N, dg, chunks), two sweeps,
    no Transpose / Softplus / Gather nodes."""
    dtype_in = u.dtype
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    dg = dim // groups
    acc = _acc_dtype(dtype_in)
    u = u.to(acc)
    dl = delta.to(acc)
    if delta_bias is not None:
        dl = dl + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dl = _softplus_ops(dl)
    nc = -(-length // chunk)
    pad = nc * chunk - length

    # padded steps have delta = 0: decay exp(0) = 1 and input 0, i.e. identity steps.
    def steps(t, rows, shape):   # (b, rows, L) -> chunk x (b, *shape, nc), one per step
        t = F.pad(t, (0, pad)) if pad else t
        return [s.reshape(batch, *shape, nc) for s in t.reshape(batch, rows, nc, chunk).split(1, -1)]

    dls = steps(dl, dim, (groups, 1, dg))                                # (b, G, 1, dg, nc)
    dus = steps(dl * u, dim, (groups, 1, dg))
    Bs = steps(B.to(acc).reshape(batch, groups * n, length), groups * n, (groups, n, 1))
    Cs = steps(C.to(acc).reshape(batch, groups * n, length), groups * n, (groups, n, 1))
    A5 = A.to(acc).reshape(groups, dg, n).transpose(1, 2).reshape(1, groups, n, dg, 1)
    gs = [torch.exp(d_t * A5) for d_t in dls]                           # (b, G, N, dg, nc)
    xs = [d_t * b_t for d_t, b_t in zip(dus, Bs)]
    end = xs[0]                                                         # chunk end, zero start
    for t in range(1, chunk):
        end = xs[t] + gs[t] * end
    tot = torch.exp(sum(dls[1:], dls[0]) * A5)                          # chunk's total decay
    ends = _scan_last(tot, end, chunk)                                  # state at each chunk end
    h = xs[0] + gs[0] * F.pad(ends[..., :-1], (1, 0))                   # from the carried state
    ys = [(h * Cs[0]).sum(2)]
    for t in range(1, chunk):
        h = xs[t] + gs[t] * h
        ys.append((h * Cs[t]).sum(2))
    y = _finish(torch.stack(ys, -1).reshape(batch, dim, nc * chunk), u, D, z, length, acc, dtype_in)
    if return_last_state:
        return y, h[..., -1].transpose(2, 3).reshape(batch, dim, n)
    return y


def _finish(y, u, D, z, length, acc, dtype_in):
    """Common tail of the chunked forms: drop the padded steps, add the D skip, gate by silu(z),
    cast back to the input dtype."""
    if y.shape[-1] != length:
        y = y[..., :length]
    if D is not None:
        y = y + u * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(dtype_in)


def _chunked_inductor(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, chunk=CHUNK):
    """Step-major form: tensors (chunk, b, G, dg, chunks, N), N innermost, one addcmul per step
    and per-step decays exp(delta * A). Inductor fuses each stage into one loop (torch.compile
    of it was ~1.5x faster than of the ORT form at L = 1024); in ONNX Runtime it was 2.3x
    slower than the ORT form (small inner broadcast spans, Transposes pushed onto N-sized
    tensors, scalar Softplus)."""
    dtype_in = u.dtype
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    dg = dim // groups
    acc, u, dl = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    nc = -(-length // chunk)
    pad = nc * chunk - length
    # padded steps have delta = 0: decay exp(0) = 1 and input 0, i.e. identity steps.
    # Step-major layouts (chunk step first) make every per-step slice contiguous.
    dl_c = F.pad(dl, (0, pad)).reshape(batch, groups, dg, nc, chunk)
    S = dl_c.cumsum(-1).movedim(-1, 0)[..., None]            # (chunk, b, G, dg, nc, 1)
    dl_s = dl_c.movedim(-1, 0)[..., None].contiguous()
    du_s = F.pad(dl * u, (0, pad)).reshape(batch, groups, dg, nc, chunk).movedim(-1, 0)[..., None].contiguous()
    # B, C: (b, G, N, L) -> (chunk, b, G, 1, nc, N), small tensors
    Bs = F.pad(B.to(acc), (0, pad)).reshape(batch, groups, n, nc, chunk).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()
    Cs = F.pad(C.to(acc), (0, pad)).reshape(batch, groups, n, nc, chunk).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()
    A5 = A.to(acc).reshape(1, groups, dg, 1, n)
    h = None
    y_loc = []
    for t in range(chunk):                                   # local states, zero start
        x_t = du_s[t] * Bs[t]                                # (b, G, dg, nc, N)
        h = x_t if h is None else torch.addcmul(x_t, torch.exp(dl_s[t] * A5), h)
        y_loc.append((h * Cs[t]).sum(-1))
    ends = _chunk_states(torch.exp(S[-1] * A5), h, chunk)   # state at each chunk end
    carry = F.pad(ends[..., :-1, :], (0, 0, 1, 0))
    y = torch.stack([y_loc[t] + (torch.exp(S[t] * A5) * carry * Cs[t]).sum(-1)
                     for t in range(chunk)], -1).reshape(batch, dim, nc * chunk)
    y = _finish(y, u, D, z, length, acc, dtype_in)
    if return_last_state:
        return y, ends[..., -1, :].reshape(batch, dim, n)
    return y


CHUNKED_FORMS = ("ort", "inductor")


def _onnx_exporting() -> bool:
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # very old torch
        return False


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False, chunk=CHUNK, form=None):
    """The chunked standard-op lowering (same contract as `selective_scan`).

    Two forms of the same recurrence, each checked against the sequential reference:
    "ort" (traced by `torch.onnx.export`: the layout ONNX Runtime CPU runs fastest) and
    "inductor" (everything else: eager fallback, torch.compile, torch.export / AOTInductor).
    `form=None` picks by whether an ONNX export is tracing."""
    if form is None:
        form = "ort" if _onnx_exporting() else "inductor"
    if form not in CHUNKED_FORMS:
        raise ValueError(f"selective_scan_chunked: form={form!r} is not one of {CHUNKED_FORMS}")
    fn = _chunked_ort if form == "ort" else _chunked_inductor
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk)


def _selective_scan_bwd_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_y,
                                grad_h, chunk=CHUNK):
    """Analytic backward of the selective scan in standard ops: the state gradient is the same
    chunked scan run backwards (reverse time, decays shifted by one step). Materialises the
    (B, D, L, N) states, which is fine for training-sized inputs.
    Returns grads for (u, delta, A, B, C, D, z, delta_bias); None for absent inputs."""
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    dg = dim // groups
    acc, u32, dl = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    a5 = A.to(acc).reshape(1, groups, dg, 1, n)
    d5 = dl.reshape(batch, groups, dg, length, 1)
    u5 = u32.reshape(batch, groups, dg, length, 1)
    b5 = B.to(acc).transpose(-1, -2).unsqueeze(2)                     # (b, G, 1, L, N)
    c5 = C.to(acc).transpose(-1, -2).unsqueeze(2)
    g = torch.exp(d5 * a5)
    h = _chunk_states(g, (d5 * u5) * b5, chunk)                         # (b, G, dg, L, N)
    y = (h * c5).sum(-1).reshape(batch, dim, length)
    if D is not None:
        y = y + u32 * D.to(acc)[:, None]

    gy = grad_y.to(acc)
    grads = dict.fromkeys(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    if z is not None:
        z32 = z.to(acc)
        sig = torch.sigmoid(z32)
        grads["z"] = (gy * y * (sig * (1 + z32 * (1 - sig)))).to(z.dtype)
        gy = gy * (z32 * sig)
    gu = gy * D.to(acc)[:, None] if D is not None else torch.zeros_like(u32)
    if D is not None:
        grads["D"] = (gy * u32).sum((0, 2)).to(D.dtype)
    gy5 = gy.reshape(batch, groups, dg, length, 1)
    grads["C"] = (gy5 * h).sum(2).transpose(-1, -2).to(C.dtype)
    # dL/dh_l = C_l gy_l + g_{l+1} dL/dh_{l+1} (+ grad of the returned last state at l = L-1)
    src = c5 * gy5
    src = torch.cat([src[..., :-1, :], src[..., -1:, :]
                     + grad_h.to(acc).reshape(batch, groups, dg, 1, n)], -2)
    g_next = F.pad(g[..., 1:, :], (0, 0, 0, 1), value=1.0)
    gh = _chunk_states(g_next.flip(-2), src.flip(-2), chunk).flip(-2)
    h_prev = F.pad(h[..., :-1, :], (0, 0, 1, 0))
    ga = gh * h_prev * g                                # grad wrt delta * A (before exp)
    grads["B"] = (gh * d5 * u5).sum(2).transpose(-1, -2).to(B.dtype)
    ghb = (gh * b5).sum(-1, keepdim=True)               # (b, G, dg, L, 1)
    gu = gu + (ghb * d5).reshape(batch, dim, length)
    g_dl = (ghb * u5 + (ga * a5).sum(-1, keepdim=True)).reshape(batch, dim, length)
    grads["A"] = (ga * d5).sum((0, 3)).reshape(dim, n).to(A.dtype)
    grads["u"] = gu.to(u.dtype)
    if delta_softplus:  # d softplus(v) / dv = sigmoid(v), v = delta + delta_bias
        pre = delta.to(acc) if delta_bias is None else delta.to(acc) + delta_bias.to(acc)[:, None]
        g_pre = g_dl * torch.sigmoid(pre)
    else:
        g_pre = g_dl
    grads["delta"] = g_pre.to(delta.dtype)
    if delta_bias is not None:
        grads["delta_bias"] = g_pre.sum((0, 2)).to(delta_bias.dtype)
    return [grads[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]


# ---------------------------------------------------------------------------------------------
# Registered op: one node for torch.compile / torch.export; CUDA -> Triton, CPU -> the fused C
# kernel of kernels.cpu_scan (fp32/fp16/bf16, N <= 256, when a C compiler works) else chunked.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("edgead::selective_scan", mutates_args=())
def _selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                       delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if get_cpu_kernel() == "fused" and cpu_scan.supports(u, A) and cpu_scan.available():
        return cpu_scan.selective_scan_cpu_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y, h = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return y, h.contiguous()


@_selective_scan_op.register_kernel("cuda")
def _selective_scan_op_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if triton is None:
        y, h = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
        return y, h.contiguous()
    return _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _selective_scan_op_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, _ = u.shape
    return u.new_empty(u.shape), u.new_empty((batch, dim, A.shape[1]), dtype=_acc_dtype(u.dtype))


@torch.library.custom_op("edgead::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                           z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                           delta_softplus: bool, grad_y: torch.Tensor,
                           grad_h: torch.Tensor) -> list[torch.Tensor]:
    """Backward in standard ops (recomputes the forward states)."""
    grads = _selective_scan_bwd_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        grad_y, grad_h)
    return [g.contiguous() if g is not None else u.new_empty(0) for g in grads]


@_selective_scan_bwd_op.register_fake
def _selective_scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_y, grad_h):
    return [t.new_empty(t.shape) if t is not None else u.new_empty(0)
            for t in (u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.has = [t is not None for t in (D, z, delta_bias)]
    ctx.delta_softplus = delta_softplus
    ctx.save_for_backward(u, delta, A, B, C, *[t for t in (D, z, delta_bias) if t is not None])


def _backward(ctx, grad_y, grad_h):
    saved = list(ctx.saved_tensors)
    u, delta, A, B, C = saved[:5]
    rest = iter(saved[5:])
    D, z, delta_bias = [next(rest) if has else None for has in ctx.has]
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    if grad_h is None:
        grad_h = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=_acc_dtype(u.dtype))
    grads = torch.ops.edgead.selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias,
                                                ctx.delta_softplus, grad_y.contiguous(),
                                                grad_h.contiguous())
    grads = [g if t is not None else None
             for g, t in zip(grads, (u, delta, A, B, C, D, z, delta_bias))]
    return (*grads, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    def bad(name, t, want):
        raise ValueError(f"selective_scan: {name} must be {want}, got "
                         f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")

    if not torch.is_tensor(u) or u.dim() != 3:
        bad("u", u, "(B, D, L)")
    batch, dim, length = u.shape
    if not torch.is_tensor(delta) or tuple(delta.shape) != (batch, dim, length):
        bad("delta", delta, f"(B, D, L) = {(batch, dim, length)}")
    if not torch.is_tensor(A) or A.dim() != 2 or A.shape[0] != dim:
        bad("A", A, f"(D, N) with D = {dim}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if (not torch.is_tensor(t) or t.dim() != 4 or t.shape[0] != batch or t.shape[2] != n
                or t.shape[3] != length or t.shape[1] < 1 or dim % t.shape[1]):
            bad(name, t, f"(B, G, N, L) = ({batch}, G, {n}, {length}) with G dividing D = {dim}")
    if B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got "
                         f"{B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (not torch.is_tensor(t) or tuple(t.shape) != (dim,)):
            bad(name, t, f"(D,) = ({dim},) or None")
    if z is not None and (not torch.is_tensor(z) or tuple(z.shape) != (batch, dim, length)):
        bad("z", z, f"(B, D, L) = {(batch, dim, length)} or None")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False):
    """Selective scan with mamba-ssm's semantics; returns y (B, D, L) in u's dtype
    [, last state (B, D, N) in fp32]. Differentiable.

    Runs the registered op `edgead::selective_scan` (Triton on CUDA, chunked standard ops on
    CPU); while exporting, or under `kernels.export_mode(...)`, traces the lowering that mode
    asks for (see `kernels.lowering`)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    lowering = resolve_lowering()
    if lowering == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                      return_last_state)
    if lowering == "plugin":
        from .onnx_plugin import selective_scan_plugin
        return selective_scan_plugin(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                     return_last_state)
    y, h = torch.ops.edgead.selective_scan(u, delta, A, B, C, D, z, delta_bias,
                                           bool(delta_softplus))
    return (y, h) if return_last_state else y


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
