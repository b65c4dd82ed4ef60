"""Python-backend pre/post-processing: numpy steps vs deploy.graph.DeployModule (torch), the
generated repository parses with model_config_pb2, and PyTriton's bundled tritonserver serves the
ensemble (pre -> core -> post) with the same answers as DeployModule."""
from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from deploy import contract
from deploy.contract import preprocess_frames
from deploy.graph import DeployModule
from deploy.triton_backend import postprocess_scores
from export.triton_ensemble import add_prepost_ensemble, onnx_as_python_backend
from export.triton_repo import parse_config
from models.base import PreprocessConfig, ScoreStats
from runtime.serve import bundled_tritonserver


class _Fake(nn.Module):
    """A stand-in model whose forward is easy to write again in numpy (the core model below)."""

    def __init__(self, size, channels, low=0.2, threshold=1.3):
        super().__init__()
        self._pp = PreprocessConfig(input_size=size, channels=channels,
                                    mean=(0.485, 0.456, 0.406)[:channels] if channels == 3 else (0.45,),
                                    std=(0.229, 0.224, 0.225)[:channels] if channels == 3 else (0.226,))
        self.score_stats = ScoreStats(low=low, threshold=threshold)

    @property
    def preprocess(self):
        return self._pp

    def forward(self, x):
        m = (x * x).mean(dim=1, keepdim=True) * 0.5 + 0.1
        return m, m.amax(dim=(1, 2, 3))


CORE_MODEL_PY = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                x = pb_utils.get_input_tensor_by_name(r, "input").as_numpy()
                m = ((x * x).mean(axis=1, keepdims=True) * np.float32(0.5) + np.float32(0.1)).astype(np.float32)
                s = m.max(axis=(1, 2, 3)).reshape(-1, 1).astype(np.float32)
                out.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("anomaly_map", m), pb_utils.Tensor("score", s)]))
            return out
