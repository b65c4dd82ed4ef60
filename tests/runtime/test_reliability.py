"""Issue 16: a line that never stops, a number that never lies. One test (or a few) per failure the
fault probes found: bad frames, slow sinks, accounting at the edges of a stream, integrity of what
decides a verdict, one-line errors, startup checks, bounded stop, paced recordings, faults that a
late reader skipped. Dead peers are this test's own 127.0.0.1 servers."""
import json
import socket
import threading
import time

import cv2
import numpy as np
import pytest

from benchmarks.soak import SilentPeer
from runtime.pipeline import Pipeline, StreamConfig
from runtime.metrics import MetricsServer
from runtime.sinks import Sink, SinkRunner, WebhookSink
from runtime.sources import SourceDisconnected, SourceError, open_source
from runtime.stream import StreamError, main, run_stream
from tests.strip_model import SIM, TILE


def _check(s, src=None):
    assert s["lines_in"] == s["lines_scored"] + s["lines_dropped"], s
    assert s["accounting_ok"], s
    if src is not None:
        assert s["lines_in"] == src.lines_produced == s["source_lines_produced"], (s["lines_in"], src.lines_produced)


def _run(engine, uri, duration=None, **cfg):
    src = open_source(uri)
    pipe = Pipeline(engine, src, StreamConfig(**cfg)).start()
    if duration is None:
        assert pipe.wait(120), "stream did not finish"
    else:
        pipe.wait(duration)
    return pipe.finish(), src


@pytest.fixture
def dead_peer():
    """A loopback server that accepts connections and never answers (a hung webhook)."""
    peer = SilentPeer()
    yield peer
    peer.close()


def _one_line_exit_2(args, capsys):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# ---- 1. one unreadable image never ends a folder stream ------------------------------------------
def _image_folder(tmp_path, n=8, bad=()):
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 256, (70, 150), dtype=np.uint8))
    for name, data in bad:
        (tmp_path / name).write_bytes(data)
    return tmp_path


def _truncated_jpeg():
    ok, b = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 256, (70, 150), dtype=np.uint8))
    return b.tobytes()[: len(b) // 2]


def test_bad_images_in_a_folder_are_corrupt_frames_and_the_stream_goes_on(torch_engine, tmp_path):
    folder = _image_folder(tmp_path, bad=[("03a.png", b""), ("05a.jpg", b"garbage" * 50),
                                          ("06a.jpg", _truncated_jpeg())])
    s, src = _run(torch_engine, f"{folder}?format=Mono8", tile=TILE, overload="block")
    _check(s)
    assert s["frames_in"] == 11 and s["corrupt_buffers"] == 3
    assert s["dropped"]["corrupt"] == 3 * 70 and s["lines_scored"] == 8 * 70
    assert s["error"] is None


def test_damaged_files_are_recognised(tmp_path):
    from runtime.sources.base import damaged_image, read_image

    good_jpg = cv2.imencode(".jpg", np.full((9, 9), 7, np.uint8))[1].tobytes()
    good_png = cv2.imencode(".png", np.full((9, 9), 7, np.uint8))[1].tobytes()
    assert damaged_image(good_jpg) is None and damaged_image(good_png) is None
    assert "truncated JPEG" in damaged_image(_truncated_jpeg())
    assert "truncated PNG" in damaged_image(good_png[:-20])
    assert damaged_image(b"") == "empty file"
    p = tmp_path / "t.jpg"
    p.write_bytes(_truncated_jpeg())
    # OpenCV's file reader takes the truncated JPEG as a whole picture (grey fill, only a warning)
    assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (70, 150)
    with pytest.raises(SourceError, match="t.jpg: truncated JPEG"):
        read_image(p)


def test_folder_of_only_damaged_images_is_one_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SourceError, match="no readable image"):
        open_source(str(tmp_path)).open()


# ---- 2. a slow or dead sink never stalls the pipeline --------------------------------------------
def _defects(n, every=150):
    return ";".join(f"{100 + i * every}:{40 + (i * 37) % 170}:6" for i in range(n))


