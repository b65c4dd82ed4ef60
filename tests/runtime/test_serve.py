"""runtime.serve end to end on loopback: a real Triton server (PyTriton's bundled tritonserver)
started in a subprocess, queried over HTTP and gRPC by tritonclient from another process, answers
compared with the same artifact run in-process; SIGTERM must leave no process behind."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtime.serve import ServeConfig, ServeError, open_engine
from tests.serve_helpers import (MAX_BATCH, SERVE_STACK, ServerProcess, descendants, exported_artifact,
                                 free_ports, wait_gone)

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = SERVE_STACK


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(padim_checkpoint, tmp_path_factory):
    return exported_artifact(padim_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    srv = ServerProcess(artifact, tmp_path_factory.mktemp("serve_log") / "serve.log")
    yield srv
    if srv.proc.poll() is None:
        srv.terminate()


QUERY = textwrap.dedent("""
    import sys, numpy as np
    import tritonclient.http as httpclient, tritonclient.grpc as grpcclient
    http_port, grpc_port, path_in, path_out = sys.argv[1:5]
    data = np.load(path_in)
    out = {}
    for proto, mod, url in (("http", httpclient, f"127.0.0.1:{http_port}"), ("grpc", grpcclient, f"127.0.0.1:{grpc_port}")):
        client = mod.InferenceServerClient(url)
        for key in data.files:
            x = data[key]
            inp = mod.InferInput("frames", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            try:
                res = client.infer("edge_ad", [inp])
            except Exception as e:
                out[f"{proto}/{key}/error"] = np.array(str(e))
                continue
            for name in ("anomaly_map", "score", "normalized_score", "verdict"):
                out[f"{proto}/{key}/{name}"] = res.as_numpy(name)
        client.close()
    np.savez(path_out, **out)
""")


# ---- tests -----------------------------------------------------------------------------------
def test_http_and_grpc_answers_equal_local_engine(server, artifact, tmp_path):
    rng = np.random.default_rng(7)
    engine = open_engine(artifact)
    h, w = engine.frame_hw
    ch = engine.frame_channels
    batches = {f"b{b}": rng.integers(0, 256, (b, h, w, ch), dtype=np.uint8) for b in (1, 3, MAX_BATCH)}
    batches["too_big"] = rng.integers(0, 256, (MAX_BATCH + 1, h, w, ch), dtype=np.uint8)
    batches["wrong_shape"] = rng.integers(0, 256, (1, h + 1, w, ch), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", **batches)
    res = subprocess.run([sys.executable, "-c", QUERY, str(server.http_port), str(server.grpc_port),
                          str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    got = dict(np.load(tmp_path / "out.npz"))
    for proto in ("http", "grpc"):
        for key in ("b1", "b3", f"b{MAX_BATCH}"):
            x = batches[key]
            ref = engine.infer(x)
            b = x.shape[0]
            np.testing.assert_allclose(got[f"{proto}/{key}/anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[f"{proto}/{key}/score"].reshape(b), ref["score"].reshape(b),
                                       rtol=1e-5, atol=1e-6)
            norm = got[f"{proto}/{key}/normalized_score"].reshape(b)
            np.testing.assert_allclose(norm, ref["normalized_score"].reshape(b), rtol=1e-5, atol=1e-6)
            verdict = got[f"{proto}/{key}/verdict"].reshape(b)
            assert verdict.dtype == np.bool_
            np.testing.assert_array_equal(verdict, norm >= 0.5)
        # Triton enforces the served contract with a clear message
        assert "batch-size must be <= 4" in str(got[f"{proto}/too_big/error"])
        assert f"{proto}/wrong_shape/error" in got


def test_dynamic_batching_and_binding(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        cfg = client.get_model_config("edge_ad").config
        assert cfg.max_batch_size == MAX_BATCH
        assert cfg.HasField("dynamic_batching")
        assert [i.name for i in cfg.input] == ["frames"]
        assert cfg.input[0].data_type == grpcclient.model_config_pb2.TYPE_UINT8
        outs = {o.name: o.data_type for o in cfg.output}
        assert outs["verdict"] == grpcclient.model_config_pb2.TYPE_BOOL
        assert {"anomaly_map", "score", "normalized_score"} <= set(outs)
    finally:
        client.close()
    # bound to loopback only: every socket the server listens on is on 127.0.0.1
    psutil = pytest.importorskip("psutil", reason="psutil lists listening sockets")
    listening = []
    for pid, _name in descendants(server.proc.pid):
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    ports = {a.port for a in listening}
    assert {server.http_port, server.grpc_port, server.metrics_port} <= ports, listening
    import ipaddress

    def loopback(ip):
        a = ipaddress.ip_address(ip.split("%")[0])
        return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)

    assert all(loopback(a.ip) for a in listening), listening


def test_metadata_model_serves_artifact_metadata(server, artifact):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        res = client.infer("edge_ad_metadata", [])
        meta = json.loads(res.as_numpy("edge_ad").reshape(-1)[0])
    finally:
        client.close()
    assert meta == json.loads(json.dumps(open_engine(artifact).meta))


def test_sigterm_stops_server_and_children(server):
    kids = descendants(server.proc.pid)
    names = [n for _, n in kids]
    assert any("tritonserver" in n for n in names), names
    code, _ = server.terminate()
    assert code == 0, server.log_path.read_text()[-3000:]
    left = wait_gone(kids)
    assert not left, f"processes left after SIGTERM: {left}"


def test_cli_errors_are_one_clear_line(tmp_path):
    missing = tmp_path / "nope.onnx"
    res = subprocess.run([sys.executable, "-m", "runtime.serve", "--engine", str(missing)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert str(missing) in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ServeError, match="http_port"):
        ServeConfig(engine="x", http_port=0).validate()
    with pytest.raises(ServeError, match="must differ"):
        ServeConfig(engine="x", http_port=9000, grpc_port=9000).validate()
    with pytest.raises(ServeError, match="model_name"):
        ServeConfig(engine="x", model_name="a b").validate()
    assert ServeConfig(engine="x").host == "127.0.0.1"


def test_port_in_use_is_one_clear_error(artifact):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http_port, metrics_port = free_ports(2)
        res = subprocess.run([sys.executable, "-m", "runtime.serve", "--engine", str(artifact),
                              "--http-port", str(http_port), "--grpc-port", str(port),
                              "--metrics-port", str(metrics_port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"grpc_port {port}" in res.stderr and "Traceback" not in res.stderr


def test_server_class_serves_a_checkpoint(padim_checkpoint):
    """Any artifact deploy.engine opens can be served: here the checkpoint itself (torch backend),
    in-process through `Server`, answers checked against the same engine called directly."""
    from deploy.remote import RemoteEngine
    from runtime.serve import Server

    engine = open_engine(padim_checkpoint, backend="torch", frame_hw=(64, 64), frame_channels=1)
    http_port, grpc_port, metrics_port = free_ports(3)
    cfg = ServeConfig(engine=str(padim_checkpoint), http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, max_batch=2, model_name="ckpt")
    frames = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
    with Server(engine, cfg) as srv:
        assert srv.is_alive()
        with RemoteEngine.from_uri(f"http://127.0.0.1:{http_port}/ckpt") as remote:
            got = remote.infer(frames)            # 3 frames > max batch 2: split in two requests
        kids = descendants(os.getpid())
    ref = engine.infer(frames)
    np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["score"], ref["score"].reshape(-1), rtol=1e-5, atol=1e-5)
    assert not wait_gone([k for k in kids if "tritonserver" in k[1] or "stub" in k[1]])
