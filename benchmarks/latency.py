"""Latency / throughput of one model on every backend present, side by side, in one run.

    python benchmarks/latency.py --ckpt model.pt [--backends torch,torch-compile,ort-cpu,ort-cuda,ort-trt,tensorrt,aoti]
        [--batch 1,8,32] [--precision fp32,fp16,int8] [--size 256] [--device cpu|cuda] [--reps N]
        [--quick] [--out DIR] [--compare OLD.json] [--make-bench] [--workdir DIR]

What one row measures: `Engine.infer` of a deploy engine (benchmarks/backends.py) - the call
runtime.stream and runtime.serve make: host uint8 frames (B, S, S, 3) NHWC in, host numpy
outputs out, pre-processing inside the graph. Method (benchmarks/timing.py): all (backend,
precision, batch) candidates are loaded first, warmed up (warm-up calls excluded; the first call,
which includes lazy compilation, is reported as `first_call_ms`), then timed in interleaved
rounds - one call of every candidate per round - so slow drift affects all alike. GPU calls are
bracketed by CUDA events and synchronised. After timing, a separate call records the peak
host/device memory of one call.

Reference rows in the same run: PyTorch eager of the model (`torch`) and a PaDiM baseline on the
same frozen encoder (`padim`), so the cost of the decoder is visible. Backends that cannot run on
this machine are listed with the reason. Outputs (benchmarks/report.py): console table, JSON,
CSV, PNG plot, Markdown; machine facts from benchmarks/env.py.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):   # `python benchmarks/latency.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import timing
from benchmarks.backends import (ALIASES, BACKENDS, REFERENCE_BACKENDS, Runner, Unavailable, make_runner,
                                 ort_op_profile)
from benchmarks.env import JetsonProbe, host_info
from benchmarks.report import (RESULTS_MD, ROW_FIELDS, compare_results, format_table, refresh_results_block,
                               write_outputs)
from deploy.contract import PRECISIONS

SCHEMA = "edge-ad-latency/2"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out"


class BenchError(ValueError):
    """A user error in the benchmark's arguments or inputs (one clear message)."""


# =============================================================================================
# models
# =============================================================================================
def build_models(ckpt: Optional[str], size: Optional[int], train: bool, model_name: str = "dvad",
                 log=print):
    """(model, padim reference, description of where the model came from).

    The reference PaDiM uses the model's encoder architecture; its encoder weights are random and
    its Gaussians fitted on random images - it is a timing reference, not a detector here."""
    import torch

    from models import create_model
    from models.checkpoint import CheckpointError, load_checkpoint

    if ckpt:
        try:
            model = load_checkpoint(ckpt)
        except CheckpointError as e:
            raise BenchError(f"--ckpt: {e}") from None
        source = f"checkpoint {ckpt}"
    elif train:
        size = size or 256
        model, source = _train_small(size, log)
    else:
        size = size or 256
        try:
            model = create_model(model_name, pretrained=False, input_size=size)
        except (ValueError, TypeError) as e:
            raise BenchError(f"--model {model_name}: cannot be built ({e})") from None
        # statistics / memories fitted on a few random images (a memory of their patches: smaller
        # than one fitted on a real training set, so its search is timed at that size)
        g = torch.Generator().manual_seed(0)
        rand = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
        with torch.no_grad():
            model.eval().prepare(rand)
            model.finalize(rand)
        source = (f"freshly initialised {model_name} (untrained, random encoder weights, fitted on random "
                  f"images: timings only, scores meaningless)")
    model = model.eval()
    in_size = model.preprocess.input_size
    enc = getattr(model.config, "encoder", "efficientnet_lite0")
    ref = create_model("padim", pretrained=False, input_size=in_size, encoder=enc).eval()
    g = torch.Generator().manual_seed(0)
    ref.prepare([torch.randn(4, 3, in_size, in_size, generator=g) for _ in range(2)])
    return model, ref, source


