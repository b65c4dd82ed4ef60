"""models.evaluate: per-class metrics equal sklearn on the model's own outputs; JSON; overlays; CLI."""
import json

import numpy as np
import pytest
import torch

from models import dvad as D
from models.checkpoint import load_checkpoint
from models.data import AnomalyDataset, scan_mvtec
from models.evaluate import evaluate, main
from models.synthetic import generate_dataset
from models.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ev")
    root = generate_dataset(tmp / "data", classes=("texture", "object"), n_train=6, n_test_good=4,
                            n_test_defect=5, size=64, seed=4)
    ckpt = tmp / "model.pt"
    # one short epoch: evaluation plumbing is under test here, not the model's quality
    train(root, model="dvad", epochs=1, out=ckpt, batch_size=4, config=D.DVADConfig.tiny().to_dict(),
          progress=False, log=lambda m: None)
    return root, ckpt, tmp


def test_metrics_match_sklearn_and_files_are_written(setup):
    from sklearn.metrics import average_precision_score, roc_auc_score

    root, ckpt, tmp = setup
    out = tmp / "eval"
    res = evaluate(ckpt, root, out, n_overlays=2, progress=False)
    # independent recomputation: the model on each test image alone, sklearn on the results
    model = load_checkpoint(ckpt)
    pp = model.preprocess
    samples, names = scan_mvtec(root, None, "test")
    ds = AnomalyDataset(samples, pp.input_size, pp.channels, pp.mean, pp.std, class_names=names)
    assert names == ["object", "texture"] and res["n_images"] == len(ds) == 18
    per = {n: dict(s=[], y=[], maps=[], masks=[]) for n in names}
    pixels_of = {}      # sample path -> (map, mask), for the per-type pixel metrics
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            amap, score = model(item["image"][None])
            d = per[names[item["class_id"]]]
            d["s"].append(float(score))
            d["y"].append(item["label"])
            d["maps"].append(amap[0, 0].numpy().ravel())
            d["masks"].append(item["mask"][0].numpy().ravel() > 0.5)
            pixels_of[ds.samples[i].path] = (d["maps"][-1], d["masks"][-1])
    for n in names:
        d = per[n]
        got = res["per_class"][n]
        assert got["image_auroc"] == pytest.approx(roc_auc_score(d["y"], d["s"]), abs=1e-6)
        assert got["image_ap"] == pytest.approx(average_precision_score(d["y"], d["s"]), abs=1e-6)
        m, k = np.concatenate(d["maps"]), np.concatenate(d["masks"])
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(k, m), abs=2e-3)
        assert 0.0 <= got["pixel_aupro"] <= 1.0
    assert res["mean"]["image_auroc"] == pytest.approx(
        np.mean([res["per_class"][n]["image_auroc"] for n in names]), abs=1e-9)
    # per defect type: each type's images against the class's normal ones, sklearn on the same scores
    thr = model.score_stats.threshold
    by_path = dict(zip([ds.samples[int(j)].path for j in res["scores"]["index"]], res["scores"]["score"]))
    n_types = 0
    for n in names:
        good = [by_path[s.path] for s in samples if s.class_name == n and s.label == 0]
        types = {s.defect_type for s in samples if s.class_name == n}
        assert set(res["per_type"][n]) == types and "good" in types and len(types) > 2
        for t in types:
            sc = [by_path[s.path] for s in samples if s.class_name == n and s.defect_type == t]
            got = res["per_type"][n][t]
            assert got["n"] == len(sc) and got["flagged"] == pytest.approx(np.mean(np.array(sc) >= thr))
            if t == "good":
                assert np.isnan(got["image_auroc"]) and np.isnan(got["pixel_auroc"])
            else:
                ref = roc_auc_score([0] * len(good) + [1] * len(sc), good + sc)
                assert got["image_auroc"] == pytest.approx(ref, abs=1e-9)
                # pixels: this type's defect pixels against every normal pixel of its and the normal images
                px = [pixels_of[s.path] for s in samples if s.class_name == n and s.defect_type in (t, "good")]
                m, k = np.concatenate([p[0] for p in px]), np.concatenate([p[1] for p in px])
                assert got["pixel_auroc"] == pytest.approx(roc_auc_score(k, m), abs=2e-3)
                assert 0.0 <= got["pixel_aupro"] <= 1.0
                n_types += 1
            assert f"{n}/{t}" in res["type_table"]
    assert n_types >= 4
    t = res["threshold"]
    assert t["tp"] + t["fp"] + t["tn"] + t["fn"] == 18 and t["tp"] + t["fn"] == 10
    # JSON written and equal to the returned numbers
    saved = json.loads((out / "metrics.json").read_text())
    for n in names:
        for key, v in res["per_class"][n].items():
            if isinstance(v, float) and not np.isnan(v):
                assert saved["per_class"][n][key] == pytest.approx(v)
    # overlays: worst/best x good/defect, 2 each; caption over three panels at the input size
    cv2 = pytest.importorskip("cv2")
    assert len(res["overlays"]) == 8
    kinds = sorted(p.split("/")[-1].split("_")[0] + "_" + p.split("/")[-1].split("_")[1] for p in res["overlays"])
    assert kinds == ["best_defect"] * 2 + ["best_good"] * 2 + ["worst_defect"] * 2 + ["worst_good"] * 2
    for p in res["overlays"]:
        img = cv2.imread(p)
        assert img is not None and img.shape[1:] == (192, 3) and 64 < img.shape[0] < 96
    # the worst normal image really is the highest-scored normal one
    sc = np.array(res["scores"]["score"])
    lab = np.array(res["scores"]["label"])
    worst_good = [p for p in res["overlays"] if "/worst_good_" in p][0]
    top = int(np.array(res["scores"]["index"])[lab == 0][np.argmax(sc[lab == 0])])
    assert ds.samples[top].path.stem in worst_good


def test_cli(setup, capsys, tmp_path):
    root, ckpt, _ = setup
    assert main(["--ckpt", str(ckpt), "--data", str(root), "--classes", "texture", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "texture" in out and "object" not in out and "threshold" in out and "texture/good" in out
    bad = tmp_path / "nope.pt"
    assert main(["--ckpt", str(bad), "--data", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_overlay_types_draw_the_defective_overlays_from_those_types(setup, capsys, tmp_path):
    root, ckpt, _ = setup
    samples, _ = scan_mvtec(root, None, "test")
    t = sorted({s.defect_type for s in samples if s.label == 1})[0]
    of_t = [s for s in samples if s.defect_type == t]
    assert 2 <= len(of_t) < sum(s.label for s in samples)
    out = tmp_path / "ev"
    assert main(["--ckpt", str(ckpt), "--data", str(root), "--out", str(out), "--overlays", "2",
                 "--overlay-types", t, "--no-progress"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    defect = [p.split("/")[-1] for p in res["overlays"] if "_defect_" in p.split("/")[-1]]
    assert len(defect) == 4 and all(f"_{t}_" in p for p in defect)
    # the worst one is the lowest-scored image of that type
    score = dict(zip(res["scores"]["index"], res["scores"]["score"]))
    low = min((score[samples.index(s)], s.path.stem) for s in of_t)[1]
    assert any(p.startswith("worst_defect_") and low in p for p in defect)
    capsys.readouterr()
    assert main(["--ckpt", str(ckpt), "--data", str(root), "--overlay-types", "nonesuch", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nonesuch" in err[0] and t in err[0]
