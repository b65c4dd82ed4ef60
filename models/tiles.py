"""Tiled training: the model learns from what the stream will show it.

`runtime.stream` cuts a line camera's strip into tiles of the engine's frame size at the camera's
native resolution. A model trained on whole images resized to its input size meets parts at
another scale in the stream (a 640 px board resized to 256 px in training is seen at 2.5x that
size in 256 px stream tiles), and nothing would say so. Here training images are laid end to end,
per class, as the strip a camera of `line_width` pixels delivers (each image resized to that width,
aspect kept - what linesim does when it replays images; with native-resolution captures whose
width is the camera's, nothing is resized), and the model trains on `tile` x `tile` crops of that
strip, resized to its input size. Crops cross image boundaries as stream tiles do.

- training: `n` seeded random crops (fixed for the run, so encoder features can be cached);
- calibration: every tile of the held-out strip at `stride` (full coverage, like the stream).

`geometry()` records the scale (model pixels per strip pixel) in the checkpoint (metadata
"training"); deploy.graph.default_frame_hw makes exports take `tile` x `tile` frames, and
runtime.stream warns when the tiles it cuts give another scale (docs/design.md section 7).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .data import DataError, Sample, load_image

LINESIM_RULE = "resize to line_width, aspect kept; INTER_AREA when shrinking, else INTER_LINEAR"


def to_line_width(img: np.ndarray, width: int) -> np.ndarray:
    """An image as a camera of `width` pixels delivers it (linesim's rule)."""
    if img.shape[1] == width:
        return img
    h = max(1, int(round(img.shape[0] * width / img.shape[1])))
    out = cv2.resize(img, (width, h), interpolation=cv2.INTER_AREA if img.shape[1] > width else cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def median_width(samples: Sequence[Sample], channels: int) -> int:
    return int(np.median([load_image(s.path, channels).shape[1] for s in samples]))


def tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """0, stride, ... and a last start aligned to the end: the stream's rule (runtime.tiling.tile_starts,
    which models/ cannot import; tests/models/test_tiles.py checks the two agree)."""
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    return starts + [length - tile] if length > tile and starts[-1] + tile < length else starts


class StripTiles(Dataset):
    """Tiles of per-class strips (module docstring) -> dict(image (C,S,S) normalised, class_id, ...),
    the items models.data.AnomalyDataset gives, so the trainer and `predict` take either."""

    def __init__(self, samples: Sequence[Sample], tile: int, line_width: int, input_size: int, channels: int,
                 mean: Sequence[float], std: Sequence[float], n_random: Optional[int] = None,
                 stride: Optional[int] = None, seed: int = 0, class_names: Optional[Sequence[str]] = None):
        if tile < 8 or line_width < 1:
            raise DataError(f"tile {tile} must be >= 8 px and line_width {line_width} >= 1")
        if (n_random is None) == (stride is None):
            raise ValueError("give n_random (random crops) or stride (full coverage), not both")
        self.tile, self.line_width, self.input_size, self.channels = int(tile), int(line_width), int(input_size), channels
        self.stride = None if stride is None else int(stride)
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        self.class_names = list(class_names) if class_names is not None else sorted({s.class_name for s in samples})
        rng = np.random.default_rng(seed)
        self.strips: Dict[int, np.ndarray] = {}
        by_class: Dict[int, List[Sample]] = {}
        for s in samples:
            by_class.setdefault(s.class_id, []).append(s)
        for cid, group in sorted(by_class.items()):
            order = rng.permutation(len(group))
            self.strips[cid] = np.concatenate([to_line_width(load_image(group[i].path, channels), line_width)
                                               for i in order])
        self.index: List[tuple] = []        # (class id, y, x)
        if stride is not None:
            for cid, strip in self.strips.items():
                for y in tile_starts(strip.shape[0], self.tile, int(stride)):
                    self.index += [(cid, y, x) for x in tile_starts(line_width, self.tile, int(stride))]
        else:
            cids = sorted(self.strips)
            lines = np.array([self.strips[c].shape[0] for c in cids], np.float64)
            picks = rng.choice(len(cids), size=int(n_random), p=lines / lines.sum())   # by strip length
            for k in picks:
                strip = self.strips[cids[k]]
                y = int(rng.integers(0, max(1, strip.shape[0] - self.tile + 1)))
                x = int(rng.integers(0, max(1, line_width - self.tile + 1)))
                self.index.append((cids[k], y, x))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lines(self) -> int:
        return int(sum(s.shape[0] for s in self.strips.values()))

    def crop(self, i: int) -> np.ndarray:
        """uint8 (tile, tile, C): strips shorter or narrower than a tile are mirrored, as the stream pads."""
        cid, y, x = self.index[i]
        block = self.strips[cid][y:y + self.tile, x:x + self.tile]
        ph, pw = self.tile - block.shape[0], self.tile - block.shape[1]
        if ph or pw:
            block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        return block

    def __getitem__(self, i: int):
        img = self.crop(i)
        if self.input_size != self.tile:
            img = cv2.resize(img, (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)
            img = img[:, :, None] if img.ndim == 2 else img
        x = (img.astype(np.float32).transpose(2, 0, 1) / 255.0 - self.mean) / self.std
        return dict(image=torch.from_numpy(np.ascontiguousarray(x)), label=0, class_id=int(self.index[i][0]),
                    index=int(i))

    def geometry(self, stride: int) -> dict:
        """What the checkpoint records ("training"): tile, stride, line width, input size, scale."""
        return {"mode": "tiles", "tile": self.tile, "stride": int(stride), "line_width": self.line_width,
                "input_size": self.input_size, "scale": self.input_size / self.tile, "layout": LINESIM_RULE}


def whole_image_geometry(samples: Sequence[Sample], input_size: int, channels: int, limit: int = 64) -> dict:
    """Geometry of whole-image training: images resized to the model input whatever their size;
    the scale is the median of input_size / sqrt(h * w) over (up to `limit` of) the images."""
    step = max(1, len(samples) // limit)
    sizes = [load_image(s.path, channels).shape[:2] for s in list(samples)[::step]]
    scale = float(np.median([input_size / np.sqrt(h * w) for h, w in sizes])) if sizes else 1.0
    med = [int(np.median([s[0] for s in sizes])), int(np.median([s[1] for s in sizes]))] if sizes else None
    return {"mode": "whole", "input_size": int(input_size), "native_median_hw": med, "scale": scale}
