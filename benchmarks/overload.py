"""Line-to-verdict latency under overload, with and without the latency budget.

    python benchmarks/overload.py --engine model.onnx [--source aravis|linesim] [--width 512]
                                  [--loads 1,2,8] [--budget-ms 1000] [--seconds 20]

1. capacity: the stream's own throughput (lines/s) with this engine and camera width, unpaced
2. for each load L: the camera at L x capacity (the Aravis fake GigE camera on 127.0.0.1 when
   Aravis is installed, else the line simulator), --overload drop-oldest, once without a budget
   and once with --latency-budget-ms; latency = a band's newest line's capture -> its verdict
3. --sigterm S: `python -m runtime.stream` at the highest load in each --overload mode, with a
   webhook that never answers, SIGTERM after S seconds: seconds until it exits with its summary

Queues bound the work in flight by count; without a budget the latency of an overloaded stream is
the time its queues take to drain. With the budget, lines that cannot get a verdict in time are
dropped (`late`) so the verdicts that are delivered stay within it. Prints a markdown table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.stream import run_stream  # noqa: E402


def fake_camera():
    """Aravis' fake GigE camera serving 127.0.0.1 (None without Aravis / PyGObject)."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError):
        return None
    cam = Aravis.GvFakeCamera.new("127.0.0.1", "EDGEADBENCH")
    return cam if cam is not None and cam.is_running() else None


def source_uri(kind: str, width: int, rate: float, lines: int) -> str:
    if kind == "aravis":
        return f"aravis://127.0.0.1?width={width}&height={lines}&rate={rate:.0f}"
    return f"linesim://?width={width}&rate={rate:.0f}&lines={lines}&kind=texture&seed=0&page=512"


def row(s: dict, load: float, rate: float, budget: Optional[float]) -> dict:
    n = max(s["lines_in"], 1)
    d = s["dropped"]
    return {"load": load, "line_rate": rate, "budget_ms": budget, "latency_ms": s["latency_ms"],
            "oldest_line_age_p99_ms": s["oldest_line_age_ms"]["p99"], "lines_in": s["lines_in"],
            "scored_pct": 100 * s["lines_scored"] / n, "late_pct": 100 * d["late"] / n,
            "late_after_inference_pct": 100 * s["late_after_inference_lines"] / n,
            "overload_pct": 100 * d["overload"] / n, "camera_drop_pct": 100 * d["camera_drop"] / n,
            "accounting_ok": s["accounting_ok"], "source_live": s["source_live"]}


def markdown(rows) -> str:
    f = lambda v: "-" if v is None else f"{v:,.0f}"   # noqa: E731
    out = ["| load | line rate (lines/s) | budget | latency p50 / p95 / p99 (ms) | oldest line p99 (ms) | "
           "scored | late (after inference) | overload | camera drop | accounting |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lat = r["latency_ms"]
        out.append(f"| {r['load']:g}x | {f(r['line_rate'])} | {'none' if r['budget_ms'] is None else f(r['budget_ms']) + ' ms'} "
                   f"| {f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])} | {f(r['oldest_line_age_p99_ms'])} "
                   f"| {r['scored_pct']:.1f} % | {r['late_pct']:.1f} % ({r['late_after_inference_pct']:.2f} %) "
                   f"| {r['overload_pct']:.1f} % | {r['camera_drop_pct']:.1f} % | {'exact' if r['accounting_ok'] else 'WRONG'} |")
    return "\n".join(out)


def time_sigterm(engine, uri: str, overload: str, after_s: float) -> dict:
    """Run the stream CLI (dead webhook included), SIGTERM it after `after_s`: seconds to exit."""
    from benchmarks.soak import SilentPeer, sigterm_to_exit

    peer = SilentPeer()
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.stream", "--engine", str(engine), "--source", uri,
                                 "--overload", overload, "--quiet", "--out", out,
                                 "--webhook", f"http://127.0.0.1:{peer.port}/x"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(after_s)
            rc, took = sigterm_to_exit(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            peer.close()
        s = json.loads((pathlib.Path(out) / "summary.json").read_text())
    return {"overload": overload, "rc": rc, "sigterm_to_exit_s": took, "hard_stopped": s["hard_stopped"],
            "shutdown_lines": s["dropped"]["shutdown"], "accounting_ok": s["accounting_ok"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--source", choices=("auto", "aravis", "linesim"), default="auto")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--lines", type=int, default=64, help="lines per camera buffer")
    p.add_argument("--loads", default="1,2,8")
    p.add_argument("--budget-ms", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sigterm", type=float, default=0.0, help="also time SIGTERM -> exit after this many s (0 = no)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cam = fake_camera() if a.source in ("auto", "aravis") else None
    if a.source == "aravis" and cam is None:
        print("error: Aravis fake camera unavailable (apt-get install gir1.2-aravis-0.8; pip install 'PyGObject<3.51')",
              file=sys.stderr)
        return 2
    kind = "aravis" if cam is not None else "linesim"
    cap_s = run_stream(a.engine, source_uri("linesim", a.width, 0, a.lines), duration_s=a.capacity_s,
                       overload="block", threads=a.threads)
    capacity = cap_s["lines_scored"] / cap_s["elapsed_s"]
    rows = []
    for load in (float(x) for x in a.loads.split(",")):
        rate = load * capacity
        for budget in (None, a.budget_ms):
            s = run_stream(a.engine, source_uri(kind, a.width, rate, a.lines), duration_s=a.seconds,
                           overload="drop-oldest", latency_budget_ms=budget, threads=a.threads)
            rows.append(row(s, load, rate, budget))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    stops = []
    if a.sigterm:
        top = max(float(x) for x in a.loads.split(",")) * capacity
        stops = [time_sigterm(a.engine, source_uri(kind, a.width, top, a.lines), mode, a.sigterm)
                 for mode in ("drop-oldest", "block")]
    res = {"engine": cap_s["engine"], "source": kind, "width": a.width, "lines_per_buffer": a.lines,
           "capacity_lines_per_s": capacity, "seconds": a.seconds, "rows": rows, "sigterm": stops,
           "load_average": os.getloadavg()}
    text = json.dumps(res, indent=2, default=str)
    print(markdown(rows) + "\n" + text)
    if a.json:
        pathlib.Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
