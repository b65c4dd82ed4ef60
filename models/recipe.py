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
  memory      `memory_weight` W > 0 (0 here; DVAD's default is 1): a nearest-neighbour term in the map, for
              anomalies the decoder reconstructs as well as normal texture (large regions: the
              eighth round of RESULTS section 12). After training, `finalize` keeps a greedy
              coreset (`models.memory`, `memory_ratio` of the patches) of the training images'
              stride-16 targets, 3 x 3 averaged and unit length (PatchCore's patch features on the
              model's own encoder), and measures s_r and s_d, the means over those images of the
              reconstruction map r (the mean over `map_strides` of 1 - cos) and of the memory map
              d (distance to the nearest row). The map before the blur is then
              r / s_r + W * d / s_d; `memory_rows` (set by finalize) sizes the buffer a checkpoint
              rebuilds.
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
from .adapted_moe import iter_batches
from .base import AnomalyModel
from .memory import coreset_of, knn_distance

STRIDES = (4, 8, 16)
SCHEDULES = ("step", "cosine")
RECIPE_BUFFER = "recipe_version"       # 0-d uint8: 1 = scored with the recipe fields, 0 = older checkpoint
# fields that decide only how a trained model scores, not its weights: `models.train --resume` of a
# finished run may change them (re-scoring the same weights, recalibrated and re-validated)
SCORING_FIELDS = ("blur_sigma", "score_topk", "map_strides", "memory_weight", "memory_ratio")
MEMORY_STRIDE = 16                     # the scale whose targets the memory holds
MEMORY_PATCH = 3                       # k x k average of those targets (PatchCore's patch size)


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
    memory_weight: float = 0.0                 # W of the nearest-neighbour term (0 = none; module doc)
    memory_ratio: float = 0.1                  # fraction of the training patches the memory keeps
    memory_rows: int = 0                       # set by finalize(); what the checkpoint's buffer holds
    # models.registry.saved_config: a checkpoint saved before the memory term existed scores without it
    PREDATING = {"memory_weight": 0.0}

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
        if self.memory_weight < 0 or not 0.0 < self.memory_ratio <= 1.0 or self.memory_rows < 0:
            bad("memory_weight/memory_ratio/memory_rows", "W >= 0, a ratio in (0, 1], rows >= 0",
                (self.memory_weight, self.memory_ratio, self.memory_rows))


class ReconstructionModel(AnomalyModel):
    """Base of the reconstruction models: subclasses build `self.encoder` and implement
    `decode(feats, training) -> (recs [r4, r8, r16], aux)` and optionally `aux_loss(aux, class_id)`."""

    frozen_encoder = True     # models.train may cache `encode(x)` outputs (no augmentation)

    @property
    def int8_keep(self) -> tuple:
        """With a memory term: the encoder, whose fp32 features the memory holds (AnomalyModel.int8_keep)."""
        return ("encoder",) if hasattr(self, "memory") else ()

    def track_recipe(self) -> None:
        """Register the recipe marker and a built memory's buffers (call in __init__, after the
        encoder); see the module doc."""
        self.register_buffer(RECIPE_BUFFER, torch.ones((), dtype=torch.uint8))
        self._legacy = False
        c = self.config
        if c.memory_weight > 0 and c.memory_rows > 0:
            self._set_memory(torch.zeros(int(c.memory_rows), self._memory_dim()), torch.ones(2))

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
            return [L.local_mean(f, k) for f in feats]

    def _memory_dim(self) -> int:
        return int(self.encoder.channels[STRIDES.index(MEMORY_STRIDE)])

    def _set_memory(self, bank: torch.Tensor, scales: torch.Tensor) -> None:
        self.register_buffer("memory", bank.contiguous())
        self.register_buffer("memory_scales", scales)      # (s_r, s_d)
        self.config.memory_rows = int(bank.shape[0])

    def memory_features(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """[f4, f8, f16] -> (B, P, C16): the memory's patch features (3 x 3 average, unit length)."""
        f = L.local_mean(feats[STRIDES.index(MEMORY_STRIDE)], MEMORY_PATCH)
        return F.normalize(f, dim=1).flatten(2).transpose(1, 2)

    def _recon_maps(self, feats, recs) -> List[torch.Tensor]:
        """1 - cos(target, reconstruction) at the scored scales: list of (B, 1, h_s, w_s)."""
        strides = STRIDES if self._legacy else tuple(self.config.map_strides)
        keep = [i for i, s in enumerate(STRIDES) if s in strides]
        return L.cosine_distance_maps([feats[i] for i in keep], [recs[i] for i in keep])

    def _memory_map(self, feats) -> torch.Tensor:
        """Distance of each stride-16 patch feature to its nearest memory row: (B, 1, h16, w16)."""
        if not hasattr(self, "memory"):
            raise RuntimeError(f"{type(self).__name__}: memory_weight={self.config.memory_weight} but no "
                               "memory built yet (finalize(loader) builds it after training)")
        f16 = feats[STRIDES.index(MEMORY_STRIDE)]
        d = knn_distance(self.memory_features(feats), self.memory, 1)
        return d.reshape(f16.shape[0], 1, f16.shape[-2], f16.shape[-1])

    def decode(self, feats: Sequence[torch.Tensor], training: bool = False):  # pragma: no cover - abstract
        raise NotImplementedError

    def aux_loss(self, aux, class_id: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None

    # ---- contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        feats = self.encode(x)
        recs, _ = self.decode(feats)
        c = self.config
        topk = 0.0 if self._legacy else c.score_topk
        rmaps = self._recon_maps(feats, recs)
        if self._legacy or c.memory_weight <= 0:
            return L.weighted_anomaly_map(rmaps, tuple(x.shape[-2:]), c.blur_sigma, topk)
        dmap = self._memory_map(feats)
        s_r, s_d = self.memory_scales[0], self.memory_scales[1]
        weights = [1.0 / (len(rmaps) * s_r)] * len(rmaps) + [c.memory_weight / s_d]
        return L.weighted_anomaly_map(rmaps + [dmap], tuple(x.shape[-2:]), c.blur_sigma, topk, weights)

    @torch.no_grad()
    def finalize(self, loader, progress: bool = False) -> None:
        """With memory_weight > 0: build the memory and its scales from the training images (module doc)."""
        c = self.config
        if self._legacy or c.memory_weight <= 0:
            return
        dev = next(self.buffers()).device
        patches, r_means = [], []
        for x, *_ in iter_batches(loader):
            feats = self.encode(x.to(dev, torch.float32))
            recs, _ = self.decode(feats)
            rmaps = self._recon_maps(feats, recs)
            r_means.append(torch.stack([m.mean(dim=(1, 2, 3)) for m in rmaps]).mean(0).cpu())
            patches.append(self.memory_features(feats).reshape(-1, self._memory_dim()).cpu())
        if not patches:
            raise ValueError(f"{type(self).__name__}.finalize: no training images in the loader")
        allf = torch.cat(patches)
        bank = allf[coreset_of(allf, c.memory_ratio, dim=128, seed=0, progress=progress)]
        d = torch.cat([knn_distance(chunk[None], bank, 1)[0] for chunk in allf.split(4096)])
        scales = torch.stack([torch.cat(r_means).mean(), d.mean()]).clamp_min(1e-8)
        self._set_memory(bank.to(dev), scales.to(dev))

    def loss_from_features(self, feats, class_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.config
        recs, aux = self.decode(feats, training=True)
        loss = L.cosine_loss(feats, recs, c.loss, c.hard_fraction, c.hard_factor)
        extra = self.aux_loss(aux, class_id)
        return loss if extra is None else loss + extra

    def training_loss(self, x, class_id: Optional[torch.Tensor] = None):
        return self.loss_from_features(self.encode(x), class_id)
