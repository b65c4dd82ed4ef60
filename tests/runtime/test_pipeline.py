"""The streaming pipeline end to end with real components (simulated line camera, camera
simulators, a real fitted model), fault injection, overload and the line accounting."""
import http.server
import json
import threading
import tracemalloc
import urllib.request

import numpy as np
import pytest

from deploy import EngineError, load_engine
from runtime.pipeline import Pipeline, StreamConfig
from runtime.sources import open_source
from runtime.stream import StreamError, main, run_stream
from tests.strip_model import SIM, TILE


def _check_accounting(s, src=None):
    assert s["lines_in"] == s["lines_scored"] + s["lines_dropped"], s
    assert s["lines_dropped"] == sum(s["dropped"].values())
    assert s["accounting_ok"]
    if src is not None:   # the simulator's own count of what the camera produced
        assert s["lines_in"] == src.lines_produced >= src.lines_emitted + src.lines_lost


def _run(engine, uri, duration=None, **cfg):
    src = open_source(uri)
    pipe = Pipeline(engine, src, StreamConfig(**cfg)).start()
    if duration is not None:
        pipe.wait(duration)
    else:
        assert pipe.wait(120), "stream did not finish"
    return pipe, pipe.finish(), src


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_defect_on_a_tile_seam_is_found_once_at_its_strip_position(kind, request, tmp_path):
    engine = load_engine(request.getfixturevalue("onnx_artifact")) if kind == "onnx" \
        else request.getfixturevalue("torch_engine")
    # bands start every 48 lines (tile 64): line 64 is the bottom edge of band 0 and inside
    # bands 1; columns 48..63 are covered by two tiles. The defect sits on both seams.
    d_line, d_col, r = 64, 60, 6
    uri = SIM + f"&rate=0&lines=40&total=400&defects={d_line}:{d_col}:{r}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Collector.bodies = []
    try:
        s = run_stream(engine, uri, out_dir=tmp_path, tile=TILE, stride=48, max_batch=8,
                       overload="block", line_pitch_mm=0.1, pixel_pitch_mm=0.05,
                       webhook=f"http://127.0.0.1:{server.server_address[1]}/hook")
    finally:
        server.shutdown()
        server.server_close()
    _check_accounting(s)
    assert s["lines_in"] == s["lines_scored"] == 400 and s["lines_dropped"] == 0
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert len(events) == 1, events
    e = events[0]
    # the event box covers the defect and is not much larger (the map is blurred a little)
    assert e["line_start"] <= d_line - r + 2 and e["line_end"] >= d_line + r - 2
    assert e["col_start"] <= d_col - r + 2 and e["col_end"] >= d_col + r - 2
    # (the map is the model's 8-px grid upsampled and blurred: a few pixels of spread)
    assert e["line_end"] - e["line_start"] <= 5 * r and e["col_end"] - e["col_start"] <= 5 * r
    assert abs((e["line_start"] + e["line_end"]) / 2 - d_line) <= r
    assert abs((e["col_start"] + e["col_end"]) / 2 - d_col) <= r
    assert abs(e["peak_line"] - d_line) <= 2 * r and abs(e["peak_col"] - d_col) <= 2 * r
    assert e["position_mm"] == pytest.approx(e["line_start"] * 0.1)
    assert _Collector.bodies == events             # webhook got the same event
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 1
    assert (tmp_path / "preview.png").is_file()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["engine"]["backend"] == engine.backend
    assert saved["lines_scored"] == 400 and saved["latency_ms"]["p99"] >= saved["latency_ms"]["p50"] > 0


