"""models.validation + synthetic.paste_defect: the held-out + synthetic-defect set recipes are chosen on."""
import numpy as np
import pytest
import torch

from models import padim as P
from models.data import make_datasets, resize_image
from models.evaluate import main as evaluate_main
from models.synthetic import DEFECT_TYPES, DEFECTS, generate_dataset, paste_defect
from models.train import train
from models.validation import SyntheticDefectDataset, validation_dataset


def _gray_photo(size=64, seed=0):
    rng = np.random.default_rng(seed)
    g = (120 + 30 * rng.standard_normal((size, size))).clip(0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_paste_defect_changes_only_masked_pixels_and_opacity_scales_the_change(defect):
    img = _gray_photo()
    strong, m1 = paste_defect(img, defect, np.random.default_rng(5), opacity=1.0)
    faint, m2 = paste_defect(img, defect, np.random.default_rng(5), opacity=0.25)
    assert np.array_equal(m1, m2) and m1.dtype == np.uint8 and m1.any()
    inside = m1.astype(bool)
    for out in (strong, faint):
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.array_equal(out[~inside], img[~inside])           # nothing outside the mask moves
    d_strong = np.abs(strong.astype(int) - img)[inside].mean()
    d_faint = np.abs(faint.astype(int) - img)[inside].mean()
    # alpha blending: the faint change is a quarter of the strong one (up to rounding)
    assert d_faint == pytest.approx(0.25 * d_strong, abs=1.0) and d_strong > 8
    # gray in, gray out
    assert (faint[:, :, 0] == faint[:, :, 1]).all() and (faint[:, :, 1] == faint[:, :, 2]).all()


def test_paste_defect_rejects_bad_input():
    with pytest.raises(ValueError, match="square uint8"):
        paste_defect(np.zeros((10, 12, 3), np.uint8), "hole", np.random.default_rng(0))
    with pytest.raises(ValueError, match="opacity"):
        paste_defect(_gray_photo(32), "hole", np.random.default_rng(0), opacity=0.0)
    with pytest.raises(ValueError, match="scratch"):
        paste_defect(_gray_photo(32), "dent", np.random.default_rng(0))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("val") / "d", classes=("texture", "object"), n_train=20,
                            n_test_good=2, n_test_defect=2, size=64, seed=1)


def test_validation_set_is_held_out_normals_plus_deterministic_defect_copies(synth):
    from models.base import PreprocessConfig

    pp = PreprocessConfig(input_size=48)
    ds = validation_dataset(synth, pp, val_fraction=0.2, seed=3, per_image=2, opacity=(0.5, 0.5))
    _, val_ds, _, names = make_datasets(synth, None, pp, 0.2, 3, require_test=False)
    assert len(val_ds) == 8 and len(ds) == 3 * len(val_ds) and ds.class_names == names
    assert ds.labels.tolist() == [0, 1, 1] * len(val_ds)
    again = validation_dataset(synth, pp, val_fraction=0.2, seed=3, per_image=2, opacity=(0.5, 0.5))
    for k in range(len(val_ds)):
        ref = val_ds[k]
        normal = ds[3 * k]
        # the normal items are exactly the held-out images the trainer calibrates on
        assert torch.equal(normal["image"], ref["image"]) and not normal["mask"].any()
        assert normal["class_id"] == ref["class_id"] and normal["label"] == 0
        raw = resize_image(val_ds.load_raw(k)[0], 48)
        types = set()
        for j in (1, 2):
            item = ds[3 * k + j]
            assert torch.equal(item["image"], again[3 * k + j]["image"])     # same arguments, same set
            m = item["mask"][0].bool()
            assert item["label"] == 1 and m.any()
            # an independent reconstruction of the copy: the same generator seed, the same paste
            rng = np.random.default_rng([3, k, j])
            d = DEFECTS[(k + j - 1) % len(DEFECTS)]
            rgb = np.repeat(raw, 3, axis=2) if raw.shape[2] == 1 else raw
            want, wmask = paste_defect(np.ascontiguousarray(rgb), d, rng, float(rng.uniform(0.5, 0.5)))
            assert np.array_equal(wmask.astype(bool), m.numpy())
            x = (want.astype(np.float32).transpose(2, 0, 1) / 255.0 - val_ds.mean) / val_ds.std
            np.testing.assert_allclose(item["image"].numpy(), x, atol=1e-6)
            types.add(ds.samples[3 * k + j].defect_type)
        assert len(types) == 2                                  # two different defect types per image


