"""DVAD (Mamba decoder + Hyper AD plug-in + MoE) and its MambaAD-style ablation.

Registered names: "dvad" (all branches on) and "mambaad" (preset: use_hyper=False, use_moe=False).

Data flow (B batch, S = input_size, dims = (d32, d16, d8, d4) decoder widths at strides 32..4):

  x (B, 3, S, S) --frozen encoder--> f4 (B, C4, S/4), f8 (B, C8, S/8), f16 (B, C16, S/16)
  neck([f4, f8, f16])                      -> z (B, d32, S/32)
  stage 0: depths[0] blocks at stride 32   -> PatchExpand -> (B, d16, S/16)
  stage 1: depths[1] blocks                -> r16 = 1x1 conv -> (B, C16, S/16)
           PatchExpand -> stage 2 -> r8 (B, C8, S/8); PatchExpand -> stage 3 -> r4 (B, C4, S/4)
  anomaly_map = blur(mean over s in map_strides of upsample(1 - cos(f_s, r_s)))  (B, 1, S, S)
  score = mean of the map's top score_topk fraction (B,)    (defaults: stride 16 only, top 1 %)
  (odd sizes: ceil at every stride; patch-expand crops to the encoder's sizes)

Block (dim d, input x (B, d, h, w)):
  n = LayerNorm2d(x)
  branches = [SS2D(n)] if use_mamba + [CNNBranch_k5(n), CNNBranch_k7(n)] if use_cnn   (each (B, d, h, w))
  cat (B, n_br*d, h, w)
  fused = moe_gate(gate(cat) (B, M, h, w), experts(cat) (B, M, d, h, w))   if use_moe   (M experts:
          1x1 convs whose input width is the concatenated n_br*d - the public code declared 2d and
          crashed on 4d) else 1x1 conv (n_br*d -> d)
  y = x + fused
  y = HyperAdapter(y, e)                    if use_hyper (per-sample weights, gate initialised at 0)

SS2D (d_inner = expand*d, K scan directions, N = d_state, R = dt_rank):
  in_proj 1x1: d -> 2 d_inner, split x, z; x = SiLU(depthwise3x3(x));
  xs = cross_scan(x, orders) (B, K, d_inner, L); per-direction x_proj -> dt (R), B (N), C (N);
  dt_proj (R -> d_inner) per direction; y = selective_scan(u=xs (B, K d_inner, L), delta, A=-exp(A_log)
  (K d_inner, N), B, C (B, K, N, L), D, delta_bias, softplus) -> cross_merge -> (B, d_inner, h, w);
  LayerNorm * SiLU(z); out_proj 1x1 d_inner -> d.  A_log = log(1..N); dt bias = softplus^-1 of a
  log-uniform sample in [1e-3, 0.1].

HyperAdapter (per sample b, rank r, latent q):
  s_b = mean_hw(y_b) + P e_b                (class-embedded features; e_b from the class embedding)
  w_b = SwiGLU-MLP(Linear(s_b))             (B, r*d + r + d*r + d): adapter weights for this sample only
  a_b = up_b @ GELU(down_b @ y_b + bd_b) + bu_b;  out_b = y_b + gate * a_b    (batched matmul)
  -> no statistic crosses the batch axis, so one image's output never depends on the others.
Class embedding: e = MLP(concat of the global means of f4, f8, f16) (B, E): from the frozen encoder,
no label needed at inference; with num_classes > 1 an auxiliary linear classifier (weight 0.1,
training only) makes it class-aware.

Defaults (CPU-trainable, ~1.4 M trainable parameters; `DVADConfig.paper()` gives the paper's sizes):
  EfficientNet-Lite2 encoder (offline weights; Lite0 / Lite1 via `encoder`), input 256, dims
  (128, 128, 32, 32) at strides 32..4 (the MambaAD preset keeps (128, 64, 32, 32)), depths
  (1, 1, 1, 1), d_state 8, expand 1, raster4 scans (4 directions), Mamba branch at strides 32/16/8
  only (the stride-4 stage keeps the CNN branches: its 64x64 scan alone costs more than the rest of
  the decoder), M = 4 experts, hyper latent 32, adapter rank 8; trained 20 epochs with hard mining
  (hard_fraction 0.9), scored on the stride-16 map plus the nearest-neighbour term (memory_weight 2:
  a coreset of 10 % of the training images' stride-16 features, ~17.6 k x 120 on magnetic tile, 8 MB)
  by its top 1 % (models.recipe).
  Measured here (2 shared cores, batch 8, cached encoder features, one thread): ~1.4 s of CPU time
  per training step (fwd + bwd): ~2 min of one core per epoch of ~700 images (Lite0; the default's
  20 epochs take ~31 min with two threads on the quiet 2-core VM); with expand 2 it is 3.3 s, with
  the Mamba branch also at stride 4 ~2x more again.
  Paper (MambaAD/DVAD): ResNet-34, dims (512, 256, 128, 64), depths (3, 4, 6, 3), d_state 16,
  expand 2, hilbert8 (8 directions), Mamba at every stage, ~25.6 M parameters.
Parameter counts of the presets (encoder / total): default dvad 1.16 M / 2.57 M, default mambaad
1.16 M / 1.66 M (on Lite0: 0.70 M / 2.09 M and 0.70 M / 1.18 M); paper mambaad 8.17 M / 24.9 M;
paper dvad 8.17 M / 51.3 M (the hypernetworks' output layers and the 4 experts on the 3d-wide
concatenation add ~26 M at widths 512/256).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from . import layers as L
from .base import ConfigBase, PreprocessConfig
from .encoders import ENCODERS, create_encoder
from .recipe import ReconRecipe, ReconstructionModel
from .registry import register_model

SCAN_KINDS = ("hilbert8", "raster4", "raster2", "raster1")
_NUM_DIRS = {"hilbert8": 8, "raster4": 4, "raster2": 2, "raster1": 1}


@dataclass
class DVADConfig(ConfigBase, ReconRecipe):
    input_size: int = 256
    # chosen on the validation split (benchmarks/RESULTS.md section 12): Lite2 over Lite1 / Lite0
    encoder: str = "efficientnet_lite2"
    encoder_weights: Optional[str] = None      # file path; None = package / torch hub cache
    # decoder widths at strides 32, 16, 8, 4; the stride-16 stage (the scored one) as wide as the
    # stride-32 one, chosen on the validation split over 3 seeds (benchmarks/RESULTS.md section 12,
    # seventh round)
    dims: Tuple[int, ...] = (128, 128, 32, 32)
    depths: Tuple[int, ...] = (1, 1, 1, 1)     # blocks per stage (0 allowed)
    d_state: int = 8
    expand: int = 1                            # paper: 2
    dt_rank: int = 0                           # 0 = ceil(d / 16)
    scan: str = "raster4"
    use_mamba: bool = True
    mamba_strides: Tuple[int, ...] = (32, 16, 8)   # stages whose blocks have the Mamba branch
    use_cnn: bool = True
    use_hyper: bool = True
    use_moe: bool = True
    num_experts: int = 4
    hyper_latent: int = 32
    hyper_hidden: int = 64
    hyper_rank: int = 8
    class_embed_dim: int = 32                  # 0 = no class embedding
    num_classes: int = 0                       # > 1: auxiliary class loss on the embedding
    cnn_kernels: Tuple[int, ...] = (5, 7)
    neck_dropout: float = 0.0                  # dropout on the encoder features entering the neck
    # training only: the fraction of stride-32 cells whose features are zeroed at every scale before
    # the neck, so the decoder must fill whole positions from their context instead of copying them
    neck_mask: float = 0.0
    # + the training / scoring recipe of models.recipe.ReconRecipe (blur, score, targets, loss, schedule),
    # with hard mining chosen on the validation split (benchmarks/RESULTS.md section 12): the gradient
    # of the easiest 90 % of positions damped 10x (Dinomaly's p = 0.9)
    hard_fraction: float = 0.9
    # 20 epochs chosen on the validation split's crack probe over 3 seeds (benchmarks/RESULTS.md section
    # 12, fifth round); ~31 min with two threads on a 2-core CPU
    epochs: int = 20
    # the nearest-neighbour term of models.recipe at twice the reconstruction's weight, chosen on the
    # validation split's band probe over 3 seeds (benchmarks/RESULTS.md section 12, ninth round: 1 over
    # none; tenth round: 2 over 1): it sees inside region-wide anomalies the decoder reconstructs;
    # built after training (~4.5 min on 2 cores)
    memory_weight: float = 2.0

    def __post_init__(self):
        def bad(field_name, expected, got):
            raise ValueError(f"DVADConfig.{field_name}: expected {expected}, got {got!r}")

        if self.encoder not in ENCODERS:
            bad("encoder", f"one of {ENCODERS}", self.encoder)
        if self.scan not in SCAN_KINDS:
            bad("scan", f"one of {SCAN_KINDS}", self.scan)
        if len(self.dims) != 4 or any(int(d) <= 0 for d in self.dims):
            bad("dims", "4 positive ints (strides 32, 16, 8, 4)", self.dims)
        if self.dims[0] % 4:
            bad("dims", "dims[0] a multiple of 4 (neck bottleneck)", self.dims)
        if len(self.depths) != 4 or any(int(d) < 0 for d in self.depths):
            bad("depths", "4 non-negative ints", self.depths)
        if any(int(v) not in (4, 8, 16, 32) for v in self.mamba_strides):
            bad("mamba_strides", "a subset of (32, 16, 8, 4)", self.mamba_strides)
        if not (self.use_mamba or self.use_cnn):
            bad("use_mamba/use_cnn", "at least one branch on", (self.use_mamba, self.use_cnn))
        if self.num_experts < 1:
            bad("num_experts", ">= 1", self.num_experts)
        if self.input_size < 32:
            bad("input_size", ">= 32", self.input_size)
        if self.d_state < 1 or self.expand < 1:
            bad("d_state/expand", ">= 1", (self.d_state, self.expand))
        if not 0.0 <= self.neck_dropout < 1.0:
            bad("neck_dropout", "in [0, 1)", self.neck_dropout)
        if not 0.0 <= self.neck_mask < 1.0:
            bad("neck_mask", "in [0, 1)", self.neck_mask)
        self.check_recipe()

    @classmethod
    def tiny(cls, **kw):
        """Seconds-to-train sizes for tests (input 64, the smallest encoder Lite0); scored on all three
        scales by their maximum without the memory term, the rule the map tests check against their
        references, trained without hard mining (test_recipe / test_recipe_memory cover the defaults)."""
        base = dict(input_size=64, encoder="efficientnet_lite0", dims=(32, 16, 16, 16), depths=(1, 1, 1, 1),
                    d_state=4, mamba_strides=(32, 16, 8, 4), map_strides=(4, 8, 16), score_topk=0.0,
                    hard_fraction=0.0, hyper_latent=8, hyper_hidden=16, hyper_rank=4, class_embed_dim=8,
                    blur_sigma=2.0, memory_weight=0.0)
        base.update(kw)
        return cls(**base)

    @classmethod
    def paper(cls, **kw):
        """The paper's sizes (MambaAD decoder on ResNet-34; DVAD adds hyper + MoE), scored by the
        reconstruction alone as the paper does (no memory term)."""
        base = dict(encoder="resnet34", dims=(512, 256, 128, 64), depths=(3, 4, 6, 3), d_state=16,
                    mamba_strides=(32, 16, 8, 4),
                    scan="hilbert8", hyper_latent=64, hyper_hidden=128, hyper_rank=16,
                    class_embed_dim=64, memory_weight=0.0)
        base.update(kw)
        return cls(**base)


# ---------------------------------------------------------------------------------------------
class SS2D(nn.Module):
    """2-D selective scan over K directions (see module doc). (B, d, h, w) -> (B, d, h, w)."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, dt_rank: int = 0,
                 scan: str = "hilbert8", hw: Optional[Tuple[int, int]] = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        di = expand * dim
        k = _NUM_DIRS[scan]
        r = dt_rank or math.ceil(dim / 16)
        self.scan, self.k, self.di, self.r, self.n = scan, k, di, r, d_state
        self.in_proj = nn.Conv2d(dim, 2 * di, 1, bias=False)
        self.conv = nn.Conv2d(di, di, 3, padding=1, groups=di)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * d_state, di))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, di, r))
        self.dt_proj_bias = nn.Parameter(torch.empty(k, di))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(k * di, 1))
        self.D = nn.Parameter(torch.ones(k * di))
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Conv2d(di, dim, 1, bias=False)
        self._hw = tuple(hw) if hw else None
        if hw:
            self.register_buffer("orders", kernels.scan_orders(hw[0], hw[1], scan), persistent=False)
        self.reset_scan_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_scan_parameters(self, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
        bound = self.di ** -0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.r ** -0.5
        nn.init.uniform_(self.dt_proj_weight, -std, std)
        dt = torch.exp(torch.rand(self.k, self.di) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.n + 1, dtype=torch.float32)).repeat(self.k * self.di, 1))
        self.D.fill_(1.0)

    def _orders(self, h: int, w: int, device):
        if self._hw == (h, w):
            return self.orders
        return kernels.scan_orders(h, w, self.scan).to(device)

    def forward(self, x):
        b, _, h, w = x.shape
        length = h * w
        xs, z = self.in_proj(x).chunk(2, dim=1)
        xs = F.silu(self.conv(xs))
        orders = self._orders(h, w, x.device)
        seq = kernels.cross_scan(xs, orders)                                   # (B, K, di, L)
        # batched matmuls, not einsum: ONNX Runtime's CPU Einsum was ~10x slower than MatMul here
        proj = torch.matmul(self.x_proj_weight, seq)                           # (B, K, R+2N, L)
        dts, bs, cs = torch.split(proj, [self.r, self.n, self.n], dim=2)
        dts = torch.matmul(self.dt_proj_weight, dts)                           # (B, K, di, L)
        y = kernels.selective_scan(
            seq.reshape(b, self.k * self.di, length), dts.reshape(b, self.k * self.di, length),
            -torch.exp(self.A_log.float()), bs.contiguous(), cs.contiguous(), self.D.float(),
            z=None, delta_bias=self.dt_proj_bias.reshape(-1).float(), delta_softplus=True)
        y = kernels.cross_merge(y.reshape(b, self.k, self.di, length), orders, (h, w))  # (B, di, h, w)
        y = self.out_norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * F.silu(z)
        return self.out_proj(y)