def test_metrics_endpoint_reports_the_pipeline_counters(torch_engine):
    from runtime.metrics import MetricsServer

    src = open_source(SIM + "&rate=0&lines=64&total=192")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, stride=64, overload="block")).start()
    assert pipe.wait(60)
    s = pipe.finish()
    with MetricsServer(pipe.snapshot, 0) as m:
        assert m.host == "127.0.0.1"
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    vals = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert vals["edge_ad_lines_in_total"] == s["lines_in"] == 192
    assert vals["edge_ad_lines_scored_total"] == s["lines_scored"]
    assert vals["edge_ad_tiles_scored_total"] == s["tiles_scored"] == 3 * 4   # 3 bands x 4 tiles


def test_overload_drop_oldest_bounds_memory_and_accounts_every_line(torch_engine):
    # 1024-px camera at 100 kHz (100 MB/s of lines) into a model that scores ~100 tiles/s
    uri = "linesim://?width=1024&rate=100000&lines=128&kind=texture&seed=1&page=256&queue=4"
    tracemalloc.start()
    try:
        pipe, s, src = _run(torch_engine, uri, duration=2.5, tile=TILE, stride=64, max_batch=16,
                            overload="drop-oldest", capture_queue=8, infer_queue=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _check_accounting(s, src)
    assert s["dropped"]["overload"] > 0 and s["lines_scored"] > 0
    assert s["lines_in"] > 100_000        # the camera really produced at rate
    # bounded: queues hold <= 8 buffers (128 KB) + 4 bands (16 tiles of 4 KB); everything
    # else is transient. An unbounded queue would have grown by ~250 MB here.
    assert peak < 60e6, f"peak traced memory {peak / 1e6:.0f} MB"


def test_disconnect_is_survived_and_the_gap_counted(torch_engine):
    uri = SIM + "&rate=4000&lines=32&total=3200&disconnect=700"
    pipe, s, src = _run(torch_engine, uri, tile=TILE, stride=64, overload="block",
                        reconnect_backoff_s=0.2, latency_budget_ms=None)
    _check_accounting(s, src)
    assert s["reconnects"] == 1
    assert s["dropped"]["reconnect_gap"] > 0            # the camera ran on while we were away
    assert s["lines_in"] == 3200
    assert s["lines_scored"] + s["dropped"]["reconnect_gap"] + s["dropped"]["camera_drop"] == 3200


def test_corrupt_buffers_and_an_engine_error_are_counted_and_the_stream_goes_on(torch_engine, monkeypatch):
    calls = {"n": 0}
    real = torch_engine.infer

    def flaky(frames):   # fault injection: the 3rd inference call fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected engine failure")
        return real(frames)

    monkeypatch.setattr(torch_engine, "infer", flaky)
    scored_bands = []
    src = open_source(SIM + "&rate=0&lines=32&total=960&corrupt=0.1&seed=4")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, stride=64, max_batch=4, overload="block"),
                    on_band=lambda b, rec: rec is not None and scored_bands.append(b)).start()
    assert pipe.wait(120)
    s = pipe.finish()
    _check_accounting(s, src)
    assert s["engine_errors"] == 1 and s["dropped"]["engine_error"] > 0
    assert s["dropped"]["corrupt"] == src.lines_corrupt > 0
    assert calls["n"] > 3 and max(b.own1 for b in scored_bands) > 800   # went on after the failure
    assert s["lines_scored"] == sum(b.owned for b in scored_bands)


def test_area_camera_frames_are_tiled_and_accounted(torch_engine, tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (100, 150), dtype=np.uint8))
    pipe, s, src = _run(torch_engine, f"{tmp_path}?format=Mono8", tile=TILE, stride=48, overload="block")
    _check_accounting(s)
    assert s["frames_in"] == 3 and s["lines_scored"] == 300
    # 100 rows -> bands at 0, 36 (end-aligned); 150 cols -> tiles at 0, 48, 86
    assert s["tiles_scored"] == 3 * 2 * 3


def _camera_stream(torch_engine, uri, seconds=2.0):
    src = open_source(uri)
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, overload="drop-oldest")).start()
    pipe.wait(seconds)
    s = pipe.finish()
    _check_accounting(s)
    assert s["lines_scored"] > 0 and s["tiles_scored"] > 0
    return s


