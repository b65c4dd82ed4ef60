"""Soak: the stream CLI for a long time above its capacity, with every fault the simulator injects,
sampling the process's memory, file descriptors and threads.

    python benchmarks/soak.py [--engine ARTIFACT] [--minutes 30] [--load 1.5] [--json out.json]

1. capacity: the stream's own steady-state throughput (lines/s) on this machine, unpaced, over
   --capacity-s after a 3 s warm-up, with the soak's --threads
2. soak: `python -m runtime.stream` on a simulated line camera at --load x capacity with buffer
   drops and corrupt buffers (probability --fault-p each), a 0.5 s stall every 45 s, a disconnect
   every 90 s, a defect every ~2 s, its events posted to a webhook that accepts connections and
   never answers (this script's own 127.0.0.1 server) besides events.jsonl and overlays
3. every --sample-s: RSS, open file descriptors, threads of the stream process (psutil)
4. SIGTERM: seconds until the process exits with its summary

Reported: RSS slope over the run after warm-up (least squares, MB/h and % of the mean RSS per
hour), descriptors and threads at start / end / max, the summary's line accounting (and the
simulator's own count of what the camera produced), sink counters, SIGTERM to exit. Without
--engine, the PaDiM stand-in of benchmarks/stream.py is fitted and exported first.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.stream import run_stream  # noqa: E402


class SilentPeer:
    """Loopback HTTP peer that accepts and never answers (keeps the newest 64 connections)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            if len(self.conns) > 64:
                self.conns.pop(0).close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def sigterm_to_exit(proc: subprocess.Popen, timeout: float = 60.0):
    """SIGTERM, wait for the exit: (exit code, seconds from the signal to the exit)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=timeout)
    return rc, time.monotonic() - t0


def fault_uri(width: int, rate: float, seconds: float, lines: int = 64, fault_p: float = 0.002,
              stall_every_s: float = 45.0, disconnect_every_s: float = 90.0, defect_every_s: float = 2.0,
              seed: int = 0) -> str:
    """linesim URI with the soak's fault schedule (line numbers from the rate and the times)."""
    at = lambda t: int(t * rate)  # noqa: E731
    stalls = ";".join(f"{at(t)}:0.5" for t in np.arange(stall_every_s / 2, seconds, stall_every_s))
    discs = ",".join(str(at(t)) for t in np.arange(disconnect_every_s / 3, seconds, disconnect_every_s))
    rng = np.random.default_rng(seed)
    defects = ";".join(f"{at(t)}:{int(rng.integers(8, width - 8))}:{int(rng.integers(3, 8))}"
                       for t in np.arange(1.0, seconds, defect_every_s))
    uri = (f"linesim://?width={width}&rate={rate:.0f}&lines={lines}&kind=texture&seed={seed}&page=512"
           f"&drop={fault_p}&corrupt={fault_p}")
    for key, val in (("stall", stalls), ("disconnect", discs), ("defects", defects)):
        if val:
            uri += f"&{key}={val}"
    return uri


def capacity(engine, width: int, lines: int, seconds: float, threads: int = 0, warmup_s: float = 3.0) -> float:
    """Lines/s the stream scores on this machine in steady state (unpaced simulator, overload=block,
    the soak's --threads): scored lines between a snapshot after `warmup_s` and one `seconds` later."""
    uri = f"linesim://?width={width}&rate=0&lines={lines}&kind=texture&seed=1&page=512"
    marks = []

    def on_start(pipe):
        def mark():
            for wait in (warmup_s, seconds):
                time.sleep(wait)
                marks.append((time.monotonic(), pipe.snapshot()["lines_scored"]))
        threading.Thread(target=mark, daemon=True).start()

    run_stream(engine, uri, duration_s=warmup_s + seconds + 0.5, overload="block", threads=threads,
               on_start=on_start)
    (t0, n0), (t1, n1) = marks[:2]
    return (n1 - n0) / (t1 - t0)


def _sample(proc) -> dict:
    with proc.oneshot():
        return {"rss_mb": proc.memory_info().rss / 1e6, "fds": proc.num_fds(), "threads": proc.num_threads()}


