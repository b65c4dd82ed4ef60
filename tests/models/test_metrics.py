"""models.metrics against sklearn and an independent threshold-sweep AUPRO, on fresh random data."""
import math
import re

import cv2
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from models.metrics import (ALL_KEYS, METRICS, PIXEL_METRICS, MetricAccumulator, compute_metrics, format_table,
                            image_metrics, jsonable)


def _sk(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return dict(auroc=roc_auc_score(y, s), ap=average_precision_score(y, s), f1max=f1.max())


def _aupro_reference(maps, masks, max_fpr=0.3):
    """Straightforward MVTec AUPRO: sweep every distinct score as threshold (score >= t), regions by
    scipy 8-connected labelling, PRO = mean per-region overlap, trapezoid up to max_fpr (end point
    interpolated), divided by max_fpr."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3))) for m in masks]
    normal = ~masks.astype(bool)
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pros = [pred[i][lab == k].mean() for i, (lab, n) in enumerate(labelled) for k in range(1, n + 1)]
        pts.append((fpr, float(np.mean(pros))))
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    keep = x <= max_fpr
    xs, ys = list(x[keep]), list(y[keep])
    if xs[-1] < max_fpr:
        j = np.argmax(x > max_fpr)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (max_fpr - x[j - 1]) / (x[j] - x[j - 1]))
        xs.append(max_fpr)
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / max_fpr


def _maps(rng, n, H, W, quantize=None):
    """Smooth random maps; every other image has 1-3 elliptic defects with raised scores."""
    maps = np.empty((n, H, W), np.float32)
    masks = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        z = cv2.GaussianBlur(rng.standard_normal((H, W)).astype(np.float32), (0, 0), 2)
        z = 0.3 + 0.15 * z / z.std()
        if i % 2:
            for _ in range(int(rng.integers(1, 4))):
                m = np.zeros((H, W), np.uint8)
                cv2.ellipse(m, (int(rng.integers(0, W)), int(rng.integers(0, H))),
                            (int(rng.integers(1, max(2, W // 6))), int(rng.integers(1, max(2, H // 6)))),
                            float(rng.uniform(0, 180)), 0, 360, 1, -1)
                masks[i] |= m
                z += rng.uniform(0.05, 0.8) * cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.5)
        maps[i] = np.clip(z, 0, None)
    if quantize:
        maps = np.round(maps / quantize) * quantize          # many ties
    return maps, masks


# ---------------------------------------------------------------------------------------------
# image level
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ties", [(7, False), (64, True), (301, False), (1000, True)])
def test_image_metrics_vs_sklearn(n, ties):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)
    got = image_metrics(s, y)
    ref = _sk(y, s)
    assert got["image_auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
    assert got["image_ap"] == pytest.approx(ref["ap"], abs=1e-12)
    assert got["image_f1max"] == pytest.approx(ref["f1max"], abs=1e-12)


def test_per_class_streaming_vs_sklearn():
    rng = np.random.default_rng(11)
    n = 240
    c = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + (c + 1) * 0.5 * y
    acc = MetricAccumulator()
    for lo in range(0, n, 37):                         # uneven batches
        acc.update(s[lo:lo + 37], y[lo:lo + 37], class_ids=c[lo:lo + 37])
    res = acc.compute(["a", "b", "c"])
    assert list(res["per_class"]) == ["a", "b", "c"]
    for k, name in enumerate("abc"):
        ref = _sk(y[c == k], s[c == k])
        r = res["per_class"][name]
        assert r["image_auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
        assert r["image_ap"] == pytest.approx(ref["ap"], abs=1e-12)
        assert r["image_f1max"] == pytest.approx(ref["f1max"], abs=1e-12)
        assert math.isnan(r["pixel_auroc"]) and math.isnan(r["mad"])       # no maps given
        assert res["counts"][name]["images"] == int((c == k).sum())
    assert res["mean"]["image_auroc"] == pytest.approx(np.mean([_sk(y[c == k], s[c == k])["auroc"]
                                                                for k in range(3)]))
    assert any("no anomaly maps" in note for note in res["notes"])


# ---------------------------------------------------------------------------------------------
# pixel level
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,quantize", [((10, 23, 31), 0.02), ((6, 17, 13), None)])
def test_pixel_metrics_exact_vs_references(shape, quantize):
    rng = np.random.default_rng(sum(shape))
    maps, masks = _maps(rng, *shape, quantize=quantize)
    y = masks.reshape(len(masks), -1).max(1)
    s = maps.reshape(len(maps), -1).max(1)
    res = compute_metrics(s, y, maps, masks, n_bins=None)["per_class"]["0"]
    ref = _sk(masks.ravel(), maps.ravel())
    assert res["pixel_auroc"] == pytest.approx(ref["auroc"], abs=1e-10)
    assert res["pixel_ap"] == pytest.approx(ref["ap"], abs=1e-10)
    assert res["pixel_f1max"] == pytest.approx(ref["f1max"], abs=1e-10)
    assert res["pixel_aupro"] == pytest.approx(_aupro_reference(maps, masks), abs=1e-10)
    assert 0.0 < res["pixel_aupro"] < 1.0


def test_aupro_touching_blobs_and_region_count():
    # two blobs touching only diagonally are ONE region (8-connectivity), as in MVTec's evaluation
    rng = np.random.default_rng(3)
    masks = np.zeros((2, 12, 12), np.uint8)
    masks[1, 2:5, 2:5] = 1
    masks[1, 5:8, 5:8] = 1
    masks[1, 9:11, 0:2] = 1
    maps = rng.random((2, 12, 12)).astype(np.float32) + masks * rng.random((2, 12, 12)).astype(np.float32)
    acc = MetricAccumulator(n_bins=None)
    acc.update([0.1, 0.9], [0, 1], maps, masks)
    res = acc.compute()
    assert res["counts"]["0"]["regions"] == 2
    assert res["per_class"]["0"]["pixel_aupro"] == pytest.approx(_aupro_reference(maps, masks), abs=1e-10)


def test_binned_error_against_exact_is_as_documented():
    rng = np.random.default_rng(2024)
    maps, masks = _maps(rng, 64, 96, 96)
    y = masks.reshape(64, -1).max(1)
    s = maps.reshape(64, -1).max(1)
    exact = compute_metrics(s, y, maps, masks, n_bins=None)["mean"]
    for n_bins, tol in ((1000, 2e-3), (10_000, 2e-4)):
        acc = MetricAccumulator(n_bins=n_bins)
        for lo in range(0, 64, 16):
            acc.update(s[lo:lo + 16], y[lo:lo + 16], maps[lo:lo + 16], masks[lo:lo + 16])
        got = acc.compute()["mean"]
        for k in PIXEL_METRICS:
            assert abs(got[k] - exact[k]) < tol, (n_bins, k, got[k], exact[k])
        for k in ("image_auroc", "image_ap", "image_f1max"):
            assert got[k] == exact[k]                    # image metrics are always exact


def test_binned_grid_widening_keeps_counts():
    # The grid is fixed from a first, narrow batch; later batches lie far above and below it.
    rng = np.random.default_rng(5)
    maps, masks = _maps(rng, 12, 20, 24)
    maps[:2] *= 0.1                                      # narrow first batch
    maps[6:8] += 5.0                                     # far above
    maps[8:10] -= 3.0                                    # far below
    y = masks.reshape(12, -1).max(1)
    s = maps.reshape(12, -1).max(1)
    acc = MetricAccumulator(n_bins=1 << 14, warmup_pixels=1)
    for i in range(0, 12, 2):
        acc.update(s[i:i + 2], y[i:i + 2], maps[i:i + 2], masks[i:i + 2])
    got = acc.compute()["per_class"]["0"]
    st = acc._pixels[0]
    assert st.pos.sum() == masks.sum() and st.neg.sum() == masks.size - masks.sum()
    assert st.pro.sum() == pytest.approx(acc.compute()["counts"]["0"]["regions"])
    exact = compute_metrics(s, y, maps, masks, n_bins=None)["per_class"]["0"]
    for k in PIXEL_METRICS:
        assert abs(got[k] - exact[k]) < 5e-3, k
    # a known score_range gives the same counts whatever the batching
    a1 = MetricAccumulator(n_bins=2000, score_range=(-3.0, 7.0))
    a1.update(s, y, maps, masks)
    a2 = MetricAccumulator(n_bins=2000, score_range=(-3.0, 7.0))
    for i in range(12):
        a2.update(s[i:i + 1], y[i:i + 1], maps[i:i + 1], masks[i:i + 1])
    assert np.array_equal(a1._pixels[0].neg, a2._pixels[0].neg)
    assert a1.compute()["per_class"] == a2.compute()["per_class"]


def test_torch_inputs_and_channel_axis():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    maps, masks = _maps(rng, 4, 16, 16)
    y = masks.reshape(4, -1).max(1)
    s = maps.reshape(4, -1).max(1)
    a = compute_metrics(torch.from_numpy(s), torch.from_numpy(y), torch.from_numpy(maps)[:, None],
                        torch.from_numpy(masks.astype(np.float32))[:, None], n_bins=None)
    b = compute_metrics(s, y, maps, masks, n_bins=None)
    assert a["per_class"] == b["per_class"]


# ---------------------------------------------------------------------------------------------
# mAD, means, edge cases, table
# ---------------------------------------------------------------------------------------------
def test_mad_and_means_consistent():
    rng = np.random.default_rng(9)
    maps, masks = _maps(rng, 18, 16, 20)
    y = masks.reshape(18, -1).max(1)
    s = maps.reshape(18, -1).max(1) + rng.normal(0, 0.05, 18)
    c = np.arange(18) % 3
    res = compute_metrics(s, y, maps, masks, class_ids=c, class_names=["x", "y", "z"], n_bins=None)
    for name, r in res["per_class"].items():
        assert set(r) == set(ALL_KEYS)
        assert r["mad"] == pytest.approx(np.mean([r[k] for k in METRICS]))
        assert all(0.0 <= r[k] <= 1.0 for k in ALL_KEYS)
    for k in METRICS:
        assert res["mean"][k] == pytest.approx(np.mean([res["per_class"][n][k] for n in "xyz"]))
    assert res["mean"]["mad"] == pytest.approx(np.mean([res["per_class"][n]["mad"] for n in "xyz"]))


def test_all_normal_class_is_nan_with_note_and_left_out_of_mean():
    rng = np.random.default_rng(10)
    maps, masks = _maps(rng, 8, 12, 12)
    y = masks.reshape(8, -1).max(1)
    s = maps.reshape(8, -1).max(1)
    normal_maps = rng.random((3, 12, 12)).astype(np.float32)
    acc = MetricAccumulator(n_bins=1000)
    acc.update(s, y, maps, masks, class_ids=np.zeros(8, int))
    acc.update(rng.random(3), np.zeros(3, int), normal_maps, np.zeros((3, 12, 12)), class_ids=np.ones(3, int))
    res = acc.compute(["good_cls", "normal_only"])
    bad = res["per_class"]["normal_only"]
    assert all(math.isnan(bad[k]) for k in ALL_KEYS)
    assert any("normal_only" in n and "no defective images" in n for n in res["notes"])
    for k in ALL_KEYS:
        assert res["mean"][k] == pytest.approx(res["per_class"]["good_cls"][k])
    table = format_table(res)
    assert "normal_only" in table and "-" in table.splitlines()[3]
    import json

    back = json.loads(json.dumps(jsonable(res), allow_nan=False))
    assert back["per_class"]["normal_only"]["image_auroc"] is None
    assert back["mean"]["mad"] == pytest.approx(res["mean"]["mad"])


def test_input_validation():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="image_labels"):
        acc.update([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        acc.update([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        acc.update([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="masks"):
        acc.update([0.1], [0], np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        acc.update([0.1], [0], np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="even"):
        MetricAccumulator(n_bins=999)
    acc.update([0.1], [0], np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="some batches"):
        acc.update([0.1], [0])
    with pytest.raises(ValueError, match="no name"):
        acc.compute(class_names=[])


def test_format_table_percent():
    rng = np.random.default_rng(12)
    maps, masks = _maps(rng, 12, 16, 16)
    y = masks.reshape(12, -1).max(1)
    s = maps.reshape(12, -1).max(1)
    res = compute_metrics(s, y, maps, masks, class_ids=(np.arange(12) // 2) % 2, class_names=["tile", "wood"])
    lines = format_table(res, digits=2).splitlines()
    assert "I-AUROC" in lines[0] and "AUPRO" in lines[0] and "mAD" in lines[0]
    rows = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in lines if re.match(r"^(tile|wood|mean) ", ln)}
    assert set(rows) == {"tile", "wood", "mean"}
    for name, src in (("tile", res["per_class"]["tile"]), ("wood", res["per_class"]["wood"]), ("mean", res["mean"])):
        assert rows[name] == pytest.approx([100 * src[k] for k in ALL_KEYS], abs=0.0051)
