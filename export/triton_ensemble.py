"""Pre/post-processing around a bare engine, as Triton Python-backend models chained in an ensemble.

An artifact exported by this toolkit already takes raw uint8 frames and returns normalised scores
(deploy/contract.py). A bare engine does not: a TensorRT plan built from another tool, or a model
exported without deploy.graph.DeployModule, takes the normalised float tensor (B, C, S, S) and
returns (anomaly_map, score). For those, `add_prepost_ensemble(repo, core_model=..., meta=...)`
adds to a Triton model repository:

    <repo>/<name>_pre/   config.pbtxt + 1/model.py   frames uint8 (B,H,W,Cf) -> input (B,C,S,S)
    <repo>/<name>_post/  config.pbtxt + 1/model.py   (anomaly_map, score) -> + normalized_score, verdict
    <repo>/<name>/       config.pbtxt: platform "ensemble", steps pre -> core -> post

so clients see the same contract as `runtime.serve`: input `frames` (UINT8, (-1, H, W, C)),
outputs `anomaly_map`, `score`, `normalized_score` (FP32, (-1, 1)), `verdict` (BOOL, (-1, 1)).
`onnx_as_python_backend` switches an `onnxruntime_onnx` model to the same Python backend running
ONNX Runtime inside the stub (for Triton builds without the onnxruntime backend). The backend code
is deploy/triton_backend.py; `write_backend_files` puts it and the contract beside each model.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Dict, Sequence, Tuple

from deploy import contract
from deploy.contract import INPUT_NAME

PRE_SUFFIX, POST_SUFFIX = "_pre", "_post"
_DEPLOY_DIR = pathlib.Path(contract.__file__).parent
MODEL_PY = """\"\"\"Triton Python-backend model written by edge-ad (export.triton_ensemble): the code is the
package `deploy` beside this file (deploy/triton_backend.py and the contract it runs).\"\"\"
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from deploy.triton_backend import TritonPythonModel  # noqa: E402,F401
"""


def write_backend_files(version_dir) -> pathlib.Path:
    """model.py + deploy/{__init__,contract,triton_backend}.py in a model's version folder."""
    version_dir = pathlib.Path(version_dir)
    pkg = version_dir / "deploy"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""The parts of edge-ad\'s deploy package a Triton Python backend runs."""\n')
    for name in ("contract.py", "triton_backend.py"):
        shutil.copyfile(_DEPLOY_DIR / name, pkg / name)
    (version_dir / "model.py").write_text(MODEL_PY)
    return version_dir / "model.py"


def _dims(d: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in d) + " ]"