@pytest.mark.stack("aravis")
def test_aravis_fake_camera_streams_into_the_pipeline(torch_engine):
    from tests.runtime.test_sources import _aravis

    Aravis = _aravis()
    cam = Aravis.GvFakeCamera.new("127.0.0.1", "EDGEAD02")
    if cam is None or not cam.is_running():
        pytest.skip("Aravis fake camera could not listen on 127.0.0.1")
    s = _camera_stream(torch_engine, "aravis://127.0.0.1?width=256&height=32&rate=2000")
    assert s["source"]["kind"] == "line" and s["buffers_in"] > 2
    del cam


@pytest.mark.stack("pylon")
def test_pylon_emulation_streams_into_the_pipeline(torch_engine):
    pytest.importorskip("pypylon", reason="pypylon not installed")
    s = _camera_stream(torch_engine, "pylon://emu?width=128&height=64&fail=2&rate=20")
    assert s["dropped"]["corrupt"] == 2 * 64 and s["frames_in"] >= 3


@pytest.mark.stack("genicam")
def test_genicam_simulator_streams_into_the_pipeline(torch_engine):
    pytest.importorskip("harvesters", reason="harvesters not installed")
    from runtime.sources import genicam_simulator_cti

    cti = genicam_simulator_cti()
    if cti is None:
        pytest.skip("genicam wheel with viky.cti not installed")
    s = _camera_stream(torch_engine, f"genicam://{cti}?width=128&height=100&format=Mono8")
    assert s["frames_in"] >= 2


def test_engine_camera_mismatch_fails_at_start(padim_checkpoint):
    rgb_engine = load_engine(padim_checkpoint, backend="torch", frame_hw=(TILE, TILE), frame_channels=3)
    with pytest.raises(EngineError) as e:
        Pipeline(rgb_engine, open_source(SIM + "&rate=0&total=64"), StreamConfig()).start()
    assert "expects RGB8" in str(e.value) and "Mono8" in str(e.value)


