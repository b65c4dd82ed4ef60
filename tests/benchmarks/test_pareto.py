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


def _result(rng, n=7):
    """A pareto.json-shaped result with random accuracies and latencies (some rows clustered)."""
    rows = []
    for i in range(n):
        ms = float(rng.uniform(5, 40)) if i % 3 else 20.0 + 0.2 * i       # every third row near 20 ms
        acc = {k: float(rng.uniform(0.6, 0.99)) for k in pareto.METRICS}
        if i % 3 == 0:
            acc["image_auroc"] = 0.84 + 0.001 * i
        rows.append(dict(name=f"model-{i}", encoder="efficientnet_lite0", status="ok", median_ms=ms, p90_ms=ms * 1.1,
                         n=30, artifact_mb=5.0, parameters=1e6, train_time_s=None, **acc))
    rows.append(dict(name="broken", encoder="efficientnet_lite0", status="error", reason="export failed",
                     artifact_mb=0.0, parameters=0, **{k: None for k in pareto.METRICS}))
    ok = rows[:-1]
    for r, f in zip(ok, pareto.pareto_front([(r["image_auroc"], r["median_ms"]) for r in ok])):
        r["pareto"] = f
    return dict(schema=pareto.SCHEMA, data="d", metric="image_auroc", reps=30, warmup=3, ort_threads=1,
                loadavg_start=[0.5, 0.5, 0.5], loadavg_end=[0.6, 0.6, 0.6], host={}, rows=rows)


def test_replot_recomputes_the_front_for_another_axis(tmp_path, capsys):
    import numpy as np

    res = _result(np.random.default_rng(11))
    src = tmp_path / "run" / "pareto.json"
    src.parent.mkdir()
    src.write_text(json.dumps(res))
    out = tmp_path / "pixel"
    assert pareto.main(["--replot", str(src), "--metric", "pixel_auroc", "--out", str(out)]) == 0
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    want = pareto.pareto_front([(r["pixel_auroc"], r["median_ms"]) for r in ok])
    assert want != [r["pareto"] for r in ok]       # the stored (image AUROC) front is not the answer
    md = (out / "pareto.md").read_text()
    assert "front = Pareto-optimal on P-AUROC" in md and md == capsys.readouterr().out.rstrip("\n") + "\n"
    for r, f in zip(ok, want):                     # the table's last column is the recomputed front
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {r['name']} |"))
        assert line.endswith("| yes |" if f else "|  |")
    assert "| broken |" in md and "export failed" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (src.parent / "pareto.png").exists()       # --out given: the run's folder is left alone


def test_labels_do_not_overlap_each_other():
    import matplotlib.pyplot as plt
    import numpy as np

    fig = pareto.figure(_result(np.random.default_rng(5), n=9))
    try:
        fig.canvas.draw()
        boxes = [t.get_window_extent() for t in fig.axes[0].texts]
        assert len(boxes) == 9
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (a, b)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("content, needle", [("{not json", "cannot read"),
                                             ('{"schema": "other"}', "not a pareto.json")])
def test_replot_of_a_bad_file_is_one_clear_error(tmp_path, capsys, content, needle):
    bad = tmp_path / "pareto.json"
    bad.write_text(content)
    assert pareto.main(["--replot", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(bad) in err[0]


def test_data_is_required_without_replot(capsys):
    assert pareto.main(["--ckpt", "x.pt"]) == 2
    assert "--data is required" in capsys.readouterr().err
