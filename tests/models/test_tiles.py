"""models.tiles and `models.train --tile`: crops of the strip the stream sees, full coverage for the
held-out tiles, the geometry recorded in the checkpoint, exports that take the training tile, and a
stream that warns (with numbers) when it cuts tiles at another scale."""
import numpy as np
import pytest

from models.data import Sample
from models.tiles import StripTiles, tile_starts, to_line_width
from runtime.tiling import tile_starts as stream_tile_starts


def test_tile_starts_is_the_streams_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tile = int(rng.integers(1, 40))
        stride = int(rng.integers(1, tile + 1))
        length = int(rng.integers(1, 200))
        assert tile_starts(length, tile, stride) == stream_tile_starts(length, tile, stride), (length, tile, stride)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import cv2

    d = tmp_path_factory.mktemp("strip_imgs")
    rng = np.random.default_rng(1)
    out = []
    for i, (h, w) in enumerate([(37, 50), (60, 41), (23, 77), (51, 50)]):
        p = d / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (h, w), dtype=np.uint8))
        out.append(Sample(p, "c", 0, "good", 0))
    return out


def test_strip_is_the_images_at_line_width_and_coverage_is_complete(images):
    from models.data import load_image

    ds = StripTiles(images, tile=16, line_width=50, input_size=16, channels=1, mean=(0.5,), std=(0.25,),
                    stride=12, seed=3)
    strip = ds.strips[0]
    parts = [to_line_width(load_image(s.path, 1), 50) for s in images]
    order = np.random.default_rng(3).permutation(len(parts))        # the seeded order of the images
    np.testing.assert_array_equal(strip, np.concatenate([parts[i] for i in order]))
    assert strip.shape[1:] == (50, 1) and ds.lines == sum(p.shape[0] for p in parts)
    covered = np.zeros(strip.shape[:2], bool)
    for cid, y, x in ds.index:
        covered[y:y + 16, x:x + 16] = True
    assert covered.all()                       # every strip pixel is in some held-out tile
    item = ds[len(ds) - 1]
    assert item["image"].shape == (1, 16, 16) and item["class_id"] == 0
    crop = ds.crop(len(ds) - 1).astype(np.float32)[:, :, 0] / 255.0
    np.testing.assert_allclose(item["image"][0].numpy(), (crop - 0.5) / 0.25, atol=1e-6)


def test_random_crops_are_seeded_and_cross_image_boundaries(images):
    kw = dict(tile=24, line_width=40, input_size=32, channels=1, mean=(0.5,), std=(0.25,), n_random=200)
    a, b = StripTiles(images, seed=4, **kw), StripTiles(images, seed=4, **kw)
    assert a.index == b.index and len(a) == 200 and a[0]["image"].shape == (1, 32, 32)
    from models.data import load_image

    heights = [to_line_width(load_image(s.path, 1), 40).shape[0] for s in images]
    order = np.random.default_rng(4).permutation(len(images))
    bounds = np.cumsum([heights[i] for i in order])[:-1]               # where one image ends on the strip
    ys = np.array([y for _, y, _ in a.index])
    assert a.lines == sum(heights) and ys.min() >= 0 and ys.max() <= a.lines - 24
    crossing = [(y < bounds) & (bounds < y + 24) for y in ys]
    assert sum(c.any() for c in crossing) > 20                          # as stream tiles do


def test_train_with_tiles_records_the_geometry_and_exports_take_the_tile(tmp_path):
    from deploy import load_engine
    from export.onnx import export_onnx
    from models.synthetic import generate_dataset
    from models.train import train
    from runtime.pipeline import scale_mismatch

    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=10, n_test_good=1, n_test_defect=1,
                            size=96, seed=2)
    model, summary = train(root / "texture", model="padim", epochs=0, out=tmp_path / "m.pt", tile=48,
                           line_width=96, progress=False, log=lambda m: None)
    geo = summary["training"]
    assert geo["mode"] == "tiles" and geo["tile"] == 48 and geo["line_width"] == 96 and geo["stride"] == 36
    assert model.preprocess.input_size == 48 and geo["scale"] == 1.0
    art = export_onnx(tmp_path / "m.pt", tmp_path / "x", check=False, quiet=True)
    assert art.meta["export"]["frame_hw"] == [48, 48] and art.meta["training"] == geo
    with load_engine(art.path) as eng:
        assert scale_mismatch(eng.meta, (48, 48)) is None
        msg = scale_mismatch(eng.meta, (96, 96))
    assert msg and "0.50x" in msg and "--frame-size 48x48" in msg


def test_whole_image_training_warns_only_at_another_scale(tmp_path):
    from models.synthetic import generate_dataset
    from models.train import train
    from runtime.pipeline import scale_mismatch

    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=6, n_test_good=1, n_test_defect=1,
                            size=160, seed=2)
    model, summary = train(root / "texture", model="padim", epochs=0, config={"input_size": 64}, progress=False,
                           log=lambda m: None)
    geo = summary["training"]
    assert geo["mode"] == "whole" and geo["native_median_hw"] == [160, 160] and geo["scale"] == pytest.approx(0.4)
    meta = {"training": geo, "preprocess": model.preprocess.to_dict()}
    assert scale_mismatch(meta, (160, 160)) is None           # 160 px tiles: as trained
    assert "2.50x" in scale_mismatch(meta, (64, 64))          # 64 px native tiles: parts 2.5x larger