def test_dead_webhook_does_not_stall_the_stream(onnx_artifact, dead_peer, tmp_path):
    uri = SIM + f"&rate=0&lines=40&total=4600&defects={_defects(30)}"
    t0 = time.monotonic()
    s = run_stream(onnx_artifact, uri, out_dir=tmp_path, tile=TILE, overload="block",
                   webhook=f"http://127.0.0.1:{dead_peer.port}/hook")
    wall = time.monotonic() - t0
    _check(s)
    assert s["lines_scored"] == 4600 and s["events"] >= 30
    hook = s["sinks"]["webhook"]
    # nothing reached the dead peer, and every event is counted somewhere
    assert hook["written"] == 0 and hook["failed"] + hook["abandoned"] + hook["dropped"] == s["events"], hook
    assert s["sinks"]["events.jsonl"]["written"] == s["events"]     # the other sinks were not held up
    # scoring 4,600 lines takes ~1 s here; the close waits at most 1 s for the sinks (was: up to
    # 1 s per event in the postprocess stage, then 10 s at close)
    assert wall < 8, wall


class _Blocking(Sink):
    name = "blocking"
    queue_size = 4

    def __init__(self):
        self.release = threading.Event()

    def write(self, record):
        self.release.wait(30)


class _Flaky(Sink):
    name = "flaky"
    retries, backoff_s, queue_size = 3, 0.01, 2000

    def __init__(self, fail_times):
        self.fail_times, self.calls, self.got = fail_times, 0, []

    def write(self, record):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise ConnectionError("injected failure")
        self.got.append(record)


class _Ev:
    def __init__(self, i):
        self.i = i
        self.line_start = self.line_end = self.col_start = self.col_end = 0

    def to_dict(self):
        return {"i": self.i}


class _Pipe:   # what SinkRunner.offer_event reads of a pipeline
    pixel_threshold, map_low = 1.0, 0.0

    class assembler:
        width = 8

    class preview:
        end, capacity = 0, 0

        @staticmethod
        def rows(a, b):
            return None

    class stitcher:
        preview_end, keep_rows = 0, 0


def test_sink_queues_never_block_and_count_every_record():
    blocking, flaky = _Blocking(), _Flaky(fail_times=2)
    runner = SinkRunner([blocking, flaky]).start()
    t0 = time.monotonic()
    for i in range(1000):
        runner.offer_event(_Pipe, _Ev(i))
    assert time.monotonic() - t0 < 1.0            # never waited for the stuck sink
    # a sink that does not draw (the webhook) queues the event alone, not the strip crop and map:
    # a stuck one holds a few KB, not tens of MB
    assert all(set(r) == {"type", "event"} for r in runner.lanes[0].items)
    deadline = time.monotonic() + 10
    while len(flaky.got) < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    snap = runner.snapshot()
    assert snap["blocking"]["dropped"] >= 1000 - 4 - 1 and snap["blocking"]["written"] == 0
    assert snap["flaky"]["retries"] == 2 and snap["flaky"]["written"] == 1000 and snap["flaky"]["failed"] == 0
    assert [r["event"]["i"] for r in flaky.got] == list(range(1000))
    t0 = time.monotonic()
    final = runner.close(timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    b = final["blocking"]
    assert b["dropped"] + b["abandoned"] + b["written"] + b["failed"] == 1000, b
    blocking.release.set()


def test_sink_counters_are_served_on_metrics(torch_engine, dead_peer):
    import urllib.request

    got = {}

    def on_start(pipe):
        got["pipe"] = pipe

    s = run_stream(torch_engine, SIM + f"&rate=0&lines=40&total=1200&defects={_defects(6)}", tile=TILE,
                   overload="block", webhook=f"http://127.0.0.1:{dead_peer.port}/x", metrics_port=0,
                   on_start=on_start)
    assert s["events"] >= 6
    runner = SinkRunner([WebhookSink(f"http://127.0.0.1:{dead_peer.port}/x", timeout_s=0.2)]).start()
    with MetricsServer(lambda: {**got["pipe"].snapshot(), "sinks": runner.snapshot()}, 0) as m:
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=5).read().decode()
    runner.close(timeout=0.1)
    from prometheus_client.parser import text_string_to_metric_families

    got = {(m.name, tuple(sorted(m.labels.items()))): m.value
           for fam in text_string_to_metric_families(text) for m in fam.samples}
    assert got[("edge_ad_sink_records_total", (("outcome", "dropped"), ("sink", "webhook")))] == 0
    assert got[("edge_ad_sink_queue_depth", (("sink", "webhook"),))] == 0
    assert ("edge_ad_lines_dropped_total", (("reason", "late"),)) in got


# ---- 3. accounting from the camera's own counters ------------------------------------------------
def test_lines_lost_before_the_first_and_after_the_last_buffer_are_counted(torch_engine):
    # the probe's URI: buffers 0-1 and 47-49 are dropped by the simulated camera (seed 2)
    s, src = _run(torch_engine, "linesim://?width=256&rate=0&lines=64&total=3200&drop=0.3&seed=2",
                  tile=TILE, overload="block")
    _check(s, src)
    assert s["lines_in"] == 3200 and s["dropped"]["camera_drop"] == src.lines_lost == 896


