"""PaDiM-style baseline: a per-position Gaussian of frozen encoder features (no gradient training).

The light peer of the reconstruction models: same frozen encoder, no decoder, so the benchmark can
show what a decoder costs. After Defard et al., "PaDiM" (ICPR 2021), written here from the method:

  features   the encoder's stride-4/8/16 maps (`models.encoders`), each bilinearly resampled to
             the grid of stride `feature_stride` (an exact 2x2 average when halving), concatenated,
             then a fixed random subset of `n_features` channels (seeded, stored as a buffer)
  fit        `prepare(loader)`: per grid position p, the mean mu_p and covariance
             Sigma_p + eps * I of the normal training features (accumulated in float64),
             stored as buffers `mean` (P, d) and `cov_inv` (P, d, d) = its inverse
  score      M_p(x) = sqrt((f_p - mu_p)^T Sigma_p^-1 (f_p - mu_p)) as batched matmuls (no
             data-dependent control flow: exportable); the map is bilinearly upsampled to the input
             size and blurred like the other models' maps; the image score is its maximum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import encoders as _enc
from . import layers as _layers
from .base import AnomalyModel, ConfigBase, PreprocessConfig, encoder_preprocess, track_input_normalisation
from .registry import register_model

_STRIDES = (4, 8, 16)


@dataclass
class PadimConfig(ConfigBase):
    input_size: int = 256
    encoder: str = "efficientnet_lite0"
    encoder_weights: Optional[str] = None
    layers: Tuple[int, ...] = (0, 1, 2)   # which encoder taps (strides 4, 8, 16) are used
    feature_stride: int = 8               # grid of the Gaussians: input_size / 8 per side
    n_features: int = 64                  # random channel subset d (PaDiM: 100 of 448)
    eps: float = 0.01                     # covariance regulariser (PaDiM: 0.01 * I)
    seed: int = 0                         # seeds the channel subset
    blur_sigma: float = 4.0

    def __post_init__(self):
        if self.feature_stride not in _STRIDES:
            raise ValueError(f"PadimConfig.feature_stride: expected one of {_STRIDES}, got "
                             f"{self.feature_stride!r}")
        if not self.layers or any(int(i) not in (0, 1, 2) for i in self.layers) \
                or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"PadimConfig.layers: expected distinct tap indices from (0, 1, 2), "
                             f"got {self.layers!r}")
        if self.n_features < 1:
            raise ValueError(f"PadimConfig.n_features: expected >= 1, got {self.n_features!r}")
        if not self.eps > 0:
            raise ValueError(f"PadimConfig.eps: expected > 0, got {self.eps!r}")


@register_model("padim")
class Padim(AnomalyModel):
    config_class = PadimConfig
    needs_gradient_training = False

    def __init__(self, config: PadimConfig, pretrained: bool = True):
        super().__init__(config, pretrained)
        c = config
        self.encoder = _enc.create_encoder(c.encoder, weights=c.encoder_weights, pretrained=pretrained)
        track_input_normalisation(self)   # preprocess: the encoder's mean/std (ImageNet for old checkpoints)
        total = sum(self.encoder.channels[i] for i in c.layers)
        if c.n_features > total:
            raise ValueError(f"PadimConfig.n_features: {c.n_features} exceeds the {total} channels of "
                             f"encoder {c.encoder!r} taps {tuple(c.layers)}")
        sizes = self.encoder.feature_sizes(c.input_size, c.input_size)
        self.grid = tuple(int(v) for v in sizes[_STRIDES.index(c.feature_stride)])
        g = torch.Generator().manual_seed(int(c.seed))
        idx = torch.randperm(total, generator=g)[: c.n_features].sort().values
        d, p = c.n_features, self.grid[0] * self.grid[1]
        self.register_buffer("channel_index", idx)
        self.register_buffer("mean", torch.zeros(p, d))
        self.register_buffer("cov_inv", torch.eye(d).expand(p, d, d).clone())
        self.register_buffer("n_fit", torch.zeros((), dtype=torch.long))

    @property
    def preprocess(self) -> PreprocessConfig:
        return encoder_preprocess(self, input_size=self.config.input_size, blur_sigma=self.config.blur_sigma)

    # ---- features -----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images -> (B, P, d) selected features on the grid."""
        feats = self.encoder(x)
        parts = []
        for i in self.config.layers:
            f = feats[i]
            if tuple(f.shape[-2:]) != self.grid:
                f = F.interpolate(f, size=self.grid, mode="bilinear", align_corners=False)
            parts.append(f)
        f = torch.cat(parts, dim=1).index_select(1, self.channel_index)
        return f.flatten(2).transpose(1, 2)

    def distance_map(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per grid position, (B, 1, gh, gw), before upsampling/blur."""
        delta = (self.features(x) - self.mean).transpose(0, 1)          # (P, B, d)
        m2 = (torch.matmul(delta, self.cov_inv) * delta).sum(-1)         # (P, B)
        return m2.clamp_min(0.0).sqrt().transpose(0, 1).reshape(x.shape[0], 1, *self.grid)

    def forward(self, x: torch.Tensor):
        dist = self.distance_map(x)
        amap = F.interpolate(dist, size=x.shape[-2:], mode="bilinear", align_corners=False)
        amap = _layers.gaussian_blur(amap, self.config.blur_sigma)
        return amap, amap.amax(dim=(1, 2, 3))

    # ---- fit ----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, loader, progress: bool = False) -> None:
        """Fit the per-position Gaussians on the (normal) training images of `loader`.

        Items may be dicts with key "image" (models.data.AnomalyDataset), (image, ...) tuples or
        plain tensors of normalised images (B, 3, S, S).
        """
        dev = self.mean.device
        p, d = self.mean.shape
        n = 0
        s1 = torch.zeros(p, d, dtype=torch.float64, device=dev)
        s2 = torch.zeros(p, d, d, dtype=torch.float64, device=dev)
        for item in loader:
            x = item["image"] if isinstance(item, dict) else item[0] if isinstance(item, (list, tuple)) else item
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"padim.prepare: expected batches of images (B, C, S, S), got "
                                 f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
            f = self.features(x.to(dev, torch.float32)).double()       # (B, P, d)
            n += f.shape[0]
            s1 += f.sum(0)
            s2 += torch.einsum("bpi,bpj->pij", f, f)
        if n < 2:
            raise ValueError(f"padim.prepare: need at least 2 training images, got {n}")
        mu = s1 / n
        cov = (s2 - n * mu.unsqueeze(2) * mu.unsqueeze(1)) / (n - 1)
        cov = cov + self.config.eps * torch.eye(d, dtype=torch.float64, device=dev)
        self.mean.copy_(mu.float())
        self.cov_inv.copy_(torch.linalg.inv(cov).float())
        self.n_fit.fill_(n)
