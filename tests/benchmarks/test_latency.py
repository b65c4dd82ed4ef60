"""benchmarks/latency.py: --quick on CPU gives complete rows, reasons for what did not run, the
written files, and --compare ratios computed from the two JSONs."""
import csv
import json
import subprocess
import sys

import pytest

from benchmarks import latency
from benchmarks.backends import BACKENDS, ort_op_profile


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # padim as the benchmarked model keeps the ONNX export to seconds; dvad's takes a minute here
    rc = latency.main(["--quick", "--model", "padim", "--size", "40", "--out", str(out), "--no-progress",
                       "--ort-threads", "1", "--ort-profile", "2", "--precision", "fp32,int8"])
    assert rc == 0
    return out, json.loads((out / "latency.json").read_text())


def test_quick_json_has_every_field_for_each_backend_it_ran(quick_run):
    out, res = quick_run
    assert res["schema"] == latency.SCHEMA
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    ran = {r["backend"] for r in ok}
    assert {"torch", "padim", "ort-cpu"} <= ran      # eager reference, PaDiM reference, ORT CPU
    for r in ok:
        missing = [k for k in latency.ROW_FIELDS if k not in r]
        assert not missing, (r["backend"], missing)
        assert r["n"] == res["settings"]["reps"] and r["batch"] == 1 and r["device"] == "cpu"
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["images_per_s"] == pytest.approx(1000.0 / r["median_ms"])
        assert r["load_s"] >= 0 and r["first_call_ms"] > 0
        assert r["host_infer_peak_mib"] is not None and r["host_mem_method"] != "unavailable"
    by = {r["backend"]: r for r in ok if r["precision"] == "fp32"}
    # exported graph reproduces the eager scores of the same frames
    assert by["ort-cpu"]["score_max_abs_diff"] < 1e-3
    assert by["torch"]["score_max_abs_diff"] == 0.0


def test_quick_lists_what_did_not_run_with_a_reason(quick_run):
    _, res = quick_run
    rows = res["rows"]
    listed = {r["backend"] for r in rows}
    assert set(BACKENDS) <= listed                   # nothing silently dropped
    for r in rows:
        if r["status"] != "ok":
            assert isinstance(r["reason"], str) and len(r["reason"]) > 10, r
    by = {r["backend"]: r for r in rows if r["precision"] == "fp32"}
    assert "--device cpu" in by["ort-cuda"]["reason"] or "CUDA" in by["ort-cuda"]["reason"]
    assert "--quick" in by["torch-compile"]["reason"]
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is None:   # the machine's own lack is named, not hidden
        assert "tensorrt" in by["tensorrt"]["reason"]
    if not torch.cuda.is_available():
        assert "CUDA device" in by["tensorrt"]["reason"] and "CUDA device" in by["ort-cuda"]["reason"]
    assert res["jetson"] == "not available" or "nvpmodel" in res["jetson"]
    assert res["host"]["cpu_count"] >= 1


