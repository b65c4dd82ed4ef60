"""models.patchcore + models.memory: brute-force nearest-neighbour and coreset references,
checkpoint round trip of the fitted memory, synthetic-defect separation, ONNX export == PyTorch."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import memory as M
from models.checkpoint import load_checkpoint, save_checkpoint
from models.patchcore import PatchCore, PatchCoreConfig
from tests.models.synthetic_defects import synthetic_defect_aurocs


def _coreset_numpy(z, n, start):
    idx = [start]
    d = ((z - z[start]) ** 2).sum(1)
    while len(idx) < n:
        j = int(np.argmax(d))
        idx.append(j)
        d = np.minimum(d, ((z - z[j]) ** 2).sum(1))
    return idx


def test_greedy_coreset_matches_numpy_loop_and_bounds_memory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 9, generator=g)
    got = M.greedy_coreset(x, 40, dim=0, seed=5).tolist()
    start = int(torch.randint(301, (1,), generator=torch.Generator().manual_seed(5)))
    assert got == _coreset_numpy(x.numpy().astype(np.float64), 40, start)
    assert len(set(got)) == 40
    assert M.greedy_coreset(x, 500).tolist() == list(range(301))


def test_greedy_coreset_covers_better_than_a_random_subset():
    """k-center: the largest distance of any row to its nearest chosen row is smaller than for a
    random subset of the same size (clustered data, where a random pick misses small clusters)."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(12, 16, generator=g) * 6
    sizes = [400] + [8] * 11
    x = torch.cat([c + 0.3 * torch.randn(s, 16, generator=g) for c, s in zip(centers, sizes)])
    keep = M.greedy_coreset(x, 24, dim=8, seed=0)
    rand = torch.randperm(x.shape[0], generator=g)[:24]
    cover = lambda idx: torch.cdist(x, x[idx]).min(1).values.max()  # noqa: E731
    assert cover(keep) < 0.5 * cover(rand)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_and_topk_similarity_match_sklearn(k):
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(k)
    bank = rng.standard_normal((157, 11)).astype(np.float32)
    f = rng.standard_normal((2, 37, 11)).astype(np.float32) * 1.3
    nn_ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank.astype(np.float64))
    dist, _ = nn_.kneighbors(f.reshape(-1, 11).astype(np.float64))
    got = M.knn_distance(torch.from_numpy(f), torch.from_numpy(bank), k)
    np.testing.assert_allclose(got.numpy().reshape(-1), dist.mean(1), rtol=1e-4, atol=1e-4)
    sims = f.reshape(-1, 11) @ bank.T
    want = -np.sort(-sims, axis=1)[:, :k].mean(1)
    got = M.topk_similarity(torch.from_numpy(f), torch.from_numpy(bank), k)
    np.testing.assert_allclose(got.numpy().reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_fill_rows_pads_by_repetition():
    b = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(M.fill_rows(b, 7), torch.cat([b, b, b[:1]]))
    assert torch.equal(M.fill_rows(b, 2), b[:2])


@pytest.mark.parametrize("l2", [False, True])
def test_patch_features_and_scores_match_an_independent_reference(l2):
    torch.manual_seed(0)
    cfg = PatchCoreConfig(input_size=48, coreset_ratio=0.25, knn=2, layers=(0, 2), patch_size=3, coreset_dim=0,
                          l2_normalize=l2)
    model = PatchCore(cfg, pretrained=False).eval()         # random encoder: the maths is under test
    train = torch.randn(5, 3, 48, 48)
    model.prepare([train[:2], {"image": train[2:]}])
    enc = model.encoder
    with torch.no_grad():
        f4, _, f16 = enc(train)
        # reference features: explicit 3x3 mean over the valid neighbours, nearest grid resampling
        # replaced by the same bilinear call (the aggregation is what differs between layers)
        def agg(f):
            ones = torch.ones(1, 1, *f.shape[-2:])
            s = F.conv2d(F.pad(f, (1, 1, 1, 1)), torch.ones(f.shape[1], 1, 3, 3), groups=f.shape[1])
            c = F.conv2d(F.pad(ones, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
            return s / c
        unit = (lambda f: F.normalize(f, dim=1)) if l2 else (lambda f: f)
        ref = torch.cat([unit(agg(f4)), unit(F.interpolate(agg(f16), size=f4.shape[-2:], mode="bilinear",
                                                           align_corners=False))], 1)
        ref = ref.flatten(2).transpose(1, 2).reshape(-1, ref.shape[1])
    n_patches = ref.shape[0]
    assert model.config.memory_rows == round(0.25 * n_patches) == model.memory.shape[0]
    # every memory row is one of the training patches, none repeated (exact distances: cdist's matmul
    # path cancels to ~1e-3 on unit-length rows)
    d = torch.cdist(model.memory, ref, compute_mode="donot_use_mm_for_euclid_dist")
    assert (d.min(1).values < 1e-4).all() and len(set(d.argmin(1).tolist())) == model.memory.shape[0]
    test = torch.randn(3, 3, 48, 48) * 1.2
    with torch.no_grad():
        amap, score = model(test)
        f, (h, w) = model.patch_features(test)
    want = torch.cdist(f.double(), model.memory.double()).topk(2, largest=False).values.mean(-1)
    up = F.interpolate(want.float().reshape(3, 1, h, w), size=(48, 48), mode="bilinear", align_corners=False)
    from models.layers import gaussian_blur

    torch.testing.assert_close(amap, gaussian_blur(up, cfg.blur_sigma), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))


def test_checkpoint_round_trip_rebuilds_the_memory_shape(tmp_path):
    cfg = PatchCoreConfig.tiny(layers=(1, 2))
    model = PatchCore(cfg, pretrained=False).eval()
    model.prepare([torch.randn(4, 3, 64, 64)])
    rows = model.config.memory_rows
    assert rows == round(0.1 * 4 * 8 * 8) and model.memory.shape == (rows, 40 + 112)
    save_checkpoint(model, tmp_path / "pc.pt")
    meta = json.loads(torch.load(tmp_path / "pc.pt", weights_only=True)["meta_json"])
    assert meta["config"]["memory_rows"] == rows
    loaded = load_checkpoint(tmp_path / "pc.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[1], model(x)[1])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="patch_size"):
        PatchCoreConfig(patch_size=2)
    with pytest.raises(ValueError, match="layers"):
        PatchCoreConfig(layers=(1, 1))


def test_max_memory_caps_the_rows():
    model = PatchCore(PatchCoreConfig.tiny(coreset_ratio=1.0, max_memory=10), pretrained=False)
    model.prepare([torch.randn(2, 3, 64, 64)])
    assert model.memory.shape[0] == model.config.memory_rows == 10


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_separates_synthetic_defects(kind):
    # the default stride-16 grid at 128 px: 8 x 8 cells (at 96 px, 6 x 6 cells localise the object's defects at 0.79)
    model = PatchCore(PatchCoreConfig(input_size=128), pretrained=True).eval()
    image, pixel = synthetic_defect_aurocs(model, kind, 128)
    assert image > 0.9, f"image AUROC {image:.3f} on {kind}"      # measured 0.95 / 0.97
    assert pixel > 0.8, f"pixel AUROC {pixel:.3f} on {kind}"      # measured 0.95 / 0.89


def test_onnx_export_matches_pytorch(tmp_path):
    from tests.models.onnx_parity import assert_onnx_matches_pytorch

    model = PatchCore(PatchCoreConfig.tiny(input_size=96), pretrained=True).eval()
    model.prepare([torch.randn(3, 3, 96, 96)])
    assert_onnx_matches_pytorch(model, tmp_path / "pc.onnx", size=96)