def rss_slope(samples: List[dict], warmup_s: float) -> dict:
    """Least-squares RSS slope over the samples after `warmup_s` (MB/h and % of the mean per hour)."""
    pts = [(s["t_s"], s["rss_mb"]) for s in samples if s["t_s"] >= warmup_s]
    if len(pts) < 3:
        return {"mb_per_h": None, "pct_per_h": None, "samples": len(pts)}
    t, r = np.array(pts).T
    slope = float(np.polyfit(t / 3600.0, r, 1)[0])
    return {"mb_per_h": slope, "pct_per_h": 100.0 * slope / float(r.mean()), "samples": len(pts),
            "from_s": float(t[0]), "rss_mean_mb": float(r.mean())}


def run_soak(engine, seconds: float, load: float = 1.5, width: int = 512, lines: int = 64,
             sample_s: float = 10.0, capacity_s: float = 8.0, fault_p: float = 0.002,
             out_dir: Optional[pathlib.Path] = None, threads: int = 0, progress: bool = True) -> dict:
    import psutil

    engine = pathlib.Path(engine)
    out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="soak-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cap = capacity(engine, width, lines, capacity_s, threads)
    rate = max(1.0, load * cap)
    uri = fault_uri(width, rate, seconds, lines, fault_p)
    peer = SilentPeer()
    cmd = [sys.executable, "-m", "runtime.stream", "--engine", str(engine), "--source", uri, "--quiet",
           "--out", str(out_dir / "stream"), "--webhook", f"http://127.0.0.1:{peer.port}/events",
           "--threads", str(threads)]
    log = open(out_dir / "stream.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    ps = psutil.Process(proc.pid)
    samples = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < seconds and proc.poll() is None:
            samples.append({"t_s": time.monotonic() - t0, **_sample(ps)})
            if progress:
                s = samples[-1]
                print(f"[{s['t_s']:7.0f} s] rss {s['rss_mb']:.1f} MB fds {s['fds']} threads {s['threads']}",
                      file=sys.stderr, flush=True)
            time.sleep(max(0.0, t0 + len(samples) * sample_s - time.monotonic()))
        samples.append({"t_s": time.monotonic() - t0, **_sample(ps)})
        rc, sigterm_s = sigterm_to_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        peer.close()
        log.close()
    summary = json.loads((out_dir / "stream" / "summary.json").read_text())
    warm = max(min(60.0, seconds / 4), seconds / 5)
    return {
        "command": " ".join(cmd[:1] + ["-m", "runtime.stream", "--engine", engine.name, "--source", "<fault URI>",
                                       "--out", "DIR", "--webhook", "<silent peer>"]),
        "engine": summary["engine"], "width": width, "lines_per_buffer": lines, "load": load,
        "capacity_lines_per_s": cap, "line_rate": rate, "seconds": seconds, "sample_s": sample_s,
        "fault_p": fault_p, "rc": rc, "sigterm_to_exit_s": sigterm_s,
        "rss": rss_slope(samples, warm), "samples": samples,
        "fds": {"first": samples[0]["fds"], "last": samples[-1]["fds"], "max": max(s["fds"] for s in samples)},
        "threads": {"first": samples[0]["threads"], "last": samples[-1]["threads"],
                    "max": max(s["threads"] for s in samples)},
        "accounting": {k: summary[k] for k in ("lines_in", "lines_scored", "lines_dropped", "dropped",
                                              "source_lines_produced", "accounting_ok", "reconnects",
                                              "corrupt_buffers", "events", "engine_errors", "error",
                                              "hard_stopped", "latency_ms", "latency_budget_ms")},
        "sinks": summary["sinks"], "peer_connections": peer.accepted, "load_average": os.getloadavg(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default=None, help="artifact (default: the fitted PaDiM stand-in of benchmarks/stream.py)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=1.5, help="camera line rate as a multiple of the stream's capacity")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--tile", type=int, default=128, help="stand-in engine's tile size")
    p.add_argument("--lines", type=int, default=64, help="lines per camera buffer")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--capacity-s", type=float, default=8.0)
    p.add_argument("--fault-p", type=float, default=0.002, help="probability of a dropped / corrupt buffer")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = backend default)")
    p.add_argument("--out", default=None, help="folder for the stream's outputs and log")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if a.engine:
        engine = pathlib.Path(a.engine)
    else:
        from benchmarks.stream import fit_standin

        engine = fit_standin(pathlib.Path(tmp.name), a.tile, a.width)
    res = run_soak(engine, a.minutes * 60, a.load, a.width, a.lines, a.sample_s, a.capacity_s, a.fault_p,
                   pathlib.Path(a.out) if a.out else None, a.threads)
    brief = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(brief, indent=2, default=str))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0 if res["accounting"]["accounting_ok"] and res["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
