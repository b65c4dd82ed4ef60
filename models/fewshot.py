"""Few-shot memory scorer with normal AND anomalous patch memories (vision-only seed 004).

Built in prepare() from a handful of images (no gradient training):
  patch features  frozen encoder maps (default strides 8 and 16) resampled to the stride-8 grid
                  and concatenated; for every patch scale k in `patch_scales` (an odd window on
                  that grid: 1, 3, 5 cells = 8, 24, 40 px at stride 8) the k x k average, L2
                  normalised.
  normal memory   the patches of the first `n_shots` normal training images of every class (one
                  shared memory for all classes), per scale, greedily
                  coreset-subsampled (k-center on a random projection, PatchCore style) to
                  `normal_memory` rows.
  anomalous memory  the patches under the defect masks of the annotated defect images (one is
                  enough), per scale, coreset-subsampled to `anomalous_memory` rows.
  scores          per scale s, with sim_X = mean of the top-`knn` cosine similarities to memory X
                  (a matmul + topk):
                      normal    n_s = 1 - sim_N
                      anomalous a_s = sim_A - sim_N   (closer to a known defect than to normal)
                  each standardised with its statistics on normal patches, then mixed with weights
                  w (one per component) into the patch score; map = upsampled + blurred patch
                  scores, image score = its maximum. Without defect images the a_s weights are 0.
  weights         random search (Dirichlet draws, the uniform mean first, as the paper's default)
                  maximising patch AUROC on augmented copies of the training images: flips /
                  90-degree rotations / brightness-contrast jitter of the normal shots (with
                  cut-paste pseudo defects on half of them) and of the defect images (their masks
                  transformed alike). Normal memory is used leave-one-image-out when scoring a copy
                  of a normal shot.

The paper's zero-shot (CLIP text prompt) term is not included: no CLIP weights offline.

Passing defect images: config field `anomalous_images` = list of [image_path, mask_path] pairs
(JSON-able; resized and normalised like the dataset), and/or `model.add_anomalous(images, masks)`
with already normalised tensors before prepare(), and/or any training-loader item with label 1
and a non-empty mask. Memory banks, score statistics and weights are buffers of fixed shapes
(from the config), so checkpoints round-trip and exported graphs hold them as constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import AnomalyModel, ConfigBase, PreprocessConfig, encoder_preprocess, track_input_normalisation
from .registry import register_model
from . import encoders as _enc
from . import layers as _layers
from .adapted_moe import iter_batches, patch_anomaly_map
from .memory import fill_rows, greedy_coreset, topk_similarity


@dataclass
class FewShotConfig(ConfigBase):
    input_size: int = 256
    encoder: str = "efficientnet_lite0"
    encoder_weights: Optional[str] = None     # path to the encoder's weights (see models.encoders)
    layers: Tuple[int, ...] = (1, 2)          # encoder features used (indices of strides 4/8/16)
    patch_scales: Tuple[int, ...] = (1, 3, 5)  # odd windows on the feature grid
    n_shots: int = 16                        # normal images used per class (0 = all training images)
    normal_memory: int = 2048                # rows per scale after coreset subsampling
    anomalous_memory: int = 256
    knn: int = 1
    anomalous_images: Tuple = ()             # [[image_path, mask_path], ...]
    search_trials: int = 64
    n_augment: int = 2                       # augmented copies per training image for the search
    coreset_dim: int = 64                    # random projection for the greedy coreset
    seed: int = 0
    blur_sigma: float = 4.0

    def __post_init__(self):
        if not self.patch_scales or any(int(k) < 1 or int(k) % 2 == 0 for k in self.patch_scales):
            raise ValueError(f"FewShotConfig.patch_scales: expected odd positive ints, got {self.patch_scales!r}")
        if not self.layers or any(int(i) not in (0, 1, 2) for i in self.layers):
            raise ValueError(f"FewShotConfig.layers: expected indices in (0, 1, 2), got {self.layers!r}")
        for i, pair in enumerate(self.anomalous_images):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ValueError(f"FewShotConfig.anomalous_images[{i}]: expected [image_path, mask_path], "
                                 f"got {pair!r}")
        if self.normal_memory < 1 or self.anomalous_memory < 1 or self.knn < 1:
            raise ValueError("FewShotConfig: normal_memory, anomalous_memory and knn must be >= 1")

    @classmethod
    def tiny(cls, **kw):
        """Seconds-to-build sizes for tests (input 64)."""
        base = dict(input_size=64, patch_scales=(1, 3), normal_memory=128, anomalous_memory=32,
                    search_trials=8, n_augment=1, blur_sigma=2.0)
        base.update(kw)
        return cls(**base)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Rank-based AUROC (ties averaged); 0.5 when one class is missing."""
    s = scores.double().flatten()
    y = labels.flatten().bool()
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return 0.5
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    if int(counts.max()) > 1:
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
        ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


