"""benchmarks/gpu_check.py: the CPU dry run end to end (every step, test sizes), and the parts that
keep one failing step from costing the run: time limits that kill a hung step's whole process
group, the budget, the report's verdicts, the output folder's size."""
import json
import os
import pathlib
import re
import sys
import tarfile
import time

import pytest
import torch

from benchmarks import gpu_check, gpu_report
from benchmarks.gpu_check import Check, Config, Step

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(tmp_path, **kw):
    base = dict(out=tmp_path / "out", work=tmp_path / "work", budget=600.0, steps=gpu_check.SELECTABLE,
                models=("dvad",), backends=("torch",), batches="1", precisions="fp32", reps=1, warm_jobs=0,
                dry_run=True, pytest_k=None, device="cpu")
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run at its smallest: dvad only, eager only, a few of the CUDA-marked tests."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    rc = gpu_check.main(["--dry-run", "--models", "dvad", "--backends", "torch", "--batch", "1,2",
                         "--pytest-k", "triton_moe_gate or test_launch_params", "--out", str(tmp / "out"),
                         "--work", str(tmp / "work")])
    return rc, tmp / "out", json.loads((tmp / "out" / "gpu_check.json").read_text()), time.monotonic() - t0


def test_dry_run_runs_every_step_and_writes_at_most_eight_files(dry_run):
    rc, out, res, secs = dry_run
    assert rc == 0, [s for s in res["steps"] if s["status"] != "ok"]
    names = [s["name"] for s in res["steps"]]
    assert names == ["env", "tests", "models", "kernels", "latency:dvad", "stream"]
    assert all(s["status"] == "ok" and s["seconds"] <= s["limit_s"] for s in res["steps"])
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES) and len(files) <= gpu_check.MAX_OUT_FILES
    assert sum(p.stat().st_size for p in out.iterdir()) < 16 << 20
    assert res["wall_s"] <= secs + 1


def test_dry_run_figures_come_from_the_steps(dry_run):
    _, out, res, _ = dry_run
    t = res["tests"]
    assert t["passed"] >= 3 and not t["failed"] and not t["errors"]          # the -k selection ran
    assert "passed" in (out / "pytest.log").read_text()
    k = res["kernels"]
    assert k["copy"]["gbytes_per_s"] > 0 and k["triton_interpret"] == "1"
    methods = {(r["op"], r["method"]) for r in k["rows"]}
    assert {("selective_scan", "triton"), ("selective_scan", "triton_aot"), ("selective_scan", "chunked"),
            ("moe_gate", "triton"), ("moe_gate", "torch")} <= methods
    for r in k["rows"]:   # every lowering equals the float64 reference on the check's own inputs
        assert r["status"] == "ok" and r["rel_err_vs_fp64_ref"] <= 1e-5, r
    rows = {(r["backend"], r["precision"], r["batch"]): r for r in res["latency"]["dvad"]["rows"]}
    for b in (1, 2):
        assert rows[("torch", "fp32", b)]["status"] == "ok" and rows[("torch", "fp32", b)]["median_ms"] > 0
    assert rows[("torch", "fp16", None)]["status"] == "unavailable"          # said why, not dropped
    s = res["stream"]
    assert s["accounting_ok"] and s["lines_in"] == s["lines_scored"] + s["lines_dropped"] and s["lines_in"] > 0
    assert s["bare_tiles_per_s"] > 0 and s["bare_lines_per_s"] == pytest.approx(s["bare_tiles_per_s"] / s["tiles_per_line"])
    assert s["tile"] == [64, 64]
    assert res["goals"][0]["verdict"] == "**met**" and all(g["verdict"] == "n/a (dry run)" for g in res["goals"][1:])
    assert res["rerun"] is None