def test_paced_stream_stopped_midway_counts_what_the_camera_still_held(torch_engine):
    s, src = _run(torch_engine, SIM + "&rate=20000&lines=32&drop=0.05&seed=1", duration=1.0,
                  tile=TILE, overload="drop-oldest")
    _check(s, src)
    assert s["lines_in"] > 10_000 and s["dropped"]["camera_drop"] > 0


@pytest.mark.parametrize("uri,needle", [
    ("linesim://?drop=2", "drop=2.0 must be <= 1.0"),
    ("linesim://?corrupt=-0.1", "corrupt=-0.1 must be >= 0.0"),
    ("linesim://?rate=inf", "rate='inf' must be a finite number"),
    ("linesim://?rate=nan", "rate='nan' must be a finite number"),
    ("linesim://?rate=-5", "rate=-5.0 must be >= 0.0"),
    ("linesim://?rate=0.0000001", "must be 0 (as fast as read) or >= 0.001"),
    ("linesim://?lines=100000000", "one buffer 409.6 GB"),
    ("linesim://?width=100001", "4 pages 40.0 GB"),
    ("linesim://?stall=10:nan", "stall entry"),
    ("linesim://?defects=5:5:3:300", "VALUE 0..255"),
    ("linesim://?seed=-1", "seed=-1 must be >= 0"),
    ("linesim://?pages=100000", "pages=100000 must be <= 64"),
    ("linesim://?disconnect=-4", "must be >= 0"),
    ("aravis://127.0.0.1?rate=nan", "rate='nan' must be a finite number"),
])
def test_source_parameters_are_validated(uri, needle):
    try:
        src = open_source(uri)
    except SourceError as e:
        assert needle in str(e), str(e)
        return
    if uri.startswith("aravis"):   # without Aravis installed the stack check comes first
        src.close()
    pytest.fail(f"{uri} was accepted")


