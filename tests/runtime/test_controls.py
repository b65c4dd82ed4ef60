"""Run-time controls on a real stream: a threshold change reaches the next band (and no earlier one),
pause counts lines as `paused` while the camera runs on, every change is recorded with its time;
the metrics histograms and the Grafana dashboard's metric names against the real exposition."""
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import exposition, metrics_registry
from runtime.pipeline import Pipeline, StreamConfig
from runtime.sources import open_source
from tests.conftest import ROOT
from tests.strip_model import SIM, TILE

# one defect every 200 lines, away from the strip's edges
DEFECTS = ";".join(f"{150 + 200 * i}:{40 + (53 * i) % 170}:6" for i in range(20))


def _stream(engine, uri, hook, **cfg):
    pipe = Pipeline(engine, open_source(uri), StreamConfig(tile=TILE, overload="block", **cfg))
    pipe.on_band = lambda band, rec: hook(pipe, band)
    pipe.start()
    assert pipe.wait(120)
    return pipe, pipe.finish()


def test_threshold_change_reaches_the_next_band(torch_engine):
    seen = {}

    def hook(pipe, band):
        if band.seq == 20:                              # band 20 is handled: the change applies from band 21
            seen["req"] = pipe.set_thresholds(pixel_threshold=1e9, image_threshold=1e9, by="test")
            seen["scored_before"] = pipe.stats.tiles_anomalous
        if band.seq == 60:
            pipe.set_thresholds(pixel_threshold=pipe.engine.map_threshold, by="test", clear_image_threshold=True)

    pipe, s = _stream(torch_engine, SIM + f"&rate=0&lines=32&total=4400&defects={DEFECTS}", hook, stride=48)
    ctl = [c for c in s["controls"] if c["control"] == "thresholds"]
    assert len(ctl) == 2 and all(c["by"] == "test" and c["time"].endswith("Z") for c in ctl)
    up, down = ctl
    assert up["pixel_threshold"] == 1e9 and up["previous"]["pixel_threshold"] == pipe.engine.map_threshold
    assert down["image_threshold"] is None and down["t_s"] >= up["t_s"] > 0
    # applied when band 21 arrived: from the first row band 20 left unfinished (its origin, 20 x 48),
    # or earlier when a defect still open reaches above it (a defect is at most a few tens of lines)
    assert 20 * 48 - TILE <= up["from_line"] <= 20 * 48 and 60 * 48 - TILE <= down["from_line"] <= 60 * 48
    events = list(pipe.events)
    before = [e for e in events if e["line_end"] < up["from_line"]]
    during = [e for e in events if e["line_start"] >= up["from_line"] and e["line_end"] < down["from_line"]]
    after = [e for e in events if e["line_start"] >= down["from_line"]]
    assert before and after and during == []
    assert s["thresholds_at_start"]["pixel_threshold"] == pipe.engine.map_threshold
    assert s["pixel_threshold"] == pipe.engine.map_threshold and s["image_threshold"] is None
    assert s["accounting_ok"] and s["lines_scored"] == 4400


def test_pause_counts_lines_and_keeps_capturing(torch_engine):
    state = {}

    def hook(pipe, band):
        if band.seq == 10 and "paused" not in state:
            pipe.pause(by="test")
            state["paused"] = True
        if pipe.stats.dropped["paused"] >= 2000 and "resumed" not in state:
            pipe.resume(by="test")
            state["resumed"] = True

    # a live camera: while paused, lines keep coming and are counted, not scored
    pipe, s = _stream(torch_engine, SIM + "&rate=20000&lines=64&total=12800", hook, stride=64,
                      latency_budget_ms=None)
    assert s["dropped"]["paused"] >= 2000 and s["accounting_ok"], s
    assert s["lines_in"] == 12800 == s["lines_scored"] + s["lines_dropped"]
    assert s["lines_scored"] > 11 * 64            # scoring came back after the resume
    kinds = [c["control"] for c in s["controls"]]
    assert kinds == ["pause", "resume"] and not s["paused"]
    pause, resume = s["controls"]
    assert pause["from_line"] is not None and resume["from_line"] - pause["from_line"] >= s["dropped"]["paused"]


def test_histograms_and_counters_in_the_exposition(torch_engine):
    pipe, s = _stream(torch_engine, SIM + "&rate=0&lines=64&total=1920", lambda p, b: None, stride=64)
    text = exposition(metrics_registry(lambda: {**pipe.snapshot(), "sinks": {}}, pipe.stats.hist,
                                       {"backend": "torch"})).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    bands = 1920 // 64
    count = [m.value for m in fams["edge_ad_line_to_verdict_seconds"].samples if m.name.endswith("_count")]
    assert count == [bands]           # one observation per scored band
    calls = [m.value for m in fams["edge_ad_engine_call_seconds"].samples if m.name.endswith("_count")]
    assert calls == [s["engine_calls"]]
    waits = {m.labels["queue"]: m.value for m in fams["edge_ad_queue_wait_seconds"].samples
             if m.name.endswith("_count")}
    assert waits["capture"] == 1920 // 64 and waits["inference"] == bands and waits["post"] == bands
    scored = [m.value for m in fams["edge_ad_lines_scored"].samples]
    assert scored == [1920]
    info = [m for f in fams.values() for m in f.samples if m.name == "edge_ad_engine_info"]
    assert info[0].labels["backend"] == "torch" and info[0].value == 1


def test_grafana_dashboard_plots_metrics_the_stream_exports(torch_engine):
    import re

    dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    pipe, _ = _stream(torch_engine, SIM + "&rate=0&lines=64&total=256", lambda p, b: None, stride=64)
    text = exposition(metrics_registry(lambda: {**pipe.snapshot(), "sinks": {"events.jsonl": {
        "written": 0, "dropped": 0, "failed": 0, "abandoned": 0, "retries": 0, "queued": 0}}},
        pipe.stats.hist, {"backend": "x"})).decode()
    exported = {m.name for f in text_string_to_metric_families(text) for m in f.samples}
    for e in exprs:
        for name in re.findall(r"edge_ad_[a-z_]+", e):
            assert name in exported, f"dashboard query {e!r} uses {name}, which the stream does not export"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", True])
def test_non_finite_threshold_is_refused(torch_engine, bad):
    pipe = Pipeline(torch_engine, open_source(SIM + "&rate=0&total=64"), StreamConfig(tile=TILE))
    with pytest.raises(ValueError, match="pixel_threshold"):
        pipe.set_thresholds(pixel_threshold=bad)
    assert pipe.control.take_thresholds() is None
