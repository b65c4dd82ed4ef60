"""DeployModule: raw camera frames in, anomaly map + scores out (the deployed artifact's graph).

The torch implementation of deploy/contract.py: every exporter traces this module, and
deploy.torch_engines.TorchEngine runs it eagerly as the parity gate's reference.

Everything the runtime would otherwise have to repeat lives inside the graph, read from the
model's own `preprocess` config (never from constants here):

    frames uint8 (B, H, W, C_frame), NHWC, RGB order when C_frame == 3
      -> float, NCHW
      -> gray -> RGB replication (C_frame 1, model 3) or ITU-R 601 luma (C_frame 3, model 1)
      -> bilinear resize to (S, S): half-pixel centres (align_corners=False), no antialias,
         computed on float values (cv2.resize(INTER_LINEAR) on float32 frames gives the same)
      -> (x / 255 - mean) / std
      -> model -> (anomaly_map (B,1,S,S), score (B,))
      -> normalized_score = clip(0.5 * (score - low) / (threshold - low), 0, 1)
      [-> anomaly_map_full: the map resized back to (H, W), same bilinear rule]

The decision threshold is NOT baked in: the verdict is `normalized_score >= 0.5` by default and
the threshold is metadata a user may change at run time. `low`/`threshold` are buffers only so that
`normalized_score` is computed in-graph; they come from `model.score_stats` at construction.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .contract import LUMA_RGB, output_names


def default_frame_hw(model) -> Tuple[int, int]:
    """The frames an artifact of `model` takes unless told otherwise: the tiles it was trained on
    (models.tiles: the stream then cuts tiles at the training scale), else its input size."""
    geo = getattr(model, "training_geometry", None) or {}
    if geo.get("mode") == "tiles":
        return int(geo["tile"]), int(geo["tile"])
    size = int(model.preprocess.input_size)
    return size, size


def _check_hw(frame_hw) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in frame_hw)
    except (TypeError, ValueError):
        raise ValueError(f"frame_hw: expected (height, width) of positive ints, got {frame_hw!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"frame_hw: expected positive height and width, got {frame_hw!r}")
    return h, w


class DeployModule(nn.Module):
    """Wrap an `AnomalyModel` so it takes uint8 NHWC frames (see module docstring)."""

    def __init__(self, model: nn.Module, frame_hw: Sequence[int] = None, frame_channels: int = 3,
                 full_res_map: bool = False):
        super().__init__()
        pp = model.preprocess
        self.model = model
        self.input_size = int(pp.input_size)
        self.frame_hw = _check_hw(frame_hw if frame_hw is not None else default_frame_hw(model))
        if frame_channels not in (1, 3):
            raise ValueError(f"frame_channels: expected 1 (gray) or 3 (RGB), got {frame_channels!r}")
        self.frame_channels = int(frame_channels)
        self.model_channels = int(pp.channels)
        if self.model_channels not in (1, 3):
            raise ValueError(f"model preprocess.channels: expected 1 or 3, got {self.model_channels}")
        if len(pp.mean) != self.model_channels or len(pp.std) != self.model_channels:
            raise ValueError(f"model preprocess: mean/std need {self.model_channels} values, got "
                             f"{len(pp.mean)}/{len(pp.std)}")
        self.full_res_map = bool(full_res_map)
        mean = torch.tensor(pp.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(pp.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA_RGB, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        stats = model.score_stats
        self.register_buffer("score_low", torch.tensor(float(stats.low), dtype=torch.float32),
                             persistent=False)
        span = max(float(stats.threshold) - float(stats.low), 1e-12)
        self.register_buffer("score_half_over_span", torch.tensor(0.5 / span, dtype=torch.float32),
                             persistent=False)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return output_names(self.full_res_map)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C_frame) -> normalised float32 (B, C_model, S, S)."""
        x = frames.permute(0, 3, 1, 2).to(torch.float32)
        if self.frame_channels == 1 and self.model_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.frame_channels == 3 and self.model_channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        s = self.input_size
        if self.frame_hw != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return x * self.scale + self.shift

    def forward(self, frames: torch.Tensor):
        x = self.preprocess(frames)
        anomaly_map, score = self.model(x)
        anomaly_map = anomaly_map.to(torch.float32)
        score = score.to(torch.float32)
        normalized = ((score - self.score_low) * self.score_half_over_span).clamp(0.0, 1.0)
        if not self.full_res_map:
            return anomaly_map, score, normalized
        if tuple(anomaly_map.shape[-2:]) != self.frame_hw:
            full = F.interpolate(anomaly_map, size=self.frame_hw, mode="bilinear",
                                 align_corners=False, antialias=False)
        else:
            full = anomaly_map
        return anomaly_map, score, normalized, full

    def example_frames(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Random uint8 frames of this module's input shape (for tracing / tests)."""
        g = torch.Generator().manual_seed(seed)
        h, w = self.frame_hw
        return torch.randint(0, 256, (batch, h, w, self.frame_channels), dtype=torch.uint8, generator=g)