# ---- 4. integrity through the stream CLI ---------------------------------------------------------
def test_edited_checkpoint_threshold_is_refused_by_stream_and_export(padim_checkpoint, tmp_path, capsys):
    import torch

    blob = torch.load(padim_checkpoint, weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta["score_stats"]["map_threshold"] = 99.0
    edited = tmp_path / "edited.pt"
    torch.save(dict(blob, meta_json=json.dumps(meta)), edited)
    line = _one_line_exit_2(["--engine", edited, "--source", SIM + "&rate=0&total=128", "--tile", TILE], capsys)
    assert "does not match its stored meta_sha256" in line
    from export.onnx import main as export_main

    assert export_main(["--ckpt", str(edited), "--out", str(tmp_path / "x"), "--no-check"]) == 2
    assert "meta_sha256" in capsys.readouterr().err
    assert not (tmp_path / "x" / "model.onnx.json").exists()


def test_rejected_artifact_needs_allow_rejected_and_start_prints_hashes(onnx_artifact, tmp_path, capsys, caplog):
    import shutil

    from deploy.artifacts import read_metadata, sidecar_path, write_sidecar

    art = tmp_path / "model.onnx"
    shutil.copy(onnx_artifact, art)
    meta = read_metadata(onnx_artifact)
    write_sidecar(art, meta, parity={"passed": False, "failures": ["score max abs diff 0.5 > 1e-3"]})
    args = ["--engine", art, "--source", SIM + "&rate=0&total=128", "--overload", "block"]
    assert "parity gate REJECTED" in _one_line_exit_2(args, capsys)
    assert main([str(a) for a in args + ["--allow-rejected"]]) == 0
    out = capsys.readouterr()
    side = json.loads(sidecar_path(art).read_text())
    assert f"sha256 {side['artifact_sha256'][:16]}" in out.out
    assert f"metadata sha256 {side['metadata_sha256'][:16]}" in out.out and "parity REJECTED" in out.out
    assert "onnx " in out.out.split("versions:")[1].splitlines()[0]
    assert any("parity gate rejected" in r.getMessage() for r in caplog.records)
    summary = json.loads(out.out[out.out.index("\n{") + 1:])
    assert summary["engine"]["parity"] == "REJECTED" and summary["engine"]["metadata_sha256"] == side["metadata_sha256"]


def test_runtime_section_thresholds_apply_unless_overridden(onnx_artifact, tmp_path):
    import shutil

    from deploy.artifacts import write_runtime_config

    art = tmp_path / "model.onnx"
    shutil.copy(onnx_artifact, art)
    shutil.copy(str(onnx_artifact) + ".json", str(art) + ".json")
    uri = SIM + "&rate=0&lines=40&total=800&defects=300:100:6"
    base = run_stream(art, uri, overload="block")
    assert base["threshold_source"] == "score_stats" and base["events"] >= 1
    write_runtime_config(art, {"pixel_threshold": 1e9, "image_threshold": -1e9})   # nothing / everything
    s = run_stream(art, uri, overload="block")
    assert s["threshold_source"] == "runtime section" and s["pixel_threshold"] == 1e9
    assert s["events"] == 0 and s["tiles_anomalous"] == s["tiles_scored"]
    o = run_stream(art, uri, overload="block", pixel_threshold=base["pixel_threshold"])
    assert o["threshold_source"] == "option" and o["events"] == base["events"]


# ---- 5. one line, exit 2, for every bad input probed -------------------------------------------
def test_cli_bad_numbers_paths_and_checkpoints_are_one_line(padim_checkpoint, onnx_artifact, tmp_path, capsys):
    import torch

    blob = torch.load(padim_checkpoint, weights_only=True)
    listmeta, badver = tmp_path / "list.pt", tmp_path / "ver.pt"
    import hashlib

    for path, meta in ((listmeta, [1, 2]), (badver, {"format": "edge-ad-checkpoint", "format_version": "one"})):
        text = json.dumps(meta)
        torch.save(dict(blob, meta_json=text, meta_sha256=hashlib.sha256(text.encode()).hexdigest()), path)
    src = SIM + "&rate=0&total=64"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--engine", listmeta, "--source", src], "holds a JSON list"),
        (["--engine", badver, "--source", src], "format_version 'one'"),
        (["--engine", onnx_artifact, "--source", src, "--metrics-port", "70000"], "--metrics-port 70000"),
        (["--engine", onnx_artifact, "--source", src, "--metrics-port", "-1"], "--metrics-port -1"),
        (["--engine", onnx_artifact, "--source", src, "--out", a_file], "is a file"),
        (["--engine", onnx_artifact, "--source", src, "--out", a_file / "sub"], "not a writable folder"),
        (["--engine", onnx_artifact, "--source", src, "--pixel-threshold", "nan"], "--pixel-threshold nan"),
        (["--engine", onnx_artifact, "--source", src, "--max-batch", "x"], "invalid int value"),
        (["--engine", onnx_artifact, "--source", src, "--latency-budget-ms", "inf"], "--latency-budget-ms inf"),
        (["--engine", tmp_path, "--source", src], "is a folder"),
    ]
    for args, needle in cases:
        assert needle in _one_line_exit_2(args, capsys), args
    for name in ("export.onnx", "export.check"):
        import importlib

        mod = importlib.import_module(name)
        extra = ["--artifact", str(onnx_artifact)] if name == "export.check" else ["--out", str(tmp_path / "o")]
        for ck, needle in ((listmeta, "holds a JSON list"), (tmp_path, "is a folder")):
            assert mod.main(["--ckpt", str(ck)] + extra) == 2, name
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err, err


# ---- 6. start-up checks come first; stop is bounded; recordings are paced or waited for -----------
def test_metrics_port_in_use_fails_before_anything_starts(onnx_artifact, tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        line = _one_line_exit_2(["--engine", onnx_artifact, "--source", SIM + "&rate=0&total=64",
                                 "--out", tmp_path, "--metrics-port", busy.getsockname()[1]], capsys)
    finally:
        busy.close()
    assert "cannot listen" in line
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "events.jsonl").exists()


def test_a_stream_too_big_for_memory_is_refused_with_the_sizes(onnx_artifact, monkeypatch):
    import runtime.sources.base as base

    monkeypatch.setattr(base, "available_memory", lambda: 50_000_000)   # a 50 MB box
    with pytest.raises(StreamError, match=r"capture queue \(64 buffers\) 67.1 MB"):
        run_stream(onnx_artifact, "linesim://?width=4096&lines=256&page=256&rate=0&total=256")