def _train_small(size: int, log):
    """A small DVAD trained for a tiny budget on synthetic data (models.train.train)."""
    from models.synthetic import generate_dataset
    from models.train import train

    epochs, n_train = 2, 16
    with tempfile.TemporaryDirectory(prefix="edge_ad_bench_") as root:
        data = pathlib.Path(root) / "data"
        generate_dataset(data, classes=("texture",), n_train=n_train, n_test_good=2, n_test_defect=2, size=size)
        model, _summary = train(data, model="dvad", epochs=epochs, batch_size=8, config={"input_size": size},
                                progress=False, log=lambda msg: log(f"[bench] train: {msg}"))
    return model, (f"small DVAD (default config, {size}px) trained {epochs} epochs on {n_train} "
                   f"synthetic 'texture' images by models.train.train")


def _param_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# =============================================================================================
# the benchmark
# =============================================================================================
@dataclass
class Settings:
    backends: Tuple[str, ...] = ("torch", "torch-compile", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "aoti")
    batches: Tuple[int, ...] = (1, 8, 32)
    precisions: Tuple[str, ...] = ("fp32",)
    size: Optional[int] = None
    device: str = "cpu"
    reps: int = 20
    warmup: int = 3
    quick: bool = False
    skip: Dict[str, str] = field(default_factory=dict)   # backend -> reason it is not run
    ort_threads: int = 0     # intra-op threads of the ORT sessions (0 = the engine default)
    ort_profile: int = 0     # profiled calls per ORT CPU row after timing (0 = no profile)


def _blank_row(backend, precision, batch, device, role, model_name) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(backend=backend, precision=precision, batch=batch, device=device, role=role,
               model=model_name, notes="")
    return row


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _load_runners(model, ref_model, settings: Settings, size: int, workdir, log):
    """{(backend, precision): loaded Runner}, their load figures, and rows for what did not load."""
    device = settings.device
    runners: Dict[Tuple[str, str], Runner] = {}
    load_info: Dict[Tuple[str, str], dict] = {}
    rows: List[dict] = []
    backends = list(dict.fromkeys(list(REFERENCE_BACKENDS[:1]) + list(settings.backends)
                                  + list(REFERENCE_BACKENDS[1:])))
    for backend in backends:
        for precision in settings.precisions:
            role = "reference" if backend in REFERENCE_BACKENDS else "backend"
            name = ref_model.model_name if backend == "padim" else model.model_name
            reason = settings.skip.get(backend)
            try:
                r = make_runner(backend, precision, device, model, ref_model, size, workdir,
                                max_batch=max(settings.batches), ort_threads=settings.ort_threads)
            except Unavailable as e:
                reason = str(e)
            if reason is None:
                try:
                    log(f"[bench] loading {backend} {precision} ...")
                    with timing.HostMemory() as hm, timing.DeviceMemory(device) as dm:
                        t0 = time.perf_counter()
                        r.load()
                        load_s = time.perf_counter() - t0
                    runners[(backend, precision)] = r
                    load_info[(backend, precision)] = dict(
                        load_s=load_s, host_load_mib=timing.mib(hm.peak_delta_bytes), host_mem_method=hm.method,
                        device_load_mib=timing.mib(dm.device_used_delta_bytes))
                except Unavailable as e:
                    reason = str(e)
                except Exception as e:   # a backend that breaks must not stop the others: its row says why
                    reason = f"load failed: {_first_line(e)}"
            if reason is not None:
                row = _blank_row(backend, precision, None, device, role, name)
                row.update(status="unavailable", reason=reason)
                rows.append(row)
                log(f"[bench] {backend} {precision}: unavailable - {reason}")
    return runners, load_info, rows


