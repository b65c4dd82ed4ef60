"""Pre/post-processing as Triton Python-backend models, chained with an engine in an ensemble.

An artifact exported with `models.deploy.DeployModule` (every ONNX / AOTInductor artifact of this
toolkit) already takes raw uint8 frames and returns normalised scores. A bare engine does not: a
TensorRT plan built from another tool, or a model exported without the wrapper, takes the
normalised float tensor (B, C, S, S) and returns (anomaly_map, score). For those,
`add_prepost_ensemble(repo, core_model=..., meta=...)` adds to a Triton model repository:

    <repo>/<name>_pre/   config.pbtxt + 1/model.py (this file)  frames uint8 (B,H,W,Cf) -> input (B,C,S,S)
    <repo>/<name>_post/  config.pbtxt + 1/model.py (this file)  (anomaly_map, score) -> + normalized_score, verdict
    <repo>/<name>/       config.pbtxt: platform "ensemble", steps pre -> core -> post

so clients see the same contract as `runtime.serve`: input `frames` (UINT8, (-1, H, W, C)),
outputs `anomaly_map`, `score`, `normalized_score` (FP32, (-1, 1)), `verdict` (BOOL, (-1, 1)).

This module is itself the Python-backend `model.py` (it is copied verbatim): it imports only
numpy and the standard library at top level, so it runs in any Triton image's Python. The
pre-processing reproduces DeployModule's exactly - gray->RGB replication or ITU-R 601 luma,
bilinear resize with half-pixel centres (align_corners=False, no antialias) on float values,
then (x / 255 - mean) / std; the post-processing is ScoreStats.normalize in float32.
The metadata (preprocess, score_stats, export.frame_hw/frame_channels) travels in each model's
config.pbtxt `parameters` as JSON.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LUMA_RGB = (0.299, 0.587, 0.114)
PRE_SUFFIX, POST_SUFFIX = "_pre", "_post"
ROLES = ("preprocess", "postprocess", "onnx")


# ---- numpy pre/post-processing (what the Python-backend models run) -----------------------------
def _resize_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Bilinear resampling of one axis, half-pixel centres, no antialias (torch's
    F.interpolate(mode="bilinear", align_corners=False, antialias=False) rule)."""
    n = x.shape[axis]
    if n == out:
        return x
    scale = np.float32(n / out)
    src = (np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = (src - i0).astype(np.float32)
    w0 = np.float32(1.0) - w1
    shape = [1] * x.ndim
    shape[axis] = out
    a = np.take(x, i0, axis=axis)
    b = np.take(x, i1, axis=axis)
    return a * w0.reshape(shape) + b * w1.reshape(shape)


def preprocess_frames(frames: np.ndarray, input_size: int, mean: Sequence[float], std: Sequence[float],
                      model_channels: int = 3) -> np.ndarray:
    """uint8 frames (B, H, W, C_frame) NHWC -> normalised float32 (B, C_model, S, S) NCHW."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] not in (1, 3):
        raise ValueError(f"frames: expected uint8 (B, H, W, 1|3), got {frames.dtype} {frames.shape}")
    x = frames.transpose(0, 3, 1, 2).astype(np.float32)
    if x.shape[1] == 1 and model_channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] == 3 and model_channels == 1:
        luma = np.asarray(LUMA_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x * luma).sum(axis=1, keepdims=True, dtype=np.float32)
    s = int(input_size)
    x = _resize_axis(_resize_axis(x, 2, s), 3, s)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    scale = np.float32(1.0) / (np.float32(255.0) * std)
    shift = -mean / std
    return np.ascontiguousarray((x * scale + shift).astype(np.float32))


def postprocess_scores(score: np.ndarray, low: float, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """score (B,) or (B, 1) -> (normalized_score (B, 1) float32, verdict (B, 1) bool)."""
    s = np.asarray(score, dtype=np.float32).reshape(-1, 1)
    span = max(float(threshold) - float(low), 1e-12)
    norm = np.clip((s - np.float32(low)) * np.float32(0.5 / span), 0.0, 1.0).astype(np.float32)
    return norm, norm >= np.float32(0.5)


# ---- the Triton Python-backend model -----------------------------------------------------------
class TritonPythonModel:
    """Config parameter `role`: "preprocess" / "postprocess" (metadata JSON in parameter `edge_ad`),
    or "onnx": run the version folder's `model_file` (default model.onnx) with ONNX Runtime."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside Triton

        self.pb = pb_utils
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.role = params.get("role", "")
        if self.role not in ROLES:
            raise ValueError(f"{cfg.get('name')}: parameter role must be one of {ROLES}, got {self.role!r}")
        if self.role == "onnx":
            import onnxruntime as ort

            path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
            so = ort.SessionOptions()
            if params.get("threads"):
                so.intra_op_num_threads = int(params["threads"])
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.output_names = [o["name"] for o in cfg.get("output", [])]
            return
        meta = json.loads(params.get("edge_ad") or "{}")
        pp = meta.get("preprocess") or {}
        st = meta.get("score_stats") or {}
        self.input_size = int(pp.get("input_size", 256))
        self.mean = pp.get("mean", (0.485, 0.456, 0.406))
        self.std = pp.get("std", (0.229, 0.224, 0.225))
        self.model_channels = int(pp.get("channels", 3))
        self.low = float(st.get("low", 0.0))
        self.threshold = float(st.get("threshold", 1.0))
        self.core_input = params.get("core_input", "input")

    def _one(self, request):
        pb = self.pb
        if self.role == "onnx":
            x = pb.get_input_tensor_by_name(request, self.input_name).as_numpy()
            outs = self.session.run(self.output_names, {self.input_name: x})
            return pb.InferenceResponse(output_tensors=[pb.Tensor(n, o) for n, o in zip(self.output_names, outs)])
        if self.role == "preprocess":
            frames = pb.get_input_tensor_by_name(request, "frames").as_numpy()
            x = preprocess_frames(frames, self.input_size, self.mean, self.std, self.model_channels)
            return pb.InferenceResponse(output_tensors=[pb.Tensor(self.core_input, x)])
        amap = pb.get_input_tensor_by_name(request, "anomaly_map").as_numpy().astype(np.float32)
        score = pb.get_input_tensor_by_name(request, "score").as_numpy()
        norm, verdict = postprocess_scores(score, self.low, self.threshold)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("anomaly_map_out", amap),
            pb.Tensor("score_out", np.asarray(score, dtype=np.float32).reshape(-1, 1)),
            pb.Tensor("normalized_score", norm),
            pb.Tensor("verdict", verdict)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # one bad request must not fail the others in its batch
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[], error=self.pb.TritonError(f"{self.role}: {type(e).__name__}: {e}")))
        return responses

    def finalize(self):
        pass


