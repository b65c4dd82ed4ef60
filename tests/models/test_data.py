"""models.data: MVTec-layout scanning, decoding, resizing, errors, val split; real data loads as is."""
import pathlib

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.base import PreprocessConfig
from models.data import (AnomalyDataset, DataError, load_image, load_mask, make_datasets, scan_mvtec,
                         split_val)
from models.synthetic import generate_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset(root, classes=("texture", "object", "fabric"), n_train=10, n_test_good=3,
                            n_test_defect=4, size=40, seed=5)


def _write(path: pathlib.Path, img: np.ndarray, params=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img, list(params))
    return path


def _make_class(root: pathlib.Path, rng, n_train=3, shape=(37, 53), ext=".png", gray=False):
    def img():
        sh = shape if gray else shape + (3,)
        return rng.integers(0, 256, sh, dtype=np.uint8)

    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}{ext}", img())
    _write(root / "test" / "good" / f"000{ext}", img())
    _write(root / "test" / "crack" / f"000{ext}", img())
    m = np.zeros(shape, np.uint8)
    m[5:15, 10:30] = 255
    _write(root / "ground_truth" / "crack" / "000_mask.png", m)
    return root


# ---------------------------------------------------------------------------------------------
# scanning
# ---------------------------------------------------------------------------------------------
def test_scan_multiclass_and_selection(synth):
    samples, names = scan_mvtec(synth, split="train")
    assert names == ["fabric", "object", "texture"]
    assert len(samples) == 30
    assert {(s.class_name, s.class_id) for s in samples} == {("fabric", 0), ("object", 1), ("texture", 2)}
    assert all(s.label == 0 and s.mask_path is None and s.defect_type == "good" for s in samples)

    test, names2 = scan_mvtec(synth, classes="texture,object", split="test")
    assert names2 == ["object", "texture"]                 # ids follow the sorted selection
    assert len(test) == 2 * 7
    for s in test:
        assert s.class_id == names2.index(s.class_name)
        if s.label:
            assert s.defect_type != "good" and s.mask_path.name == s.path.stem + "_mask.png"
            assert s.mask_path.parent.name == s.defect_type and s.mask_path.is_file()
        else:
            assert s.defect_type == "good" and s.mask_path is None


def test_ids_from_a_models_class_names(synth):
    model_names = ["texture", "carpet", "object", "fabric"]          # a model's own order
    test, names = scan_mvtec(synth, classes="object", split="test", id_names=model_names)
    assert names == model_names and {s.class_id for s in test} == {2}
    tr, va, te, names2 = make_datasets(synth, "texture,fabric", val_fraction=0.2, id_names=model_names)
    assert names2 == model_names
    for ds in (tr, va, te):
        assert {s.class_id for s in ds.samples} == {0, 3}
        assert all(model_names[s.class_id] == s.class_name for s in ds.samples)
    with pytest.raises(DataError, match="fabric not among the model's classes"):
        scan_mvtec(synth, split="test", id_names=["object", "texture"])


def test_single_class_root(synth):
    samples, names = scan_mvtec(synth / "object", split="test")
    assert names == ["object"] and len(samples) == 7 and sum(s.label for s in samples) == 4


def test_unknown_class_lists_available(synth):
    with pytest.raises(DataError, match=r"unknown class\(es\) carpet; available: fabric, object, texture"):
        scan_mvtec(synth, classes=["carpet"])


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_mvtec(tmp_path / "nope")
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="MVTec-layout"):
        scan_mvtec(tmp_path)


def test_missing_mask_names_image_and_expected_path(tmp_path):
    root = _make_class(tmp_path / "c", np.random.default_rng(0))
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError) as e:
        scan_mvtec(root, split="test")
    msg = str(e.value)
    assert str(root / "test" / "crack" / "000.png") in msg and "000_mask.png" in msg


def test_empty_folder_and_missing_train_good(tmp_path):
    root = _make_class(tmp_path / "c", np.random.default_rng(0))
    for p in (root / "test" / "good").iterdir():
        p.unlink()
    (root / "test" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"test/good: folder holds no images"):
        scan_mvtec(root, split="test")
    for p in (root / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"train/good: folder holds no images"):
        scan_mvtec(root, split="train")
    (root / "train" / "good").rmdir()
    with pytest.raises(DataError, match=r"train/good: missing"):
        scan_mvtec(root, split="train")


