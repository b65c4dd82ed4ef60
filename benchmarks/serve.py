"""Served (Triton via runtime.serve) vs in-process latency and throughput, same engine, one run.

    python -m benchmarks.serve --engine model.onnx [--backend ort-cpu] [--requests 200]
        [--batch 1] [--concurrency 8] [--max-batch 8] [--out benchmarks/out/serve.json]
    python -m benchmarks.serve --demo [--size 256]     # exports a PaDiM artifact first

What runs (all on this host; the server's tritonserver and the clients share its cores):
  in-process      engine.infer(frames) in this process (deploy.load_engine)
  served grpc     RemoteEngine over gRPC to `python -m runtime.serve` (a subprocess) on 127.0.0.1
  served http     the same over HTTP
Sequential latency: one request at a time, the three candidates interleaved round-robin
(benchmarks.timing.interleaved). Throughput: `--concurrency` client threads sending batch
`--batch` requests as fast as they can, in-process (threads sharing the engine) and served over
gRPC (Triton's dynamic batcher merges them up to `--max-batch`). Host info and the Jetson power
state (nvpmodel / jetson_clocks / tegrastats, when present) are recorded with the numbers.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np

from benchmarks.env import JetsonProbe, host_info
from benchmarks.timing import Candidate, interleaved, summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_ports(n: int):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def demo_artifact(out_dir: pathlib.Path, size: int = 256, channels: int = 1) -> pathlib.Path:
    """A PaDiM model (frozen encoder, Gaussians fitted on random frames: speed only, not
    accuracy) exported with export.onnx."""
    import torch

    import models
    from export.onnx import export_onnx
    from deploy.graph import DeployModule

    torch.manual_seed(0)
    model = models.create_model("padim", input_size=size).eval()
    dm = DeployModule(model, frame_hw=(size, size), frame_channels=channels)
    with torch.no_grad():
        model.prepare([dm.preprocess(dm.example_frames(8, seed=s)) for s in range(2)])
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, out_dir, frame_channels=channels, check=False, quiet=True).path


class ServedEngine:
    """`python -m runtime.serve` in a subprocess on loopback; stopped with SIGTERM."""

    def __init__(self, engine_path, backend=None, threads=0, max_batch=8, queue_delay_us=2000, log=None):
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        cmd = [sys.executable, "-m", "runtime.serve", "--engine", str(engine_path),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--max-batch", str(max_batch),
               "--max-queue-delay-us", str(queue_delay_us), "--threads", str(threads)]
        if backend:
            cmd += ["--backend", backend]
        self.log = open(log or "/dev/null", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=180):
        from deploy.remote import RemoteEngine, RemoteError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runtime.serve exited with {self.proc.returncode}")
            try:
                RemoteEngine.from_uri(f"http://127.0.0.1:{self.http_port}/edge_ad", wait_ready_s=1).close()
                return self
            except RemoteError:
                time.sleep(0.5)
        raise RuntimeError("runtime.serve not ready in time")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def throughput(fn, frames_per_call: int, concurrency: int, calls: int) -> Dict[str, float]:
    """`calls` calls of fn() from `concurrency` threads; wall-clock images/s and per-call latency."""
    lat = []

    def one(_):
        t = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1e3)

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency, calls))))  # warm-up: every thread once
        lat.clear()
        t0 = time.perf_counter()
        list(pool.map(one, range(calls)))
        wall = time.perf_counter() - t0
    s = summarize(lat, batch=frames_per_call)
    return {"concurrency": concurrency, "calls": calls, "wall_s": wall,
            "images_per_s": calls * frames_per_call / wall, "latency_median_ms": s["median_ms"],
            "latency_p90_ms": s["p90_ms"], "latency_p99_ms": s["p99_ms"]}


def run(engine_path, backend=None, threads=0, requests=200, batch=1, concurrency=8, max_batch=8,
        queue_delay_us=2000, seed=0, log=None) -> dict:
    from deploy import load_engine
    from deploy.remote import RemoteEngine

    local = load_engine(engine_path, backend=backend, threads=threads)
    h, w = local.frame_hw
    frames = np.random.default_rng(seed).integers(0, 256, (batch, h, w, local.frame_channels), dtype=np.uint8)
    server = ServedEngine(engine_path, backend, threads, max_batch, queue_delay_us, log).wait_ready()
    try:
        grpc = RemoteEngine.from_uri(f"grpc://127.0.0.1:{server.grpc_port}/edge_ad", max_inflight=concurrency)
        http = RemoteEngine.from_uri(f"http://127.0.0.1:{server.http_port}/edge_ad", max_inflight=concurrency)
        ref = local.infer(frames)
        for eng in (grpc, http):  # same answers before timing anything
            out = eng.infer(frames)
            np.testing.assert_allclose(out["score"], ref["score"].reshape(-1), rtol=1e-4, atol=1e-5)
        cands = [Candidate("in-process", lambda: local.infer(frames)),
                 Candidate("served grpc", lambda: grpc.infer(frames)),
                 Candidate("served http", lambda: http.infer(frames))]
        interleaved(cands, reps=requests, warmup=3)
        seq = {c.name: (summarize(c.samples_ms, batch=batch) if c.samples_ms else None) | {"error": c.error}
               for c in cands}
        thr = {"in-process": throughput(lambda: local.infer(frames), batch, concurrency, requests),
               "served grpc": throughput(lambda: grpc.infer(frames), batch, concurrency, requests)}
        grpc.close()
        http.close()
    finally:
        server.close()
        local.close()
    return {"engine": str(engine_path), "backend": local.backend, "frame": [h, w, local.frame_channels],
            "batch": batch, "requests": requests, "concurrency": concurrency, "server_max_batch": max_batch,
            "server_queue_delay_us": queue_delay_us, "threads": threads,
            "sequential": seq, "throughput": thr}


def markdown(res: dict) -> str:
    lines = [f"engine `{res['engine']}` ({res['backend']}), frames {res['frame']}, batch {res['batch']}, "
             f"{res['requests']} requests", "",
             "| path | median ms | p90 ms | p99 ms | img/s (sequential) |", "|---|---|---|---|---|"]
    for name, s in res["sequential"].items():
        if s.get("median_ms") is None:
            lines.append(f"| {name} | error: {s['error']} | | | |")
            continue
        lines.append(f"| {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['images_per_s']:.1f} |")
    lines += ["", f"| path ({res['concurrency']} client threads) | img/s | median ms | p99 ms |",
              "|---|---|---|---|"]
    for name, t in res["throughput"].items():
        lines.append(f"| {name} | {t['images_per_s']:.1f} | {t['latency_median_ms']:.2f} | "
                     f"{t['latency_p99_ms']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", help="exported artifact to serve and run in-process")
    src.add_argument("--demo", action="store_true", help="export a PaDiM artifact first (benchmarks/out/serve_demo)")
    p.add_argument("--size", type=int, default=256, help="--demo: model input and frame size")
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    engine = a.engine
    if a.demo:
        engine = demo_artifact(ROOT / "benchmarks" / "out" / "serve_demo", size=a.size)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with JetsonProbe() as probe:
        res = run(engine, a.backend, a.threads, a.requests, a.batch, a.concurrency, a.max_batch,
                  a.max_queue_delay_us, log=out.with_suffix(".server.log"))
    res["command"] = "python -m benchmarks.serve " + " ".join(sys.argv[1:] if argv is None else argv)
    res["host"] = host_info("cpu")
    res["jetson"] = probe.report()
    # other work on the host skews every number: record the load around the run
    res["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    out.write_text(json.dumps(res, indent=2, default=str))
    print(markdown(res))
    print(f"\nhost load average (1 min) before/after: {res['loadavg_1m_before_after']}, "
          f"{os.cpu_count()} CPUs")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
