"""RemoteEngine against a real `runtime.serve` on loopback: same answers as the in-process
engine over gRPC and HTTP, batches above the server's max batch split and merged, concurrent
async calls, clear errors; and `runtime.stream --remote` end to end."""
from __future__ import annotations

import concurrent.futures as cf
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from deploy.remote import RemoteEngine, RemoteError, parse_uri
from runtime.serve import open_engine
from tests import serve_helpers as H

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = H.SERVE_STACK




@pytest.fixture(scope="module")
def artifact(padim_checkpoint, tmp_path_factory):
    return H.exported_artifact(padim_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    srv = H.ServerProcess(artifact, tmp_path_factory.mktemp("remote_log") / "serve.log", max_batch=H.MAX_BATCH)
    yield srv
    code, kids = srv.terminate()
    assert code == 0
    assert not H.wait_gone(kids)


@pytest.fixture(scope="module")
def local(artifact):
    return open_engine(artifact)


def _frames(engine, b, seed):
    h, w = engine.frame_hw
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, engine.frame_channels), dtype=np.uint8)


def _assert_same(out, ref):
    assert set(out) >= {"anomaly_map", "score", "normalized_score"}
    b = ref["score"].reshape(-1).shape[0]
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-6)
    assert out["score"].shape == (b,) and out["normalized_score"].shape == (b,)
    np.testing.assert_allclose(out["score"], ref["score"].reshape(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["normalized_score"], ref["normalized_score"].reshape(b), rtol=1e-5, atol=1e-6)


def test_parse_uri():
    u = parse_uri("grpc://127.0.0.1:8101/edge_ad")
    assert (u.protocol, u.host, u.port, u.model, u.version) == ("grpc", "127.0.0.1", 8101, "edge_ad", "")
    u = parse_uri("http://localhost/m/3")
    assert (u.port, u.model, u.version) == (8000, "m", "3")
    assert parse_uri("grpc://[::1]/m").address == "[::1]:8001"
    assert str(parse_uri("http://h:1/m/2")) == "http://h:1/m/2"
    for bad in ("tcp://h:1/m", "grpc://h:1", "grpc://h:1/m/x", "grpc:///m", "grpc://h:99999/m", "m"):
        with pytest.raises(ValueError, match="remote URI"):
            parse_uri(bad)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_remote_engine_matches_local(server, local, protocol):
    port = server.grpc_port if protocol == "grpc" else server.http_port
    with RemoteEngine.from_uri(f"{protocol}://127.0.0.1:{port}/edge_ad") as eng:
        assert eng.max_batch == H.MAX_BATCH
        assert tuple(eng.frame_hw) == tuple(local.frame_hw) and eng.frame_channels == local.frame_channels
        # metadata travels with the model (the companion *_metadata model)
        assert {k: v for k, v in eng.meta.items() if k != "remote"} == local.meta
        # odd sizes, one below, at and above the server's max batch (split into chunks and merged)
        for i, b in enumerate((1, 3, H.MAX_BATCH, 2 * H.MAX_BATCH + 1)):
            x = _frames(local, b, seed=10 * i + len(protocol))
            _assert_same(eng.infer(x), local.infer(x))


def test_remote_engine_async_concurrent(server, local):
    xs = [_frames(local, b, seed=100 + b) for b in (1, 2, 1, 3, 5, 1, 2, 4)]
    with RemoteEngine.from_uri(f"grpc://127.0.0.1:{server.grpc_port}/edge_ad", max_inflight=3) as eng:
        futs = [eng.infer_async(x) for x in xs]
        outs = [f.result(timeout=60) for f in futs]
    for x, out in zip(xs, outs):
        _assert_same(out, local.infer(x))
    # many cameras, one server: threads sharing one engine
    with RemoteEngine.from_uri(f"http://127.0.0.1:{server.http_port}/edge_ad") as eng:
        with cf.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(eng.infer, xs))
    for x, out in zip(xs, outs):
        _assert_same(out, local.infer(x))


def test_remote_engine_errors(server, local):
    with RemoteEngine.from_uri(f"grpc://127.0.0.1:{server.grpc_port}/edge_ad") as eng:
        h, w = local.frame_hw
        with pytest.raises(RemoteError, match="frames"):
            eng.infer(np.zeros((1, h + 2, w, local.frame_channels), np.uint8))
        with pytest.raises(RemoteError, match="uint8"):
            eng.infer(np.zeros((1, h, w, local.frame_channels), np.float32))
    with pytest.raises(RemoteError, match="engine is closed"):
        eng.infer(_frames(local, 1, 0))
    with pytest.raises(RemoteError, match="not reachable"):
        RemoteEngine.from_uri(f"grpc://127.0.0.1:{server.grpc_port}/no_such_model", wait_ready_s=0.5)
    port = H.free_ports(1)[0]  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="not reachable"):
        RemoteEngine.from_uri(f"http://127.0.0.1:{port}/edge_ad", wait_ready_s=0.5)
    assert time.monotonic() - t0 < 20


def _stream_events(engine, uri, out_dir):
    from runtime.stream import run_stream
    from tests.strip_model import TILE

    s = run_stream(engine, uri, out_dir=out_dir, tile=TILE, stride=48, max_batch=8, overload="block")
    events = [json.loads(x) for x in (out_dir / "events.jsonl").read_text().splitlines()]
    return s, events


def test_stream_through_remote_engine_end_to_end(server, local, tmp_path):
    """runtime.stream's pipeline on the simulated line camera, the model served by Triton:
    the same defect events as with the in-process engine."""
    from tests.strip_model import SIM

    d_line, d_col, r = 150, 100, 6
    uri = SIM + f"&rate=0&lines=40&total=400&defects={d_line}:{d_col}:{r}"
    s_loc, ev_loc = _stream_events(local, uri, tmp_path / "local")
    with RemoteEngine.from_uri(f"grpc://127.0.0.1:{server.grpc_port}/edge_ad") as eng:
        s_rem, ev_rem = _stream_events(eng, uri, tmp_path / "remote")
    assert s_rem["lines_in"] == s_rem["lines_scored"] == 400 and s_rem["lines_dropped"] == 0
    assert s_rem["tiles_scored"] == s_loc["tiles_scored"] > 0
    assert s_rem["engine"]["backend"] == "remote"
    assert len(ev_rem) == len(ev_loc) >= 1
    hit = [e for e in ev_rem if e["line_start"] <= d_line <= e["line_end"] and e["col_start"] <= d_col <= e["col_end"]]
    assert hit, ev_rem
    keys = ("line_start", "line_end", "col_start", "col_end", "peak_line", "peak_col")
    assert [[e[k] for k in keys] for e in ev_rem] == [[e[k] for k in keys] for e in ev_loc]


def test_stream_cli_remote(server, tmp_path):
    from tests.strip_model import SIM

    uri = f"grpc://127.0.0.1:{server.grpc_port}/edge_ad"
    res = subprocess.run([sys.executable, "-m", "runtime.stream", "--remote", uri, "--source",
                          SIM + "&rate=0&lines=40&total=200", "--out", str(tmp_path), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lines_scored"] == 200 and summary["engine"]["backend"] == "remote"
