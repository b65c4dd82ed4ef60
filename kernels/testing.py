"""Random inputs with realistic ranges for the kernels' tests and benchmarks."""
from __future__ import annotations

import torch

from .selective_scan import selective_scan


def make_scan_inputs(batch=2, dim=6, length=37, n=5, groups=2, *, seed=0, dtype=torch.float32,
                     device="cpu", with_D=True, with_z=True, with_bias=True, softplus=True,
                     steep=False):
    """Inputs for `selective_scan` as a dict of keyword arguments.

    A follows Mamba's init (-1..-n per state, times a random factor); `steep=True` multiplies
    some channels' decays by up to 1e4 so exp(delta * A) underflows (large-decay test).
    Without softplus, delta and delta_bias are drawn positive (as softplus would give)."""
    if dim % groups:
        raise ValueError(f"make_scan_inputs: dim={dim} is not divisible by groups={groups}")
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, 1, generator=gen))
    if steep:
        A = A * torch.where(torch.rand(dim, 1, generator=gen) < 0.5,
                            10 ** (4 * torch.rand(dim, 1, generator=gen)), torch.ones(dim, 1))
    if softplus:
        delta = rnd(batch, dim, length)
    else:
        delta = torch.rand(batch, dim, length, generator=gen) * 0.5
    kw = dict(u=rnd(batch, dim, length), delta=delta, A=A,
              B=rnd(batch, groups, n, length), C=rnd(batch, groups, n, length),
              D=rnd(dim) if with_D else None, z=rnd(batch, dim, length) if with_z else None,
              delta_bias=(rnd(dim, scale=0.5) if softplus else torch.rand(dim, generator=gen) * 0.5)
              if with_bias else None, delta_softplus=softplus)
    for k in ("u", "delta", "B", "C", "z"):
        if kw[k] is not None:
            kw[k] = kw[k].to(dtype)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}


def to_double(kw):
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}


class TwoScans(torch.nn.Module):
    """Two chained scans for export tests: the first with every option (D skip, z gate, delta
    bias, softplus), the second with none, so an exported graph carries both node variants."""

    def __init__(self, A, D, bias):
        super().__init__()
        self.A, self.D, self.bias = (torch.nn.Parameter(t) for t in (A, D, bias))

    def forward(self, u, delta, B, C, z):
        y1 = selective_scan(u, delta, self.A, B, C, self.D, z, self.bias, delta_softplus=True)
        y2 = selective_scan(y1, delta, self.A, B, C)  # no D / z / bias, no softplus
        return y1, y2