class MoE(nn.Module):
    """M dense experts (1x1 convs on the concatenated width) mixed by a per-pixel softmax gate."""

    def __init__(self, cin: int, cout: int, num_experts: int):
        super().__init__()
        self.m, self.cout = num_experts, cout
        self.experts = nn.Conv2d(cin, num_experts * cout, 1)   # all M experts in one conv
        self.gate = nn.Conv2d(cin, num_experts, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        experts = self.experts(x).reshape(b, self.m, self.cout, h, w)
        return kernels.moe_gate(self.gate(x), experts)


class SwiGLU(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int):
        super().__init__()
        self.w12 = nn.Linear(cin, 2 * hidden)
        self.w3 = nn.Linear(hidden, cout)

    def forward(self, x):
        a, g = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * g)


class HyperAdapter(nn.Module):
    """Per-sample bottleneck adapter whose weights a hypernetwork makes from the sample's latent."""

    def __init__(self, dim: int, latent: int, hidden: int, rank: int, embed_dim: int = 0):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.embed_proj = nn.Linear(embed_dim, dim) if embed_dim else None
        self.to_latent = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, latent))
        n_out = 2 * rank * dim + rank + dim
        self.hyper = SwiGLU(latent, hidden, n_out)
        # static part of the adapter weights; the hypernetwork adds a per-sample residual
        self.down0 = nn.Parameter(torch.randn(rank, dim) * dim ** -0.5)
        self.up0 = nn.Parameter(torch.randn(dim, rank) * 0.02)
        self.gate = nn.Parameter(torch.zeros(dim))   # output gate, 0 at init: starts as identity

    def forward(self, y, e: Optional[torch.Tensor] = None):
        b, d, h, w = y.shape
        s = y.mean(dim=(2, 3))                                          # (B, d): this sample only
        if self.embed_proj is not None and e is not None:
            s = s + self.embed_proj(e)
        p = self.hyper(self.to_latent(s))                               # (B, n_out)
        rd = self.rank * d
        down = self.down0 + p[:, :rd].reshape(b, self.rank, d) * d ** -0.5
        up = self.up0 + p[:, rd: 2 * rd].reshape(b, d, self.rank) * 0.1
        bd = p[:, 2 * rd: 2 * rd + self.rank]
        bu = p[:, 2 * rd + self.rank:]
        t = y.reshape(b, d, h * w)
        a = F.gelu(torch.matmul(down, t) + bd.unsqueeze(-1))           # (B, r, hw)
        a = torch.matmul(up, a) + bu.unsqueeze(-1)                      # (B, d, hw)
        return y + self.gate.view(1, d, 1, 1) * a.reshape(b, d, h, w)


