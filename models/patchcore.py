"""PatchCore: a nearest-neighbour memory of normal patch features, greedy-coreset subsampled.

After Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), written
here from the method, on the same frozen encoders as the other models (no gradient training):

  patch features  the encoder's maps at `layers`, each averaged over its `patch_size` x
                  `patch_size` neighbourhood (local aggregation, stride 1), L2-normalised per layer
                  (`l2_normalize`), resampled to the grid of the first layer (bilinear) and
                  concatenated: one D-dim feature per grid cell.
  memory          every patch of every training image (one memory for all classes: unified),
                  subsampled by greedy k-center coreset (`models.memory.greedy_coreset`, on a
                  `coreset_dim`-d random projection) to `coreset_ratio` of the patches (PatchCore
                  uses 1-10 %). `prepare()` writes the row count into `config.memory_rows`, so
                  the checkpoint rebuilds a buffer of the right shape.
  score           patch score = Euclidean distance to the nearest memory row (`knn` > 1: mean of
                  the k nearest; on unit-length features a cosine distance), as |f|^2 - 2 f.m +
                  |m|^2 by matmul + top-k (`models.memory.knn_distance`: exports to ONNX /
                  AOTInductor); the map is the bilinearly upsampled, blurred patch scores, the
                  image score its maximum.

Defaults (chosen on the validation set of models.validation, benchmarks/RESULTS.md section 12):
the stride-16 map alone (PatchCore's layer2 + layer3 at strides 8 + 16 scored 84.0 image AUROC
there, stride 16 alone 88.3), unit-length features (raw Euclidean: 62.5), 10 % coreset. On Lite0
at 256 px: 16 x 16 cells of 112 dims per image; 10 % of 686 magnetic-tile images = 17,562 rows =
7.5 MB of memory; scoring is a (256 x 112) @ (112 x 17,562) matmul per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import encoders as _enc
from .adapted_moe import iter_batches, patch_anomaly_map
from .base import AnomalyModel, ConfigBase, PreprocessConfig
from . import layers as _layers
from .memory import coreset_of, knn_distance
from .registry import register_model


@dataclass
class PatchCoreConfig(ConfigBase):
    input_size: int = 256
    encoder: str = "efficientnet_lite0"
    encoder_weights: Optional[str] = None
    layers: Tuple[int, ...] = (2,)            # encoder taps (indices of strides 4, 8, 16)
    patch_size: int = 3                       # local neighbourhood averaged into each patch feature
    l2_normalize: bool = True                 # unit-length features per layer (distance ~ cosine)
    coreset_ratio: float = 0.1                # fraction of all training patches kept
    coreset_dim: int = 128                    # random projection for the coreset distances (0 = none)
    max_memory: int = 0                       # cap on the rows (0 = none)
    memory_rows: int = 0                      # set by prepare(); what the checkpoint's buffer holds
    knn: int = 1
    seed: int = 0
    blur_sigma: float = 4.0

    def __post_init__(self):
        if not self.layers or any(int(i) not in (0, 1, 2) for i in self.layers) \
                or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"PatchCoreConfig.layers: expected distinct tap indices from (0, 1, 2), "
                             f"got {self.layers!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"PatchCoreConfig.patch_size: expected an odd int >= 1, got {self.patch_size!r}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"PatchCoreConfig.coreset_ratio: expected a fraction in (0, 1], got "
                             f"{self.coreset_ratio!r}")
        if self.knn < 1 or self.memory_rows < 0 or self.max_memory < 0:
            raise ValueError("PatchCoreConfig: knn must be >= 1, memory_rows and max_memory >= 0")

    @classmethod
    def tiny(cls, **kw):
        """Seconds-to-build sizes for tests (input 64)."""
        base = dict(input_size=64, coreset_ratio=0.1, blur_sigma=2.0)
        base.update(kw)
        return cls(**base)


@register_model("patchcore")
class PatchCore(AnomalyModel):
    config_class = PatchCoreConfig
    needs_gradient_training = False
    int8_keep = ("encoder",)          # its memory holds fp32 encoder features (AnomalyModel.int8_keep)

    def __init__(self, config: PatchCoreConfig, pretrained: bool = True):
        super().__init__(config, pretrained)
        c = config
        self.encoder = _enc.create_encoder(c.encoder, weights=c.encoder_weights, pretrained=pretrained)
        self.layer_ids = tuple(int(i) for i in c.layers)
        self.dim = sum(self.encoder.channels[i] for i in self.layer_ids)
        rows = max(int(c.memory_rows), 1)
        self.register_buffer("memory", torch.zeros(rows, self.dim))
        self.build_log: dict = {}

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.config.input_size, mean=tuple(self.encoder.mean),
                                std=tuple(self.encoder.std), blur_sigma=self.config.blur_sigma)

    # ---- features -----------------------------------------------------------------------
    def patch_features(self, x: torch.Tensor):
        """(B, 3, S, S) normalised images -> ((B, P, D) patch features, grid (h, w))."""
        with torch.no_grad():
            feats = self.encoder(x)
            k = self.config.patch_size
            sel = [feats[i] for i in self.layer_ids]
            size = sel[0].shape[-2:]
            parts = []
            for f in sel:
                f = _layers.local_mean(f, k)
                if f.shape[-2:] != size:
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                if self.config.l2_normalize:
                    f = F.normalize(f, dim=1)
                parts.append(f)
            fmap = torch.cat(parts, dim=1)
            return fmap.flatten(2).transpose(1, 2), (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor):
        f, (h, w) = self.patch_features(x)
        d = knn_distance(f, self.memory, self.config.knn)
        return patch_anomaly_map(d.reshape(x.shape[0], 1, h, w), x.shape[-2:], self.config.blur_sigma)

    # ---- fit ----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, loader, progress: bool = False) -> None:
        """Collect the patch features of every (normal) training image and coreset-subsample them."""
        c = self.config
        dev = self.memory.device
        chunks = []
        for x, *_ in iter_batches(loader):
            f, _ = self.patch_features(x.to(dev, torch.float32))
            chunks.append(f.reshape(-1, self.dim).cpu())
        if not chunks:
            raise ValueError("patchcore.prepare: no training images in the loader")
        allf = torch.cat(chunks)
        keep = coreset_of(allf, c.coreset_ratio, c.coreset_dim, c.seed, int(c.max_memory), progress=progress)
        bank = allf[keep].to(dev)
        self.memory = bank.contiguous()
        self.config.memory_rows = int(bank.shape[0])
        self.build_log = dict(patches=int(allf.shape[0]), memory_rows=int(bank.shape[0]), dim=self.dim,
                              memory_mb=bank.numel() * 4 / 2 ** 20)

    def finalize(self, loader, progress: bool = False) -> None:
        """Builds the memory if prepare() was not called (a loop that only calls finalize)."""
        if int(self.config.memory_rows) == 0:
            self.prepare(loader, progress)