def test_dry_run_markdown_and_details(dry_run):
    _, out, res, _ = dry_run
    md = (out / "gpu_check.md").read_text()
    for head in ("**Dry run on the CPU**", "## Goals", "## Steps", "## Correctness on CUDA", "## Kernel speed",
                 "### dvad", "| torch (ref) | fp32 | 1 |", "## Stream"):
        assert head in md, head
    with tarfile.open(out / "details.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"latency/dvad/latency.json", "kernels.json", "stream.json", "env.json", "junit.xml",
            "logs/tests.log"} <= names
    assert not any(n.endswith((".pt", ".pt2")) for n in names)


def test_a_hung_step_is_killed_with_its_children_and_the_next_still_runs(tmp_path):
    chk = Check(_config(tmp_path))
    pid_file = tmp_path / "child.pid"
    hang = Step("hang", [sys.executable, "-c",
                         "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                         "'import time; time.sleep(120)']); open(sys.argv[1], 'w').write(str(p.pid)); "
                         "time.sleep(120)", str(pid_file)], max_s=2, est_s=1, min_s=1)
    t0 = time.monotonic()
    rec = chk.run(hang)
    assert rec["status"] == "timeout" and "2 s limit" in rec["reason"] and time.monotonic() - t0 < 15
    child = int(pid_file.read_text())
    for _ in range(50):   # the grandchild went with its process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} of the killed step still runs")
    crash = chk.run(Step("crash", [sys.executable, "-c", "raise SystemExit('boom: bad thing')"], max_s=30, est_s=1,
                         min_s=1))
    assert crash["status"] == "failed" and crash["rc"] == 1 and "boom: bad thing" in crash["reason"]
    ok = chk.run(Step("ok", [sys.executable, "-c", "print('fine')"], max_s=30, est_s=1, min_s=1))
    assert ok["status"] == "ok" and "fine" in pathlib.Path(ok["log"]).read_text()
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["timeout", "failed", "ok"]


