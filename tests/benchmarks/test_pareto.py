"""benchmarks/pareto.py on a tiny synthetic set: one run trains / evaluates / exports / times every
model; accuracy equals models.evaluate on the same checkpoint; the front is the non-dominated set."""
import json

import pytest

from benchmarks import pareto


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from models.synthetic import generate_dataset
    from models.train import train

    tmp = tmp_path_factory.mktemp("pareto")
    root = generate_dataset(tmp / "data", classes=("texture",), n_train=12, n_test_good=4, n_test_defect=4,
                            size=64, seed=3)
    quiet = dict(progress=False, log=lambda m: None, validate=False)
    train(root, model="padim", out=tmp / "padim.pt", config={"input_size": 64, "n_features": 16}, **quiet)
    train(root, model="patchcore", out=tmp / "pc.pt", config={"input_size": 64, "coreset_ratio": 0.1}, **quiet)
    return root, tmp


def test_pareto_front_is_the_non_dominated_set():
    pts = [(0.9, 10.0), (0.8, 5.0), (0.85, 12.0), (0.9, 10.0), (0.95, 30.0), (0.7, 5.0)]
    # (0.85, 12) is beaten by (0.9, 10); (0.7, 5) by (0.8, 5); equal points do not dominate each other
    assert pareto.pareto_front(pts) == [True, True, False, True, True, False]


def test_one_run_gives_table_json_and_plot(setting, tmp_path, capsys):
    from models.evaluate import evaluate

    root, tmp = setting
    out = tmp_path / "out"
    rc = pareto.main(["--data", str(root), "--ckpt", f"padim={tmp / 'padim.pt'}", "--ckpt", str(tmp / "pc.pt"),
                      "--out", str(out), "--reps", "3", "--warmup", "1"])
    assert rc == 0
    res = json.loads((out / "pareto.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"padim", "patchcore (efficientnet_lite0)"}
    for name, ck in (("padim", "padim.pt"), ("patchcore (efficientnet_lite0)", "pc.pt")):
        r = rows[name]
        assert r["status"] == "ok" and r["n"] >= 3 and 0 < r["median_ms"] <= r["p90_ms"]
        assert r["parity"] is True and (out / "onnx" / ck.split(".")[0] / "model.onnx").is_file()
        ref = evaluate(tmp / ck, root, progress=False)["mean"]          # independent: the library call
        for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "mad"):
            assert r[k] == pytest.approx(ref[k], abs=1e-9)
    front = pareto.pareto_front([(r["image_auroc"], r["median_ms"]) for r in res["rows"]])
    assert [r["pareto"] for r in res["rows"]] == front and any(front)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "pareto.md").read_text()
    assert md.count("\n| ") == 2 + 2 and "| padim |" in md                # header, rule, one row a model
    assert "| padim |" in capsys.readouterr().out


def test_train_entry_trains_once_and_reuses(setting, tmp_path, monkeypatch):
    root, _ = setting
    calls = []
    import models.train as T

    real = T.train

    def counting(*a, **kw):          # count the trainings; the tiny config keeps this one fast
        calls.append(kw.get("model"))
        kw["config"] = dict(kw.get("config") or {}, input_size=64, n_features=8)
        return real(*a, **kw)

    monkeypatch.setattr(T, "train", counting)
    (entry,) = pareto.parse_entries([], ["padim:efficientnet_lite1"])
    assert entry == dict(name=None, model="padim", encoder="efficientnet_lite1")
    path = pareto._train_missing(entry, root, tmp_path, log=lambda m: None)
    assert path == tmp_path / "padim-efficientnet_lite1.pt" and path.is_file() and calls == ["padim"]
    from models.checkpoint import load_checkpoint

    assert load_checkpoint(path).config.encoder == "efficientnet_lite1"
    assert pareto._train_missing(entry, root, tmp_path, log=lambda m: None) == path and calls == ["padim"]


@pytest.mark.parametrize("args, needle", [
    (["--ckpt", "nope.pt"], "nope.pt"),
    (["--train", "resnet"], "unknown model"),
    ([], "nothing to measure"),
])
def test_bad_entries_are_one_clear_error(setting, tmp_path, capsys, args, needle):
    root, _ = setting
    assert pareto.main(["--data", str(root), "--out", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