class DVADBlock(nn.Module):
    def __init__(self, dim: int, cfg: DVADConfig, hw: Optional[Tuple[int, int]], use_mamba: bool = True):
        super().__init__()
        use_mamba = use_mamba and cfg.use_mamba
        use_cnn = cfg.use_cnn or not use_mamba        # a block always keeps at least one branch
        self.norm = L.LayerNorm2d(dim)
        self.ss2d = SS2D(dim, cfg.d_state, cfg.expand, cfg.dt_rank, cfg.scan, hw) if use_mamba else None
        self.cnns = nn.ModuleList([L.CNNBranch(dim, k) for k in cfg.cnn_kernels]) if use_cnn else None
        n_br = int(use_mamba) + (len(cfg.cnn_kernels) if use_cnn else 0)
        if cfg.use_moe:
            self.fuse = MoE(n_br * dim, dim, cfg.num_experts)
        else:
            self.fuse = nn.Conv2d(n_br * dim, dim, 1)
        self.hyper = (HyperAdapter(dim, cfg.hyper_latent, cfg.hyper_hidden, cfg.hyper_rank,
                                   cfg.class_embed_dim) if cfg.use_hyper else None)

    def forward(self, x, e: Optional[torch.Tensor] = None):
        n = self.norm(x)
        br = []
        if self.ss2d is not None:
            br.append(self.ss2d(n))
        if self.cnns is not None:
            br.extend(c(n) for c in self.cnns)
        y = x + self.fuse(torch.cat(br, dim=1))
        if self.hyper is not None:
            y = self.hyper(y, e)
        return y


