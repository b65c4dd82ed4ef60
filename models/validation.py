"""The validation set recipes are chosen on: held-out normal images + synthetic defects on copies.

Never tune on the test split. What is left to choose a recipe on (a training schedule, a loss, an
encoder, a scoring rule) is the slice of train/good that `models.data.make_datasets` holds out
(--val-fraction, by file-name hash, the same split `models.train` calibrates its threshold on) and
defects drawn onto copies of those real normal images:

    items  for each held-out normal image k (resized to the model's input size S):
             the image itself                                         label 0, empty mask
             `per_image` copies, copy j with defect DEFECTS[(k + j) % 4]  label 1, exact mask
               (models.synthetic.paste_defect: scratch, hole, stain, colour shift; another list of
               `defects`, e.g. only the thin "crack", on request), alpha-blended
               with an opacity drawn uniformly from `opacity` (faint to strong)
           every copy from its own numpy Generator seeded (seed, k, j): the same arguments give the
           same set on every machine.
    metrics  the test metrics (models.metrics: image AUROC / AP / F1-max, pixel AUROC / AP /
           F1-max, AUPRO, mAD) on these items.

Synthetic defects are not the real ones (on magnetic tile: blowholes, cracks, breaks, fray, uneven
surfaces), so a recipe that wins here is a candidate; the test split then runs once per recipe that
is reported.

    python -m models.evaluate --ckpt model.pt --data DIR --val-synthetic [--val-defects crack]
    python -m models.train ... (the summary's "validation" block holds the same metrics)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset

from .data import AnomalyDataset, Sample, make_datasets, resize_image
from .synthetic import DEFECTS, paste_defect

DEFAULT_PER_IMAGE = 2
DEFAULT_OPACITY = (0.1, 0.4)   # faint: PaDiM scores ~99.9 image AUROC at (0.3, 0.9) on magnetic tile


class SyntheticDefectDataset(Dataset):
    """Held-out normal images and synthetic-defect copies of them (see module doc); items are the
    dicts of `models.data.AnomalyDataset` (image, mask, label, class_id, index)."""

    def __init__(self, normal: AnomalyDataset, per_image: int = DEFAULT_PER_IMAGE,
                 opacity: Tuple[float, float] = DEFAULT_OPACITY, seed: int = 0,
                 defects: Sequence[str] = DEFECTS):
        lo, hi = (float(v) for v in opacity)
        if per_image < 0 or not 0.0 < lo <= hi <= 1.0 or not defects:
            raise ValueError(f"SyntheticDefectDataset: need per_image >= 0, 0 < opacity lo <= hi <= 1 and "
                             f"defect types; got {per_image}, {opacity}, {defects}")
        self.normal, self.per_image, self.opacity, self.seed = normal, int(per_image), (lo, hi), int(seed)
        self.defects = tuple(defects)
        self.class_names = list(normal.class_names)
        self.samples = []
        for k, s in enumerate(normal.samples):
            self.samples.append(s)
            for j in range(self.per_image):
                d = self.defects[(k + j) % len(self.defects)]
                self.samples.append(Sample(s.path, s.class_name, s.class_id, f"synthetic_{d}", 1, None))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int64)

    def __getitem__(self, i: int):
        k, j = divmod(int(i), 1 + self.per_image)
        ds = self.normal
        img, _ = ds.load_raw(k)
        S = ds.input_size
        img = resize_image(img, S)
        mask = np.zeros((S, S), np.uint8)
        if j > 0:
            rng = np.random.default_rng([self.seed, k, j])
            d = self.defects[(k + j - 1) % len(self.defects)]
            rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
            rgb, mask = paste_defect(np.ascontiguousarray(rgb), d, rng, float(rng.uniform(*self.opacity)))
            img = rgb[:, :, :1] if img.shape[2] == 1 else rgb
        return ds.make_item(img, mask, self.samples[i], i)


def validation_dataset(data, preprocess, classes=None, val_fraction: float = 0.1, seed: int = 0,
                       id_names: Optional[Sequence[str]] = None, per_image: int = DEFAULT_PER_IMAGE,
                       opacity: Tuple[float, float] = DEFAULT_OPACITY, defects: Sequence[str] = DEFECTS
                       ) -> SyntheticDefectDataset:
    """The validation set of `data` for a model trained with `val_fraction` and `seed` (with other
    `defects` than the default set, e.g. ("crack",): a probe of one kind of defect)."""
    if not val_fraction > 0:
        raise ValueError(f"the validation set needs held-out images: val_fraction must be > 0, got {val_fraction}")
    _, val_ds, _, _ = make_datasets(data, classes, preprocess, val_fraction, seed, require_test=False,
                                    id_names=id_names)
    return SyntheticDefectDataset(val_ds, per_image, opacity, seed, defects)


def validate(model, normal: AnomalyDataset, batch_size: int = 8, workers: int = 0, device: str = "cpu",
             progress: bool = False, per_image: int = DEFAULT_PER_IMAGE,
             opacity: Tuple[float, float] = DEFAULT_OPACITY, seed: int = 0) -> dict:
    """Mean metrics (fractions) of `model` on the validation set built from held-out `normal`."""
    from .evaluate import score_dataset

    ds = SyntheticDefectDataset(normal, per_image, opacity, seed)
    res, *_ = score_dataset(model, ds, batch_size, workers, device, progress, desc="validating")
    return dict(res["mean"], n_images=len(ds))