# ---- repository writer -------------------------------------------------------------------------
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
            _io("input", "frames", "TYPE_UINT8", frame_dims),
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
            _io("input", "frames", "TYPE_UINT8", frame_dims),
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
            shutil.copyfile(__file__, d / "1" / "model.py")
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
        shutil.copyfile(__file__, dst / v.name / "model.py")
    return dst


def parse_config(path):
    """config.pbtxt -> tritonclient's ModelConfig protobuf (raises ValueError naming the file)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = pathlib.Path(path)
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ValueError(f"{path}: not a valid Triton model config: {e}") from None


# ---- the tritonserver bundled with PyTriton (local development and tests) ---------------------
def bundled_tritonserver(work_dir) -> Optional[Tuple[pathlib.Path, pathlib.Path, Dict[str, str]]]:
    """(tritonserver binary, backend directory with the Python backend, environment) from the
    nvidia-pytriton wheel, or None when it is not installed / ships no Python backend.

    The wheel keeps one backend stub per Python version; Triton wants it beside the backend
    library, so a backend directory is assembled under `work_dir`."""
    import sys
    import sysconfig

    try:
        import pytriton
    except ImportError:
        return None
    root = pathlib.Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    lib = root / "backends" / "python" / "libtriton_python.so"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not (binary.is_file() and lib.is_file() and stub.is_file()):
        return None
    be = pathlib.Path(work_dir) / "backends" / "python"
    be.mkdir(parents=True, exist_ok=True)
    for f in (lib, root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(f, be / f.name)
    libs = [str(pathlib.Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"),
            sysconfig.get_config_var("LIBDIR") or ""]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs + env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    return binary, be.parent, env