def run_benchmark(model, ref_model, settings: Settings, workdir, log=print, progress=True) -> dict:
    """Time every (backend, precision, batch); returns the result dict (schema SCHEMA)."""
    from tqdm import tqdm

    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    size = settings.size or model.preprocess.input_size
    device = settings.device
    runners, load_info, rows = _load_runners(model, ref_model, settings, size, workdir, log)
    rng = np.random.default_rng(0)
    frames = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in settings.batches}

    candidates: List[timing.Candidate] = []
    meta: Dict[int, dict] = {}
    for key, r in runners.items():
        for b in settings.batches:
            f = frames[b]
            c = timing.Candidate(name=f"{key[0]}/{key[1]}/b{b}", fn=(lambda r=r, f=f: r.run(f)), device=device)
            meta[id(c)] = dict(runner=r, key=key, batch=b, first_call_ms=None, host_first_call_mib=None)
            # first call (lazy compilation, allocator growth, engine setup) is reported on its own
            try:
                with timing.HostMemory() as hm:
                    meta[id(c)]["first_call_ms"] = timing.Clock(device).time(c.fn)
                meta[id(c)]["host_first_call_mib"] = timing.mib(hm.peak_delta_bytes)
            except Exception as e:   # its row reports the error
                c.error = _first_line(e)
            candidates.append(c)
    live = [c for c in candidates if c.error is None]
    bar = tqdm(total=settings.reps, desc="timing rounds", unit="round", disable=not progress)
    with JetsonProbe() as jetson:
        timing.interleaved(live, reps=settings.reps, warmup=max(settings.warmup - 1, 0),
                           progress=lambda r: bar.update(1))
    bar.close()

    # the fp32 eager outputs of the same frames, for score_max_abs_diff (after timing: the first
    # calls above stay real first calls)
    reference_scores = {}
    if ("torch", "fp32") in runners:
        for b in settings.batches:
            try:
                reference_scores[b] = runners[("torch", "fp32")].run(frames[b])["score"].astype(np.float64)
            except Exception:   # the torch row reports its own error
                pass
    for c in candidates:
        m = meta[id(c)]
        r, (backend, precision), b = m["runner"], m["key"], m["batch"]
        role = "reference" if backend in REFERENCE_BACKENDS else "backend"
        row = _blank_row(backend, precision, b, device, role, r.model.model_name)
        row.update(load_info[(backend, precision)])
        row.update(first_call_ms=m["first_call_ms"], host_first_call_mib=m["host_first_call_mib"],
                   artifact=r.artifact, notes="; ".join(n for n in r.notes if n))
        if c.error is not None or not c.samples_ms:
            row.update(status="error", reason=c.error or "no samples")
            rows.append(row)
            continue
        row.update(status="ok", reason="")
        row.update(timing.summarize(c.samples_ms, batch=b))
        try:   # memory of one call, after timing (never inside it)
            with timing.HostMemory() as hm, timing.DeviceMemory(device) as dm:
                out = r.run(frames[b])
        except Exception as e:   # timed fine but failed later: keep the timings, say what failed
            row.update(status="error", reason=f"after timing: {_first_line(e)}")
            rows.append(row)
            continue
        row.update(host_infer_peak_mib=timing.mib(hm.peak_delta_bytes), host_mem_method=hm.method,
                   device_torch_peak_mib=timing.mib(dm.torch_peak_bytes),
                   device_used_delta_mib=timing.mib(dm.device_used_delta_bytes))
        if b in reference_scores and backend != "padim":
            row["score_max_abs_diff"] = float(np.max(np.abs(out["score"].astype(np.float64)
                                                            - reference_scores[b])))
        rows.append(row)
    ort_profiles = {}
    if settings.ort_profile:   # after all timing: where ONNX Runtime spends its time, per op type
        for (backend, precision), r in runners.items():
            if backend == "ort-cpu":
                for b in settings.batches:
                    try:
                        ort_profiles[f"{backend}/{precision}/b{b}"] = ort_op_profile(
                            r.artifact, frames[b], runs=settings.ort_profile, threads=settings.ort_threads)
                    except Exception as e:   # a profile that fails must not lose the timings
                        log(f"[bench] ORT profile of {backend} {precision} b{b} failed: {_first_line(e)}")
    for r in runners.values():
        r.engine.close()
    return {
        "schema": SCHEMA,
        "ort_profiles": ort_profiles,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": dict(host_info(device), loadavg_at_start=load_before),
        "jetson": jetson.report(),
        "settings": {"backends": list(dict.fromkeys(r["backend"] for r in rows)), "batches": list(settings.batches),
                     "precisions": list(settings.precisions), "size": size, "device": device,
                     "reps": settings.reps, "warmup": settings.warmup, "quick": settings.quick,
                     "interleaved": True},
        "model": {"name": model.model_name, "params": _param_count(model), "config": model.config.to_dict()},
        "reference_model": {"name": ref_model.model_name, "params": _param_count(ref_model),
                            "config": ref_model.config.to_dict()},
        "rows": rows,
    }