@pytest.mark.parametrize("args,needle", [
    (["--engine", "{ckpt}", "--source", "linesim://?width=-3"], "width=-3 must be >= 1"),
    (["--engine", "/nonexistent/model.onnx", "--source", SIM], "engine file not found"),
    (["--engine", "{ckpt}", "--source", "nosuch://x"], "unknown source scheme"),
    (["--engine", "{ckpt}", "--source", SIM, "--tile", "64", "--stride", "80"], "stride"),
    (["--engine", "{onnx}", "--source", SIM + "&format=RGB8"], "expects Mono8"),
    (["--engine", "{onnx}", "--source", SIM, "--tile", "32"], "does not match"),
])
def test_cli_user_errors_exit_2_with_one_line(args, needle, padim_checkpoint, request, capsys):
    onnx = request.getfixturevalue("onnx_artifact") if any("{onnx}" in a for a in args) else ""
    args = [a.replace("{ckpt}", str(padim_checkpoint)).replace("{onnx}", str(onnx)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err


def test_cli_streams_and_prints_the_summary(padim_checkpoint, tmp_path, capsys):
    rc = main(["--engine", str(padim_checkpoint), "--source", SIM + "&rate=0&total=128", "--tile", "64",
               "--overload", "block", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["lines_in"] == s["lines_scored"] == 128 and s["accounting_ok"]
    assert json.loads((tmp_path / "summary.json").read_text())["lines_in"] == 128


@pytest.mark.stack("aravis")
def test_aravis_camera_that_goes_away_is_reopened_with_backoff(torch_engine):
    import gc
    import time

    from tests.runtime.test_sources import _aravis

    Aravis = _aravis()
    cam = Aravis.GvFakeCamera.new("127.0.0.1", "EDGEAD03")
    if cam is None or not cam.is_running():
        pytest.skip("Aravis fake camera could not listen on 127.0.0.1")
    src = open_source("aravis://127.0.0.1?width=128&height=32&rate=3200&timeout=0.5")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, overload="drop-oldest", reconnect_backoff_s=0.2)).start()
    try:
        pipe.wait(1.5)
        before = pipe.snapshot()["lines_in"]
        del cam                       # the camera goes away (its thread stops, nothing answers)
        gc.collect()
        pipe.wait(1.5)
        cam = Aravis.GvFakeCamera.new("127.0.0.1", "EDGEAD03")   # ... and comes back
        deadline = time.monotonic() + 15
        while pipe.snapshot()["reconnects"] == 0 and time.monotonic() < deadline:
            pipe.wait(0.2)
        pipe.wait(1.0)
    finally:
        s = pipe.finish()
    _check_accounting(s)
    assert before > 0
    assert s["reconnects"] == 1
    assert s["dropped"]["reconnect_gap"] > 0      # estimated from the time away x line rate
    assert s["lines_in"] > before + s["dropped"]["reconnect_gap"]   # lines arrived after the reopen
    del cam


def test_hard_stop_and_a_dead_stage_never_hang_and_keep_the_accounting(torch_engine, monkeypatch):
    import time

    real = torch_engine.infer

    def slow(frames):              # fault injection: an engine far slower than the camera
        time.sleep(0.3)
        return real(frames)

    monkeypatch.setattr(torch_engine, "infer", slow)
    src = open_source(SIM + "&rate=0&lines=32")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, stride=48, overload="block", max_batch=4,
                                                    drain_timeout_s=0.5)).start()
    pipe.wait(1.0)
    t0 = time.monotonic()
    s = pipe.finish()
    assert time.monotonic() - t0 < 8
    assert s["hard_stopped"] and s["dropped"]["shutdown"] > 0
    _check_accounting(s, src)

    # a stage that dies (here: the postprocess callback raises) stops the pipeline, no hang
    def boom(band, rec):
        raise RuntimeError("sink exploded")

    monkeypatch.setattr(torch_engine, "infer", real)
    src = open_source(SIM + "&rate=0&lines=32")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, overload="block"), on_band=boom).start()
    assert pipe.wait(30), "pipeline did not stop after a stage died"
    t0 = time.monotonic()
    s = pipe.finish()
    assert time.monotonic() - t0 < 8
    assert "sink exploded" in s["error"]
    _check_accounting(s, src)


@pytest.mark.parametrize("overload", ["drop-oldest", "block"])
def test_cli_sigterm_ends_an_overloaded_stream_with_the_summary_within_5_s(onnx_artifact, tmp_path, overload):
    import os
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # 2048 px at 20 kHz: far more than the engine scores, so every queue is full at the signal
    proc = subprocess.Popen([sys.executable, "-m", "runtime.stream", "--engine", str(onnx_artifact),
                             "--source", "linesim://?width=2048&kind=texture&page=256&rate=20000",
                             "--overload", overload, "--out", str(tmp_path)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        first = ""
        while time.monotonic() < deadline:      # wait for the second live console line
            first = proc.stdout.readline()
            if (first.startswith("[") and "in 0 " not in first) or proc.poll() is not None:
                break
        assert "lines/s" in first, first + proc.stderr.read()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["accounting_ok"] and summary["lines_in"] > 0
    assert summary["source_lines_produced"] == summary["lines_in"]
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert took <= 5.0, f"SIGTERM to exit took {took:.1f} s"


def test_stream_passes_the_buffer_choice_to_the_tensorrt_runner(tmp_path):
    """`--buffers` reaches TensorRTEngine: an unknown choice is refused, naming the plan file
    (checked before TensorRT is needed, so this runs on a machine without it)."""
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"not a plan")
    with pytest.raises(StreamError) as e:
        run_stream(plan, SIM + "&rate=0&total=64", backend="tensorrt", buffers="opencl")
    assert "model.engine" in str(e.value) and "opencl" in str(e.value)