@register_model("fewshot")
class FewShot(AnomalyModel):
    config_class = FewShotConfig
    needs_gradient_training = False
    int8_keep = ("encoder",)          # its memories hold fp32 encoder features (AnomalyModel.int8_keep)

    def __init__(self, config: FewShotConfig, pretrained: bool = True):
        super().__init__(config, pretrained)
        c = config
        self.encoder = _enc.create_encoder(c.encoder, weights=c.encoder_weights, pretrained=pretrained)
        track_input_normalisation(self)   # preprocess: the encoder's mean/std (ImageNet for old checkpoints)
        self.layer_ids = tuple(int(i) for i in c.layers)
        self.scales = tuple(int(k) for k in c.patch_scales)
        d = sum(self.encoder.channels[i] for i in self.layer_ids)
        S = len(self.scales)
        self.dim = d
        self.register_buffer("normal_bank", torch.zeros(S, c.normal_memory, d))
        self.register_buffer("anomalous_bank", torch.zeros(S, c.anomalous_memory, d))
        self.register_buffer("comp_mean", torch.zeros(2 * S))
        self.register_buffer("comp_std", torch.ones(2 * S))
        self.register_buffer("weights", torch.cat([torch.full((S,), 1.0 / S), torch.zeros(S)]))
        self.register_buffer("has_anomalous", torch.zeros(()))
        self.register_buffer("built", torch.zeros(()))
        self._extra_anomalous: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.search_log: dict = {}

    @property
    def preprocess(self) -> PreprocessConfig:
        return encoder_preprocess(self, input_size=self.config.input_size, blur_sigma=self.config.blur_sigma)

    # ---- features ------------------------------------------------------------------------
    def patch_features(self, x, with_grid: bool = False):
        """Per patch scale: L2-normalised patch features (B, P, D) [, grid (h, w) of the first layer]."""
        with torch.no_grad():
            feats = self.encoder(x)
            sel = [feats[i] for i in self.layer_ids]
            size = sel[0].shape[-2:]
            fmap = torch.cat([f if f.shape[-2:] == size else
                              F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                              for f in sel], dim=1)
            out = []
            for k in self.scales:
                g = _layers.local_mean(fmap, k)
                out.append(F.normalize(g.flatten(2).transpose(1, 2), dim=-1))
            return (out, tuple(size)) if with_grid else out

    def _sim(self, f, bank):
        """Mean of the top-knn cosine similarities of f (B, P, D) to bank (N, D): (B, P)."""
        return topk_similarity(f, bank, self.config.knn)

    def components(self, x, with_grid: bool = False):
        """Raw score components (B, 2S, P): [n_1..n_S, a_1..a_S] [, grid (h, w)]."""
        fs, grid = self.patch_features(x, with_grid=True)
        ns, As = [], []
        for i, f in enumerate(fs):
            sn = self._sim(f, self.normal_bank[i])
            sa = self._sim(f, self.anomalous_bank[i])
            ns.append(1.0 - sn)
            As.append(sa - sn)
        comp = torch.stack(ns + As, dim=1)
        return (comp, grid) if with_grid else comp

    def patch_scores(self, x):
        comp, (h, w) = self.components(x, with_grid=True)                # (B, 2S, P)
        z = (comp - self.comp_mean[None, :, None]) / self.comp_std[None, :, None]
        score = (z * self.weights[None, :, None]).sum(1)                  # (B, P)
        return score.reshape(x.shape[0], 1, h, w)

    def _grid_hw(self, x):
        return self.patch_features(x[:1], with_grid=True)[1]

    def forward(self, x):
        return patch_anomaly_map(self.patch_scores(x), x.shape[-2:], self.config.blur_sigma)

    # ---- building the memories -----------------------------------------------------------
    def add_anomalous(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        """Register annotated defect images (normalised (N, C, S, S), masks (N, 1, S, S)) for prepare()."""
        if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0]:
            raise ValueError(f"add_anomalous: expected images (N, C, S, S) and masks (N, 1, S, S), got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        for i in range(images.shape[0]):
            self._extra_anomalous.append((images[i].detach().cpu(), masks[i].detach().cpu()))

    def _load_config_anomalous(self):
        from . import data as _data

        pp = self.preprocess
        mean = np.asarray(pp.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(pp.std, np.float32).reshape(-1, 1, 1)
        out = []
        for i, (ip, mp) in enumerate(self.config.anomalous_images):
            img = _data.load_image(ip, channels=3)
            mask = _data.load_mask(mp)
            if mask.shape != img.shape[:2]:
                raise _data.DataError(f"{mp}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                                      f"{ip} ({img.shape[1]}x{img.shape[0]}) (config anomalous_images[{i}])")
            if not mask.any():
                raise _data.DataError(f"{mp}: empty defect mask (config anomalous_images[{i}]); expected "
                                      f"non-zero pixels marking the defect")
            x = _data.resize_image(img, pp.input_size).astype(np.float32).transpose(2, 0, 1) / 255.0
            x = (x - mean) / std
            m = _data.resize_mask(mask, pp.input_size).astype(np.float32)[None]
            out.append((torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(m)))
        return out

    @torch.no_grad()
    def prepare(self, loader, progress: bool = False) -> None:
        c = self.config
        dev = self.normal_bank.device
        normals, anomalous = [], list(self._extra_anomalous) + self._load_config_anomalous()
        per_class: dict = {}
        for x, cids, masks, labels in iter_batches(loader):
            for i in range(x.shape[0]):
                cid = int(cids[i]) if cids is not None else 0
                lab = int(labels[i]) if labels is not None else 0
                if lab == 1 and masks is not None and bool(masks[i].any()):
                    anomalous.append((x[i].cpu(), masks[i].cpu()))
                elif lab == 0 and (c.n_shots <= 0 or per_class.get(cid, 0) < c.n_shots):
                    normals.append(x[i].cpu())
                    per_class[cid] = per_class.get(cid, 0) + 1
        if not normals:
            raise ValueError("few-shot prepare(): no normal training images in the loader")
        xn = torch.stack(normals)
        S = len(self.scales)
        # normal memory (per scale), keeping the source image of every row for leave-one-out
        feats_n = self._features_batched(xn.to(dev))                       # list of (N, P, D)
        P = feats_n[0].shape[1]
        src_all = torch.arange(xn.shape[0]).repeat_interleave(P)
        nbank, nsrc = [], []
        for i in range(S):
            flat = feats_n[i].reshape(-1, self.dim).cpu()
            keep = greedy_coreset(flat, c.normal_memory, c.coreset_dim, c.seed + i, progress)
            nbank.append(fill_rows(flat[keep], c.normal_memory))
            nsrc.append(fill_rows(src_all[keep][:, None].float(), c.normal_memory)[:, 0].long())
        self.normal_bank.copy_(torch.stack(nbank).to(dev))
        # anomalous memory
        if anomalous:
            xa = torch.stack([a for a, _ in anomalous]).to(dev)
            ma = torch.stack([m for _, m in anomalous])
            feats_a = self._features_batched(xa)
            grid = self._grid_hw(xa)
            mgrid = F.adaptive_max_pool2d(ma, grid).flatten(1) > 0.5                 # (Na, P)
            abank = []
            for i in range(S):
                rows = feats_a[i].cpu()[mgrid]
                keep = greedy_coreset(rows, c.anomalous_memory, c.coreset_dim, c.seed + 100 + i, progress)
                abank.append(fill_rows(rows[keep], c.anomalous_memory))
            self.anomalous_bank.copy_(torch.stack(abank).to(dev))
            self.has_anomalous.fill_(1.0)
        else:
            self.anomalous_bank.zero_()
            self.has_anomalous.fill_(0.0)
        self._search_weights(xn, anomalous, torch.stack(nsrc))
        self.built.fill_(1.0)

    def finalize(self, loader, progress: bool = False) -> None:
        """Builds the memories if prepare() was not called (a loop that only calls finalize)."""
        if float(self.built) == 0:
            self.prepare(loader, progress)

    def _features_batched(self, x, bs: int = 8):
        outs = None
        for i in range(0, x.shape[0], bs):
            fs = self.patch_features(x[i:i + bs])
            outs = [[f] for f in fs] if outs is None else [o + [f] for o, f in zip(outs, fs)]
        return [torch.cat(o) for o in outs]

    # ---- weight search -------------------------------------------------------------------
    @staticmethod
    def _augment(x, m, g: torch.Generator):
        """Random flip / rot90 / brightness-contrast jitter of normalised x (C,S,S) and mask (1,S,S)."""
        k = int(torch.randint(4, (1,), generator=g))
        x, m = torch.rot90(x, k, (1, 2)), torch.rot90(m, k, (1, 2))
        if bool(torch.rand(1, generator=g) < 0.5):
            x, m = x.flip(2), m.flip(2)
        a = 1.0 + (float(torch.rand(1, generator=g)) - 0.5) * 0.2
        b = (float(torch.rand(1, generator=g)) - 0.5) * 0.2
        return x * a + b, m

    @staticmethod
    def _cutpaste(x, g: torch.Generator):
        """Paste a rotated rectangle of the image elsewhere (a pseudo defect). Returns (x, mask)."""
        C, H, W = x.shape
        h = int(H * (0.08 + 0.12 * float(torch.rand(1, generator=g))))
        w = int(W * (0.08 + 0.12 * float(torch.rand(1, generator=g))))
        y0, x0 = int(torch.randint(H - h, (1,), generator=g)), int(torch.randint(W - w, (1,), generator=g))
        y1, x1 = int(torch.randint(H - h, (1,), generator=g)), int(torch.randint(W - w, (1,), generator=g))
        patch = x[:, y0:y0 + h, x0:x0 + w].flip(1, 2) * 1.2 + 0.3
        out = x.clone()
        out[:, y1:y1 + h, x1:x1 + w] = patch
        m = torch.zeros(1, H, W)
        m[:, y1:y1 + h, x1:x1 + w] = 1.0
        return out, m

    @torch.no_grad()
    def _search_weights(self, xn, anomalous, nsrc):
        c = self.config
        dev = self.normal_bank.device
        g = torch.Generator().manual_seed(c.seed)
        S = len(self.scales)
        imgs, masks, src = [], [], []
        for r in range(c.n_augment):
            for i in range(xn.shape[0]):
                x, m = self._augment(xn[i], torch.zeros(1, *xn.shape[-2:]), g)
                if (i + r) % 2 == 1:
                    x, m = self._cutpaste(x, g)
                imgs.append(x), masks.append(m), src.append(i)
            for x0, m0 in anomalous:
                x, m = self._augment(x0, m0, g)
                imgs.append(x), masks.append(m), src.append(-1)
        x = torch.stack(imgs).to(dev)
        m = torch.stack(masks)
        grid = self._grid_hw(x)
        ylab = (F.adaptive_avg_pool2d(m, grid).flatten(1) > 0.25)          # (N, P)
        # components with leave-one-image-out normal memory
        comps = []
        for b in range(0, x.shape[0], 8):
            fs = self.patch_features(x[b:b + 8])
            s_img = torch.tensor(src[b:b + 8])
            excl = (s_img[:, None] == nsrc[:, None, :].cpu()).to(dev)      # (S, b, Nn)
            ns, As = [], []
            for i, f in enumerate(fs):
                sims = f @ self.normal_bank[i].transpose(0, 1)                   # (b, P, Nn)
                sims = sims.masked_fill(excl[i][:, None, :], -2.0)
                sn = torch.topk(sims, c.knn, dim=-1).values.mean(-1)
                sa = self._sim(f, self.anomalous_bank[i])
                ns.append(1.0 - sn), As.append(sa - sn)
            comps.append(torch.stack(ns + As, dim=1).cpu())
        comp = torch.cat(comps)                                              # (N, 2S, P)
        neg = comp.transpose(0, 1).reshape(2 * S, -1)[:, ~ylab.flatten()]
        mean, std = neg.mean(1), neg.std(1).clamp_min(1e-6)
        self.comp_mean.copy_(mean.to(dev))
        self.comp_std.copy_(std.to(dev))
        z = (comp - mean[None, :, None]) / std[None, :, None]
        active = torch.ones(2 * S)
        if float(self.has_anomalous) == 0:
            active[S:] = 0.0
        trials = [active / active.sum()]
        dir_ = torch.distributions.Dirichlet(torch.ones(2 * S))
        torch.manual_seed(c.seed)
        for _ in range(max(c.search_trials - 1, 0)):
            w = dir_.sample() * active
            trials.append(w / w.sum())
        best, best_w = -1.0, trials[0]
        yl = ylab.flatten()
        scores = []
        for w in trials:
            s = (z * w[None, :, None]).sum(1).flatten()
            a = auroc(s, yl)
            scores.append(a)
            if a > best + 1e-9:
                best, best_w = a, w
        self.weights.copy_(best_w.to(dev))
        self.search_log = {"trials": len(trials), "best_patch_auroc": best, "uniform_patch_auroc": scores[0],
                           "n_images": int(x.shape[0]), "n_positive_patches": int(yl.sum())}
