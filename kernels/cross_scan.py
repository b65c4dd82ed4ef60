"""Multi-direction scan orders for 2-D feature maps (VMamba / MambaAD "cross-scan").

`scan_orders(H, W, kind)` builds constant index tables (K, L = H*W); each row is a
permutation of range(L) that lists the flat (row-major) pixel indices in visiting order.
`cross_scan` gathers a (B, C, H, W) map into K sequences, `cross_merge` un-permutes K
sequences with the inverse tables (also a gather) and sums them. No `scatter_` anywhere in
the forward, so both lower to a single ONNX `Gather` each.

Kinds (K directions):
- "raster1": row-major.
- "raster2": row-major and its reverse.
- "raster4": row-major, column-major, and both reversed (VMamba's cross-scan).
- "hilbert8": a generalised Hilbert curve ("gilbert", defined for any H x W, not only
  powers of two) over 4 views of the map, each also reversed (MambaAD's 8 directions). Views
  are taken from x, x^T, rot90(x), rot90(x)^T, then the other symmetries of the rectangle,
  skipping views whose curve repeats a taken one (see `_hilbert_forward_rows`). Rows 0-3 are
  the forward orders, rows 4-7 the same reversed: row k+4 == row k flipped.
"""
from __future__ import annotations

import functools

import torch

KINDS = ("hilbert8", "raster4", "raster2", "raster1")


def _sgn(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert(x, y, ax, ay, bx, by, out):
    """Generalised Hilbert curve over the rectangle spanned by (ax, ay) x (bx, by) at (x, y).

    Recursive split in the manner of the "gilbert" construction: halve the major axis (two
    parts) when the rectangle is long, else do the classic 3-part Hilbert step; odd halves are
    nudged to even lengths so the path keeps unit steps wherever the sizes allow.
    Appends (x, y) points (x = column, y = row) to `out`.
    """
    w = abs(ax + ay)
    h = abs(bx + by)
    dax, day = _sgn(ax), _sgn(ay)
    dbx, dby = _sgn(bx), _sgn(by)
    if h == 1:
        for _ in range(w):
            out.append((x, y))
            x, y = x + dax, y + day
        return
    if w == 1:
        for _ in range(h):
            out.append((x, y))
            x, y = x + dbx, y + dby
        return
    ax2, ay2 = ax // 2, ay // 2
    bx2, by2 = bx // 2, by // 2
    w2 = abs(ax2 + ay2)
    h2 = abs(bx2 + by2)
    if 2 * w > 3 * h:
        if (w2 % 2) and (w > 2):
            ax2, ay2 = ax2 + dax, ay2 + day
        _gilbert(x, y, ax2, ay2, bx, by, out)
        _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out)
    else:
        if (h2 % 2) and (h > 2):
            bx2, by2 = bx2 + dbx, by2 + dby
        _gilbert(x, y, bx2, by2, ax2, ay2, out)
        _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out)
        _gilbert(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
                 -bx2, -by2, -(ax - ax2), -(ay - ay2), out)


@functools.lru_cache(maxsize=64)
def hilbert_path(H: int, W: int) -> tuple:
    """Visiting order of a generalised Hilbert curve on an H x W grid: tuple of flat
    row-major indices r * W + c (a permutation of range(H * W))."""
    pts: list = []
    if W >= H:
        _gilbert(0, 0, W, 0, 0, H, pts)
    else:
        _gilbert(0, 0, 0, H, W, 0, pts)
    return tuple(y * W + x for x, y in pts)


def _views(H: int, W: int):
    """Index grids of the views in priority order: x, x^T, rot90(x), rot90(x)^T, then the
    remaining symmetries of the rectangle (rot180, rot270 and their transposes)."""
    idx = torch.arange(H * W).reshape(H, W)
    rot = [torch.rot90(idx, k, (0, 1)) for k in range(4)]
    return [idx, idx.t(), rot[1], rot[1].t(), rot[2], rot[3], rot[2].t(), rot[3].t()]


def _hilbert_forward_rows(H: int, W: int, k: int = 4):
    """k forward Hilbert orders, distinct up to reversal where the grid allows it.

    A Hilbert curve is mirror-symmetric (reflecting it reverses it), so on a square map
    rot90(x)^T gives the reverse of x's curve; taking the views in priority order and
    skipping any whose order (or its reverse) is already taken gives 8 distinct directions on
    square maps. Very regular rectangles (e.g. 32 x 64) admit only 4 distinct orders in
    total; the missing rows then repeat the first ones, so K stays 8 for every shape."""
    seen, rows = set(), []
    for v in _views(H, W):
        path = torch.tensor(hilbert_path(v.shape[0], v.shape[1]), dtype=torch.long)
        order = v.reshape(-1)[path]
        key, rkey = tuple(order.tolist()), tuple(order.flip(0).tolist())
        if key in seen or rkey in seen:
            continue
        seen.update((key, rkey))
        rows.append(order)
        if len(rows) == k:
            break
    base = len(rows)
    while len(rows) < k:
        rows.append(rows[len(rows) % base])
    return rows


