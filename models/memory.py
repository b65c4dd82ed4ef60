"""Patch-feature memory banks shared by the memory models (`fewshot`, `patchcore`).

  greedy_coreset(x (N, D), n, dim, seed) -> indices (n,)
      greedy k-center subsampling (PatchCore, Roth et al. 2022): start at a seeded random row, then
      repeatedly add the row farthest from the rows chosen so far, distances measured on a fixed
      Gaussian random projection to `dim` dimensions (0 = none). Each step is one matrix-vector
      product (|z|^2 - 2 z.z_j + |z_j|^2), so 1 % of ~700 k patches takes about a minute on one core.
  coreset_of(x, ratio, dim, seed, max_rows) -> indices: the coreset of a fraction of the rows.
  fill_rows(bank (m, D), rows) -> (rows, D)
      pad a bank to a fixed row count by repeating rows (duplicates never change a nearest neighbour).
  topk_similarity(f (B, P, D), bank (M, D), k) -> (B, P)
      mean of the k largest dot products (cosine similarities for L2-normalised rows): matmul + topk.
  knn_distance(f (B, P, D), bank (M, D), k, bank_sq (M,) or None) -> (B, P)
      mean Euclidean distance to the k nearest rows: |f|^2 - 2 f.m + |m|^2 as a matmul, top-k of its
      negation, clamp at 0, square root. No data-dependent control flow: both export to ONNX /
      AOTInductor like any other graph (the bank is a constant of the graph).
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm import tqdm


def greedy_coreset(x: torch.Tensor, n: int, dim: int = 64, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Indices of a greedy k-center coreset of n rows of x (N, D) (on a random projection)."""
    N = x.shape[0]
    if n >= N:
        return torch.arange(N)
    g = torch.Generator().manual_seed(seed)
    z = x.float()
    if dim and z.shape[1] > dim:
        z = z @ (torch.randn(z.shape[1], dim, generator=g) / dim ** 0.5)
    sq = z.pow(2).sum(1)
    start = int(torch.randint(N, (1,), generator=g))
    idx = [start]
    dist = (sq - 2.0 * (z @ z[start]) + sq[start]).clamp_min_(0.0)
    for _ in tqdm(range(n - 1), desc="coreset", disable=not progress, leave=False):
        j = int(dist.argmax())
        idx.append(j)
        torch.minimum(dist, (sq - 2.0 * (z @ z[j]) + sq[j]).clamp_min_(0.0), out=dist)
    return torch.tensor(idx)


def coreset_of(x: torch.Tensor, ratio: float, dim: int = 64, seed: int = 0, max_rows: int = 0,
               progress: bool = False) -> torch.Tensor:
    """Indices of a greedy coreset of `ratio` of the rows of x (at least one; at most `max_rows` if > 0)."""
    n = max(1, int(round(ratio * x.shape[0])))
    return greedy_coreset(x, min(n, max_rows) if max_rows else n, dim, seed, progress=progress)


def fill_rows(bank: torch.Tensor, rows: int) -> torch.Tensor:
    """Exactly `rows` rows: pad by repeating rows (duplicates never change a max / top-1)."""
    if bank.shape[0] >= rows:
        return bank[:rows]
    reps = -(-rows // bank.shape[0])
    return bank.repeat(reps, 1)[:rows]


def topk_similarity(f: torch.Tensor, bank: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Mean of the top-k dot products of f (B, P, D) with the rows of bank (M, D): (B, P)."""
    s = f @ bank.transpose(0, 1)
    return torch.topk(s, k, dim=-1).values.mean(-1)


def knn_distance(f: torch.Tensor, bank: torch.Tensor, k: int = 1, bank_sq: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
    """Mean Euclidean distance of f (B, P, D) to its k nearest rows of bank (M, D): (B, P)."""
    if bank_sq is None:
        bank_sq = bank.pow(2).sum(-1)
    neg_d2 = 2.0 * (f @ bank.transpose(0, 1)) - bank_sq - f.pow(2).sum(-1, keepdim=True)   # -(d^2)
    d2 = -torch.topk(neg_d2, k, dim=-1).values
    return d2.clamp_min(0.0).sqrt().mean(-1)
