"""The live page: its strip against a direct computation, its API (read-only views open, every change
needing the token, thresholds / pause / save reaching the stream and the signed sidecar), only
127.0.0.1 listening, and - in headless Chromium - the page itself during a linesim stream."""
import json
import os
import pathlib
import shutil
import tempfile
import time
import urllib.request

import numpy as np
import psutil
import pytest

from deploy import load_engine
from deploy.artifacts import read_metadata, write_runtime_config
from runtime.strip import WebStrip
from runtime.tiling import RollingRows
from tests.conftest import ROOT
from tests.runtime.ui_helpers import copy_artifact, defect_uri, http, streaming, wait_for

pytest.importorskip("starlette", reason='the live page needs starlette and uvicorn: pip install -e ".[ui]"')

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = pathlib.Path(os.environ.get("EDGE_AD_TEST_ARTIFACTS", ROOT / "test-artifacts"))


# ---- the strip ----------------------------------------------------------------------------------
class _Stitcher:
    """What WebStrip reads of a StripStitcher: final map rows held in a ring of keep_rows."""

    def __init__(self, full_map, keep_rows):
        self.full, self.keep_rows, self.preview_end = full_map, keep_rows, 0

    def map_lines(self, lines):
        if lines[0] < self.preview_end - self.keep_rows or lines[-1] >= self.preview_end:
            return None
        return self.full[lines].copy()


class _Pipe:
    def __init__(self, full_map, width, channels, keep):
        self.stitcher = _Stitcher(full_map, keep)
        self.preview = RollingRows(keep, width, channels)


@pytest.mark.parametrize("width,channels,lines,dw,dh", [(250, 1, 1000, 64, 37), (97, 3, 300, 200, 300),
                                                        (130, 1, 5000, 64, 50)])
def test_strip_is_the_max_pooled_newest_lines(width, channels, lines, dw, dh):
    rng = np.random.default_rng(width)
    total = 5 * lines + 13
    image = rng.integers(0, 256, (total, width, channels), dtype=np.uint8)
    amap = rng.random((total, width), dtype=np.float32)
    amap[rng.random(total) < 0.05] = -np.inf          # lines never scored keep no heat
    strip = WebStrip(width, channels, lines=lines, display_w=dw, display_h=dh)
    pipe = _Pipe(amap, width, channels, keep=256)
    written = 0
    while pipe.stitcher.preview_end < total:          # bands of odd sizes; final rows lag the image
        n = int(rng.integers(1, 120))
        pipe.preview.write(written, image[written:written + n])
        written += n
        pipe.stitcher.preview_end = max(0, min(total, written - int(rng.integers(0, 60))))
        if written >= total:
            pipe.stitcher.preview_end = total
        strip.update(pipe)
    img, got, first = strip.view()
    kx, ky, step = strip.kx, strip.ky, strip.row_step
    assert kx == -(-width // dw) and ky == -(-lines // dh) and step == max(1, ky // 8)
    newest = (total - 1) // ky
    padded = np.pad(amap, ((0, 0), (0, strip.w * kx - width)), constant_values=-np.inf)
    for r in range(dh):
        b = newest - r
        if b < 0:
            assert first[r] == -1
            continue
        ref = padded[b * ky:(b + 1) * ky:step].reshape(-1, strip.w, kx).max(axis=(0, 2))   # sampled lines
        assert first[r] == b * ky
        np.testing.assert_array_equal(got[r], ref)
        np.testing.assert_array_equal(img[r], image[b * ky, ::kx])
    pic, meta = strip.render(0.5, 0.0, boxes=[{"line_start": total - 5, "line_end": total - 2,
                                                "col_start": 3, "col_end": 9}])
    assert pic.shape == (min(dh, newest + 1), strip.w, 3) and meta["last_line"] == total - 1 and meta["ky"] == ky


# ---- the API --------------------------------------------------------------------------------------
def _listening_hosts():
    return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN})