def test_crack_probe_draws_only_thin_dark_lines(synth):
    from models.base import PreprocessConfig

    pp = PreprocessConfig(input_size=64)
    ds = validation_dataset(synth, pp, val_fraction=0.2, seed=3, defects=("crack",), opacity=(1.0, 1.0))
    default = validation_dataset(synth, pp, val_fraction=0.2, seed=3, opacity=(1.0, 1.0))
    assert len(ds) == len(default) and {s.defect_type for s in ds.samples if s.label} == {"synthetic_crack"}
    area = {"crack": [], "scratch": []}
    for i, s in enumerate(ds.samples):
        if s.label:
            item = ds[i]
            m = item["mask"][0].bool()
            normal = ds[i - 1 if ds.samples[i - 1].label == 0 else i - 2]
            assert (item["image"][:, m] < normal["image"][:, m]).all()     # darker on every mask pixel
            area["crack"].append(int(m.sum()))
    for i, s in enumerate(default.samples):
        if s.defect_type == "synthetic_scratch":
            area["scratch"].append(int(default[i]["mask"].sum()))
    # one pixel wide: a fraction of a scratch's area
    assert area["scratch"] and np.mean(area["crack"]) < 0.5 * np.mean(area["scratch"])


def test_validation_set_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        validation_dataset("unused", None, val_fraction=0.0)
    with pytest.raises(ValueError, match="opacity"):
        SyntheticDefectDataset(type("D", (), {"class_names": [], "samples": []})(), opacity=(0.5, 0.2))


def test_train_summary_and_evaluate_cli_report_validation_metrics(synth, tmp_path, capsys):
    out = tmp_path / "padim.pt"
    cfg = P.PadimConfig(input_size=64, n_features=32).to_dict()
    _, summary = train(synth, model="padim", out=out, config=cfg, val_fraction=0.2, seed=2, progress=False,
                       log=lambda m: None)
    v = summary["validation"]
    assert v["n_images"] == 3 * summary["val_images"]
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= v[k] <= 1.0
    # independent recomputation: the saved model on each validation item alone, sklearn's AUROC
    from sklearn.metrics import roc_auc_score

    from models.checkpoint import load_checkpoint

    model = load_checkpoint(out)
    ds = validation_dataset(synth, model.preprocess, val_fraction=0.2, seed=2)
    with torch.no_grad():
        scores = [float(model(ds[i]["image"][None])[1]) for i in range(len(ds))]
    cids, scores = np.array([s.class_id for s in ds.samples]), np.array(scores)
    per_class = [roc_auc_score(ds.labels[cids == c], scores[cids == c]) for c in (0, 1)]
    assert v["image_auroc"] == pytest.approx(np.mean(per_class), abs=1e-9)      # mean over classes
    assert v["image_auroc"] > 0.5                 # faint defects, 16 images per class: above chance
    # the CLI rebuilds the same set from the checkpoint's val_fraction / seed and gets the same numbers
    assert evaluate_main(["--ckpt", str(out), "--data", str(synth), "--val-synthetic", "--no-progress",
                          "--out", str(tmp_path / "ev")]) == 0
    import json

    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_images"] == v["n_images"] and m["split"].startswith("validation")
    assert m["mean"]["image_auroc"] == pytest.approx(v["image_auroc"], abs=1e-9)
    assert m["mean"]["pixel_auroc"] == pytest.approx(v["pixel_auroc"], abs=1e-9)
    assert "I-AUROC" in capsys.readouterr().out
    # --val-defects: the crack probe scores the same held-out images with crack copies only
    assert evaluate_main(["--ckpt", str(out), "--data", str(synth), "--val-synthetic", "--val-defects", "crack",
                          "--val-opacity", "0.5,0.9", "--no-progress", "--out", str(tmp_path / "cr")]) == 0
    c = json.loads((tmp_path / "cr" / "metrics.json").read_text())
    assert c["n_images"] == v["n_images"]
    assert {t for cls in c["per_type"].values() for t in cls} == {"good", "synthetic_crack"}
    ds = validation_dataset(synth, model.preprocess, val_fraction=0.2, seed=2, defects=("crack",),
                            opacity=(0.5, 0.9))
    with torch.no_grad():
        scores = np.array([float(model(ds[i]["image"][None])[1]) for i in range(len(ds))])
    per_class = [roc_auc_score(ds.labels[cids == c], scores[cids == c]) for c in (0, 1)]
    assert c["mean"]["image_auroc"] == pytest.approx(np.mean(per_class), abs=1e-9)
    capsys.readouterr()
    base = ["--ckpt", str(out), "--data", str(synth), "--no-progress"]
    for bad in (["--val-synthetic", "--val-defects", "dent"], ["--val-synthetic", "--val-defects", ","],
                ["--val-defects", "crack"],                    # an unknown type, none, or without the split
                ["--val-synthetic", "--val-opacity", "0.5"], ["--val-synthetic", "--val-opacity", "0,1"],
                ["--val-synthetic", "--val-opacity", "a,b"], ["--val-opacity", "0.2,0.3"]):
        with pytest.raises(SystemExit) as e:
            evaluate_main(base + bad)
        assert e.value.code == 2 and bad[-2] in capsys.readouterr().err
