"""Stream throughput vs. the same engine's bare throughput, and latency at a paced line rate.

    python benchmarks/stream.py [--engine ARTIFACT] [--width 1024] [--tile 128] [--seconds 8]
        [--device cpu|cuda]

Three measurements in one run, on the same engine and the same kind of tiles:
  bare     engine.infer on batches of --max-batch tiles in a loop (tiles/s); bare and stream
           runs alternate (--rounds), each stream figure is compared with the mean of the bare
           figures measured just before and after it (machine load drifts)
  stream   the full pipeline (capture, tiling, batching, stitching, accounting) from a line
           simulator running as fast as it can (rate=0, overload=block): steady-state tiles/s,
           from a snapshot after warm-up to the end; goal >= 0.95 x bare
  paced    the simulator at --load x the stream's line capacity: latency percentiles from line
           capture to verdict, and the drops (there should be none below capacity)

Without --engine, a PaDiM model (models.padim, gradient-free) is fitted on simulator tiles and
exported to ONNX (export.onnx) as a stand-in engine. Results print as JSON (and --json FILE).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):   # run as a script: the repo root before benchmarks/ (whose kernels.py
    sys.path.insert(0, str(ROOT))  # would shadow the kernels package)

from deploy import load_engine  # noqa: E402
from deploy.graph import DeployModule  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from runtime.pipeline import Pipeline, StreamConfig  # noqa: E402
from runtime.sources import open_source  # noqa: E402


def sim_uri(width: int, rate: float, lines: int, seed: int = 0) -> str:
    return f"linesim://?width={width}&rate={rate}&lines={lines}&kind=texture&seed={seed}&page=1024&queue=64"


def fit_standin(out_dir: pathlib.Path, tile: int, width: int, n_fit: int = 64) -> pathlib.Path:
    """PaDiM fitted on defect-free simulator tiles, calibrated, exported to ONNX."""
    import torch

    import models
    from models.base import ScoreStats
    from models.checkpoint import save_checkpoint

    src = open_source(sim_uri(width, 0, 64))
    rng = np.random.default_rng(0)

    def tiles(n):
        out = []
        for _ in range(n):
            y, x = int(rng.integers(0, 4 * 1024 - tile)), int(rng.integers(0, max(1, width - tile)))
            out.append(src.strip_lines(y, tile)[:, x:x + tile])
        return torch.from_numpy(np.stack(out)[..., None])

    model = models.create_model("padim", input_size=tile).eval()
    dep = DeployModule(model, frame_hw=(tile, tile), frame_channels=1)
    with torch.no_grad():
        t = tiles(n_fit)
        model.prepare([dep.preprocess(t[i:i + 16]) for i in range(0, n_fit, 16)])
        amap, score = model(dep.preprocess(tiles(16)))
    model.score_stats = ScoreStats(low=float(score.min()), threshold=float(score.max()) * 1.15,
                                   map_low=float(amap.min()), map_threshold=float(amap.max()) * 1.15,
                                   method="benchmark stand-in: 1.15 x max held-out normal", n_images=16)
    ckpt = save_checkpoint(model, out_dir / "model.pt")
    return export_onnx(ckpt, out_dir / "model.onnx", frame_hw=(tile, tile), frame_channels=1,
                       check=False, quiet=True).path


def bare_throughput(engine, frames: np.ndarray, seconds: float) -> dict:
    engine.infer(frames)                      # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.infer(frames)
        n += 1
    dt = time.perf_counter() - t0
    return {"tiles_per_s": n * frames.shape[0] / dt, "calls": n, "seconds": dt,
            "ms_per_call": 1000 * dt / max(n, 1)}


def stream_run(engine, uri: str, cfg: StreamConfig, seconds: float, warmup: float) -> dict:
    pipe = Pipeline(engine, open_source(uri), cfg).start()
    pipe.wait(warmup)
    a, ta = pipe.snapshot(), time.monotonic()
    pipe.wait(seconds)
    b, tb = pipe.snapshot(), time.monotonic()
    s = pipe.finish()
    dt = tb - ta
    calls = max(b["engine_calls"] - a["engine_calls"], 1)
    s["steady"] = {"tiles_per_s": (b["tiles_scored"] - a["tiles_scored"]) / dt,
                   "lines_per_s": (b["lines_scored"] - a["lines_scored"]) / dt, "seconds": dt,
                   # fraction of wall time the engine was busy: ~1.0 means the pipeline kept it fed,
                   # and any gap to the bare figure is the engine itself running slower
                   "engine_busy": (b["engine_time_s"] - a["engine_time_s"]) / dt,
                   "tiles_per_call": (b["tiles_scored"] - a["tiles_scored"]) / calls,
                   "ms_per_call": 1000 * (b["engine_time_s"] - a["engine_time_s"]) / calls}
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default=None, help="artifact to benchmark (default: fitted PaDiM stand-in)")
    p.add_argument("--backend", default=None)
    p.add_argument("--width", type=int, default=1024, help="simulated camera width (px)")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--stride", type=int, default=None, help="default 3/4 tile")
    p.add_argument("--lines", type=int, default=64, help="lines per camera buffer")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--load", type=float, default=0.7, help="paced run at this fraction of stream capacity")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch / aoti engines: cpu or cuda[:N]")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    path = pathlib.Path(a.engine) if a.engine else fit_standin(pathlib.Path(tmp.name), a.tile, a.width)
    engine = load_engine(path, backend=a.backend, frame_hw=(a.tile, a.tile), frame_channels=1, threads=a.threads,
                         device=a.device)
    tile = engine.frame_hw[0] if engine.frame_hw else a.tile
    src = open_source(sim_uri(a.width, 0, 64, seed=7))
    strip = src.strip_lines(0, tile)
    xs = np.linspace(0, max(0, a.width - tile), a.max_batch).astype(int)
    frames = np.stack([strip[:, x:x + tile] for x in xs])[..., None]
    # small queues: at rate=0 the source fills every queue, and a full queue is only latency
    cfg = StreamConfig(tile=tile, stride=a.stride, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                       overload="block", capture_queue=4, infer_queue=4, drain_timeout_s=3.0)

    # interleaved rounds (bare, stream, bare, stream, ...): the machine's load drifts, so each
    # stream figure is compared with the bare figures measured right around it
    bares, streams, lat, busy = [], [], [], []
    for r in range(a.rounds):
        bares.append(bare_throughput(engine, frames, a.seconds))
        full = stream_run(engine, sim_uri(a.width, 0, a.lines, seed=r), cfg, a.seconds, a.warmup)
        streams.append(full["steady"]["tiles_per_s"])
        busy.append({k: full["steady"][k] for k in ("engine_busy", "tiles_per_call", "ms_per_call")})
        lat.append(full["latency_ms"])
        acc_ok = full["accounting_ok"]
    bares.append(bare_throughput(engine, frames, a.seconds))
    bare_ms = [b["ms_per_call"] for b in bares]
    bares = [b["tiles_per_s"] for b in bares]
    ratios = [s_ / ((bares[i] + bares[i + 1]) / 2) for i, s_ in enumerate(streams)]
    capacity_lines = full["steady"]["lines_per_s"]
    rate = max(1.0, a.load * capacity_lines)
    paced_cfg = StreamConfig(tile=tile, stride=a.stride, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                             overload="drop-oldest", capture_queue=8, infer_queue=4, drain_timeout_s=3.0)
    paced = stream_run(engine, sim_uri(a.width, round(rate), a.lines), paced_cfg, a.seconds, a.warmup)
    res = {
        "engine": engine.describe(), "width": a.width, "tile": tile, "stride": full["stride"],
        "max_batch": a.max_batch, "rounds": a.rounds,
        "bare_tiles_per_s": bares, "stream_tiles_per_s": streams,
        "stream_vs_bare": ratios, "stream_vs_bare_median": float(np.median(ratios)),
        "bare_ms_per_call": bare_ms, "stream_engine": busy,
        "stream_lines_per_s_last_round": capacity_lines,
        "paced": {"line_rate": rate, "load": a.load, "lines_per_s": paced["steady"]["lines_per_s"],
                  "latency_ms": paced["latency_ms"], "oldest_line_age_ms": paced["oldest_line_age_ms"],
                  "dropped": paced["dropped"], "accounting_ok": paced["accounting_ok"]},
        "accounting_ok": acc_ok and paced["accounting_ok"],
    }
    print(json.dumps(res, indent=2, default=str))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