def test_missing_test_folder(tmp_path):
    root = _make_class(tmp_path / "c", np.random.default_rng(0), n_train=4)
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="test: missing"):
        make_datasets(root)
    train, val, test, names = make_datasets(root, require_test=False, val_fraction=0.25)
    assert test is None and len(train) == 3 and len(val) == 1


# ---------------------------------------------------------------------------------------------
# decoding and items
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext,gray", [(".png", False), (".png", True), (".jpg", True), (".jpg", False)])
def test_items_match_independent_resize(tmp_path, ext, gray):
    rng = np.random.default_rng(1)
    shape = (37, 53) if not gray else (61, 29)
    root = _make_class(tmp_path / "c", rng, shape=shape, ext=ext, gray=gray)
    S = 24
    pp = PreprocessConfig(input_size=S)
    train, val, test, names = make_datasets(root, preprocess=pp, val_fraction=0.0)
    assert names == ["c"] and len(val) == 0 and len(train) == 3 and len(test) == 2
    for ds in (train, test):
        for i in range(len(ds)):
            item = ds[i]
            s = ds.samples[i]
            assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
            assert item["mask"].shape == (1, S, S) and item["label"] == s.label and item["index"] == i
            # reference: PIL-free decode via cv2 in BGR, then torch bilinear (align_corners=False)
            raw = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
            rgb = np.repeat(raw[:, :, None], 3, 2) if raw.ndim == 2 else raw[:, :, ::-1]
            t = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
            ref = F.interpolate(t, size=(S, S), mode="bilinear", align_corners=False)[0] / 255.0
            mean = torch.tensor(pp.mean).view(3, 1, 1)
            std = torch.tensor(pp.std).view(3, 1, 1)
            ref = (ref - mean) / std
            # cv2 resizes uint8 with fixed-point weights and rounds: <= ~1 grey level apart
            assert torch.allclose(item["image"], ref, atol=1.5 / 255 / min(pp.std))
            if gray:
                x = item["image"] * std + mean
                assert torch.allclose(x[0], x[1], atol=1e-6) and torch.allclose(x[1], x[2], atol=1e-6)
            if s.label:
                m = cv2.imread(str(s.mask_path), cv2.IMREAD_UNCHANGED) > 0
                mref = F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(S, S),
                                     mode="nearest")[0]
                assert torch.equal(item["mask"], mref) and item["mask"].sum() > 0
            else:
                assert item["mask"].sum() == 0


def test_rgb_order_16bit_alpha_and_channels(tmp_path):
    bgr = np.zeros((9, 11, 3), np.uint8)
    bgr[..., 2] = 200                              # pure red in OpenCV's BGR order
    p = _write(tmp_path / "red.png", bgr)
    rgb = load_image(p)
    assert rgb.shape == (9, 11, 3) and rgb[..., 0].min() == 200 and rgb[..., 1:].max() == 0
    g = load_image(p, channels=1)
    assert g.shape == (9, 11, 1) and abs(int(g[0, 0, 0]) - round(0.299 * 200)) <= 1
    p16 = _write(tmp_path / "deep.png", np.full((5, 6), 65535, np.uint16))
    assert load_image(p16).max() == 255 and load_image(p16).dtype == np.uint8
    bgra = np.dstack([bgr, np.full((9, 11), 7, np.uint8)])
    assert np.array_equal(load_image(_write(tmp_path / "a.png", bgra)), rgb)
    m = np.zeros((9, 11, 3), np.uint8)
    m[2, 3, 1] = 1
    mm = load_mask(_write(tmp_path / "m.png", m))
    assert mm.dtype == bool and mm.sum() == 1 and mm[2, 3]


def test_one_channel_dataset(tmp_path):
    root = _make_class(tmp_path / "c", np.random.default_rng(2))
    pp = PreprocessConfig(input_size=16, channels=1, mean=(0.5,), std=(0.25,))
    train, _, test, _ = make_datasets(root, preprocess=pp, val_fraction=0.0)
    x = train[0]["image"]
    assert x.shape == (1, 16, 16)
    raw = cv2.cvtColor(cv2.imread(str(train.samples[0].path)), cv2.COLOR_BGR2GRAY)
    ref = (cv2.resize(raw, (16, 16), interpolation=cv2.INTER_LINEAR) / 255.0 - 0.5) / 0.25
    assert np.allclose(x[0].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"not an image at all"])
