"""The training and scoring recipe shared by the feature-reconstruction models (dvad, mambaad, omniad).

A reconstruction model has a frozen encoder giving maps at strides 4 / 8 / 16 and a trainable
decoder rebuilding them; `ReconstructionModel` holds what they share, `ReconRecipe` the config
fields of the recipe (benchmarks/RESULTS.md section 12 has the ablations that chose the defaults):

  targets     `encode(x)`: the frozen encoder maps, each averaged over `feature_pool` x
              `feature_pool` neighbourhoods (stride 1; 1 = as they are): what the decoder
              reconstructs and what the map compares.
  loss        `models.layers.cosine_loss(kind=loss, hard_fraction, hard_factor)` summed over the
              three scales (pixel or global cosine, optional hard mining), plus the model's own
              auxiliary terms (`aux_loss`).
  map, score  per scale in `map_strides` 1 - cos(target, reconstruction), upsampled, averaged,
              Gaussian blur `blur_sigma`; image score = mean of the top `score_topk` fraction of
              the map (0 = its maximum).
  schedule    `epochs` (models.train's default for --epochs), `schedule` ("step" | "cosine"),
              `warmup_epochs`, `lr` (AdamW at batch 16, scaled with the batch), `weight_decay`.

Checkpoints saved before the recipe fields existed score as they were trained and calibrated
(maximum of the map over all three scales, unpooled targets): their state dict has no
`RECIPE_BUFFER`, the load hook marks them, and `forward` keeps the old rule for them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import layers as L
from .base import AnomalyModel

STRIDES = (4, 8, 16)
SCHEDULES = ("step", "cosine")
RECIPE_BUFFER = "recipe_version"       # 0-d uint8: 1 = scored with the recipe fields, 0 = older checkpoint
# fields that decide only how a trained model scores, not its weights: `models.train --resume` of a
# finished run may change them (re-scoring the same weights, recalibrated and re-validated)
SCORING_FIELDS = ("blur_sigma", "score_topk", "map_strides")


@dataclass
class ReconRecipe:
    """Recipe fields of a reconstruction model's config (mixed into its @dataclass config)."""

    blur_sigma: float = 4.0
    # scoring chosen on the validation split for dvad and omniad (benchmarks/RESULTS.md section 12):
    # the map of the stride-16 scale alone (all three are still trained), the image score the mean of
    # its top 1 % (0 = the map's maximum)
    score_topk: float = 0.01
    map_strides: Tuple[int, ...] = (16,)       # scales averaged into the anomaly map
    feature_pool: int = 1                      # k x k average of the encoder maps (odd): the targets
    loss: str = "pixel"                        # "pixel" | "global" cosine (models.layers.cosine_loss)
    hard_fraction: float = 0.0                 # hard mining: damp the gradient of the easiest fraction
    hard_factor: float = 0.1
    epochs: int = 10
    schedule: str = "step"                     # "step" | "cosine"
    warmup_epochs: float = 0.0
    lr: float = 0.005                          # AdamW lr at batch 16 (scaled linearly with batch)
    weight_decay: float = 1e-4

    def check_recipe(self) -> None:
        name = type(self).__name__

        def bad(field_name, expected, got):
            raise ValueError(f"{name}.{field_name}: expected {expected}, got {got!r}")

        if not self.map_strides or any(int(v) not in STRIDES for v in self.map_strides) \
                or len(set(self.map_strides)) != len(self.map_strides):
            bad("map_strides", f"distinct strides from {STRIDES}", self.map_strides)
        if not 0.0 <= self.score_topk <= 1.0:
            bad("score_topk", "a fraction in [0, 1]", self.score_topk)
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            bad("feature_pool", "an odd int >= 1", self.feature_pool)
        if self.loss not in L.LOSSES:
            bad("loss", f"one of {L.LOSSES}", self.loss)
        if not 0.0 <= self.hard_fraction < 1.0:
            bad("hard_fraction", "a fraction in [0, 1)", self.hard_fraction)
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}", self.schedule)
        if self.epochs < 0 or self.warmup_epochs < 0:
            bad("epochs/warmup_epochs", ">= 0", (self.epochs, self.warmup_epochs))


class ReconstructionModel(AnomalyModel):
    """Base of the reconstruction models: subclasses build `self.encoder` and implement
    `decode(feats, training) -> (recs [r4, r8, r16], aux)` and optionally `aux_loss(aux, class_id)`."""

    frozen_encoder = True     # models.train may cache `encode(x)` outputs (no augmentation)

    def track_recipe(self) -> None:
        """Register the recipe marker (call in __init__); see the module doc."""
        self.register_buffer(RECIPE_BUFFER, torch.ones((), dtype=torch.uint8))
        self._legacy = False

        def _mark_old(module, state_dict, prefix, *args):
            state_dict.setdefault(prefix + RECIPE_BUFFER, torch.zeros((), dtype=torch.uint8))

        def _mirror(module, incompatible):
            module._legacy = int(getattr(module, RECIPE_BUFFER)) == 0

        self.register_load_state_dict_pre_hook(_mark_old)
        self.register_load_state_dict_post_hook(_mirror)

    # ---- pieces ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The targets: frozen encoder maps [f4, f8, f16], `feature_pool`-averaged (no gradient)."""
        with torch.no_grad():
            feats = [f.detach() for f in self.encoder(x)]
            k = 1 if self._legacy else int(self.config.feature_pool)
            if k > 1:
                feats = [F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False) for f in feats]
            return feats

    def decode(self, feats: Sequence[torch.Tensor], training: bool = False):  # pragma: no cover - abstract
        raise NotImplementedError

    def aux_loss(self, aux, class_id: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None

    # ---- contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        feats = self.encode(x)
        recs, _ = self.decode(feats)
        c = self.config
        strides, topk = (STRIDES, 0.0) if self._legacy else (tuple(c.map_strides), c.score_topk)
        keep = [i for i, s in enumerate(STRIDES) if s in strides]
        return L.cosine_anomaly_map([feats[i] for i in keep], [recs[i] for i in keep], tuple(x.shape[-2:]),
                                    c.blur_sigma, topk)

    def loss_from_features(self, feats, class_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.config
        recs, aux = self.decode(feats, training=True)
        loss = L.cosine_loss(feats, recs, c.loss, c.hard_fraction, c.hard_factor)
        extra = self.aux_loss(aux, class_id)
        return loss if extra is None else loss + extra

    def training_loss(self, x, class_id: Optional[torch.Tensor] = None):
        return self.loss_from_features(self.encode(x), class_id)
