"""The edge runtime runs an ONNX artifact without torch: `runtime.stream` in a subprocess where importing
torch (or the training side: kernels, export, the model zoo) raises ImportError, streaming the
simulated line camera through the exported test model, with exact accounting and the same events
as the run in a process that has torch. Of `models`, only the simulator's procedural pages
(models.synthetic: numpy + OpenCV) may load (docs/design.md section 1)."""
import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT
from tests.strip_model import SIM

BLOCKED = ("torch", "torchvision", "triton", "kernels", "export")
MODELS_ALLOWED = ("models", "models.registry", "models.synthetic")

RUNNER = textwrap.dedent(f"""
    import importlib.abc, runpy, sys

    class NoTraining(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in {BLOCKED!r} or (top == "models" and name not in {MODELS_ALLOWED!r}):
                raise ImportError("blocked by the torch-free test: " + name)
            return None

    sys.meta_path.insert(0, NoTraining())
    try:
        runpy.run_module("runtime.stream", run_name="__main__")
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}
                        or (m.split(".")[0] == "models" and m not in {MODELS_ALLOWED!r}))
        print("LOADED:" + ",".join(loaded), file=sys.stderr)
""")


def _stream(args, tmp_path, env=None):
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_blocker_really_blocks_torch():
    res = subprocess.run([sys.executable, "-c", RUNNER.replace('runpy.run_module("runtime.stream", '
                                                               'run_name="__main__")', "import torch")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "blocked by the torch-free test: torch" in res.stderr


def test_stream_runs_an_onnx_artifact_without_torch(onnx_artifact, tmp_path):
    uri = SIM + "&rate=0&lines=40&total=400&defects=150:100:6"
    res = _stream(["--engine", str(onnx_artifact), "--source", uri, "--out", str(tmp_path / "nt"), "--quiet"],
                  tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED:\n" in res.stderr, res.stderr[-500:]          # nothing of the training side loaded
    summary = json.loads((tmp_path / "nt" / "summary.json").read_text())
    assert summary["lines_in"] == summary["lines_scored"] == 400 and summary["accounting_ok"]
    assert summary["engine"]["backend"] == "ort-cpu"
    # the same stream in a process that has torch: identical events
    with_torch = subprocess.run([sys.executable, "-m", "runtime.stream", "--engine", str(onnx_artifact),
                                 "--source", uri, "--out", str(tmp_path / "t"), "--quiet"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert with_torch.returncode == 0, with_torch.stderr[-3000:]
    ev = [json.loads(x) for x in (tmp_path / "nt" / "events.jsonl").read_text().splitlines()]
    ev_t = [json.loads(x) for x in (tmp_path / "t" / "events.jsonl").read_text().splitlines()]
    keys = ("line_start", "line_end", "col_start", "col_end")
    assert ev and [[e[k] for k in keys] for e in ev] == [[e[k] for k in keys] for e in ev_t]
    assert any(e["line_start"] <= 150 <= e["line_end"] and e["col_start"] <= 100 <= e["col_end"] for e in ev)


def test_checkpoint_without_torch_is_one_clear_error(padim_checkpoint, tmp_path):
    res = _stream(["--engine", str(padim_checkpoint), "--source", SIM + "&rate=0&total=80", "--quiet"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "torch" in res.stderr