def test_page_api_token_controls_and_save(onnx_artifact, tmp_path):
    artifact = copy_artifact(onnx_artifact, tmp_path / "a")
    write_runtime_config(artifact, {"calibration": {"method": "fpr", "fpr": 0.01}})
    engine = load_engine(artifact)
    token = "test-token-0123"
    with streaming(engine, defect_uri(4000), ui="127.0.0.1:0", ui_token=token, tile=64, metrics_port=0,
                   out_dir=tmp_path / "out", latency_budget_ms=None) as got:
        url, pipe = got["ui"], got["pipe"]
        assert got["token"] is None and not any(token in line for line in got["console"])   # not echoed
        assert _listening_hosts() == ["127.0.0.1"]          # page and metrics: loopback only
        status, page = http("GET", url)
        assert status == 200 and b"edge-ad" in page and b"/static/app.js" in page
        assert http("GET", url + "static/app.js")[0] == 200
        assert wait_for(lambda: pipe.stats.events >= 3)
        status, st = http("GET", url + "api/state")
        assert st["info"]["artifact_sha256"] == read_metadata(artifact)["artifact_sha256"]
        assert st["status"]["lines_in"] > 0 and st["save_possible"]
        assert b"edge_ad_lines_in_total" in http("GET", url + "metrics")[1]
        # server-sent events: live figures and events arrive without asking
        msgs = []
        with urllib.request.urlopen(url + "api/stream?since=0", timeout=10) as r:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                line = r.readline().decode()
                if line.startswith("data: "):
                    msgs.append(json.loads(line[6:]))
        kinds = {m["type"] for m in msgs}
        assert {"status", "event"} <= kinds, kinds
        ev = next(m for m in msgs if m["type"] == "event")
        assert ev["crop"] and http("GET", url + ev["crop"].lstrip("/"))[1][:4] == b"\x89PNG"
        # nothing changes without the token
        for path, body in (("api/thresholds", {"pixel_threshold": 1.0}), ("api/pause", {}), ("api/save", {})):
            assert http("POST", url + path, body)[0] == 401
            assert http("POST", url + path, body, token="wrong-token-xyz")[0] == 403
        assert pipe.control.snapshot()["controls"] == 0 and not pipe.control.paused
        assert http("POST", url + "api/thresholds", b'{"pixel_threshold": "NaN"}', token=token)[0] == 400
        assert http("POST", url + "api/thresholds", {"pixel_thresh": 1}, token=token)[0] == 400
        new = round(pipe.engine.map_threshold * 1.5, 6)
        status, req = http("POST", url + "api/thresholds", {"pixel_threshold": new, "image_threshold": 3.5},
                           token=token)
        assert status == 200 and req["pixel_threshold"] == new
        assert wait_for(lambda: pipe.control.snapshot()["pixel_threshold"] == new)
        assert http("POST", url + "api/pause", {}, token=token)[0] == 200
        assert wait_for(lambda: pipe.stats.dropped["paused"] > 500)
        assert http("POST", url + "api/resume", {}, token=token)[0] == 200
        status, saved = http("POST", url + "api/save", {}, token=token)
        assert status == 200, saved
    s = got["summary"]
    assert s["accounting_ok"] and s["dropped"]["paused"] > 500
    assert [c["control"] for c in s["controls"]] == ["thresholds", "pause", "resume", "save"]
    assert all(c["by"] == "ui" for c in s["controls"])
    assert s["pixel_threshold"] == new and s["image_threshold"] == 3.5
    rt = read_metadata(artifact)["runtime"]          # verifies the re-signed sidecar
    assert rt["pixel_threshold"] == new and rt["image_threshold"] == 3.5
    assert rt["calibration"] == {"method": "fpr", "fpr": 0.01}         # other keys kept
    assert all(u.startswith("http://127.0.0.1:") for u in s["listening"]) and len(s["listening"]) == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert [x["control"] for x in lines if "control" in x] == ["thresholds", "pause", "resume", "save"]
    assert sum("control" not in x for x in lines) == s["events"]


