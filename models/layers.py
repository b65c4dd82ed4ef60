"""Pieces shared by the reconstruction models (DVAD, MambaAD-style, Omni-AD).

Shapes (B batch, S input side, f_s encoder feature at stride s with C_s channels):

  Neck(enc_channels=(C4, C8, C16), out_dim)     [f4, f8, f16] -> (B, out_dim, ceil(S/32), ...)
      conv3x3 s2 (C4->C8) on f4 + conv1x1 on f8 -> BN, ReLU; conv3x3 s2 (C8->C16) + conv1x1 on f16
      -> BN, ReLU; conv1x1; 3 ResNet bottlenecks (the first stride 2) -> out_dim (MambaAD's MFF-OCE,
      docs/design.md section 4, with the channels of any encoder).
  PatchExpand(in_dim, out_dim)                   (B, in_dim, h, w) -> (B, out_dim, 2h, 2w)
      1x1 (linear) in_dim -> 4 out_dim, pixel shuffle, LayerNorm; `size=(H, W)` crops odd sizes.
  CNNBranch(dim, k)                              (B, dim, h, w) -> same: 1x1 -> depthwise kxk -> 1x1,
      each followed by InstanceNorm + SiLU (per sample: batch independent).
  LayerNorm2d(dim)                               LayerNorm over the channel axis of (B, C, h, w).
  local_mean(f, k)                               k x k average at stride 1 (the patch features of the
      reconstruction targets and of every memory model).
  cosine_anomaly_map(feats, recs, size, blur_sigma, topk) -> (map (B, 1, size, size), score (B,))
      per scale 1 - cosine over channels, bilinear to the input size, mean over scales, Gaussian blur
      (fixed separable conv, replicate padding), score = `image_score`: the map's max (topk 0) or
      the mean of its top-`topk` fraction of pixels. `weighted_anomaly_map(maps, size, blur_sigma, topk,
      weights)` is its second half for any maps (a weighted sum instead of the mean).
  cosine_loss(feats, recs, kind, hard_fraction, hard_factor) -> scalar: sum over scales of the mean
      per-pixel 1 - cosine ("pixel") or per-image cosine of the flattened maps ("global"), with
      optional hard mining (see the function).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_bn_relu(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 stride s, 1x1 expand x4) with a projection shortcut when needed."""

    def __init__(self, cin: int, planes: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        cout = planes * expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class Neck(nn.Module):
    """Fuses the three encoder maps into one stride-32 map of `out_dim` channels (see module doc)."""

    def __init__(self, enc_channels: Sequence[int], out_dim: int, num_blocks: int = 3):
        super().__init__()
        c4, c8, c16 = (int(c) for c in enc_channels)
        if out_dim % 4:
            raise ValueError(f"Neck: out_dim must be a multiple of 4 (bottleneck expansion), got {out_dim}")
        self.down4 = nn.Conv2d(c4, c8, 3, 2, 1, bias=False)
        self.lat8 = nn.Conv2d(c8, c8, 1, bias=False)
        self.bn8 = nn.BatchNorm2d(c8)
        self.down8 = nn.Conv2d(c8, c16, 3, 2, 1, bias=False)
        self.lat16 = nn.Conv2d(c16, c16, 1, bias=False)
        self.bn16 = nn.BatchNorm2d(c16)
        self.fuse = _conv_bn_relu(c16, c16, 1)
        planes = out_dim // 4
        blocks = [Bottleneck(c16, planes, stride=2)]
        blocks += [Bottleneck(out_dim, planes) for _ in range(num_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f4, f8, f16 = feats
        a = F.relu(self.bn8(self.down4(f4) + self.lat8(f8)))
        b = F.relu(self.bn16(self.down8(a) + self.lat16(f16)))
        return self.blocks(self.fuse(b))


class PatchExpand(nn.Module):
    """x2 upsampling: linear in_dim -> 4*out_dim, pixel shuffle, LayerNorm (MambaAD's patch expand)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.expand = nn.Conv2d(in_dim, 4 * out_dim, 1, bias=False)
        self.norm = LayerNorm2d(out_dim)

    def forward(self, x, size: Optional[Tuple[int, int]] = None):
        x = F.pixel_shuffle(self.expand(x), 2)
        if size is not None:
            x = x[:, :, : size[0], : size[1]]
        return self.norm(x)


class CNNBranch(nn.Module):
    """1x1 -> depthwise kxk -> 1x1, each with InstanceNorm (affine) + SiLU."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False), nn.InstanceNorm2d(dim, affine=True), nn.SiLU(),
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False),
            nn.InstanceNorm2d(dim, affine=True), nn.SiLU(),
            nn.Conv2d(dim, dim, 1, bias=False), nn.InstanceNorm2d(dim, affine=True), nn.SiLU())

    def forward(self, x):
        return self.body(x)


@functools.lru_cache(maxsize=16)
def _gaussian_taps(sigma: float, truncate: float = 4.0) -> tuple:
    # plain Python floats, no torch ops: a cached tensor (or a value computed from one while
    # torch.export traces) would leak fake / symbolic values into later eager calls
    radius = max(int(truncate * sigma + 0.5), 1)
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    total = math.fsum(k)
    return tuple(v / total for v in k)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius int(truncate*sigma + 0.5) (scipy's convention)."""
    return torch.tensor(_gaussian_taps(float(sigma), float(truncate)), dtype=torch.float32)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with replicate padding (a fixed conv: exportable)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(float(sigma)).to(device=x.device, dtype=x.dtype)
    r = (k.numel() - 1) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x


def local_mean(f: torch.Tensor, k: int) -> torch.Tensor:
    """k x k average of (B, C, h, w) at stride 1, same size (edge cells over the cells that exist)."""
    if k <= 1:
        return f
    return F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)


def cosine_distance_maps(feats: Sequence[torch.Tensor], recs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Per scale 1 - cosine(f, r) over channels: list of (B, 1, h_s, w_s)."""
    return [(1.0 - F.cosine_similarity(f, r, dim=1)).unsqueeze(1) for f, r in zip(feats, recs)]


def image_score(amap: torch.Tensor, topk: float = 0.0) -> torch.Tensor:
    """(B, 1, H, W) map -> (B,) image score: its maximum (topk = 0) or the mean of its top `topk`
    fraction of pixels (at least one; Dinomaly scores the top 1 %): a fixed k, so it exports."""
    if topk <= 0:
        return amap.amax(dim=(1, 2, 3))
    flat = amap.flatten(1)
    k = max(1, int(round(flat.shape[1] * float(topk))))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def weighted_anomaly_map(maps, size, blur_sigma: float = 4.0, topk: float = 0.0, weights=None):
    """(map (B, 1, H, W), score (B,)): sum over maps (B, 1, h_i, w_i) of weight_i x the map bilinearly
    upsampled to `size` (weights default to 1 / len(maps): the mean), Gaussian blur; score =
    `image_score(map, topk)`."""
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    amap = None
    for i, m in enumerate(maps):
        up = F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
        if weights is not None:
            up = up * weights[i]
        amap = up if amap is None else amap + up
    # the mean as a sum divided once: the graph (and its fp16 / int8 exports) of the maps' mean as before
    amap = gaussian_blur(amap / len(maps) if weights is None else amap, blur_sigma)
    return amap, image_score(amap, topk)


def cosine_anomaly_map(feats, recs, size, blur_sigma: float = 4.0, topk: float = 0.0):
    """(map (B, 1, H, W), score (B,)): mean over scales of the upsampled 1 - cosine maps, blurred;
    score = `image_score(map, topk)`."""
    return weighted_anomaly_map(cosine_distance_maps(feats, recs), size, blur_sigma, topk)


LOSSES = ("pixel", "global")


def _scale_gradient(mask: torch.Tensor, factor: float):
    return lambda g: g * torch.where(mask, torch.full_like(g, factor), torch.ones_like(g))


def cosine_loss(feats, recs, kind: str = "pixel", hard_fraction: float = 0.0, hard_factor: float = 0.1
                ) -> torch.Tensor:
    """Reconstruction loss, summed over scales (f = encoder feature, r = reconstruction, (B, C, h, w)):

    kind "pixel"   mean over pixels of 1 - cos(f_p, r_p) (the quantity the anomaly map shows)
    kind "global"  mean over images of 1 - cos(flatten(f), flatten(r)): one cosine per image and
                   scale over all channels and positions (Dinomaly / ReContrast's "global cosine":
                   a looser target than every pixel, which the papers found keeps the decoder from
                   reconstructing everything, anomalies included)
    hard_fraction p > 0: hard mining (Dinomaly): the gradient reaching r at the positions whose
                   per-pixel distance 1 - cos(f_p, r_p) is among the easiest p of the batch (per
                   scale) is multiplied by hard_factor, so training concentrates on the
                   hardest 1 - p (training only; the value of the loss is unchanged).
    """
    if kind not in LOSSES:
        raise ValueError(f"loss kind {kind!r} unknown; expected one of {LOSSES}")
    total = 0.0
    for f, r in zip(feats, recs):
        f = f.detach()
        if hard_fraction > 0 and r.requires_grad:
            with torch.no_grad():
                d = 1.0 - F.cosine_similarity(f, r, dim=1)                    # (B, h, w)
                k = max(1, int(d.numel() * (1.0 - hard_fraction)))
                thresh = torch.topk(d.flatten(), k).values[-1]
                easy = (d < thresh).unsqueeze(1)                              # (B, 1, h, w)
            r.register_hook(_scale_gradient(easy, float(hard_factor)))
        if kind == "pixel":
            total = total + (1.0 - F.cosine_similarity(f, r, dim=1)).mean()
        else:
            total = total + (1.0 - F.cosine_similarity(f.flatten(1), r.flatten(1), dim=1)).mean()
    return total


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linears, Kaiming convs, unit norms (timm-like defaults)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm2d)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

