"""Shared check: a memory / statistics model fitted on rendered normal images separates rendered
defects (models.synthetic), scored with sklearn's AUROC at image and pixel level."""
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from models.synthetic import render_sample

DEFECTS = ("scratch", "hole", "stain", "color")


def normalise(img_u8: np.ndarray, pp) -> torch.Tensor:
    """uint8 HWC -> the model's own normalisation (`pp` = model.preprocess)."""
    x = torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(pp.mean).view(3, 1, 1)) / torch.tensor(pp.std).view(3, 1, 1)


def synthetic_defect_aurocs(model, kind: str, size: int, seed: int = 1):
    """prepare() on 24 normal renders (two batches), score 8 normal + 8 defective ones:
    (image AUROC, pixel AUROC over the defective images' maps)."""
    rng = np.random.default_rng(seed)
    pp = model.preprocess
    train = torch.stack([normalise(render_sample(kind, size, rng)[0], pp) for _ in range(24)])
    model.prepare([train[:12], train[12:]])
    good = [render_sample(kind, size, rng)[0] for _ in range(8)]
    bad = [render_sample(kind, size, rng, defect=d) for d in DEFECTS * 2]
    x = torch.stack([normalise(im, pp) for im in good + [b[0] for b in bad]])
    with torch.no_grad():
        amap, score = model(x)
    image = roc_auc_score(np.r_[np.zeros(8), np.ones(8)], score.numpy())
    masks = np.stack([b[1] for b in bad]).astype(bool)
    return image, roc_auc_score(masks.ravel(), amap[8:, 0].numpy().ravel())
