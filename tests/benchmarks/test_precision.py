"""benchmarks/precision.py: the AUROCs it reports equal sklearn on ONNX Runtime outputs computed here
independently (own image loading, own sessions); fp32 is its own reference; clear input errors."""
import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmarks import precision as P
from deploy.ort import int8_as_written, ort_session_options

SIZE = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny PaDiM (random encoder, Gaussians fitted on the synthetic train images) and its data."""
    from models import create_model
    from models.checkpoint import save_checkpoint
    from models.data import load_image, scan_mvtec
    from models.synthetic import generate_dataset

    tmp = tmp_path_factory.mktemp("precision")
    data = generate_dataset(tmp / "syn", classes=("texture",), n_train=8, n_test_good=5, n_test_defect=6,
                            size=64, seed=3) / "texture"
    torch.manual_seed(0)
    model = create_model("padim", pretrained=False, input_size=SIZE, n_features=16).eval()
    train, _ = scan_mvtec(data, split="train")
    imgs = np.stack([cv2.resize(load_image(s.path, 3), (SIZE, SIZE), interpolation=cv2.INTER_AREA) for s in train])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess.std).view(1, 3, 1, 1)
    model.prepare([(x - mean) / std])
    ckpt = save_checkpoint(model, tmp / "model.pt")
    out = tmp / "out"
    rc = P.main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--json", str(tmp / "r.json"),
                 "--n-calib", "6", "--calib-method", "percentile", "--calib-percentile", "99.9", "--no-progress"])
    assert rc == 0
    return ckpt, data, out, json.loads((tmp / "r.json").read_text())


def _own_test_set(data, channels):
    """Independent loading: every test image, its mask (0 for good), its label from the folder name."""
    frames, masks, labels = [], [], []
    for img_path in sorted((data / "test").rglob("*.png")):
        defect = img_path.parent.name
        flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
        img = cv2.imread(str(img_path), flag)
        if channels == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        frames.append(cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA).reshape(SIZE, SIZE, channels))
        if defect == "good":
            masks.append(np.zeros((SIZE, SIZE), np.uint8))
        else:
            m = cv2.imread(str(data / "ground_truth" / defect / f"{img_path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
            masks.append((cv2.resize(m, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8))
        labels.append(int(defect != "good"))
    return np.stack(frames), np.stack(masks), np.array(labels)


def test_reported_aurocs_equal_sklearn_on_ort_outputs(setup):
    _, data, _, res = setup
    frames, masks, labels = _own_test_set(data, res["frame_channels"])
    assert res["n_test"] == len(labels) == res["n_available"] and res["n_defect"] == labels.sum()
    rows = {r["precision"]: r for r in res["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8"]
    for prec, r in rows.items():
        so = ort_session_options(exact_int8=int8_as_written(prec))   # the session deploy.ort.OrtEngine opens
        sess = ort.InferenceSession(r["onnx"], so, providers=["CPUExecutionProvider"])
        maps, scores = zip(*(sess.run(["anomaly_map", "score"], {"frames": frames[i:i + 1]})
                             for i in range(len(frames))))            # batch 1 here, batch 8 there
        scores = np.concatenate([np.ravel(s) for s in scores])
        maps = np.concatenate([m[:, 0] for m in maps])
        img = 100 * roc_auc_score(labels, scores)
        pix = 100 * roc_auc_score(masks.ravel(), maps.ravel())
        assert r["image_auroc"] == pytest.approx(img, abs=1e-6), prec
        assert r["pixel_auroc"] == pytest.approx(pix, abs=1e-4), prec
        assert r["s_per_image"] > 0
    assert rows["fp32"]["d_image"] == 0 and rows["fp32"]["d_pixel"] == 0
    for prec in ("fp16", "int8"):
        assert rows[prec]["d_image"] == pytest.approx(rows[prec]["image_auroc"] - rows["fp32"]["image_auroc"])
        assert rows[prec]["d_pixel"] == pytest.approx(rows[prec]["pixel_auroc"] - rows["fp32"]["pixel_auroc"])


def test_int8_options_reach_the_graph_and_the_report(setup):
    _, _, out, res = setup
    info = {r["precision"]: r for r in res["rows"]}["int8"]["precision_info"]
    assert info["method"] == "percentile" and info["percentile"] == 99.9 and info["calib_frames"] == 6
    assert res["int8_options"] == {"calib_method": "percentile", "calib_percentile": 99.9, "n_calib": 6}
    md = (out / "precision.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 3 and len({ln.count("|") for ln in table}) == 1
    assert "percentile p99.9" in md and "mixed fp16:" in md and "Command: `python benchmarks/precision.py --ckpt" in md


def test_missing_inputs_are_one_clear_error(setup, tmp_path, capsys):
    ckpt, data, _, _ = setup
    assert P.main(["--ckpt", str(tmp_path / "nope.pt"), "--data", str(data), "--no-progress"]) == 2
    assert "--ckpt:" in capsys.readouterr().err
    assert P.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "nodata"), "--no-progress",
                   "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "--data:" in err and "nodata" in err and "Traceback" not in err
    assert P.main(["--ckpt", str(ckpt), "--data", str(data), "--precision", "fp32,int4", "--no-progress"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert P.main(["--ckpt", str(ckpt), "--data", str(data), "--calib", str(tmp_path / "nocalib"),
                   "--no-progress"]) == 2
    assert "--calib:" in capsys.readouterr().err


def test_reused_fp32_graph_and_seeded_subset(setup, tmp_path):
    ckpt, data, out, full = setup
    rc = P.main(["--ckpt", str(ckpt), "--data", str(data), "--onnx-fp32", str(out / "model.onnx"), "--precision",
                 "int8", "--limit", "8", "--seed", "1", "--out", str(tmp_path), "--int8-fp32-consumers", "qdq",
                 "--n-calib", "4", "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "precision.json").read_text())
    assert [r["precision"] for r in res["rows"]] == ["fp32", "int8"]      # fp32 always measured as the reference
    assert res["rows"][0]["onnx"] == str(out / "model.onnx") and res["n_test"] == 8 and res["n_available"] == 11
    assert res["rows"][1]["precision_info"]["fp32_consumers"] == "qdq"
    frames, masks, labels = _own_test_set(data, res["frame_channels"])
    pick = sorted(np.random.default_rng(1).choice(len(labels), 8, replace=False))   # the documented subset
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    maps, scores = sess.run(["anomaly_map", "score"], {"frames": frames[pick]})
    assert res["rows"][0]["image_auroc"] == pytest.approx(100 * roc_auc_score(labels[pick], np.ravel(scores)))
    assert res["rows"][0]["pixel_auroc"] == pytest.approx(
        100 * roc_auc_score(masks[pick].ravel(), maps[:, 0].ravel()), abs=1e-4)