class ClassEmbedding(nn.Module):
    """e = MLP(concat of global means of the encoder maps): (B, E), no label needed."""

    def __init__(self, enc_channels: Sequence[int], dim: int, num_classes: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(sum(enc_channels), dim), nn.LayerNorm(dim), nn.GELU(),
                                 nn.Linear(dim, dim))
        self.classifier = nn.Linear(dim, num_classes) if num_classes > 1 else None

    def forward(self, feats):
        return self.mlp(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))


def mask_cells(feats: Sequence[torch.Tensor], fraction: float) -> list:
    """Zero the same random cells of a stride-32 grid (each with probability `fraction`, per sample)
    in every map of `feats` [f4, f8, f16]: a cell covers 8 x 8 positions of f4, 4 x 4 of f8, 2 x 2 of f16
    (ceil sizes: the last row / column of a cell may be cut)."""
    b, _, h16, w16 = feats[-1].shape
    keep = (torch.rand(b, 1, (h16 + 1) // 2, (w16 + 1) // 2, device=feats[-1].device) >= fraction)
    out = []
    for f, k in zip(feats, (8, 4, 2)):
        m = keep.repeat_interleave(k, 2).repeat_interleave(k, 3)[..., : f.shape[-2], : f.shape[-1]]
        out.append(f * m.to(f.dtype))
    return out


# ---------------------------------------------------------------------------------------------
@register_model("dvad")
class DVAD(ReconstructionModel):
    """Frozen encoder + neck + Mamba/CNN/Hyper/MoE decoder; forward contract in models/base.py,
    targets / loss / map / score from the recipe (models.recipe)."""

    config_class = DVADConfig

    def __init__(self, config: DVADConfig, pretrained: bool = True):
        super().__init__(config, pretrained)
        c = config
        self.encoder = create_encoder(c.encoder, weights=c.encoder_weights, pretrained=pretrained)
        enc_ch = tuple(self.encoder.channels)
        s = c.input_size
        sizes = self.encoder.feature_sizes(s, s)                # strides 4, 8, 16
        s32 = ((sizes[2][0] + 1) // 2, (sizes[2][1] + 1) // 2)
        stage_hw = [s32, sizes[2], sizes[1], sizes[0]]
        dims = [int(d) for d in c.dims]
        self.neck = L.Neck(enc_ch, dims[0])
        self.expands = nn.ModuleList([L.PatchExpand(dims[i], dims[i + 1]) for i in range(3)])
        self.stages = nn.ModuleList([
            nn.ModuleList([DVADBlock(dims[i], c, stage_hw[i], use_mamba=(32 >> i) in c.mamba_strides)
                           for _ in range(int(c.depths[i]))])
            for i in range(4)])
        # decoder outputs at strides 16, 8, 4 -> encoder channels (for the cosine comparison)
        self.heads = nn.ModuleList([nn.Conv2d(dims[1], enc_ch[2], 1), nn.Conv2d(dims[2], enc_ch[1], 1),
                                    nn.Conv2d(dims[3], enc_ch[0], 1)])
        self.class_embed = (ClassEmbedding(enc_ch, c.class_embed_dim, c.num_classes)
                            if c.use_hyper and c.class_embed_dim > 0 else None)
        self.neck_dropout = nn.Dropout(c.neck_dropout) if c.neck_dropout > 0 else None
        self.track_recipe()
        for mod in (self.neck, self.expands, self.stages, self.heads, self.class_embed):
            if mod is not None:
                L.init_weights(mod)
        for m in self.modules():   # init_weights reset these; restore the Mamba / hyper inits
            if isinstance(m, SS2D):
                m.reset_scan_parameters()

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.config.input_size, mean=tuple(self.encoder.mean),
                                std=tuple(self.encoder.std), blur_sigma=self.config.blur_sigma)

    # ---- pieces ---------------------------------------------------------------------------
    def decode(self, feats: Sequence[torch.Tensor], training: bool = False):
        """-> (reconstructions [r4, r8, r16] matching feats, class embedding (B, E) or None)."""
        e = self.class_embed(feats) if self.class_embed is not None else None
        sizes = [tuple(f.shape[-2:]) for f in feats]
        if self.neck_dropout is not None:     # identity in eval mode (and in every export)
            feats = [self.neck_dropout(f) for f in feats]
        if training and self.training and self.config.neck_mask > 0:
            feats = mask_cells(feats, self.config.neck_mask)
        z = self.neck(feats)
        outs = []
        for i in range(4):
            if i > 0:
                z = self.expands[i - 1](z, sizes[3 - i])
            for blk in self.stages[i]:
                z = blk(z, e)
            if i > 0:
                outs.append(self.heads[i - 1](z))
        return outs[::-1], e

    def aux_loss(self, e, class_id: Optional[torch.Tensor] = None):
        """Class loss on the embedding (weight 0.1) when several classes are trained."""
        if class_id is None or self.class_embed is None or self.class_embed.classifier is None:
            return None
        return 0.1 * F.cross_entropy(self.class_embed.classifier(e), class_id.long())


@dataclass
class MambaADConfig(DVADConfig):
    """DVADConfig preset: the Hyper AD plug-in (and with it the class embedding) and MoE off."""

    use_hyper: bool = False
    use_moe: bool = False
    # the widths MambaAD was measured at over 3 seeds (RESULTS.md section 12, sixth round); DVAD's wider
    # stride-16 stage was chosen for DVAD and has not been trained in this ablation
    dims: Tuple[int, ...] = (128, 64, 32, 32)
    # and without DVAD's memory term (chosen for DVAD in the ninth round; MambaAD's numbers are its
    # reconstruction alone)
    memory_weight: float = 0.0


@register_model("mambaad")
class MambaAD(DVAD):
    """MambaAD-style ablation: DVAD with use_hyper=False and use_moe=False (a config preset)."""

    config_class = MambaADConfig