def _io(kind: str, name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'{kind} {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)} }}'


def _params(p: Dict[str, str]) -> str:
    return "\n".join(f"parameters {{ key: {json.dumps(k)} value {{ string_value: {json.dumps(v)} }} }}"
                     for k, v in p.items())


def add_prepost_ensemble(repo, core_model: str, meta: dict, name: str = "edge_ad", max_batch: int = 8,
                         core_input: str = "input", core_outputs: Tuple[str, str] = ("anomaly_map", "score"),
                         core_score_dims: Sequence[int] = (1,), instances: int = 1) -> Dict[str, pathlib.Path]:
    """Add `<name>_pre`, `<name>_post` (Python backend) and the ensemble `<name>` to `repo`.

    `core_model` (already in the repository, e.g. a `tensorrt_plan` built from an engine without
    the pre-processing) takes `core_input` float32 (B, C, S, S) and returns `core_outputs`
    = (anomaly map (B, 1, S, S), score with per-sample dims `core_score_dims`). `meta` is the
    artifact metadata (preprocess, score_stats, export.frame_hw / frame_channels). Returns the
    three model folders."""
    repo = pathlib.Path(repo)
    pp = meta.get("preprocess") or {}
    ex = meta.get("export") or {}
    s = int(pp.get("input_size", 256))
    c = int(pp.get("channels", 3))
    hw = ex.get("frame_hw") or [-1, -1]
    fc = int(ex.get("frame_channels") or c)
    frame_dims = [int(hw[0]), int(hw[1]), fc]
    if not (repo / core_model).is_dir():
        raise FileNotFoundError(f"{repo / core_model}: core model folder not found in the repository")
    if max_batch < 1:
        raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
    blob = json.dumps({k: meta.get(k) for k in ("model", "preprocess", "score_stats", "class_names", "export")
                       if k in meta}, sort_keys=True)
    pre, post = name + PRE_SUFFIX, name + POST_SUFFIX
    amap_out, score_out = core_outputs
    configs = {
        pre: "\n".join([
            f'name: "{pre}"', 'backend: "python"', f"max_batch_size: {int(max_batch)}",
            _io("input", INPUT_NAME, "TYPE_UINT8", frame_dims),
            _io("output", core_input, "TYPE_FP32", [c, s, s]),
            f"instance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]",
            _params({"role": "preprocess", "edge_ad": blob, "core_input": core_input})]),
        post: "\n".join([
            f'name: "{post}"', 'backend: "python"', f"max_batch_size: {int(max_batch)}",
            _io("input", "anomaly_map", "TYPE_FP32", [1, s, s]),
            _io("input", "score", "TYPE_FP32", core_score_dims),
            _io("output", "anomaly_map_out", "TYPE_FP32", [1, s, s]),
            _io("output", "score_out", "TYPE_FP32", [1]),
            _io("output", "normalized_score", "TYPE_FP32", [1]),
            _io("output", "verdict", "TYPE_BOOL", [1]),
            f"instance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]",
            _params({"role": "postprocess", "edge_ad": blob})]),
        name: "\n".join([
            f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {int(max_batch)}",
            _io("input", INPUT_NAME, "TYPE_UINT8", frame_dims),
            _io("output", "anomaly_map", "TYPE_FP32", [1, s, s]),
            _io("output", "score", "TYPE_FP32", [1]),
            _io("output", "normalized_score", "TYPE_FP32", [1]),
            _io("output", "verdict", "TYPE_BOOL", [1]),
            "ensemble_scheduling {",
            f'  step {{ model_name: "{pre}" model_version: -1 input_map {{ key: "frames" value: "frames" }} '
            f'output_map {{ key: "{core_input}" value: "_normalized" }} }}',
            f'  step {{ model_name: "{core_model}" model_version: -1 '
            f'input_map {{ key: "{core_input}" value: "_normalized" }} '
            f'output_map {{ key: "{amap_out}" value: "_map" }} output_map {{ key: "{score_out}" value: "_score" }} }}',
            f'  step {{ model_name: "{post}" model_version: -1 input_map {{ key: "anomaly_map" value: "_map" }} '
            f'input_map {{ key: "score" value: "_score" }} '
            f'output_map {{ key: "anomaly_map_out" value: "anomaly_map" }} output_map {{ key: "score_out" value: "score" }} '
            f'output_map {{ key: "normalized_score" value: "normalized_score" }} '
            f'output_map {{ key: "verdict" value: "verdict" }} }}',
            "}"]),
    }
    out = {}
    for model_name, text in configs.items():
        d = repo / model_name
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(text + "\n")
        if model_name != name:
            write_backend_files(d / "1")
        out[model_name] = d
    return out


def onnx_as_python_backend(repo, model_name: str, out_repo, threads: int = 0) -> pathlib.Path:
    """Copy `repo/<model_name>` (an `onnxruntime_onnx` model, e.g. from `python -m
    export.triton_repo`) to `out_repo`, switched to the Python backend running the same
    model.onnx with ONNX Runtime inside the backend stub. For Triton builds without the
    onnxruntime backend (PyTriton's bundled server, minimal images); same config otherwise
    (inputs, outputs, reshape, dynamic batching, instances, parameters)."""
    src = pathlib.Path(repo) / model_name
    cfg_path = src / "config.pbtxt"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such model config")
    text = cfg_path.read_text()
    lines = text.splitlines()
    plat = [i for i, ln in enumerate(lines) if ln.strip().startswith("platform:")]
    if not plat or "onnxruntime_onnx" not in lines[plat[0]]:
        raise ValueError(f"{cfg_path}: expected platform \"onnxruntime_onnx\"")
    lines[plat[0]] = 'backend: "python"'
    versions = sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit())
    files = [f.name for v in versions for f in v.glob("*.onnx")]
    if not files:
        raise FileNotFoundError(f"{src}: no <version>/*.onnx file")
    lines.append(_params({"role": "onnx", "model_file": files[0], "threads": str(int(threads))}))
    dst = pathlib.Path(out_repo) / model_name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "config.pbtxt").write_text("\n".join(lines) + "\n")
    for v in versions:
        write_backend_files(dst / v.name)
    return dst
