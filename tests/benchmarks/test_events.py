"""benchmarks/events.py on the synthetic set with the strip test model: rows at the default and the
calibrated threshold, a curve whose recall never rises with the threshold, the three files."""
import json

import pytest

from benchmarks import events


@pytest.fixture(scope="module")
def synthetic_class(tmp_path_factory):
    from models.synthetic import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("syn_events"), classes=("texture",), n_train=20,
                            n_test_good=5, n_test_defect=5, size=96, seed=7)
    return root / "texture"


def test_events_benchmark_writes_rows_curve_and_plot(onnx_artifact, synthetic_class, tmp_path):
    rc = events.main(["--artifact", f"padim={onnx_artifact}", "--data", str(synthetic_class), "--width", "128",
                      "--target-per-100-good", "20", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "events.json").read_text())
    (r,) = res["results"]
    assert set(r["rows"]) >= {"default", "calibrated"} and r["tile"] == [64, 64]
    cal = r["rows"]["calibrated"]
    assert cal["normal_measured"] <= 20.0 and cal["good_images"] == 5 and cal["defective_images"] == 5
    curve = sorted(r["curve"], key=lambda c: c["threshold"])
    recalls = [c["recall"] for c in curve]
    assert all(a >= b - 1e-12 for a, b in zip(recalls, recalls[1:])), recalls   # higher threshold, no more recall
    assert (tmp_path / "events.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "events.md").read_text()
    assert "| padim | 128 | 64 | default |" in md and "| padim | 128 | 64 | calibrated |" in md


def test_bad_data_is_one_clear_error(onnx_artifact, tmp_path, capsys):
    assert events.main(["--artifact", str(onnx_artifact), "--data", str(tmp_path), "--no-calibration",
                        "--out", str(tmp_path / "o")]) == 2
    assert "test/" in capsys.readouterr().err
