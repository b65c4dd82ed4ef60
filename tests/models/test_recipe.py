"""Training-recipe pieces of the reconstruction models: schedules, the pixel / global cosine loss with
hard mining, top-k image scores, per-channel feature standardisation (each against an independent
reference)."""
import math

import numpy as np
import pytest
import torch

import models
from models import layers as L
from models.train import TrainError, lr_factor


def test_lr_factor_step_cosine_and_warmup():
    total = 100
    step = [lr_factor(i, total, "step") for i in range(total)]
    assert step[:80] == [1.0] * 80 and step[80:] == [0.1] * 20
    cos = [lr_factor(i, total, "cosine", warmup_steps=10) for i in range(total)]
    # linear warm-up to 1, then half a cosine down to 0.1 at the last step
    assert cos[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert cos[10] == pytest.approx(1.0)
    t = (total - 1 - 10) / (total - 10)
    assert cos[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert min(cos) > 0.0
    with pytest.raises(TrainError, match="schedule"):
        lr_factor(0, 10, "linear")


def _pair(seed=0, shape=(3, 5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(*shape, generator=g)
    r = (f + 0.8 * torch.randn(*shape, generator=g)).requires_grad_(True)
    return f, r


def test_pixel_and_global_cosine_losses_match_numpy():
    f, r = _pair()
    fn, rn = f.numpy().astype(np.float64), r.detach().numpy().astype(np.float64)
    # pixel: mean over (b, y, x) of 1 - cos over channels
    num = (fn * rn).sum(1)
    den = np.linalg.norm(fn, axis=1) * np.linalg.norm(rn, axis=1)
    assert float(L.cosine_loss([f], [r], "pixel")) == pytest.approx((1 - num / den).mean(), abs=1e-6)
    # global: one cosine per image over the flattened map
    ff, rr = fn.reshape(3, -1), rn.reshape(3, -1)
    want = (1 - (ff * rr).sum(1) / (np.linalg.norm(ff, axis=1) * np.linalg.norm(rr, axis=1))).mean()
    assert float(L.cosine_loss([f], [r], "global")) == pytest.approx(want, abs=1e-6)
    # summed over scales
    f2, r2 = _pair(1, (3, 4, 3, 3))
    both = L.cosine_loss([f, f2], [r, r2], "global")
    assert float(both) == pytest.approx(float(L.cosine_loss([f], [r], "global") + L.cosine_loss([f2], [r2], "global")))
    with pytest.raises(ValueError, match="loss kind"):
        L.cosine_loss([f], [r], "l1")


@pytest.mark.parametrize("kind", ["pixel", "global"])
def test_hard_mining_damps_the_gradient_of_the_easiest_positions_only(kind):
    f, r = _pair(2)
    (g_plain,) = torch.autograd.grad(L.cosine_loss([f], [r], kind), r)
    loss = L.cosine_loss([f], [r], kind, hard_fraction=0.75, hard_factor=0.1)
    (g_hard,) = torch.autograd.grad(loss, r)
    assert float(loss) == pytest.approx(float(L.cosine_loss([f], [r], kind)))     # value unchanged
    # reference: the per-pixel distances, the positions below the (1 - p) top-k value are "easy"
    d = (1 - torch.nn.functional.cosine_similarity(f, r.detach(), dim=1)).flatten()
    k = int(d.numel() * 0.25)
    easy = (d < torch.sort(d, descending=True).values[k - 1]).reshape(3, 1, 6, 7).expand_as(r)
    torch.testing.assert_close(g_hard[easy], 0.1 * g_plain[easy])
    torch.testing.assert_close(g_hard[~easy], g_plain[~easy])
    assert int((~easy[:, 0]).sum()) == k


@pytest.mark.parametrize("topk", [0.0, 0.01, 0.1, 1.0])
def test_image_score_is_the_mean_of_the_top_fraction(topk):
    amap = torch.rand(4, 1, 13, 11)
    flat = np.sort(amap.flatten(1).numpy(), axis=1)[:, ::-1]
    k = max(1, int(round(143 * topk))) if topk > 0 else 1
    np.testing.assert_allclose(L.image_score(amap, topk).numpy(), flat[:, :k].mean(1), rtol=1e-6)


@pytest.mark.parametrize("name", ["dvad", "omniad"])
def test_recipe_targets_map_and_score_and_old_checkpoints_keep_the_old_rule(name):
    """pool 3, map from strides 8 + 16, top-1 % score: each against explicit torch ops; a state dict
    saved before the recipe fields existed (no recipe_version) keeps max-over-all-scales, unpooled."""
    import torch.nn.functional as F

    from models.registry import get_model_class

    cls = get_model_class(name).config_class
    torch.manual_seed(0)
    cfg = cls.tiny(feature_pool=3, map_strides=(8, 16), score_topk=0.01).to_dict()
    model = models.create_model(name, pretrained=False, **cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.encoder(x)
        feats = model.encode(x)
        for f, r in zip(feats, raw):
            torch.testing.assert_close(f, F.avg_pool2d(r, 3, 1, 1, count_include_pad=False))
        recs, _ = model.decode(feats)
        amap, score = model(x)
        want, _ = L.cosine_anomaly_map(feats[1:], recs[1:], (64, 64), cfg["blur_sigma"], 0.0)
        torch.testing.assert_close(amap, want)
        k = round(64 * 64 * 0.01)
        torch.testing.assert_close(score, want.flatten(1).topk(k, dim=1).values.mean(1))
    # the same weights as an old checkpoint: no recipe_version in the state dict
    sd = {k: v for k, v in model.state_dict().items() if k != "recipe_version"}
    old = models.create_model(name, pretrained=False, **cfg).eval()
    old.load_state_dict(sd, strict=True)
    assert int(old.recipe_version) == 0
    with torch.no_grad():
        raw_recs, _ = old.decode(raw)
        want_old = L.cosine_anomaly_map(raw, raw_recs, (64, 64), cfg["blur_sigma"], 0.0)
        got = old(x)
    torch.testing.assert_close(got[0], want_old[0])
    torch.testing.assert_close(got[1], want_old[0].amax(dim=(1, 2, 3)))
    # re-saved, it stays old; a new model's state dict says new
    again = models.create_model(name, pretrained=False, **cfg).eval()
    again.load_state_dict(old.state_dict())
    assert again._legacy and not model._legacy and int(model.state_dict()["recipe_version"]) == 1