# =============================================================================================
# CLI
# =============================================================================================
def _csv_list(text: str, what: str, allowed=None, cast=str, aliases=None) -> Tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise BenchError(f"--{what}: expected a comma-separated list, got {text!r}")
    out = []
    for t in items:
        t = (aliases or {}).get(t, t)
        try:
            v = cast(t)
        except ValueError:
            raise BenchError(f"--{what}: {t!r} is not a valid {cast.__name__}") from None
        if allowed is not None and v not in allowed:
            raise BenchError(f"--{what}: unknown value {t!r}; expected some of {', '.join(allowed)}")
        if cast is int and v < 1:
            raise BenchError(f"--{what}: expected positive integers, got {t!r}")
        out.append(v)
    return tuple(dict.fromkeys(out))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/latency.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="model checkpoint (model.pt); default: a small DVAD (see --make-bench)")
    p.add_argument("--model", default="dvad",
                   help="registered model built when no --ckpt is given (default dvad)")
    p.add_argument("--backends", default=None,
                   help=f"comma list from {','.join(b for b in BACKENDS if b != 'padim')} "
                        "(default: all; torch and the padim reference are always added)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8,32)")
    p.add_argument("--precision", default=None,
                   help="comma list from fp32,fp16,int8 (default fp32; --make-bench fp32,int8)")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (default: the model's input size)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 20; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per candidate (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="seconds on CPU: tiny model (64 px), batch 1, torch + ort-cpu + padim, few rounds")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/out)")
    p.add_argument("--compare", help="an earlier latency.json: print new/old ratios")
    p.add_argument("--make-bench", action="store_true",
                   help="what `make bench` runs: small DVAD trained briefly on synthetic data, the CPU set, "
                        "benchmarks/out/latency.md and the block at the end of benchmarks/RESULTS.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workdir", default=None,
                   help="keep exported artifacts here and reuse those an earlier run of the same model left "
                        "(default: a temporary folder, removed afterwards)")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="intra-op threads of the ONNX Runtime sessions (default 0: the engine's default)")
    p.add_argument("--ort-profile", type=int, default=0, metavar="N",
                   help="after timing, N profiled calls per ORT CPU row: kernel time per op type "
                        "(console and JSON 'ort_profiles')")
    return p.parse_args(argv)


