"""Accuracy vs latency of trained models: the picture a user chooses a model from.

    python benchmarks/pareto.py --data ../shared/data/magnetic_tile \\
        --ckpt runs/dvad.pt --ckpt runs/patchcore.pt [--ckpt NAME=runs/x.pt ...] \\
        [--train dvad --train patchcore:efficientnet_lite2 ...] [--out benchmarks/out/pareto]
        [--reps 30] [--warmup 3] [--threads 1] [--metric image_auroc]
    python benchmarks/pareto.py --replot benchmarks/out/pareto/pareto.json [--metric pixel_auroc] [--out DIR]

One run, for every model (a trained checkpoint, or one trained here with its default recipe by
--train MODEL[:ENCODER], saved under --out/ckpt and reused by later runs):
  accuracy  `models.evaluate.evaluate` on the test split of --data (image / pixel AUROC, AUPRO, mAD);
  latency   the model exported with `export.onnx.export_onnx` (uint8 frames in, pre-processing
            inside, the parity gate on) and timed in ONNX Runtime on the CPU at batch 1 through
            `deploy.load_engine(...).infer` - the call runtime.stream makes - with --threads intra-op
            threads; all models are timed round-robin (`benchmarks.timing.interleaved`), so load from
            other processes hits every model alike; median and p90 of --reps calls after --warmup.
Writes pareto.json (rows + host facts + load), pareto.md (the table) and pareto.png (accuracy vs
median ms, one point per model/encoder, the Pareto front joined) under --out. A point is on the
front when no other model is both at least as accurate and at least as fast (and better in one).
--replot redraws the table and plot of such a run (on another accuracy axis, if asked) without
measuring again.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import List, Optional, Sequence

if __package__ in (None, ""):   # `python benchmarks/pareto.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

SCHEMA = "edge-ad-pareto/1"
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "mad")
_HEAD = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pixel_aupro": "AUPRO", "mad": "mAD"}


class ParetoError(ValueError):
    """A bad --ckpt / --train entry (the message says which and why)."""


def parse_entries(ckpts: Sequence[str], trains: Sequence[str]) -> List[dict]:
    """--ckpt [NAME=]PATH and --train MODEL[:ENCODER] -> [{name, ckpt | model, encoder}]."""
    out = []
    for item in ckpts or []:
        name, _, path = item.rpartition("=")
        p = pathlib.Path(path)
        if not p.is_file():
            raise ParetoError(f"--ckpt {item}: checkpoint {p} not found")
        out.append(dict(name=name or None, ckpt=p))
    if trains:
        from models.registry import list_models

        for item in trains:
            model, _, encoder = item.partition(":")
            if model not in list_models():
                raise ParetoError(f"--train {item}: unknown model {model!r}; registered: {', '.join(list_models())}")
            out.append(dict(name=None, model=model, encoder=encoder or None))
    if not out:
        raise ParetoError("nothing to measure: give --ckpt PATH and/or --train MODEL[:ENCODER]")
    return out


def pareto_front(points: Sequence[tuple]) -> List[bool]:
    """points = [(accuracy, ms)]: True where no other point is >= as accurate and <= as slow, and
    strictly better in one of the two."""
    flags = []
    for i, (a, t) in enumerate(points):
        dominated = any((a2 >= a and t2 <= t) and (a2 > a or t2 < t)
                        for j, (a2, t2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def mark_front(rows: List[dict], metric: str) -> None:
    """Set row["pareto"] on the measured rows (front on `metric` vs median ms); drop it elsewhere."""
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None]
    for r in rows:
        r.pop("pareto", None)
    for r, f in zip(ok, pareto_front([(r[metric], r["median_ms"]) for r in ok])):
        r["pareto"] = f


def _train_missing(entry: dict, data, ckpt_dir: pathlib.Path, log) -> pathlib.Path:
    from models.train import train

    tag = entry["model"] + (f"-{entry['encoder']}" if entry["encoder"] else "")
    path = ckpt_dir / f"{tag}.pt"
    if path.is_file():
        log(f"[pareto] {tag}: reusing {path}")
        return path
    log(f"[pareto] {tag}: training with its default recipe -> {path}")
    cfg = {"encoder": entry["encoder"]} if entry["encoder"] else {}
    train(data, model=entry["model"], out=path, config=cfg, progress=False, log=log, validate=False)
    return path


def measure(entries: List[dict], data, out: pathlib.Path, reps: int = 30, warmup: int = 3, threads: int = 1,
            metric: str = "image_auroc", log=print) -> dict:
    """Evaluate, export and time every entry; returns the result dict (also written under `out`)."""
    from deploy import load_engine
    from export.onnx import export_onnx
    from models.checkpoint import load_checkpoint
    from models.evaluate import evaluate

    from benchmarks.env import host_info
    from benchmarks.timing import Candidate, interleaved, summarize

    if metric not in METRICS:
        raise ParetoError(f"--metric {metric!r}: expected one of {METRICS}")
    out.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    rows, engines, cands = [], [], []
    try:
        for e in entries:
            ckpt = e.get("ckpt") or _train_missing(e, data, out / "ckpt", log)
            model = load_checkpoint(ckpt)
            enc = getattr(model.config, "encoder", "?")
            name = e.get("name") or f"{model.model_name} ({enc})"
            log(f"[pareto] {name}: evaluating {ckpt} on the test split of {data}")
            t0 = time.perf_counter()
            res = evaluate(model, data, progress=False)
            t_eval = time.perf_counter() - t0
            exp = export_onnx(ckpt, out / "onnx" / pathlib.Path(ckpt).stem, quiet=True, n=4)
            train_meta = (model.checkpoint_meta.get("extra") or {}).get("train") or {}
            rows.append(dict(
                name=name, model=model.model_name, encoder=enc, checkpoint=str(ckpt), artifact=str(exp.path),
                artifact_mb=exp.size_bytes / 2 ** 20, onnx_nodes=exp.node_count,
                parity=exp.parity.passed if exp.parity is not None else None,
                parameters=sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()),
                train_time_s=train_meta.get("train_time_s"), epochs=train_meta.get("epochs"),
                eval_s=t_eval, **{k: res["mean"].get(k) for k in METRICS}))
            eng = load_engine(exp.path, backend="ort-cpu", threads=threads)
            engines.append(eng)
            h, w = eng.frame_hw
            frames = np.random.default_rng(0).integers(0, 256, (1, h, w, eng.frame_channels), dtype=np.uint8)
            cands.append(Candidate(name=name, fn=(lambda eng=eng, fr=frames: eng.infer(fr))))
            del model
        log(f"[pareto] timing {len(cands)} ONNX Runtime CPU engines at batch 1, {reps} rounds round-robin")
        interleaved(cands, reps=reps, warmup=warmup)
    finally:
        for eng in engines:
            eng.close()
    for row, c in zip(rows, cands):
        if c.error:
            row.update(status="error", reason=c.error)
            continue
        s = summarize(c.samples_ms, batch=1)
        row.update(status="ok", median_ms=s["median_ms"], p90_ms=s["p90_ms"], n=s["n"])
    mark_front(rows, metric)
    result = dict(schema=SCHEMA, data=str(data), metric=metric, reps=reps, warmup=warmup, ort_threads=threads,
                  loadavg_start=load_start, loadavg_end=list(os.getloadavg()), host=host_info("cpu"), rows=rows)
    (out / "pareto.json").write_text(json.dumps(result, indent=2))
    (out / "pareto.md").write_text(markdown(result))
    plot(result, out / "pareto.png")
    log(f"[pareto] wrote {out / 'pareto.md'}, {out / 'pareto.json'}, {out / 'pareto.png'}")
    return result


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}"


def markdown(res: dict) -> str:
    la, lb = res["loadavg_start"], res["loadavg_end"]
    lines = [f"Test split of `{res['data']}`; ONNX Runtime CPU, batch 1, {res['ort_threads']} intra-op thread(s), "
             f"median of {res['reps']} round-robin calls; 1-min load average {la[0]:.1f} at start, {lb[0]:.1f} "
             f"at end; front = Pareto-optimal on {_HEAD[res['metric']]} vs median ms.", "",
             "| model | encoder | I-AUROC | P-AUROC | AUPRO | mAD | ORT ms (median) | p90 | artifact MB | "
             "params + buffers | train s | front |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(res["rows"], key=lambda r: r.get("median_ms") or float("inf")):
        ms = f"{r['median_ms']:.1f}" if r["status"] == "ok" else r.get("reason", "error")
        p90 = f"{r['p90_ms']:.1f}" if r["status"] == "ok" else "-"
        ts = f"{r['train_time_s']:.0f}" if r.get("train_time_s") is not None else "-"
        lines.append(f"| {r['name']} | {r['encoder']} | {_pct(r['image_auroc'])} | {_pct(r['pixel_auroc'])} | "
                     f"{_pct(r['pixel_aupro'])} | {_pct(r['mad'])} | {ms} | {p90} | {r['artifact_mb']:.1f} | "
                     f"{r['parameters'] / 1e6:.2f} M | {ts} | {'yes' if r.get('pareto') else ''} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    fig = figure(res)                 # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(res: dict):
    """The accuracy-vs-latency scatter of a result (a matplotlib Figure; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from adjustText import adjust_text

    metric = res["metric"]
    rows = [r for r in res["rows"] if r["status"] == "ok" and r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    xs, ys = [r["median_ms"] for r in rows], [100 * r[metric] for r in rows]
    texts = []
    for r, x, y in zip(rows, xs, ys):
        ax.scatter([x], [y], s=70 if r.get("pareto") else 40, marker="o" if r.get("pareto") else "s",
                   edgecolors="k", zorder=3)
        texts.append(ax.text(x, y, r["name"], fontsize=8))
    front = sorted((x, y) for r, x, y in zip(rows, xs, ys) if r.get("pareto"))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", lw=1, ls="--", zorder=1)
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    lo, hi = ax.get_xlim()
    if hi / lo < 10:    # less than a decade: finer, labelled minor ticks (else the axis has one number)
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0,
                                                                       6.0, 8.0)))
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"ONNX Runtime CPU latency at batch 1, median ms ({res['ort_threads']} thread(s))")
    ax.set_ylabel(f"{_HEAD[metric]} (%), test split")
    ax.set_title(f"accuracy vs latency (o Pareto front); load {res['loadavg_start'][0]:.1f}", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    if texts:           # move the labels off each other and off the points, a thin line back to each
        adjust_text(texts, x=xs, y=ys, ax=ax, expand=(1.3, 1.6),
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
    return fig


def replot(result_json, out=None, metric: Optional[str] = None) -> dict:
    """Redraw pareto.md / pareto.png from a run's pareto.json, on another accuracy axis if asked (the
    front recomputed for it), without measuring again. Writes beside the json unless `out` is given."""
    path = pathlib.Path(result_json)
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParetoError(f"{path}: cannot read a pareto result ({e})") from None
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        raise ParetoError(f"{path}: not a pareto.json (schema {SCHEMA!r} expected)")
    res["metric"] = metric or res["metric"]
    mark_front(res["rows"], res["metric"])
    out = pathlib.Path(out) if out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.md").write_text(markdown(res))
    plot(res, out / "pareto.png")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/pareto.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MVTec-layout folder with test/ and ground_truth/ (required unless --replot)")
    p.add_argument("--ckpt", action="append", default=[], metavar="[NAME=]PATH",
                   help="a trained checkpoint (repeatable)")
    p.add_argument("--train", action="append", default=[], metavar="MODEL[:ENCODER]",
                   help="train MODEL (default recipe, optional encoder) unless --out/ckpt has it (repeatable)")
    p.add_argument("--out", help="output folder (default benchmarks/out/pareto; with --replot the json's own)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--metric", choices=METRICS, help="the accuracy axis (default image_auroc; with --replot "
                                                     "the run's own)")
    p.add_argument("--replot", metavar="PARETO_JSON",
                   help="redraw the table and plot of an earlier run (into --out if given) without measuring")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from deploy import EngineError
    from export._common import ExportError
    from models.checkpoint import CheckpointError
    from models.data import DataError

    try:
        if a.replot:
            res = replot(a.replot, a.out, a.metric)
        else:
            if not a.data:
                raise ParetoError("--data is required (the MVTec-layout folder), unless --replot")
            if a.reps < 1 or a.warmup < 0 or a.threads < 0:
                raise ParetoError(f"--reps must be >= 1, --warmup and --threads >= 0 (got {a.reps}, {a.warmup}, "
                                  f"{a.threads})")
            entries = parse_entries(a.ckpt, a.train)
            out = pathlib.Path(a.out or "benchmarks/out/pareto")
            res = measure(entries, a.data, out, a.reps, a.warmup, a.threads, a.metric or "image_auroc")
    except (ParetoError, CheckpointError, DataError, EngineError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
