"""Python-backend pre/post-processing: numpy steps vs models.deploy.DeployModule (torch), the
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

from models.base import PreprocessConfig, ScoreStats
from models.deploy import DeployModule
from runtime.triton_python_backend import (add_prepost_ensemble, bundled_tritonserver, parse_config,
                                           postprocess_scores, preprocess_frames)


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
    assert (dirs["edge_ad_pre"] / "1" / "model.py").read_text().count("class TritonPythonModel") == 1
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


def test_bundled_tritonserver_serves_the_ensemble(tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
    found = bundled_tritonserver(tmp_path / "server")
    if found is None:
        pytest.skip("no tritonserver with the Python backend bundled (pip install nvidia-pytriton)")
    binary, backends, env = found
    hw, frame_ch = (37, 41), 1
    model = _Fake(32, 3)
    repo, _ = _repo(tmp_path, model, hw, frame_ch)
    http_port, grpc_port, metrics_port = _free_ports(3)
    log = open(tmp_path / "tritonserver.log", "w")
    proc = subprocess.Popen([str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
                             "--http-address", "127.0.0.1", "--http-port", str(http_port),
                             "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
                             "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics_port),
                             "--allow-gpu-metrics", "false", "--exit-timeout-secs", "10"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = client.is_model_ready("edge_ad")
            except Exception:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        if not ready:
            text = (tmp_path / "tritonserver.log").read_text()
            if "ensemble" in text.lower() and "not supported" in text.lower():
                pytest.skip("bundled tritonserver was built without ensemble support")
            raise AssertionError(f"ensemble not ready:\n{text[-4000:]}")
        dm = DeployModule(model, frame_hw=hw, frame_channels=frame_ch).eval()
        for b in (1, 3):
            frames = np.random.default_rng(b).integers(0, 256, (b, *hw, frame_ch), dtype=np.uint8)
            inp = httpclient.InferInput("frames", list(frames.shape), "UINT8")
            inp.set_data_from_numpy(frames)
            res = client.infer("edge_ad", [inp])
            with torch.no_grad():
                amap, score, norm = dm(torch.from_numpy(frames))
            np.testing.assert_allclose(res.as_numpy("anomaly_map"), amap.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(res.as_numpy("score").ravel(), score.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(res.as_numpy("normalized_score").ravel(), norm.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(res.as_numpy("verdict").ravel(), norm.numpy() >= 0.5)
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
