"""The import graph: kernels <- models <- deploy <- {export, runtime} <- benchmarks, nothing upward, and
the edge runtime's modules import neither torch nor the training side at module level (docs/design.md
section 1). Parsed from the source with ast, so a lazy import inside a function counts too."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "deploy", "export", "runtime", "benchmarks")
ALLOWED = {
    "kernels": {"kernels"},
    "models": {"kernels", "models"},
    "deploy": {"kernels", "models", "deploy"},
    "export": {"kernels", "models", "deploy", "export"},
    "runtime": {"deploy", "runtime"},
    "benchmarks": set(PACKAGES),
}
# The one import of `models` from the runtime: linesim's procedural pages (kind=...) come from
# models.synthetic (numpy + OpenCV; `models` and its registry import no torch). With images=DIR
# it is not imported at all.
EXCEPTIONS = {("runtime/sources/linesim.py", "models.synthetic")}
# torch-free at import time: what `runtime.stream --engine model.onnx` loads
TORCH_FREE = ["runtime"] + [f"deploy/{m}.py" for m in ("__init__", "contract", "artifacts", "engine", "ort",
                                                        "tensorrt", "remote", "cuda_buffers", "triton_backend")]
TRAINING_SIDE = {"torch", "torchvision", "triton", "kernels", "models", "export"}


def _modules(top):
    return sorted((ROOT / top).rglob("*.py"))


def _imports(path: pathlib.Path, module_level_only: bool = False):
    """(line, top-level package, full module name) of every import in the file (relative imports
    count as the file's own package); module_level_only: top-level statements and `try:` bodies."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = path.relative_to(ROOT).parts[0]
    if module_level_only:
        nodes = [n for top in tree.body for n in ([top] + (top.body if isinstance(top, ast.Try) else []))]
    else:
        nodes = list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0], a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = pkg if node.level else (node.module or "")
            found.append((node.lineno, name.split(".")[0], name))
    return found


@pytest.mark.parametrize("top", PACKAGES)
def test_no_upward_import(top):
    bad = []
    for path in _modules(top):
        rel = str(path.relative_to(ROOT))
        for line, target, full in _imports(path):
            if target in PACKAGES and target not in ALLOWED[top] and (rel, full) not in EXCEPTIONS:
                bad.append(f"{rel}:{line} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_edge_runtime_modules_are_torch_free_at_import():
    bad = []
    for entry in TORCH_FREE:
        paths = _modules(entry) if not entry.endswith(".py") else [ROOT / entry]
        for path in paths:
            for line, target, _full in _imports(path, module_level_only=True):
                if target in TRAINING_SIDE:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "module-level imports the edge runtime cannot have:\n" + "\n".join(bad)


def test_checker_sees_a_planted_violation(tmp_path, monkeypatch):
    """The checker itself can fail: an upward import in a throwaway module is reported."""
    fake = ROOT / "models" / "_layering_probe.py"
    fake.write_text("from runtime import pipeline\n")
    try:
        assert any(t == "runtime" for _, t, _ in _imports(fake))
        with pytest.raises(AssertionError, match="_layering_probe.py:1 imports runtime"):
            test_no_upward_import("models")
    finally:
        fake.unlink()
