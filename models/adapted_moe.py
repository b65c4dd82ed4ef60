"""Adapted-MoE: routed SimpleNet-style discriminator experts with test-time adaptation (seed 001).

Pipeline (per image):
  frozen encoder -> two feature scales (default strides 8 and 16), each 3x3-averaged, the coarser
  upsampled, concatenated: one patch feature per stride-8 cell -> trainable projection (D -> D).
  Router: image embedding (mean of the frozen patch features, standardised with training
  statistics) -> Linear -> LayerNorm -> h (router_dim) -> Linear -> softmax over M experts.
  Trained with cross-entropy on routing labels PLUS center loss ||h - center[y]||^2 (weight
  `center_weight`; the public code declared it but never added it to the loss).
  Routing labels: the dataset's class ids when there are 2..M classes ("class"), otherwise
  sub-classes found by k-means (k = M) on the image embeddings in prepare() ("cluster").
  Experts: discriminators Linear(D, H) - BatchNorm - LeakyReLU(0.2) - Linear(H, 1), trained
  SimpleNet-style: real adapted features -> D >= +margin, the same plus Gaussian noise (synthetic
  anomalies) -> D <= -margin (truncated L1). Patch anomaly score = -D.
  Test-time adaptation with the routed expert k's training statistics (mean c_k, std sigma_k of
  its projected patch features, computed in finalize()):
      f' = normalize((f - mu_img) * sigma_k / sigma_img + c_k)
  (mu_img, sigma_img: the image's own per-channel patch statistics). Training applies the same
  transform with running estimates of c_k / sigma_k, so experts see what they get at test time.
  Top-k routing inside the graph: torch.topk on the router probabilities, the chosen experts'
  (BatchNorm-folded) weights and statistics gathered by index, scores mixed with the
  renormalised top-k probabilities. No host-side control flow; batch independent in eval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import AnomalyModel, ConfigBase, PreprocessConfig, encoder_preprocess, track_input_normalisation
from .registry import register_model
from . import encoders as _enc
from . import layers as _layers

_ROUTING = ("auto", "class", "cluster")


@dataclass
class AdaptedMoEConfig(ConfigBase):
    input_size: int = 256
    # Lite2's validation gain is within this trainer's seed spread (benchmarks/RESULTS.md section 12)
    encoder: str = "efficientnet_lite0"
    encoder_weights: Optional[str] = None     # path to the encoder's weights (see models.encoders)
    layers: Tuple[int, ...] = (1, 2)      # indices into the encoder's (stride 4, 8, 16) features
    feature_dim: int = 0                  # D of the projection; 0 = sum of the chosen channels
    num_experts: int = 4
    top_k: int = 1                        # paper: top-4 of more experts
    routing: str = "auto"                 # "auto" | "class" | "cluster" (see module doc)
    router_dim: int = 64
    expert_hidden: int = 256              # paper: 512 (with D = 768)
    center_weight: float = 0.1
    noise_std: float = 0.05               # Gaussian "synthetic anomaly" std per channel (on L2-normalised features)
    margin: float = 0.5
    tta: bool = True
    kmeans_iters: int = 50
    seed: int = 0
    stats_momentum: float = 0.1
    blur_sigma: float = 4.0
    lr: float = 3e-3
    weight_decay: float = 1e-5

    def __post_init__(self):
        if self.routing not in _ROUTING:
            raise ValueError(f"AdaptedMoEConfig.routing: expected one of {_ROUTING}, got {self.routing!r}")
        if not 1 <= int(self.top_k) <= int(self.num_experts):
            raise ValueError(f"AdaptedMoEConfig.top_k: expected 1..num_experts={self.num_experts}, "
                             f"got {self.top_k}")
        if not self.layers or any(int(i) not in (0, 1, 2) for i in self.layers):
            raise ValueError(f"AdaptedMoEConfig.layers: expected indices in (0, 1, 2), got {self.layers!r}")

    @classmethod
    def tiny(cls, **kw):
        """Seconds-to-train sizes for tests (input 64, the smallest encoder Lite0)."""
        base = dict(input_size=64, encoder="efficientnet_lite0", num_experts=2, router_dim=16, expert_hidden=32,
                    blur_sigma=2.0)
        base.update(kw)
        return cls(**base)


def iter_batches(loader):
    """Yield (images, class_ids or None, masks or None, labels or None) from a training loader."""
    for batch in loader:
        if isinstance(batch, dict):
            yield batch["image"], batch.get("class_id"), batch.get("mask"), batch.get("label")
        elif isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None), None, None
        else:
            yield batch, None, None, None


def patch_anomaly_map(patch_scores, size, blur_sigma: float):
    """(map (B, 1, H, W), score (B,)) from patch scores (B, 1, h, w): bilinear up, blur, max. Named
    `*anomaly_map`: export.precision keeps what it traces to fp32 (the map tail)."""
    amap = F.interpolate(patch_scores, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    amap = _layers.gaussian_blur(amap, blur_sigma)
    return amap, amap.amax(dim=(1, 2, 3))


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Plain k-means (k-means++ init, deterministic given seed). x (N, D) -> centroids (k, D)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means: {n} samples cannot form {k} clusters (need >= num_experts images)")
    cent = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cent)).pow(2).min(dim=1).values
        if float(d2.sum()) <= 0:
            idx = torch.randint(n, (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        cent.append(x[idx].squeeze(0))
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = c.clone()
        for j in range(k):
            sel = assign == j
            if bool(sel.any()):
                new[j] = x[sel].mean(0)
        if torch.allclose(new, c):
            break
        c = new
    return c.float()


class Expert(nn.Module):
    """SimpleNet discriminator: Linear - BN - LeakyReLU(0.2) - Linear -> one logit per patch."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, f):                        # (N, D) -> (N,)
        return self.fc2(F.leaky_relu(self.bn(self.fc1(f)), 0.2)).squeeze(-1)

    def folded(self):
        """(W1 (H, D), b1 (H,), w2 (H,), b2 ()) with eval-mode BatchNorm folded into fc1."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        w1 = self.fc1.weight * scale[:, None]
        b1 = (self.fc1.bias - self.bn.running_mean) * scale + self.bn.bias
        return w1, b1, self.fc2.weight[0], self.fc2.bias[0]


@register_model("adapted_moe")
class AdaptedMoE(AnomalyModel):
    config_class = AdaptedMoEConfig
    frozen_encoder = True     # models.train may cache `encode(x)` outputs (no augmentation)

    def __init__(self, config: AdaptedMoEConfig, pretrained: bool = True):
        super().__init__(config, pretrained)
        c = config
        self.encoder = _enc.create_encoder(c.encoder, weights=c.encoder_weights, pretrained=pretrained)
        track_input_normalisation(self)   # preprocess: the encoder's mean/std (ImageNet for old checkpoints)
        self.layer_ids = tuple(int(i) for i in c.layers)
        cin = sum(self.encoder.channels[i] for i in self.layer_ids)
        d = int(c.feature_dim) or cin
        m = int(c.num_experts)
        self.in_dim, self.dim = cin, d
        self.proj = nn.Linear(cin, d)
        self.router_hidden = nn.Sequential(nn.Linear(cin, c.router_dim), nn.LayerNorm(c.router_dim))
        self.router_out = nn.Linear(c.router_dim, m)
        self.centers = nn.Parameter(torch.zeros(m, c.router_dim))
        self.experts = nn.ModuleList([Expert(d, c.expert_hidden) for _ in range(m)])
        # statistics (buffers: saved in checkpoints, constants in exported graphs)
        self.register_buffer("emb_mean", torch.zeros(cin))
        self.register_buffer("emb_std", torch.ones(cin))
        self.register_buffer("cluster_centroids", torch.zeros(m, cin))
        self.register_buffer("routing_mode", torch.zeros((), dtype=torch.long))   # 0 class, 1 cluster
        self.register_buffer("expert_used", torch.ones(m))
        self.register_buffer("expert_mean", torch.zeros(m, d))
        self.register_buffer("expert_std", torch.ones(m, d))
        self.register_buffer("stats_initialised", torch.zeros(m))

    @property
    def preprocess(self) -> PreprocessConfig:
        return encoder_preprocess(self, input_size=self.config.input_size, blur_sigma=self.config.blur_sigma)

    # ---- features ------------------------------------------------------------------------
    def frozen_features(self, x):
        """Aggregated frozen patch features (B, Cin, h, w) at the finest chosen scale."""
        with torch.no_grad():
            feats = self.encoder(x)
            sel = [feats[i] for i in self.layer_ids]
            size = sel[0].shape[-2:]
            out = []
            for f in sel:
                f = _layers.local_mean(f, 3)
                if f.shape[-2:] != size:
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                out.append(f)
            return torch.cat(out, dim=1).detach()

    def embedding(self, fmap):
        """Standardised image embedding for the router: (B, Cin)."""
        return (fmap.mean(dim=(2, 3)) - self.emb_mean) / self.emb_std

    def router(self, emb):
        h = self.router_hidden(emb)
        logits = self.router_out(h)
        # experts that never saw training data are never selected
        logits = logits - (1.0 - self.expert_used) * 1e4
        return h, logits

    def routing_labels(self, emb, class_id: Optional[torch.Tensor]):
        if int(self.routing_mode) == 1 or class_id is None:
            return torch.cdist(emb, self.cluster_centroids).argmin(dim=1)
        return class_id.to(emb.device).long()

    def project(self, fmap):
        return self.proj(fmap.flatten(2).transpose(1, 2))           # (B, P, D)

    @staticmethod
    def adapt(f, mean_k, std_k, enabled: bool = True):
        """TTA: normalize((f - mu_img) * sigma_k / sigma_img + c_k). f (B, P, D); mean/std (B, D)."""
        if enabled:
            mu = f.mean(dim=1, keepdim=True)
            sd = (f - mu).pow(2).mean(dim=1, keepdim=True).add(1e-6).sqrt()
            f = (f - mu) * (std_k[:, None, :] / sd) + mean_k[:, None, :]
        return F.normalize(f, dim=-1)

    # ---- training hooks ------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, loader, progress: bool = False) -> None:
        embs, cids = [], []
        for x, cid, _, _ in iter_batches(loader):
            fmap = self.frozen_features(x.to(self.emb_mean.device))
            embs.append(fmap.mean(dim=(2, 3)).cpu())
            cids.append(cid.cpu().long() if cid is not None else None)
        if not embs:
            raise ValueError("Adapted-MoE prepare(): the training loader is empty")
        e = torch.cat(embs)
        self.emb_mean.copy_(e.mean(0))
        self.emb_std.copy_(e.std(0, unbiased=False).clamp_min(1e-6))
        es = (e - self.emb_mean.cpu()) / self.emb_std.cpu()
        m = self.config.num_experts
        have_ids = all(c is not None for c in cids)
        ids = torch.cat(cids) if have_ids else None
        n_cls = int(ids.unique().numel()) if have_ids else 0
        mode = self.config.routing
        if mode == "auto":
            mode = "class" if have_ids and 2 <= n_cls and int(ids.max()) < m else "cluster"
        if mode == "class":
            if not have_ids:
                raise ValueError("Adapted-MoE routing='class': the training loader gives no class_id")
            if int(ids.max()) >= m:
                raise ValueError(f"Adapted-MoE routing='class': class id {int(ids.max())} needs "
                                 f"num_experts > {int(ids.max())} (got {m}); use routing='cluster'")
            self.routing_mode.fill_(0)
            labels = ids
        else:
            self.routing_mode.fill_(1)
            self.cluster_centroids.copy_(kmeans(es, m, self.config.kmeans_iters, self.config.seed))
            labels = torch.cdist(es, self.cluster_centroids.cpu()).argmin(dim=1)
        used = torch.zeros(m)
        used[labels.unique()] = 1.0
        self.expert_used.copy_(used)
        if float(self.stats_initialised.sum()) > 0:
            return      # already trained (a resumed run): keep the trained centers and statistics
        # router centers start at the class means of the initial router embedding
        h = self.router_hidden(es.to(self.emb_mean.device)).cpu()
        for k in range(m):
            sel = labels == k
            if bool(sel.any()):
                self.centers.data[k] = h[sel].mean(0).to(self.centers.device)

    def encode(self, x) -> List[torch.Tensor]:
        """[aggregated frozen patch features (B, Cin, h, w)] (what models.train may cache)."""
        return [self.frozen_features(x)]

    def training_loss(self, x, class_id: Optional[torch.Tensor] = None):
        return self.loss_from_features(self.encode(x), class_id)

    def loss_from_features(self, feats, class_id: Optional[torch.Tensor] = None):
        c = self.config
        fmap = feats[0]
        emb = self.embedding(fmap)
        y = self.routing_labels(emb, class_id)
        h, logits = self.router(emb)
        loss_router = F.cross_entropy(logits, y) + c.center_weight * (h - self.centers[y]).pow(2).sum(1).mean()
        f = self.project(fmap)                                    # (B, P, D)
        loss_disc = f.new_zeros(())
        n_groups = 0
        for k in y.unique().tolist():
            sel = y == k
            fk = f[sel]                                          # (b, P, D)
            self._update_stats(k, fk.detach())
            mean_k = self.expert_mean[k].clone().expand(fk.shape[0], -1)
            std_k = self.expert_std[k].clone().expand(fk.shape[0], -1)
            real = self.adapt(fk, mean_k, std_k, c.tta).reshape(-1, self.dim)
            fake = real + torch.randn_like(real) * c.noise_std
            scores = self.experts[k](torch.cat([real, fake]))
            n = real.shape[0]
            loss_disc = loss_disc + F.relu(c.margin - scores[:n]).mean() + F.relu(c.margin + scores[n:]).mean()
            n_groups += 1
        return loss_disc / max(n_groups, 1) + loss_router

    @torch.no_grad()
    def _update_stats(self, k: int, fk):
        flat = fk.reshape(-1, fk.shape[-1])
        mean, std = flat.mean(0), flat.std(0, unbiased=False).clamp_min(1e-6)
        if float(self.stats_initialised[k]) == 0:
            self.expert_mean[k], self.expert_std[k] = mean, std
            self.stats_initialised[k] = 1
        else:
            mom = self.config.stats_momentum
            self.expert_mean[k].lerp_(mean, mom)
            self.expert_std[k].lerp_(std, mom)

    @torch.no_grad()
    def finalize(self, loader, progress: bool = False) -> None:
        """Exact per-expert statistics of the projected training features (for TTA)."""
        m = self.config.num_experts
        s1 = torch.zeros(m, self.dim, dtype=torch.float64)
        s2 = torch.zeros(m, self.dim, dtype=torch.float64)
        cnt = torch.zeros(m, dtype=torch.float64)
        was_training = self.training
        self.eval()
        for x, cid, _, _ in iter_batches(loader):
            fmap = self.frozen_features(x.to(self.emb_mean.device))
            y = self.routing_labels(self.embedding(fmap), cid).cpu()
            f = self.project(fmap).double().cpu()
            for k in y.unique().tolist():
                fk = f[y == k].reshape(-1, self.dim)
                s1[k] += fk.sum(0)
                s2[k] += fk.pow(2).sum(0)
                cnt[k] += fk.shape[0]
        for k in range(m):
            if cnt[k] > 0:
                mean = s1[k] / cnt[k]
                var = (s2[k] / cnt[k] - mean.pow(2)).clamp_min(1e-12)
                self.expert_mean[k] = mean.float().to(self.expert_mean.device)
                self.expert_std[k] = var.sqrt().float().to(self.expert_std.device)
                self.stats_initialised[k] = 1
        self.train(was_training)

    # ---- inference -----------------------------------------------------------------------
    def route(self, x):
        """Router probabilities (B, M) for normalised images x (for tests and inspection)."""
        _, logits = self.router(self.embedding(self.frozen_features(x)))
        return torch.softmax(logits, dim=-1)

    def patch_scores(self, x):
        fmap = self.frozen_features(x)
        B, _, hh, ww = fmap.shape
        _, logits = self.router(self.embedding(fmap))
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = torch.topk(probs, self.config.top_k, dim=-1)          # (B, k)
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        f = self.project(fmap)
        parts = [e.folded() for e in self.experts]
        w1 = torch.stack([p[0] for p in parts])                              # (M, H, D)
        b1 = torch.stack([p[1] for p in parts])                              # (M, H)
        w2 = torch.stack([p[2] for p in parts])                              # (M, H)
        b2 = torch.stack([p[3] for p in parts])                              # (M,)
        total = f.new_zeros(B, f.shape[1])
        for j in range(self.config.top_k):
            idx = top_i[:, j]
            g = self.adapt(f, self.expert_mean[idx], self.expert_std[idx], self.config.tta)
            z = torch.einsum("bpd,bhd->bph", g, w1[idx]) + b1[idx][:, None, :]
            z = F.leaky_relu(z, 0.2)
            out = torch.einsum("bph,bh->bp", z, w2[idx]) + b2[idx][:, None]
            total = total + weights[:, j:j + 1] * (-out)
        return total.reshape(B, 1, hh, ww)

    def forward(self, x):
        return patch_anomaly_map(self.patch_scores(x), x.shape[-2:], self.config.blur_sigma)
