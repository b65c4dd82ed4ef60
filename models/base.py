"""The interface every anomaly model implements; export, runtime and benchmarks use only this.

Contract (all models):
  forward(x) -> (anomaly_map, score)
      x: (B, C, S, S) float32, already resized to `preprocess.input_size` and normalised with
      `preprocess.mean/std` (C = preprocess.channels); anomaly_map: (B, 1, S, S) float32;
      score: (B,) float32 (higher = more anomalous). Each sample's outputs depend on that
      sample alone (batch independence), and forward has no data-dependent host control flow
      (exportable).
  Training (`models.train`):
      prepare(loader)            optional: statistics / memory banks / clustering before training
      training_loss(x, class_id) gradient training (when `needs_gradient_training`)
      finalize(loader)           optional: statistics after training
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigBase:
    """Mixin for small @dataclass configs that round-trip through JSON."""

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]] = None):
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {unknown}; "
                             f"expected some of {sorted(names)}")
        kw = {}
        for k, v in d.items():
            default = names[k].default
            if isinstance(default, tuple):      # "--config map_strides=16" means the 1-tuple
                v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
            kw[k] = v
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass
class PreprocessConfig(ConfigBase):
    """What export and runtime need to turn a raw frame into the model's input."""

    input_size: int = 256
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    channels: int = 3          # model input channels; gray frames are replicated to 3
    blur_sigma: float = 4.0    # Gaussian blur of the anomaly map (inside the model)


@dataclass
class ScoreStats(ConfigBase):
    """Normalisation and decision threshold, computed on held-out normal images.

    normalized = clip(0.5 * (score - low) / (threshold - low), 0, 1); verdict = score >= threshold
    (equivalently normalized >= 0.5). `method` says how the threshold was chosen.
    """

    low: float = 0.0
    threshold: float = 1.0
    map_low: float = 0.0
    map_threshold: float = 1.0
    method: str = "unset"
    false_alarm_rate: Optional[float] = None
    n_images: int = 0

    def normalize(self, score):
        """clip(0.5 * (score - low) / (threshold - low), 0, 1) of a tensor or an array: the
        training side's copy of deploy.contract.normalize_score (tests/deploy/test_contract.py)."""
        return _unit(score, self.low, self.threshold)

    def normalize_map(self, amap):
        """The anomaly map on the same scale (0.5 at map_threshold), for heat maps."""
        return _unit(amap, self.map_low, self.map_threshold)


def _unit(x, low: float, threshold: float):
    span = max(threshold - low, 1e-12)
    if isinstance(x, torch.Tensor):
        return ((x - low) / span * 0.5).clamp(0.0, 1.0)
    import numpy as np

    return np.clip((np.asarray(x, dtype=np.float64) - low) / span * 0.5, 0.0, 1.0)


# Checkpoint format of the zoo families (omniad, padim, adapted_moe, fewshot): a state dict with
# `LEGACY_NORM_BUFFER` = 0 was trained on the encoder's own mean/std; one without the buffer (format
# version 1's first layout) was trained on ImageNet mean/std whatever the encoder expected, and
# loading it sets the flag to 1 so the model keeps that normalisation (its scores do not change).
LEGACY_NORM_BUFFER = "legacy_imagenet_norm"


def track_input_normalisation(model: nn.Module) -> None:
    """Give `model` (with a frozen `model.encoder` exposing `.mean/.std`) a 0-d uint8 buffer saying
    which normalisation it was trained with: 0 = the encoder's (new models), 1 = ImageNet (a state
    dict without the buffer). Integer, so `.half()` / `.to()` leave it exact."""
    model.register_buffer(LEGACY_NORM_BUFFER, torch.zeros((), dtype=torch.uint8))

    def _old_state_dict_means_imagenet(module, state_dict, prefix, *args):
        state_dict.setdefault(prefix + LEGACY_NORM_BUFFER, torch.ones((), dtype=torch.uint8))

    model.register_load_state_dict_pre_hook(_old_state_dict_means_imagenet)


def encoder_preprocess(model: nn.Module, **kw) -> "PreprocessConfig":
    """PreprocessConfig with the mean/std `model` was trained with (see `track_input_normalisation`)."""
    if bool(getattr(model, LEGACY_NORM_BUFFER)):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = tuple(model.encoder.mean), tuple(model.encoder.std)
    return PreprocessConfig(mean=tuple(mean), std=tuple(std), **kw)


class AnomalyModel(nn.Module):
    """Base class of all registered models (see module docstring for the contract)."""

    model_name: str = "?"          # set by @register_model
    config_class = ConfigBase       # each model sets its own @dataclass config
    needs_gradient_training: bool = True

    def __init__(self, config, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.score_stats = ScoreStats()
        self.class_names: list = []

    # ---- metadata -------------------------------------------------------------------
    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=getattr(self.config, "input_size", 256))

    # Module paths an INT8 export keeps fp32 unless told otherwise (export.trt --int8-keep): a model
    # whose scores compare encoder features with a memory of fp32 features keeps that encoder (an
    # INT8 encoder moves every distance to the memory: benchmarks/RESULTS.md section 3).
    int8_keep: tuple = ()

    # ---- inference ------------------------------------------------------------------
    def forward(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- training hooks -------------------------------------------------------------
    def prepare(self, loader, progress: bool = False) -> None:
        """Called once before gradient training with the training loader (progress: show bars for
        long steps inside, such as a coreset; models.train wraps the loader itself)."""

    def training_loss(self, x: torch.Tensor, class_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no gradient training")

    def finalize(self, loader, progress: bool = False) -> None:
        """Called once after gradient training with the training loader (progress: as prepare)."""

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