def test_sigterm_ends_the_running_steps_and_keeps_the_report(tmp_path):
    import signal

    chk = Check(_config(tmp_path))
    r = chk.start(Step("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], max_s=300, est_s=1,
                       min_s=1))
    with pytest.raises(SystemExit) as e:
        chk._interrupted(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM and r.proc.poll() is not None
    assert chk.records["sleeper"]["status"] == "interrupted"
    assert "**Stopped: interrupted by signal" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_steps_that_no_longer_fit_the_budget_are_listed_with_a_rerun_command(tmp_path):
    chk = Check(_config(tmp_path, dry_run=False, device="cuda"))
    chk.deadline = time.monotonic() + gpu_check.RESERVE_S + 10      # 10 s left
    rec = chk.run(Step("latency:omniad", [sys.executable, "-c", "pass"], max_s=300, est_s=90, min_s=40))
    assert rec["status"] == "not reached" and ">= 40 s" in rec["reason"]
    deadline = chk.run(Step("deadline", [sys.executable, "-c", "import sys; print(sys.argv[1:])"], max_s=300,
                            est_s=1, min_s=1, deadline_flag="--until"))   # the step is told the limit it got
    assert deadline["status"] == "ok" and deadline["command"].endswith("--until 5")
    res = chk.summary()
    assert res["rerun"] == "python3 benchmarks/gpu_check.py --out $OUT/gpu --steps latency --models omniad"


def test_plan_puts_the_stream_after_the_first_models_latency_and_warms_only_compiled_backends(tmp_path):
    c = _config(tmp_path, models=("dvad", "padim"), backends=("torch", "torch-compile", "aoti"), warm_jobs=2,
                dry_run=False, device="cuda")
    p = gpu_check.plan(c)
    assert [s.name for s in p["timed"]] == ["kernels", "latency:dvad", "stream", "latency:padim"]
    assert [s.name for s in p["setup"]] == ["env", "models", "stream-export"]
    assert [s.name for s in p["warm"]] == ["warm:kernels", "warm:dvad", "warm:padim"]
    warm = p["warm"][1].argv
    assert warm[warm.index("--backends") + 1] == "torch-compile,aoti" and warm[warm.index("--reps") + 1] == "1"
    timed = p["timed"][1].argv   # the timed run reuses what the warm-up exported
    assert timed[timed.index("--workdir") + 1] == warm[warm.index("--workdir") + 1]
    assert p["timed"][2].argv[p["timed"][2].argv.index("--engine") + 1].endswith("model.pt2")
    eager = gpu_check.plan(_config(tmp_path, warm_jobs=2))
    assert eager["warm"] == [] and "stream-export" not in [s.name for s in eager["setup"]]


@pytest.mark.parametrize("argv,msg", [(["--steps", "tests,bogus"], "--steps: bogus"),
                                      (["--models", "resnet"], "--models: resnet"),
                                      (["--backends", "trt"], "--backends: trt"),
                                      (["--budget", "5"], "--budget: expected >= 60")])
def test_bad_arguments_are_one_clear_error(argv, msg, capsys):
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_without_a_cuda_device_the_real_run_stops_at_once(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the real run would start")
    rc = gpu_check.main(["--steps", "tests", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert rc == 2 and "--dry-run" in capsys.readouterr().err
    assert "**Stopped: no CUDA device visible" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_junit_parsing(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="5">'
        '<testcase classname="tests.a" name="t1"/>'
        '<testcase classname="tests.a" name="t2"><failure message="AssertionError: 2 != 3&#10;more">x</failure></testcase>'
        '<testcase classname="tests.b" name="t3"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.b" name="t4"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.c" name="t5"><error message="fixture broke"/></testcase>'
        '</testsuite></testsuites>')
    j = gpu_report.parse_junit(tmp_path / "j.xml")
    assert (j["total"], j["passed"], j["skipped"]) == (5, 1, 2)
    assert j["failed"] == [{"test": "tests.a::t2", "message": "AssertionError: 2 != 3"}]
    assert j["errors"][0]["test"] == "tests.c::t5" and j["skip_reasons"] == {"no CUDA device": 2}


def test_details_drop_the_logs_before_growing_past_the_limit(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "big.log").write_bytes(os.urandom(300_000))   # incompressible
    (tmp_path / "kernels.json").write_text("{}")
    gpu_report.pack_details(tmp_path, tmp_path / "d.tar.gz", limit=100_000)
    with tarfile.open(tmp_path / "d.tar.gz") as tar:
        assert tar.getnames() == ["kernels.json"]


def test_goal_verdicts_read_the_figures():
    res = {"dry_run": False, "tests": {"passed": 10, "failed": [], "errors": [], "skipped": 2, "total": 12},
           "kernels": {"verdicts": [{"L": 4096, "batch": 8, "triton_share_of_copy_bw": 0.62,
                                     "triton_vs_best_standard_op": 3.0},
                                    {"L": 256, "batch": 1, "triton_share_of_copy_bw": 0.1,
                                     "triton_vs_best_standard_op": 0.8}]},
           "latency": {"dvad": {"rows": [{"backend": "aoti", "precision": "fp32", "batch": 1, "status": "ok",
                                          "median_ms": 1.7}]}},
           "stream": {"width": 4096, "rate": 20000.0, "lines_dropped": 0, "lines_in": 400000,
                      "latency_ms": {"p99": 61.0}, "bare_tiles_per_s": 1400.0}}
    v = {g["goal"]: g["verdict"] for g in gpu_report.goals(res)}
    assert list(v.values()) == ["**met**", "**met**", "**missed**", "**met**", "**met**", "**missed**", "**met**"]
    none = {g["goal"]: g["verdict"] for g in gpu_report.goals({"dry_run": False})}
    assert set(none.values()) == {"not measured"}


def test_device_command_in_results_fits_the_device_tool():
    """RESULTS.md's GPU section gives the exact `run` call: one command of <= 2000 characters that
    installs the carried wheels and runs this check into $OUT, with `.whl` carried."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    sec = text[text.index("## 8. GPU check"):]
    cmd = re.search(r"command: `([^`]+)`", sec).group(1)
    assert len(cmd) <= 2000 and "benchmarks/gpu_check.py" in cmd and "$OUT/" in cmd
    assert "--target /tmp/site .whl/*.whl" in cmd and 'carry: `[".whl"]`' in sec
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
