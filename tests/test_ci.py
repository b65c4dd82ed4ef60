""".ci/check_stacks.py: an installed stack whose tests skipped (or never ran) fails CI; a stack that
did not install may skip; the table lists every stack."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def _check(tmp_path, tally, *installed):
    report = tmp_path / "stacks.json"
    report.write_text(json.dumps(tally))
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "check_stacks.py"), str(report), *installed],
                          capture_output=True, text=True, timeout=60)


def _t(passed=0, failed=0, skipped=0, reasons=()):
    return {"passed": passed, "failed": failed, "skipped": skipped, "skip_reasons": list(reasons)}


def test_installed_and_exercised_passes(tmp_path):
    res = _check(tmp_path, {"serve": _t(12), "tensorrt": _t(skipped=3, reasons=["x: tensorrt missing"])}, "serve")
    assert res.returncode == 0, res.stdout
    assert "serve" in res.stdout and "tensorrt" in res.stdout


def test_installed_but_skipped_fails_with_the_reason(tmp_path):
    res = _check(tmp_path, {"aravis": _t(1, skipped=1, reasons=["t::a: fake camera could not listen"])}, "aravis")
    assert res.returncode == 1 and "fake camera could not listen" in res.stdout


def test_installed_but_never_run_fails(tmp_path):
    res = _check(tmp_path, {}, "pylon")
    assert res.returncode == 1 and "no test of this stack ran" in res.stdout


def test_missing_report_fails(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_stacks.py"), str(tmp_path / "none.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