def settings_from_args(a) -> Settings:
    import torch

    if a.size is not None and a.size < 16:
        raise BenchError(f"--size: expected >= 16 pixels, got {a.size}")
    for name in ("reps", "warmup"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "reps" else 0):
            raise BenchError(f"--{name}: expected a positive number, got {v}")
    device = a.device or ("cuda" if torch.cuda.is_available() and not (a.quick or a.make_bench) else "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BenchError(f"--device: expected cpu or cuda[:i], got {device!r}")
    s = Settings(device=device)
    names = tuple(b for b in BACKENDS if b != "padim")
    skip = {}
    if a.quick:   # every backend is listed; the slow-to-build ones say why they did not run
        s.batches, s.reps, s.warmup = (1,), 5, 1
        skip = {b: "skipped by --quick (build/compile takes minutes; run without --quick)"
                for b in ("torch-compile", "aoti", "tensorrt", "ort-trt")}
    elif a.make_bench:   # the CPU set on a small model: minutes on 2 cores
        s.backends = ("torch", "torch-compile", "ort-cpu", "aoti")
        s.batches, s.reps = (1, 4), 8
    if a.backends:
        s.backends = _csv_list(a.backends, "backends", allowed=names + ("padim",), aliases=ALIASES)
    if a.batch:
        s.batches = _csv_list(a.batch, "batch", cast=int)
    default_precision = "fp32,int8" if a.make_bench and not a.quick else "fp32"
    s.precisions = _csv_list(a.precision or default_precision, "precision", allowed=PRECISIONS)
    s.size = a.size
    s.reps = a.reps if a.reps is not None else s.reps
    s.warmup = a.warmup if a.warmup is not None else s.warmup
    s.quick = a.quick
    s.skip = {b: r for b, r in skip.items() if b in s.backends}
    for name in ("ort_threads", "ort_profile"):
        if getattr(a, name) < 0:
            raise BenchError(f"--{name.replace('_', '-')}: expected 0 or a positive number, got {getattr(a, name)}")
    s.ort_threads, s.ort_profile = a.ort_threads, a.ort_profile
    return s


def _print_extras(result, old, compare_path) -> None:
    for key, prof in result.get("ort_profiles", {}).items():
        print(f"\nONNX Runtime profile {key} ({prof['runs']} calls, threads {prof['threads'] or 'default'}): "
              f"kernel time {prof['kernel_ms']:.2f} ms per call")
        for o in prof["ops"][:12]:
            print(f"  {o['op']:<24}{o['ms']:>9.2f} ms {o['nodes']:>5} nodes {100 * o['share']:>6.1f} %")
    if old is not None:
        print(f"\ncompared with {compare_path} (latency ratio new/old; < 1 is faster):")
        for c in result["compare"]["rows"]:
            print(f"  {c['backend']:>8} {c['precision']} b{c['batch']:<3} median {c['old_median_ms']:.2f} -> "
                  f"{c['new_median_ms']:.2f} ms  x{c['latency_ratio']:.3f} (speedup {c['speedup']:.2f})")
        if not result["compare"]["rows"]:
            print("  no rows in common")


def main(argv=None) -> int:
    a = parse_args(argv)
    command = "python benchmarks/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        s = settings_from_args(a)
        old = None
        if a.compare:
            try:
                old = json.loads(pathlib.Path(a.compare).read_text())
            except (OSError, ValueError) as e:
                raise BenchError(f"--compare {a.compare}: not a readable latency JSON ({e})") from None
            if old.get("schema") != SCHEMA:
                raise BenchError(f"--compare {a.compare}: schema {old.get('schema')!r}, expected {SCHEMA!r}")
        size = a.size
        if not a.ckpt and size is None:
            size = 64 if a.quick else 128 if a.make_bench else 256
        model, ref, source = build_models(a.ckpt, size, train=a.make_bench and not a.ckpt, model_name=a.model)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[bench] model: {source}")
    work = a.workdir or tempfile.mkdtemp(prefix="edge_ad_latency_")
    try:
        result = run_benchmark(model, ref, s, work, progress=not a.no_progress)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["model_source"] = source
    if old is not None:
        result["compare"] = {"against": str(a.compare), "rows": compare_results(result, old)}
    paths = write_outputs(result, a.out, command)
    if a.make_bench and not a.quick:
        paths["results"] = str(refresh_results_block(RESULTS_MD, pathlib.Path(paths["md"]).read_text()))
    print()
    print(format_table(result))
    _print_extras(result, old, a.compare)
    print("\nwritten: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
