"""benchmarks/defect_types.py: per-type image AUROC equals sklearn on the saved scores, runs sharing a
name are averaged (mean, sample sd), the table and plot are written, bad input is one error (exit 2)."""
import json

import numpy as np
import pytest

from benchmarks import defect_types as DT


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from models.evaluate import evaluate
    from models.synthetic import generate_dataset
    from models.train import train

    tmp = tmp_path_factory.mktemp("types")
    root = generate_dataset(tmp / "data", classes=("object", "texture"), n_train=8, n_test_good=4,
                            n_test_defect=7, size=64, seed=5)
    train(root, model="padim", out=tmp / "padim.pt", config={"input_size": 64, "n_features": 16},
          progress=False, log=lambda m: None, validate=False)
    evaluate(tmp / "padim.pt", root, tmp / "eval", n_overlays=0, progress=False)
    return root, tmp


def _fake(path, real, rng):
    """The real result with other (random) per-image scores: a second 'seed' of another model."""
    res = json.loads(real.read_text())
    res["scores"]["score"] = rng.normal(size=len(res["scores"]["score"])).tolist()
    path.write_text(json.dumps(res))
    return res


def test_per_type_auroc_and_seed_mean_match_sklearn(setting, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from models.data import scan_mvtec

    root, tmp = setting
    real = tmp / "eval" / "metrics.json"
    rng = np.random.default_rng(0)
    fakes = [_fake(tmp_path / f"f{k}.json", real, rng) for k in range(3)]
    old = json.loads(real.read_text())      # a result written before per-type pixel metrics existed
    for types in old["per_type"].values():
        for r in types.values():
            r.pop("pixel_auroc"), r.pop("pixel_aupro")
    (tmp_path / "old.json").write_text(json.dumps(old))
    out = tmp_path / "out"
    args = ["--data", str(root), "--out", str(out), "--eval", f"padim={real}", "--eval", f"old={tmp_path / 'old.json'}"]
    args += [a for k in range(3) for a in ("--eval", f"rand={tmp_path / f'f{k}.json'}")]
    assert DT.main(args) == 0
    res = json.loads((out / "defect_types.json").read_text())
    samples, _ = scan_mvtec(root, None, "test")
    path_of = [s.path for s in samples]

    def sk(result, cls, t):
        score = dict(zip([path_of[int(i)] for i in result["scores"]["index"]], result["scores"]["score"]))
        good = [score[s.path] for s in samples if s.class_name == cls and s.label == 0]
        bad = [score[s.path] for s in samples if s.class_name == cls and s.defect_type == t]
        return roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)

    padim = json.loads(real.read_text())
    assert set(res["classes"]) == {"object", "texture"}
    for cls, c in res["classes"].items():
        assert len(c["types"]) >= 3 and "good" not in c["types"]
        rows = {r["name"]: r for r in c["rows"]}
        assert rows["padim"]["runs"] == 1 and rows["rand"]["runs"] == 3
        assert rows["padim"]["all"] == pytest.approx(padim["per_class"][cls]["image_auroc"])
        for t in c["types"]:
            assert c["n"][t] == sum(1 for s in samples if s.class_name == cls and s.defect_type == t)
            assert rows["padim"]["types"][t] == pytest.approx(sk(padim, cls, t), abs=1e-9)
            ref = [sk(f, cls, t) for f in fakes]
            assert rows["rand"]["types"][t] == pytest.approx(np.mean(ref), abs=1e-9)
            assert rows["rand"]["sd"][t] == pytest.approx(np.std(ref, ddof=1), abs=1e-9)
            # pixel AUROC: read from the saved per-type results (the fakes kept padim's maps)
            px = padim["per_type"][cls][t]["pixel_auroc"]
            assert 0.0 < px < 1.0 and rows["padim"]["pixel"]["types"][t] == pytest.approx(px)
            assert rows["rand"]["pixel"]["types"][t] == pytest.approx(px) and rows["rand"]["pixel"]["sd"][t] < 1e-12
            assert np.isnan(rows["old"]["pixel"]["types"][t]) and rows["old"]["types"][t] == rows["padim"]["types"][t]
        assert rows["old"]["pixel"]["runs"] == 0 and rows["rand"]["pixel"]["runs"] == 3
        assert rows["padim"]["pixel"]["all"] == pytest.approx(padim["per_class"][cls]["pixel_auroc"])
    text = capsys.readouterr().out
    assert "| padim | 1 |" in text and "| rand | 3 |" in text and "+-" in text
    assert text.count("Pixel AUROC (%) per defect type") == 2 and "| old | 1 | " in text and "| old | 0 | - |" in text
    assert (out / "defect_types.md").read_text() in text
    assert (out / "defect_types.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_error(setting, tmp_path, capsys):
    root, tmp = setting
    real = tmp / "eval" / "metrics.json"
    res = json.loads(real.read_text())
    short = tmp_path / "short.json"
    short.write_text(json.dumps(dict(res, scores={k: v[:-1] for k, v in res["scores"].items()})))
    val = tmp_path / "val.json"
    val.write_text(json.dumps(dict(res, split="validation (held-out normal + synthetic defects)")))
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    for bad, why in [(f"x={tmp_path / 'missing.json'}", "missing.json"), (str(real), "NAME=PATH"),
                     (f"x={junk}", "not a models.evaluate"), (f"x={short}", "not an evaluation of this data"),
                     (f"x={val}", "test split is expected")]:
        assert DT.main(["--data", str(root), "--out", str(tmp_path / "o"), "--eval", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (bad, err)
    assert DT.main(["--data", str(root), "--out", str(tmp_path / "o")]) == 2
    assert "--eval" in capsys.readouterr().err
    assert DT.main(["--data", str(tmp_path / "nodata"), "--eval", f"x={real}", "--out", str(tmp_path / "o")]) == 2
    assert "nodata" in capsys.readouterr().err
