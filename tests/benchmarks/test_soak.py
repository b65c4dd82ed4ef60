"""benchmarks/soak.py for two minutes (the 30-minute run is in benchmarks/RESULTS.md): the stream CLI
at 1.5x its capacity with dropped, corrupt and stalled buffers, disconnects, defects and a webhook
that never answers. Every line is accounted for against the simulator's own count, every fault
fired, SIGTERM gives the summary within 5 s, and nothing grows: threads, descriptors, memory."""
import pytest

from benchmarks.soak import fault_uri, rss_slope, run_soak


def test_fault_schedule_and_slope_helpers():
    uri = fault_uri(256, 1000, 200, fault_p=0.01)
    assert "stall=22500:0.5;67500:0.5;112500:0.5;157500:0.5" in uri and "disconnect=30000,120000" in uri
    assert "drop=0.01&corrupt=0.01" in uri and uri.count(":") > 100
    flat = [{"t_s": t, "rss_mb": 100.0} for t in range(0, 100, 10)]
    rising = [{"t_s": t, "rss_mb": 100.0 + t / 3600.0 * 7} for t in range(0, 100, 10)]   # 7 MB/h
    assert rss_slope(flat, 0)["mb_per_h"] == pytest.approx(0, abs=1e-9)
    assert rss_slope(rising, 20)["mb_per_h"] == pytest.approx(7) and rss_slope(rising, 95)["mb_per_h"] is None


@pytest.mark.slow
def test_two_minute_soak(onnx_artifact, tmp_path):
    r = run_soak(onnx_artifact, seconds=120, load=1.5, width=256, sample_s=5, capacity_s=5,
                 fault_p=0.003, out_dir=tmp_path, progress=False)
    acc = r["accounting"]
    assert r["rc"] == 0 and acc["error"] is None and acc["accounting_ok"]
    assert acc["lines_in"] == acc["source_lines_produced"] == acc["lines_scored"] + acc["lines_dropped"]
    # every injected fault happened and was counted
    d = acc["dropped"]
    assert acc["reconnects"] >= 1 and d["reconnect_gap"] > 0
    assert acc["corrupt_buffers"] > 0 and d["corrupt"] > 0 and d["camera_drop"] > 0
    assert d["overload"] + d["late"] > 0            # 1.5x capacity: something had to give
    assert acc["events"] > 10 and acc["latency_ms"]["p99"] <= acc["latency_budget_ms"]
    hook = r["sinks"]["webhook"]
    assert hook["written"] == 0 and hook["failed"] + hook["dropped"] + hook["abandoned"] == acc["events"]
    assert r["sinks"]["events.jsonl"]["written"] == acc["events"]
    assert r["sigterm_to_exit_s"] <= 5.0
    # nothing grows: threads and descriptors end where they were after start-up
    steady = [s for s in r["samples"] if s["t_s"] >= 20]
    assert max(s["threads"] for s in steady) - min(s["threads"] for s in steady) <= 2
    assert max(s["fds"] for s in steady) - min(s["fds"] for s in steady) <= 4
    assert r["rss"]["pct_per_h"] is not None
    assert steady[-1]["rss_mb"] - steady[0]["rss_mb"] < 25, [round(s["rss_mb"]) for s in steady]
