"""Test configuration. TRITON_INTERPRET must be set before any @triton.jit module loads: without
a CUDA device the Triton kernels run under the interpreter (numpy, on CPU); with one they run on
the GPU. An explicit TRITON_INTERPRET in the environment wins (benchmarks/gpu_check.py sets 0 on
the GPU and 1 in its CPU dry run)."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


@pytest.fixture(scope="session")
def magnetic_tile():
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"real dataset not present at {MAGNETIC_TILE} (only in the project's dev/CI checkout)")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def padim_checkpoint(tmp_path_factory):
    """tests/strip_model.py's PaDiM, fitted on the simulated strip and saved as a checkpoint."""
    from tests.strip_model import fit_padim_checkpoint

    return fit_padim_checkpoint(tmp_path_factory.mktemp("padim") / "model.pt")


@pytest.fixture(scope="session")
def torch_engine(padim_checkpoint):
    from deploy import load_engine
    from tests.strip_model import TILE

    return load_engine(padim_checkpoint, backend="torch", frame_hw=(TILE, TILE), frame_channels=1)


@pytest.fixture(scope="session")
def onnx_artifact(padim_checkpoint, tmp_path_factory):
    from tests.strip_model import export_onnx_artifact

    return export_onnx_artifact(padim_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")


# ---- optional stacks: which tests each one ran (docs: .ci/run) -------------------------------
# `@pytest.mark.stack(name)` tags a test that exercises an optional stack (camera simulators,
# Triton serving, TensorRT, CUDA; `cuda` tests run the Triton kernels under the interpreter where
# no GPU is); `pytest --stack NAME` runs only those. The tally per stack is printed at the end of
# the run and, with EDGE_AD_STACK_REPORT=FILE, written as JSON; .ci/check_stacks.py fails CI when
# a stack that installed still had tests skip.
_STACK_OF = {}
_STACK_TALLY = {}


def pytest_addoption(parser):
    parser.addoption("--stack", action="append", default=[], metavar="NAME",
                     help="run only the tests tagged @pytest.mark.stack(NAME) (repeatable); `--stack cuda` is "
                          "the GPU check's correctness step (benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in item.iter_markers("stack"):
            _STACK_OF.setdefault(item.nodeid, set()).add(mark.args[0])
    want = set(config.getoption("stack"))
    if want:
        keep = [i for i in items if _STACK_OF.get(i.nodeid, set()) & want]
        config.hook.pytest_deselected(items=[i for i in items if not _STACK_OF.get(i.nodeid, set()) & want])
        items[:] = keep


def pytest_runtest_logreport(report):
    stacks = _STACK_OF.get(report.nodeid)
    if not stacks:
        return
    outcome = None
    if report.skipped:
        outcome = "skipped"
    elif report.failed:
        outcome = "failed"
    elif report.when == "call":
        outcome = "passed"
    if outcome is None:
        return
    for s in stacks:
        t = _STACK_TALLY.setdefault(s, {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": []})
        t[outcome] += 1
        if outcome == "skipped" and isinstance(report.longrepr, tuple):
            t["skip_reasons"].append(f"{report.nodeid}: {report.longrepr[2]}")


def pytest_terminal_summary(terminalreporter):
    if not _STACK_TALLY:
        return
    terminalreporter.write_sep("-", "optional stacks (tests passed / failed / skipped)")
    for s, t in sorted(_STACK_TALLY.items()):
        terminalreporter.write_line(f"{s:<12} {t['passed']:>4} passed {t['failed']:>3} failed {t['skipped']:>3} skipped")
    path = os.environ.get("EDGE_AD_STACK_REPORT")
    if path:
        import json

        pathlib.Path(path).write_text(json.dumps(_STACK_TALLY, indent=1))
