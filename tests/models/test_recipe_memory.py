"""The reconstruction recipe's nearest-neighbour term (`memory_weight`, models.recipe): the memory, its
scales and the fused map against an independent float64 reference (brute-force distances, explicit
cosines); checkpoint round trip; ONNX == PyTorch; re-scoring a finished run adds it to the same weights."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import layers as L
from models.checkpoint import load_checkpoint, save_checkpoint
from models.registry import get_model_class
from models.synthetic import generate_dataset
from models.train import train
from tests.models.onnx_parity import assert_onnx_matches_pytorch


def _built(name, weight=0.7, ratio=0.3, seed=0, **kw):
    cfg = get_model_class(name).config_class.tiny(memory_weight=weight, memory_ratio=ratio, **kw).to_dict()
    torch.manual_seed(seed)
    model = models.create_model(name, pretrained=False, **cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    loader = [torch.randn(n, 3, 64, 64, generator=g) for n in (4, 3, 2)]     # uneven last batch
    model.finalize(loader)
    return model, loader


def _patches(f16):
    """(B, C, h, w) -> (B * h * w, C) float64: 3 x 3 average (edge cells over the cells that exist), unit length."""
    f = f16.double().numpy()
    B, C, h, w = f.shape
    out = np.zeros_like(f)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = f[:, :, max(i - 1, 0): i + 2, max(j - 1, 0): j + 2].mean(axis=(2, 3))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.transpose(0, 2, 3, 1).reshape(-1, C)


def _nearest(a, bank):
    return np.sqrt(((a[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)


def _one_minus_cos(f, r):
    f, r = f.double().numpy(), r.double().numpy()
    return 1.0 - (f * r).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(r, axis=1))


@pytest.mark.parametrize("name", ["dvad", "omniad"])
def test_memory_scales_and_map_match_an_independent_reference(name):
    model, loader = _built(name, map_strides=(8, 16), score_topk=0.01)
    with torch.no_grad():
        feats = [model.encode(x) for x in loader]
        recs = [model.decode(f)[0] for f in feats]
    patches = np.concatenate([_patches(f[2]) for f in feats])
    bank = model.memory.double().numpy()
    assert model.config.memory_rows == bank.shape[0] == round(0.3 * len(patches))
    # every memory row is one of the training patches, and no patch is kept twice
    assert _nearest(bank, patches).max() < 1e-5
    assert len(np.unique(bank.round(5), axis=0)) == len(bank)
    r_means = np.concatenate([np.mean([_one_minus_cos(f[i], r[i]).mean(axis=(1, 2)) for i in (1, 2)], axis=0)
                              for f, r in zip(feats, recs)])
    s_r, s_d = model.memory_scales.double().numpy()
    np.testing.assert_allclose(s_r, r_means.mean(), rtol=1e-4)
    # (float32 |f|^2 - 2 f.m + |m|^2 leaves ~1e-3 on the kept patches' zero distances: sqrt of rounding)
    np.testing.assert_allclose(s_d, _nearest(patches, bank).mean(), rtol=3e-3)
    # the fused map on fresh images: r / s_r + W d / s_d, upsampled, blurred; top-1 % score
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        amap, score = model(x)
        f = model.encode(x)
        r, _ = model.decode(f)
    h, w = f[2].shape[-2:]
    d = _nearest(_patches(f[2]), bank).reshape(3, 1, h, w)
    want = 0.0
    for i in (1, 2):
        m = torch.from_numpy(_one_minus_cos(f[i], r[i])[:, None])
        want = want + F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False) / (2 * s_r)
    want = want + 0.7 * F.interpolate(torch.from_numpy(d), size=(64, 64), mode="bilinear",
                                      align_corners=False) / s_d
    want = L.gaussian_blur(want.float(), model.config.blur_sigma)
    torch.testing.assert_close(amap, want, rtol=1e-4, atol=1e-4)
    k = round(64 * 64 * 0.01)
    torch.testing.assert_close(score, want.flatten(1).topk(k, dim=1).values.mean(1), rtol=1e-4, atol=1e-4)


def test_each_term_averages_one_on_the_training_images_and_weight_zero_changes_nothing():
    """The scales make each term's mean over the training images 1 before the blur (the fused map
    averages 1 + W there); memory_weight 0 builds nothing and scores as before."""
    model, loader = _built("dvad", weight=2.0, map_strides=(16,))
    with torch.no_grad():
        feats = [model.encode(x) for x in loader]
        rm = torch.cat([model._recon_maps(f, model.decode(f)[0])[0] for f in feats])
        dm = torch.cat([model._memory_map(f) for f in feats])
    assert float(rm.mean() / model.memory_scales[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(dm.mean() / model.memory_scales[1]) == pytest.approx(1.0, abs=1e-4)
    plain, _ = _built("dvad", weight=0.0, map_strides=(16,))
    assert not hasattr(plain, "memory") and plain.config.memory_rows == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = plain.encode(x)
        want = L.cosine_anomaly_map([f[2]], [plain.decode(f)[0][2]], (64, 64), plain.config.blur_sigma, 0.0)
        torch.testing.assert_close(plain(x)[0], want[0])


def test_forward_before_the_memory_is_built_says_so():
    cfg = get_model_class("dvad").config_class.tiny(memory_weight=1.0).to_dict()
    model = models.create_model("dvad", pretrained=False, **cfg).eval()
    with pytest.raises(RuntimeError, match="no memory built yet"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="memory_weight/memory_ratio"):
        get_model_class("dvad").config_class.tiny(memory_ratio=0.0)


def test_checkpoint_round_trip_and_onnx_export(tmp_path):
    model, _ = _built("omniad", map_strides=(16,))
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.memory_rows == model.config.memory_rows
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    assert_onnx_matches_pytorch(loaded, tmp_path / "m.onnx", size=64)


def test_rescoring_a_finished_run_adds_the_memory_to_the_same_weights(tmp_path):
    """`--resume --config memory_weight=W` on a finished run, even one whose state predates the field."""
    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=10, n_test_good=1,
                            n_test_defect=1, size=64, seed=5)
    tiny = get_model_class("dvad").config_class.tiny().to_dict()
    quiet = dict(progress=False, log=lambda msg: None, validate=False, batch_size=4, seed=3)
    first, _ = train(root, model="dvad", epochs=1, out=tmp_path / "r.pt", config=tiny, **quiet)
    state_path = tmp_path / "r.pt.state"
    state = torch.load(state_path, weights_only=True)
    old = {k: v for k, v in json.loads(state["config_json"]).items() if not k.startswith("memory_")}
    torch.save(dict(state, config_json=json.dumps(old)), state_path)     # as written before the field
    again, summary = train(root, model="dvad", epochs=1, out=tmp_path / "r.pt", resume=True,
                           config=dict(tiny, memory_weight=1.0), **quiet)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    saved = load_checkpoint(tmp_path / "r.pt")
    assert saved.config.memory_weight == 1.0 and saved.config.memory_rows == again.memory.shape[0] > 0
    assert summary["config"]["memory_weight"] == 1.0 and summary["finalize_time_s"] > 0


@pytest.mark.parametrize("name", ["dvad", "omniad"])
def test_a_checkpoint_saved_before_the_memory_term_scores_without_it(tmp_path, name):
    """DVAD's and Omni-AD's defaults have the term (memory_weight 2 and 1), but a checkpoint whose config
    predates the field was trained and calibrated without it: it loads with memory_weight 0 and scores as
    it did."""
    import hashlib

    assert get_model_class(name).config_class().memory_weight > 0
    cfg = get_model_class(name).config_class.tiny(memory_weight=0.0, map_strides=(16,)).to_dict()
    torch.manual_seed(0)
    model = models.create_model(name, pretrained=False, **cfg).eval()
    path = save_checkpoint(model, tmp_path / "old.pt")
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta["config"] = {k: v for k, v in meta["config"].items() if not k.startswith("memory_")}
    meta_json = json.dumps(meta)
    torch.save(dict(blob, meta_json=meta_json, meta_sha256=hashlib.sha256(meta_json.encode()).hexdigest()), path)
    old = load_checkpoint(path)
    assert old.config.memory_weight == 0.0 and not hasattr(old, "memory")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), old(x)):
            assert torch.equal(a, b)