def test_ui_port_in_use_is_one_clear_error(onnx_artifact, tmp_path, capsys):
    import socket

    from runtime.stream import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc = main(["--engine", str(onnx_artifact), "--source", defect_uri(0, extra="&total=64"),
                   "--ui", f"127.0.0.1:{port}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--ui 127.0.0.1:{port}: cannot listen" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()


# ---- in a real browser -----------------------------------------------------------------------------
def _chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('playwright not installed (pip install -e ".[ui-test]"; .ci/run does)')
    if not pathlib.Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium not installed (apt-get install chromium; .ci/run does)")
    return sync_playwright


@pytest.mark.stack("browser")
def test_page_in_headless_chromium(onnx_artifact, tmp_path):
    sync_playwright = _chromium()
    engine = load_engine(onnx_artifact)
    with streaming(engine, defect_uri(2000), ui="127.0.0.1:0", tile=64, latency_budget_ms=None,
                   line_pitch_mm=0.1, pixel_pitch_mm=0.1) as got, sync_playwright() as pw:
        url, token, pipe = got["ui"], got["token"], got["pipe"]
        assert token                                            # generated and printed at start
        ctx = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-", dir=tmp_path), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}#token={token}")
            page.wait_for_function("document.querySelectorAll('#events li').length >= 3", timeout=20_000)
            page.wait_for_function("Number(document.getElementById('strip').dataset.v) > 0 && "
                                   "document.getElementById('strip').naturalHeight > 0", timeout=10_000)
            v0 = int(page.get_attribute("#strip", "data-v"))
            page.wait_for_function(f"Number(document.getElementById('strip').dataset.v) > {v0}", timeout=10_000)
            # the page shows each event soon after its verdict (the benchmark measures the goal, 1 s)
            shown = page.evaluate("window.edgead.shown")
            verdicts = {e["seq"]: e["t_verdict"] for e in list(pipe.events)}
            delays = [shown[str(k)] - verdicts[k] for k in verdicts if str(k) in shown]
            assert delays and max(delays) < 5.0, delays
            assert pipe.engine.integrity()["artifact_sha256"][:12] in page.inner_text("#identity")
            # the threshold control: far above every map value -> no new events; back -> events again
            page.fill("#pixel-threshold", "1e9")
            page.click("#apply")
            page.wait_for_function("document.querySelector('#controls li') !== null", timeout=10_000)
            assert "pixel 1000000000" in page.inner_text("#controls li")
            time.sleep(0.8)                                   # the next status message
            quiet0 = int(page.inner_text("#event-count"))
            time.sleep(2.0)
            assert int(page.inner_text("#event-count")) == quiet0      # at 2 kHz: ~20 defects went by
            page.fill("#pixel-threshold", repr(pipe.engine.map_threshold))
            page.click("#apply")
            page.wait_for_function(f"Number(document.getElementById('event-count').textContent) > {quiet0}",
                                   timeout=10_000)
            page.click("#pause")
            page.wait_for_selector("#paused", state="visible", timeout=10_000)
            page.click("#resume")
            page.wait_for_selector("#paused", state="hidden", timeout=10_000)
            page.wait_for_timeout(1500)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui.png"))
            # a page without the token can look but not change anything
            other = ctx.new_page()
            other.goto(url)
            other.wait_for_function("document.querySelectorAll('#events li').length >= 1", timeout=10_000)
            other.fill("#pixel-threshold", "1e9")
            other.click("#apply")
            other.wait_for_function("document.getElementById('msg').textContent.includes('refused (401)')",
                                    timeout=10_000)
            assert errors == []
        finally:
            ctx.close()
    s = got["summary"]
    kinds = [c["control"] for c in s["controls"]]
    assert kinds == ["thresholds", "thresholds", "pause", "resume"] and s["accounting_ok"]
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000