def test_corrupt_file_is_one_clear_error(tmp_path, content):
    root = _make_class(tmp_path / "c", np.random.default_rng(3))
    bad = root / "train" / "good" / "001.png"
    bad.write_bytes(content)
    train, _, _, _ = make_datasets(root, val_fraction=0.0)
    i = [s.path.name for s in train.samples].index("001.png")
    with pytest.raises(DataError, match=r"001\.png: not a readable image"):
        train[i]
    # a truncated JPEG
    jp = _write(tmp_path / "x.jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jp.write_bytes(jp.read_bytes()[:40])
    with pytest.raises(DataError, match="x.jpg"):
        load_image(jp)


def test_mask_size_mismatch(tmp_path):
    root = _make_class(tmp_path / "c", np.random.default_rng(4))
    _write(root / "ground_truth" / "crack" / "000_mask.png", np.full((10, 10), 255, np.uint8))
    _, _, test, _ = make_datasets(root, val_fraction=0.0)
    i = [s.label for s in test.samples].index(1)
    with pytest.raises(DataError, match="differs from its image"):
        test[i]


def test_bad_preprocess_arguments(synth):
    samples, _ = scan_mvtec(synth)
    with pytest.raises(ValueError, match="mean/std"):
        AnomalyDataset(samples, channels=3, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ValueError, match="channels"):
        AnomalyDataset(samples, channels=2)


# ---------------------------------------------------------------------------------------------
# validation split
# ---------------------------------------------------------------------------------------------
def test_val_split_deterministic_disjoint_per_class(synth):
    train, val, test, names = make_datasets(synth, val_fraction=0.25, seed=3)
    train2, val2, _, _ = make_datasets(synth, val_fraction=0.25, seed=3)
    assert [s.path for s in val.samples] == [s.path for s in val2.samples]
    assert [s.path for s in train.samples] == [s.path for s in train2.samples]
    tr, va = {s.path for s in train.samples}, {s.path for s in val.samples}
    assert not tr & va and len(tr | va) == 30
    for n in names:
        assert sum(s.class_name == n for s in val.samples) == 3      # ceil(0.25 * 10)
    # independent of input order, and a different seed picks other images
    samples, _ = scan_mvtec(synth)
    _, v_rev = split_val(samples[::-1], 0.25, 3)
    assert {s.path for s in v_rev} == va
    _, v_other = split_val(samples, 0.25, 4)
    assert {s.path for s in v_other} != va
    assert all(s.label == 0 for s in val.samples) and val.class_names == names
    # adding images never moves a kept validation image into training unless k grows
    extra = samples + [type(samples[0])(s.path.with_name("new" + s.path.name), s.class_name, s.class_id,
                                        "good", 0, None) for s in samples[:1]]
    _, v_more = split_val(extra, 0.25, 3)
    assert len({s.path for s in v_more} & va) >= len(va) - 1


def test_val_fraction_bounds(synth):
    samples, _ = scan_mvtec(synth)
    with pytest.raises(ValueError, match="val_fraction"):
        split_val(samples, 1.0)
    tr, va = split_val(samples, 0.99)
    assert len(tr) == 3 and len(va) == 27                     # one training image kept per class


# ---------------------------------------------------------------------------------------------
# the real dataset (light: scan, and a handful of items)
# ---------------------------------------------------------------------------------------------
def test_magnetic_tile_loads_as_is(magnetic_tile):
    train, val, test, names = make_datasets(magnetic_tile, val_fraction=0.1, seed=0)
    assert names == [magnetic_tile.name]
    assert len(train) > 100 and len(val) > 10 and len(test) > 100
    labels = test.labels
    assert 0 < labels.sum() < len(labels)
    types = {s.defect_type for s in test.samples}
    assert "good" in types and len(types) >= 3
    defect_idx = np.flatnonzero(labels == 1)[::97][:4]
    good_idx = np.flatnonzero(labels == 0)[:2]
    for i in list(defect_idx) + list(good_idx):
        item = test[int(i)]
        assert item["image"].shape == (3, 256, 256) and torch.isfinite(item["image"]).all()
        assert (item["mask"].sum() > 0) == bool(labels[i])
        raw = cv2.imread(str(test.samples[int(i)].path), cv2.IMREAD_UNCHANGED)
        assert raw.ndim == 2                                   # grayscale JPEG -> replicated
        x = item["image"]
        mean = torch.tensor(test.mean[:, 0, 0])[:, None, None]
        std = torch.tensor(test.std[:, 0, 0])[:, None, None]
        x = x * std + mean
        assert torch.allclose(x[0], x[2], atol=1e-5)
    item = train[0]
    assert item["label"] == 0 and item["mask"].sum() == 0