@pytest.mark.parametrize("overload", ["drop-oldest", "block"])
def test_stop_is_bounded_with_full_queues(torch_engine, monkeypatch, overload):
    real = torch_engine.infer

    def slow(frames):              # an engine far slower than the camera: queues fill up
        time.sleep(0.4)
        return real(frames)

    monkeypatch.setattr(torch_engine, "infer", slow)
    src = open_source(SIM + "&rate=20000&lines=32")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, overload=overload, max_batch=4,
                                                    latency_budget_ms=None)).start()
    pipe.wait(1.5)
    assert pipe.q_cap.qsize() > 0 or pipe.q_inf.qsize() > 0
    t0 = time.monotonic()
    s = pipe.finish()
    assert time.monotonic() - t0 < 5.0      # drain 2 s, then hard stop (was: 10 s drain + 5 s per join)
    _check(s, src)
    assert s["dropped"]["shutdown"] > 0


def test_image_folder_is_not_live_and_loses_nothing_to_a_slow_engine(torch_engine, monkeypatch, tmp_path):
    real = torch_engine.infer
    monkeypatch.setattr(torch_engine, "infer", lambda f: (time.sleep(0.05), real(f))[1])
    folder = _image_folder(tmp_path, n=30)
    s, src = _run(torch_engine, f"{folder}?format=Mono8", tile=TILE, overload="drop-oldest",
                  capture_queue=2, infer_queue=2)
    _check(s)
    assert not s["source_live"] and s["lines_dropped"] == 0 and s["lines_scored"] == 30 * 70


def test_disconnect_fires_even_when_a_late_reader_skips_its_line():
    src = open_source("linesim://?width=16&rate=20000&lines=10&queue=2&disconnect=300")
    with src:
        first = src.read()
        time.sleep(0.3)                   # 6,000 lines late: the camera lost most of them
        with pytest.raises(SourceDisconnected, match="line 300"):
            src.read()
        assert first.index == 0 and src.lines_lost > 300


def test_stop_interrupts_a_long_stall(torch_engine):
    src = open_source(SIM + "&rate=2000&lines=32&stall=100:60")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE)).start()
    pipe.wait(0.5)
    t0 = time.monotonic()
    s = pipe.finish()
    assert time.monotonic() - t0 < 3.0
    _check(s, src)


def test_single_line_buffers_get_the_slack_of_64_line_buffers(torch_engine):
    """The camera's buffer queue and the capture queue hold lines, not a count of buffers: with
    1-line buffers, 16 camera buffers were 8 ms at 2 kHz and 64 capture slots 64 lines, so any
    hiccup of the reader lost lines that 64-line buffers kept."""
    cam = open_source("linesim://?width=16&rate=2000&lines=1&total=1000")
    with cam:
        cam.read()
        time.sleep(0.2)                      # the reader is 400 lines late
        got = 1 + sum(b.lines for b in cam)
    assert got == 1000 and cam.lines_lost == 0
    src = open_source(SIM + "&rate=4000&lines=1&total=3000")
    pipe = Pipeline(torch_engine, src, StreamConfig(tile=TILE, overload="drop-oldest", latency_budget_ms=None,
                                                    infer_queue=64))
    pipe.setup()
    real, calls = pipe.assembler.push, []

    def hiccup(*a):                          # the tiling stage pauses once for 0.25 s (1,000 lines)
        calls.append(1)
        if len(calls) == 5:
            time.sleep(0.25)
        return real(*a)

    pipe.assembler.push = hiccup
    pipe.start()
    assert pipe.wait(60)
    s = pipe.finish()
    _check(s, src)
    assert s["lines_scored"] == 3000, s["dropped"]


def test_pathological_config_values_are_refused_at_construction():
    for kw, needle in (({"max_batch": 0}, "--max-batch 0"), ({"pixel_threshold": float("inf")}, "finite"),
                       ({"line_pitch_mm": 0.0}, "> 0"), ({"latency_budget_ms": 0.0}, "> 0"),
                       ({"drain_timeout_s": float("nan")}, "finite"), ({"capture_queue": 0}, "capture-queue")):
        with pytest.raises(ValueError, match=needle):
            StreamConfig(**kw)


def test_latency_reservoir_is_preallocated_and_unbiased():
    from runtime.accounting import Latencies

    lat = Latencies(cap=2000, seed=3)
    before = lat._buf.nbytes
    values = np.random.default_rng(0).permutation(20_000).astype(float)
    for v in values:
        lat.add(v)
    assert lat.n == 20_000 and len(lat.samples) == 2000 and lat._buf.nbytes == before
    assert not np.isnan(lat.samples).any()
    assert abs(np.median(lat.samples) - 10_000) < 1_000       # a uniform sample of all 20,000
    assert len(set(lat.samples.tolist())) == 2000