''')


def _meta(model, frame_hw, frame_channels):
    return {"model": "fake", "preprocess": model.preprocess.to_dict(), "score_stats": model.score_stats.to_dict(),
            "class_names": [], "export": {"frame_hw": list(frame_hw), "frame_channels": frame_channels}}


@pytest.mark.parametrize("hw,frame_ch,size,model_ch", [((37, 53), 1, 32, 3), ((20, 24), 3, 48, 3),
                                                        ((31, 29), 3, 16, 1), ((32, 32), 1, 32, 3)])
def test_preprocess_matches_deploy_module(hw, frame_ch, size, model_ch):
    model = _Fake(size, model_ch)
    dm = DeployModule(model, frame_hw=hw, frame_channels=frame_ch)
    frames = np.random.default_rng(sum(hw)).integers(0, 256, (3, *hw, frame_ch), dtype=np.uint8)
    ref = dm.preprocess(torch.from_numpy(frames)).numpy()
    got = preprocess_frames(frames, size, model.preprocess.mean, model.preprocess.std, model_ch)
    assert got.shape == ref.shape == (3, model_ch, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


def test_postprocess_matches_score_stats():
    stats = ScoreStats(low=0.3, threshold=1.7)
    score = np.random.default_rng(1).uniform(-1, 4, 257).astype(np.float32)
    norm, verdict = postprocess_scores(score, stats.low, stats.threshold)
    ref = stats.normalize(score)
    np.testing.assert_allclose(norm.ravel(), ref, rtol=1e-6, atol=1e-6)
    clear = np.abs(ref - 0.5) > 1e-6
    np.testing.assert_array_equal(verdict.ravel()[clear], (ref >= 0.5)[clear])
    with pytest.raises(ValueError, match="frames"):
        preprocess_frames(np.zeros((1, 4, 4, 2), np.uint8), 8, (0.5,), (0.5,), 1)


def _repo(tmp_path, model, hw, frame_ch, max_batch=4):
    repo = tmp_path / "repo"
    core = repo / "core" / "1"
    core.mkdir(parents=True)
    (core / "model.py").write_text(CORE_MODEL_PY)
    s, c = model.preprocess.input_size, model.preprocess.channels
    (repo / "core" / "config.pbtxt").write_text(textwrap.dedent(f'''
        name: "core"
        backend: "python"
        max_batch_size: {max_batch}
        input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {c}, {s}, {s} ] }} ]
        output [ {{ name: "anomaly_map" data_type: TYPE_FP32 dims: [ 1, {s}, {s} ] }},
                 {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }} ]
        instance_group [ {{ kind: KIND_CPU count: 1 }} ]
    '''))
    dirs = add_prepost_ensemble(repo, "core", _meta(model, hw, frame_ch), name="edge_ad", max_batch=max_batch)
    return repo, dirs


@pytest.mark.stack("serve")
def test_generated_repository_parses(tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] provides model_config_pb2")
    model = _Fake(32, 3)
    repo, dirs = _repo(tmp_path, model, (40, 36), 1)
    assert set(dirs) == {"edge_ad", "edge_ad_pre", "edge_ad_post"}
    ens = parse_config(dirs["edge_ad"] / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 4
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["edge_ad_pre", "core", "edge_ad_post"]
    assert list(ens.input[0].dims) == [40, 36, 1]
    assert {o.name for o in ens.output} == {"anomaly_map", "score", "normalized_score", "verdict"}
    pre = parse_config(dirs["edge_ad_pre"] / "config.pbtxt")
    assert pre.backend == "python" and pre.parameters["role"].string_value == "preprocess"
    assert list(pre.output[0].dims) == [3, 32, 32]
    post = parse_config(dirs["edge_ad_post"] / "config.pbtxt")
    assert post.parameters["role"].string_value == "postprocess"
    version = dirs["edge_ad_pre"] / "1"      # the backend code and the contract travel with the model
    assert "from deploy.triton_backend import TritonPythonModel" in (version / "model.py").read_text()
    assert (version / "deploy" / "triton_backend.py").read_text().count("class TritonPythonModel") == 1
    assert (version / "deploy" / "contract.py").read_bytes() == pathlib.Path(contract.__file__).read_bytes()
    bad = tmp_path / "bad.pbtxt"
    bad.write_text('name: "x" max_batch_size: "eight"')
    with pytest.raises(ValueError, match="bad.pbtxt"):
        parse_config(bad)
    with pytest.raises(FileNotFoundError, match="no_core"):
        add_prepost_ensemble(repo, "no_core", _meta(model, (40, 36), 1))


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _Tritonserver:
    """PyTriton's bundled tritonserver on loopback ports, serving `repo` (context manager)."""

    def __init__(self, tmp_path, repo, model):
        self.httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
        found = bundled_tritonserver(tmp_path / "server")
        if found is None:
            pytest.skip("no tritonserver with the Python backend bundled (pip install nvidia-pytriton)")
        binary, backends, env = found
        self.http_port, self.grpc_port, metrics_port = _free_ports(3)
        self.log_path = tmp_path / "tritonserver.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
             "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
             "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
             "--allow-gpu-metrics", "false", "--exit-timeout-secs", "10"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = self.httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.client.is_model_ready(model):
                    return
            except Exception:
                pass
            time.sleep(0.5)
        self.close()
        raise AssertionError(f"{model} not ready:\n{self.log_path.read_text()[-4000:]}")

    def infer(self, model, frames, outputs):
        inp = self.httpclient.InferInput("frames", list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames)
        res = self.client.infer(model, [inp])
        return {n: res.as_numpy(n) for n in outputs}

    def close(self):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.stack("serve")
def test_bundled_tritonserver_serves_the_ensemble(tmp_path):
    hw, frame_ch = (37, 41), 1
    model = _Fake(32, 3)
    repo, _ = _repo(tmp_path, model, hw, frame_ch)
    dm = DeployModule(model, frame_hw=hw, frame_channels=frame_ch).eval()
    with _Tritonserver(tmp_path, repo, "edge_ad") as server:
        for b in (1, 3):
            frames = np.random.default_rng(b).integers(0, 256, (b, *hw, frame_ch), dtype=np.uint8)
            res = server.infer("edge_ad", frames, ("anomaly_map", "score", "normalized_score", "verdict"))
            with torch.no_grad():
                amap, score, norm = dm(torch.from_numpy(frames))
            np.testing.assert_allclose(res["anomaly_map"], amap.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(res["score"].ravel(), score.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(res["normalized_score"].ravel(), norm.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(res["verdict"].ravel(), norm.numpy() >= 0.5)


@pytest.mark.stack("serve")
def test_export_triton_repo_parses_and_serves_on_the_python_backend(padim_checkpoint, tmp_path_factory, tmp_path):
    """`export.triton_repo`'s repository (onnxruntime_onnx) parses with model_config_pb2; the
    bundled tritonserver has no onnxruntime backend, so the same model folder is switched to the
    Python backend (ONNX Runtime inside the stub) and must answer like the in-process engine."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] provides model_config_pb2")
    from deploy import load_engine
    from export.triton_repo import export_triton_repo
    from tests.serve_helpers import exported_artifact

    artifact = exported_artifact(padim_checkpoint, tmp_path_factory)

    repo = export_triton_repo(padim_checkpoint, tmp_path / "repo", onnx_path=artifact, max_batch=4, quiet=True)
    cfg = parse_config(repo.config)
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    dst = onnx_as_python_backend(tmp_path / "repo", "edge_ad", tmp_path / "pyrepo")
    with pytest.raises(ValueError, match="onnxruntime_onnx"):
        onnx_as_python_backend(tmp_path / "pyrepo", "edge_ad", tmp_path / "x")  # not an ONNX model any more
    cfg2 = parse_config(dst / "config.pbtxt")
    assert cfg2.backend == "python" and not cfg2.platform
    assert [o.name for o in cfg2.output] == [o.name for o in cfg.output]
    assert cfg2.HasField("dynamic_batching") and cfg2.parameters["role"].string_value == "onnx"

    local = load_engine(artifact)
    h, w = local.frame_hw
    with _Tritonserver(tmp_path, tmp_path / "pyrepo", "edge_ad") as server:
        for b in (1, 3):
            frames = np.random.default_rng(20 + b).integers(0, 256, (b, h, w, local.frame_channels), dtype=np.uint8)
            got = server.infer("edge_ad", frames, ("anomaly_map", "score", "normalized_score"))
            ref = local.infer(frames)
            np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["score"].reshape(b), ref["score"].reshape(b), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["normalized_score"].reshape(b), ref["normalized_score"].reshape(b),
                                       rtol=1e-5, atol=1e-5)