def test_quick_writes_csv_png_markdown(quick_run):
    out, res = quick_run
    with open(out / "latency.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res["rows"])
    ok_csv = [r for r in rows if r["status"] == "ok"]
    ok_json = [r for r in res["rows"] if r["status"] == "ok"]
    for c, j in zip(ok_csv, ok_json):
        assert float(c["median_ms"]) == pytest.approx(j["median_ms"])
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "latency.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(ok_json) and "Machine:" in md and "Command:" in md
    assert len({ln.count("|") for ln in table}) == 1      # every row has the header's cell count


def _result(rows):
    return {"schema": latency.SCHEMA, "rows": rows}


def _row(backend, batch, median, p99, status="ok", precision="fp32", device="cpu"):
    return {"backend": backend, "precision": precision, "batch": batch, "device": device,
            "status": status, "median_ms": median, "p99_ms": p99,
            "images_per_s": batch * 1000.0 / median}


def test_compare_ratios():
    old = _result([_row("torch", 1, 10.0, 14.0), _row("ort", 1, 4.0, 5.0), _row("ort", 8, 20.0, 30.0),
                   _row("trt", 1, 1.0, 1.0)])
    new = _result([_row("torch", 1, 12.5, 21.0), _row("ort", 1, 3.0, 4.5), _row("ort", 8, 20.0, 24.0),
                   _row("aoti", 1, 2.0, 2.0), _row("trt", 1, 1.0, 1.0, status="unavailable"),
                   _row("ort", 1, 9.0, 9.0, precision="int8")])
    got = {(c["backend"], c["batch"]): c for c in latency.compare_results(new, old)}
    assert set(got) == {("torch", 1), ("ort", 1), ("ort", 8)}   # unmatched / not-ok rows left out
    assert got[("torch", 1)]["latency_ratio"] == pytest.approx(1.25)
    assert got[("torch", 1)]["speedup"] == pytest.approx(0.8)
    assert got[("torch", 1)]["throughput_ratio"] == pytest.approx(0.8)
    assert got[("torch", 1)]["p99_ratio"] == pytest.approx(1.5)
    assert got[("ort", 1)]["speedup"] == pytest.approx(4.0 / 3.0)
    assert got[("ort", 8)]["latency_ratio"] == pytest.approx(1.0)
    assert got[("ort", 8)]["p99_ratio"] == pytest.approx(0.8)


def test_compare_cli_prints_ratios_against_an_earlier_run(quick_run, tmp_path):
    out, res = quick_run
    old = json.loads((out / "latency.json").read_text())
    for r in old["rows"]:   # pretend the earlier run was exactly twice as slow
        if r["status"] == "ok":
            for k in ("median_ms", "p90_ms", "p99_ms"):
                r[k] *= 2
            r["images_per_s"] /= 2
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    cmp = latency.compare_results(res, old)
    assert len(cmp) == sum(r["status"] == "ok" for r in res["rows"])
    for c in cmp:
        assert c["latency_ratio"] == pytest.approx(0.5) and c["speedup"] == pytest.approx(2.0)
    # and the CLI refuses a foreign JSON with one clear message
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    p = subprocess.run([sys.executable, "benchmarks/latency.py", "--quick", "--compare", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "schema" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--backends", "torch,tpu"], "--backends"),
    (["--batch", "1,zero"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--precision", "fp8"], "--precision"),
    (["--device", "tpu"], "--device"),
    (["--ort-threads", "-1"], "--ort-threads"),
    (["--ort-profile", "-2"], "--ort-profile"),
])
def test_bad_arguments_give_one_clear_error(argv, needle):
    a = latency.parse_args(argv)
    with pytest.raises(latency.BenchError, match=needle):
        latency.settings_from_args(a)


def test_bad_checkpoint_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert latency.main(["--ckpt", str(bad), "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ckpt" in err and str(bad) in err


def test_quick_run_uses_ort_threads_and_profiles_each_ort_row(quick_run):
    _, res = quick_run
    ort_row = next(r for r in res["rows"] if r["backend"] == "ort-cpu" and r["status"] == "ok")
    assert "1 intra-op thread(s)" in ort_row["notes"]
    prof = res["ort_profiles"]["ort-cpu/fp32/b1"]
    assert prof["runs"] == 2 and prof["threads"] == 1 and prof["kernel_ms"] > 0
    assert sum(o["share"] for o in prof["ops"]) == pytest.approx(1.0)
    assert sum(o["ms"] for o in prof["ops"]) == pytest.approx(prof["kernel_ms"])


def test_ort_op_profile_counts_the_graphs_nodes_per_call(tmp_path):
    """A hand-made graph (3 Exp, 1 Mul): per-call node counts and op types come out exact, so
    warm-up calls are excluded and times are per call."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Exp", ["x"], ["a"]), helper.make_node("Exp", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "x"], ["c"]), helper.make_node("Exp", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4096])])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32) * 0.1
    prof = ort_op_profile(path, x, runs=4, threads=1)
    assert {o["op"]: o["nodes"] for o in prof["ops"]} == {"Exp": 3, "Mul": 1}
    assert prof["ops"][0]["op"] == "Exp"          # 3 passes over the tensor vs 1
    assert all(o["ms"] > 0 for o in prof["ops"])


def test_ort_int8_row_runs_the_static_qdq_graph_of_export_trt(quick_run):
    """The INT8 row benchmarks the deployed INT8 artifact (explicit Q/DQ with static ranges, as
    `export.trt --precision int8` writes it) and stays close to the fp32 scores."""
    _, res = quick_run
    rows = [r for r in res["rows"] if r["backend"] == "ort-cpu" and r["precision"] == "int8"]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    assert "static Q/DQ" in rows[0]["notes"], rows[0]["notes"]
    fp32 = next(r for r in res["rows"] if r["backend"] == "ort-cpu" and r["precision"] == "fp32")
    # int8 rounding moves the scores a little (not 0); a broken graph moves them a lot
    assert fp32["score_max_abs_diff"] < rows[0]["score_max_abs_diff"] < 0.05   # measured 3e-4