@functools.lru_cache(maxsize=64)
def _orders_cached(H: int, W: int, kind: str) -> torch.Tensor:
    if kind == "raster1":
        rows = [torch.arange(H * W)]
    elif kind == "raster2":
        rows = [torch.arange(H * W), torch.arange(H * W).flip(0)]
    elif kind == "raster4":
        idx = torch.arange(H * W).reshape(H, W)
        fwd = [idx.reshape(-1), idx.t().reshape(-1)]
        rows = fwd + [r.flip(0) for r in fwd]
    else:  # hilbert8
        fwd = _hilbert_forward_rows(H, W)
        rows = fwd + [r.flip(0) for r in fwd]
    return torch.stack(rows).contiguous()


def scan_orders(H: int, W: int, kind: str = "hilbert8") -> torch.Tensor:
    """Constant index tables (K, H*W) (int64, CPU); row k = flat pixel indices in visiting
    order of direction k."""
    if kind not in KINDS:
        raise ValueError(f"scan_orders: kind={kind!r} is not one of {KINDS}")
    if int(H) < 1 or int(W) < 1:
        raise ValueError(f"scan_orders: H and W must be >= 1, got H={H}, W={W}")
    return _orders_cached(int(H), int(W), kind).clone()


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    """inv[k, orders[k, i]] = i, computed without scatter (argsort of a permutation).

    Compute it once (e.g. at model init, as a buffer) and pass it to `cross_merge(...,
    inverse=...)`: otherwise the argsort is traced into exported graphs (ONNX TopK with
    K = H*W, which TensorRT rejects for K >= 3840)."""
    return torch.argsort(orders, dim=-1)


def _check_orders(orders, L, where):
    if orders.dim() != 2 or orders.shape[1] != L:
        raise ValueError(f"{where}: orders must be (K, {L}) for a map of {L} pixels, "
                         f"got {tuple(orders.shape)}")


def cross_scan(x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, K, C, L): sequence k is x flattened and read in orders[k]."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    _check_orders(orders, h * w, "cross_scan")
    k = orders.shape[0]
    # One Gather along the pixel axis of the channels-last (B, L, C) view: each index copies C
    # contiguous values. (Gathering along the last axis copies one value per index: ONNX Runtime
    # CPU took ~10x longer for it at these sizes.) Both transposes swap the last two axes, the
    # permutation ORT's CPU Transpose does fast (~5x a general one such as (1, 3, 0, 2)).
    flat = x.reshape(b, c, h * w).transpose(1, 2)
    seq = flat.index_select(1, orders.reshape(-1).to(x.device))        # (B, K*L, C)
    return seq.reshape(b, k, h * w, c).transpose(2, 3)


def cross_merge(y: torch.Tensor, orders: torch.Tensor, hw=None, inverse=None) -> torch.Tensor:
    """y (B, K, C, L) -> (B, C, H, W): each direction put back in row-major pixel order by a
    gather with the inverse table, summed over K. `hw` = (H, W); defaults to a square map.
    `inverse`: `inverse_orders(orders)` precomputed (recommended for export: no sort traced)."""
    if y.dim() != 4:
        raise ValueError(f"cross_merge: y must be (B, K, C, L), got shape {tuple(y.shape)}")
    b, k, c, length = y.shape
    _check_orders(orders, length, "cross_merge")
    if orders.shape[0] != k:
        raise ValueError(f"cross_merge: y has K={k} directions but orders has {orders.shape[0]}")
    if hw is None:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ValueError(f"cross_merge: L={length} is not a square; pass hw=(H, W)")
        hw = (side, side)
    h, w = int(hw[0]), int(hw[1])
    if h * w != length:
        raise ValueError(f"cross_merge: hw={hw} does not match L={length}")
    if inverse is None:
        inv = inverse_orders(orders.to(y.device))
    else:
        if tuple(inverse.shape) != tuple(orders.shape):
            raise ValueError(f"cross_merge: inverse must have the shape of orders "
                             f"{tuple(orders.shape)}, got {tuple(inverse.shape)}")
        inv = inverse.to(y.device)
    # flat index into the (K*L) axis: direction k's pixel p sits at k*L + inv[k, p]
    flat_idx = (inv + torch.arange(k, device=y.device)[:, None] * length).reshape(-1)
    seq = y.transpose(2, 3).reshape(b, k * length, c)                  # channels last, as in cross_scan
    out = seq.index_select(1, flat_idx).reshape(b, k, length, c).sum(1)
    return out.transpose(1, 2).reshape(b, c, h, w)


def cross_merge_ref(y: torch.Tensor, orders: torch.Tensor, hw) -> torch.Tensor:
    """Slow reference for tests: explicit per-direction un-permutation by Python loops."""
    b, k, c, length = y.shape
    out = torch.zeros(b, c, length, dtype=y.dtype, device=y.device)
    for kk in range(k):
        for i, p in enumerate(orders[kk].tolist()):
            out[:, :, p] += y[:, kk, :, i]
    return out.reshape(b, c, hw[0], hw[1])
