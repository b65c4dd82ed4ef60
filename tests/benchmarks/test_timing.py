"""benchmarks.timing: the measurement itself, checked against workloads of known duration/size."""
import time

import numpy as np
import pytest

from benchmarks import timing


def test_clock_measures_a_known_sleep():
    clock = timing.Clock("cpu")
    samples = [clock.time(lambda: time.sleep(0.02)) for _ in range(5)]
    # sleep never returns early; the upper bound is loose (shared 2-core machine), the point is
    # that the clock reports milliseconds of the call, not seconds or microseconds
    assert min(samples) >= 20.0 - 0.5
    assert np.median(samples) < 20.0 + 15.0


def test_interleaved_rounds_warmup_and_errors():
    calls = {"a": 0, "b": 0, "bad": 0}

    def make(name, secs):
        def fn():
            calls[name] += 1
            time.sleep(secs)
        return fn

    def bad():
        calls["bad"] += 1
        if calls["bad"] > 2:
            raise RuntimeError("device lost\nsecond line")

    cands = [timing.Candidate("a", make("a", 0.01)), timing.Candidate("b", make("b", 0.03)),
             timing.Candidate("bad", bad)]
    timing.interleaved(cands, reps=4, warmup=2)
    a, b, c = cands
    assert calls["a"] == calls["b"] == 2 + 4           # warm-up calls are run but never recorded
    assert len(a.samples_ms) == len(b.samples_ms) == 4
    assert a.error is None and b.error is None
    assert c.error == "RuntimeError: device lost" and len(c.samples_ms) == 0
    assert min(b.samples_ms) >= 30.0 - 0.5 and min(a.samples_ms) >= 10.0 - 0.5
    assert np.median(b.samples_ms) > np.median(a.samples_ms)


def test_interleaving_order_is_round_robin():
    order = []
    cands = [timing.Candidate(n, (lambda n=n: order.append(n))) for n in "xyz"]
    timing.interleaved(cands, reps=3, warmup=0)
    assert "".join(order) == "xyz" * 3


def test_min_time_extends_the_run():
    c = timing.Candidate("s", lambda: time.sleep(0.005))
    timing.interleaved([c], reps=1, warmup=0, min_time_s=0.05)
    assert len(c.samples_ms) >= 2 and sum(c.samples_ms) >= 50.0


def test_summarize_against_numpy():
    rng = np.random.default_rng(3)
    s = rng.gamma(2.0, 3.0, size=101)
    out = timing.summarize(s, batch=8)
    assert out["n"] == 101
    assert out["median_ms"] == pytest.approx(np.median(s))
    assert out["p90_ms"] == pytest.approx(np.quantile(s, 0.9))
    assert out["p99_ms"] == pytest.approx(np.quantile(s, 0.99))
    assert out["images_per_s"] == pytest.approx(8000.0 / np.median(s))
    with pytest.raises(ValueError):
        timing.summarize([])


def test_host_memory_sees_a_known_allocation():
    n = 96 * 2 ** 20
    big = np.ones(3 * n, dtype=np.uint8)   # an earlier, larger peak must not leak into the block's
    del big
    with timing.HostMemory() as hm:
        buf = np.ones(n, dtype=np.uint8)   # touched pages: resident
        del buf
    if hm.method == "unavailable":
        pytest.skip("no way to read peak memory on this platform")
    assert hm.peak_delta_bytes >= 0.9 * n, (hm.method, hm.peak_delta_bytes)
    if hm.method == "vmhwm":                      # exact method: no wild over-count either
        assert hm.peak_delta_bytes < 1.5 * n


def test_device_memory_on_cpu_reports_nothing():
    with timing.DeviceMemory("cpu") as dm:
        pass
    assert dm.torch_peak_bytes is None and dm.device_used_delta_bytes is None
    assert "not a CUDA" in dm.method


@pytest.mark.stack("cuda")
def test_cuda_clock_measures_device_work():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    clock = timing.Clock("cuda")
    ms = clock.time(lambda: torch.cuda._sleep(50_000_000))   # ~tens of ms of GPU spinning
    assert ms >= clock.last_device_ms > 1.0
