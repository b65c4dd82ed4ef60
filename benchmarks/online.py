"""On the line: the live page, run-time thresholds and the plant's protocols, measured.

    python benchmarks/online.py [--width 4096 --rate 20000 --seconds 20 --rounds 2] [--plant] [--json F]

  page     the same paced linesim stream (defects every --every lines) alternately without the page
           (bare) and with `--ui` served and the page open in headless Chromium (Debian's chromium,
           Playwright): lines scored and dropped by reason, latency, and for the page the delay from
           an event's verdict (and from its last line's capture) to the page showing it
  threshold  near the end of each page run, a pixel threshold change over HTTP: time from the request
           to the band that applied it, and events after the line it applied from (expected 0)
  plant    (--plant) the stream with --mqtt (a Mosquitto broker started here on 127.0.0.1 and
           restarted mid-run, a persistent QoS 1 subscriber) and --opcua (an asyncua client
           subscribed to LastEvent): events delivered vs the stream's own
  listen   `runtime.stream --ui 0 --metrics-port 0 --opcua 0` in a subprocess: every socket it listens on

Without --engine, a PaDiM stand-in (models.padim on 64 px inputs) is fitted on simulator tiles and
exported to ONNX for --tile x --tile frames. Results print as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy import load_engine  # noqa: E402
from runtime.stream import run_stream  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def sim_uri(width, rate, every, seconds, lines=64):
    n = int(rate * seconds / every) + 2
    defects = ";".join(f"{every // 2 + every * i}:{(97 * i) % (width - 40) + 20}:8" for i in range(n))
    return f"linesim://?width={width}&rate={rate}&lines={lines}&kind=texture&seed=5&page=1024&defects={defects}"


def fit_standin(out_dir: pathlib.Path, tile: int, width: int) -> pathlib.Path:
    """PaDiM on 64 px inputs taking tile x tile Mono8 frames, fitted on simulator tiles, ONNX."""
    import torch

    import models
    from deploy.graph import DeployModule
    from export.onnx import export_onnx
    from models.base import ScoreStats
    from models.checkpoint import save_checkpoint
    from runtime.sources import open_source

    src = open_source(f"linesim://?width={width}&rate=0&lines=64&kind=texture&seed=5&page=1024")
    rng = np.random.default_rng(0)

    def tiles(n):
        return torch.from_numpy(np.stack([src.strip_lines(int(rng.integers(0, 4000 - tile)), tile)
                                          [:, (x := int(rng.integers(0, width - tile))):x + tile]
                                          for _ in range(n)])[..., None])
    torch.manual_seed(0)
    model = models.create_model("padim", input_size=64).eval()
    dep = DeployModule(model, frame_hw=(tile, tile), frame_channels=1)
    with torch.no_grad():
        t = tiles(64)
        model.prepare([dep.preprocess(t[i:i + 16]) for i in range(0, 64, 16)])
        amap, score = model(dep.preprocess(tiles(32)))
    model.score_stats = ScoreStats(low=float(score.min()), threshold=float(score.max()) * 1.15,
                                   map_low=float(amap.min()), map_threshold=float(amap.max()) * 1.15,
                                   method="benchmark stand-in: 1.15 x max held-out normal", n_images=32)
    ckpt = save_checkpoint(model, out_dir / "model.pt")
    return export_onnx(ckpt, out_dir / "model.onnx", frame_hw=(tile, tile), frame_channels=1, check=False,
                       quiet=True).path


class Run:
    """run_stream in a thread; `console` lines, the pipeline, the summary."""

    def __init__(self, engine, uri, seconds, **kw):
        self.lines, self.pipe, self.summary = [], None, None
        self.started = threading.Event()

        def on_start(p):
            self.pipe = p
            self.started.set()

        def go():
            try:
                self.summary = run_stream(engine, uri, duration_s=seconds, console=self.lines.append,
                                          status_every_s=3600, on_start=on_start, **kw)
            finally:
                self.started.set()
        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()
        self.started.wait(120)

    def line(self, prefix):
        return next((x[len(prefix):] for x in self.lines if x.startswith(prefix)), None)

    def join(self):
        self.thread.join(300)
        return self.summary


def pct(v, qs=(50, 99)):
    return {f"p{q}": (round(float(np.percentile(v, q)), 4) if len(v) else None) for q in qs} | \
        {"max": round(float(max(v)), 4) if len(v) else None, "n": len(v)}


def figures(s):
    return {k: s[k] for k in ("lines_in", "lines_scored", "lines_dropped", "dropped", "events", "tiles_scored",
                              "accounting_ok")} | {"latency_ms": s["latency_ms"], "lines_per_s": s["lines_per_s"]}


def page_run(engine, uri, a, pw):
    run = Run(engine, uri, a.seconds, ui="127.0.0.1:0", tile=a.tile, max_batch=a.max_batch)
    url = run.line("ui: ").split("#")[0].split()[0]
    token = run.line("ui: ").split("#token=")[1].split()[0]
    ctx = pw.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"), executable_path=a.chromium,
                                                headless=True, args=CHROMIUM_ARGS,
                                                viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.goto(f"{url}#token={token}")
    if a.browser_nice:        # the operator's browser is not on the edge box: here it may only use idle CPU
        import psutil

        for c in psutil.Process().children(recursive=True):
            try:
                if "chrom" in c.name():
                    c.nice(a.browser_nice)
            except psutil.Error:
                pass
    time.sleep(max(0.0, a.seconds - 4.0))
    # the threshold change: 4 s before the end
    line_at_request = run.pipe.stats.lines_scored
    t_req = time.time()
    body = json.dumps({"pixel_threshold": 1e9}).encode()
    req = urllib.request.Request(url + "api/thresholds", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    time.sleep(2.0)
    shown = page.evaluate("window.edgead.shown")
    opened = page.evaluate("window.edgead.openedAt")
    ctx.close()
    s = run.join()
    # events whose verdict came after the page's event stream opened (earlier ones arrive with the page)
    events = [e for e in run.pipe.events if e["t_verdict"] > opened]
    d_verdict = [shown[str(e["seq"])] - e["t_verdict"] for e in events if str(e["seq"]) in shown]
    d_capture = [shown[str(e["seq"])] - e["t_capture"] for e in events
                 if str(e["seq"]) in shown and e.get("t_capture")]
    ctl = next(c for c in s["controls"] if c["control"] == "thresholds")
    t_applied = ctl["t_unix"]
    return {**figures(s), "page_events_shown": len(d_verdict), "events_total": len(events),
            "verdict_to_page_s": pct(d_verdict), "capture_to_page_s": pct(d_capture),
            "threshold": {"request_to_applied_s": round(t_applied - t_req, 4), "from_line": ctl["from_line"],
                          "lines_scored_at_request": line_at_request,
                          "events_after_from_line": sum(e["line_start"] >= ctl["from_line"] for e in events)}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plant_run(engine, uri, a):
    import getpass

    import paho.mqtt.client as paho
    from asyncua import Client

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mosquitto-"))
    port = free_port()
    (tmp / "m.conf").write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                                f"persistence true\npersistence_location {tmp}/\n")
    broker = lambda: subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",  # noqa: E731
                                       str(tmp / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = broker()
    time.sleep(0.5)
    got = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-mes", clean_session=False)
    sub.reconnect_delay_set(0.1, 1)
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("line/#", qos=1)
    sub.on_message = lambda c, u, m: m.topic.endswith("/event") and got.append(json.loads(m.payload)["seq"])
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    time.sleep(0.5)
    run = Run(engine, uri, a.seconds, tile=a.tile, max_batch=a.max_batch, mqtt=f"mqtt://127.0.0.1:{port}/line",
              opcua="127.0.0.1:0", reject_offset_lines=2000)
    endpoint = run.line("opcua: ")
    opc_seen = []

    async def opc():
        class H:
            def datachange_notification(self, node, val, data):
                if val:
                    opc_seen.append(json.loads(val)["seq"])
        async with Client(endpoint) as c:
            idx = await c.get_namespace_index("urn:edge-ad:stream")
            obj = await c.nodes.objects.get_child([f"{idx}:Stream"])
            sub_ = await c.create_subscription(20, H())
            await sub_.subscribe_data_change(await obj.get_child([f"{idx}:LastEvent"]), queuesize=10000,
                                             sampling_interval=0)
            while run.thread.is_alive():
                await asyncio.sleep(0.1)
    t = threading.Thread(target=lambda: asyncio.run(opc()), daemon=True)
    t.start()
    time.sleep(a.seconds / 3)
    proc.terminate()
    proc.wait(10)
    down_s = 2.0
    time.sleep(down_s)
    proc = broker()
    s = run.join()
    t.join(10)
    deadline = time.monotonic() + 15
    while set(range(1, s["events"] + 1)) - set(got) and time.monotonic() < deadline:
        time.sleep(0.1)
    sub.disconnect()
    sub.loop_stop()
    proc.terminate()
    proc.wait(10)
    n = s["events"]
    m = s["sinks"]["mqtt"]
    return {**figures(s), "broker_down_s": down_s,
            "mqtt": {"events": n, "delivered_unique": len(set(got) & set(range(1, n + 1))),
                     "duplicates": len(got) - len(set(got)), "missing": len(set(range(1, n + 1)) - set(got)),
                     "sink": {k: m.get(k) for k in ("published", "acked", "dropped", "failed", "abandoned",
                                                    "abandoned_unacked", "connects", "disconnects")}},
            "opcua": {"events": n, "delivered_unique": len(set(opc_seen) & set(range(1, n + 1))),
                      "missing": len(set(range(1, n + 1)) - set(opc_seen)),
                      "in_order": opc_seen == sorted(opc_seen)}}


def listen_check(artifact, a):
    import psutil

    uri = sim_uri(1024, 2000, 1000, 30)
    p = subprocess.Popen([sys.executable, "-m", "runtime.stream", "--engine", str(artifact), "--source", uri,
                          "--tile", str(a.tile), "--ui", "0", "--metrics-port", "0", "--opcua", "0",
                          "--duration", "12"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("opcua: "):
            break
    time.sleep(1.0)
    socks = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(p.pid).net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN})
    p.terminate()
    p.communicate(timeout=30)
    return {"command": "runtime.stream ... --ui 0 --metrics-port 0 --opcua 0", "listening": socks,
            "only_loopback": all(x.startswith("127.0.0.1:") for x in socks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default=None)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rate", type=float, default=20000)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--every", type=int, default=2000, help="a defect every this many lines")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--plant", action="store_true")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--browser-nice", type=int, default=0,
                   help="renice the Chromium processes (e.g. 19: the page only gets idle CPU, as a browser "
                        "on the operator's own machine would take none from the stream)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = tempfile.TemporaryDirectory()
    path = pathlib.Path(a.engine) if a.engine else fit_standin(pathlib.Path(tmp.name), a.tile, a.width)
    engine = load_engine(path, frame_hw=(a.tile, a.tile), frame_channels=1)
    uri = sim_uri(a.width, a.rate, a.every, a.seconds + 5)
    out = {"width": a.width, "rate": a.rate, "tile": a.tile, "seconds": a.seconds, "defect_every": a.every,
           "browser_nice": a.browser_nice, "argv": sys.argv[1:],
           "load_before": open("/proc/loadavg").read().split()[:3], "bare": [], "page": []}
    with sync_playwright() as pw:
        for r in range(a.rounds):
            out["bare"].append(figures(Run(engine, uri, a.seconds, tile=a.tile, max_batch=a.max_batch).join()))
            print(json.dumps(out["bare"][-1]), flush=True)
            out["page"].append(page_run(engine, uri, a, pw))
            print(json.dumps(out["page"][-1]), flush=True)
    if a.plant:
        out["plant"] = plant_run(engine, uri, a)
        print(json.dumps(out["plant"]), flush=True)
    out["listen"] = listen_check(path, a)
    out["load_after"] = open("/proc/loadavg").read().split()[:3]
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        pathlib.Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
