"""Event-level accuracy of deployed artifacts: a labelled test split replayed as a line camera.

    python benchmarks/events.py --artifact NAME=model.onnx [--artifact NAME2=other.onnx ...]
        --data CLASS_DIR [--width 256] [--line-pitch-mm 0.1] [--line-rate-hz 5000]
        [--target-per-100-good 1] [--seed 0] [--out DIR]

For each artifact (runtime.replay): the MVTec-layout test split of --data is laid end to end as
the strip a camera of --width pixels delivers and streamed once through the production pipeline
(runtime.stream's tiling, batching, stitching and events); the event-level curve over pixel
thresholds follows from the recorded tile maps. Reported per artifact: defect recall (ground-truth
regions found, and defective images with a found region), event precision, false events per 100
good images (and per metre / per hour given the line pitch / rate), per defect type, at
  * the artifact's default threshold (its runtime config, else score_stats.map_threshold);
  * the threshold calibrated for --target-per-100-good false events on held-out normal images
    (the trainer's validation split of train/good: never the test split), as runtime.calibrate does;
  * the best recall the curve reaches at <= the target on the test split itself (an oracle, for
    reference only: it is tuned on the test data).
Writes events.json, events.md and events.png (recall vs false events per 100 good images) to --out.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
from typing import Dict, List, Optional

if __package__ in (None, ""):   # `python benchmarks/events.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from deploy import EngineError, load_engine
from models.data import DataError, scan_mvtec, split_val
from runtime.calibrate import calibrate
from runtime.replay import ReplayError, lay_out, mvtec_test_images, record, score_events, sweep, threshold_grid

SCHEMA = "edge-ad-events/1"


def validation_normals(data, seed: int = 0, val_fraction: float = 0.1) -> List[pathlib.Path]:
    """The trainer's held-out normal images of --data (models.data.split_val: the same split
    models.train calibrates on, never trained on)."""
    samples, _ = scan_mvtec(data, split="train")
    _, val = split_val(samples, val_fraction, seed)
    return [s.path for s in val]


def default_threshold(engine) -> float:
    rt = engine.meta.get("runtime") or {}
    return float(rt.get("pixel_threshold", engine.map_threshold))


def evaluate_artifact(name: str, artifact, data, width: Optional[int], target: float, seed: int = 0,
                      line_pitch_mm: Optional[float] = None, line_rate_hz: Optional[float] = None,
                      calibrate_on=None, log=print) -> dict:
    with load_engine(artifact) as engine, tempfile.TemporaryDirectory(prefix="edge_ad_events_") as tmp:
        width = width or int((engine.meta.get("training") or {}).get("line_width") or 256)
        strip = lay_out(mvtec_test_images(data), width, f"{tmp}/test", engine.frame_channels, seed=seed)
        log(f"[events] {name}: streaming {len(strip.placed)} test images ({strip.lines} lines at width {width})")
        rec = record(engine, strip)
        default = default_threshold(engine)
        rows = {"default": dict(threshold=default, **score_events(rec.events(default), strip, line_pitch_mm,
                                                                  line_rate_hz))}
        if calibrate_on:
            normal = pathlib.Path(tmp) / "normal"
            normal.mkdir()
            for i, p in enumerate(calibrate_on):
                (normal / f"{i:05d}{p.suffix}").symlink_to(p.resolve())
            log(f"[events] {name}: calibrating on {len(calibrate_on)} held-out normal images")
            cal = calibrate(engine, normal, width, target, "per_100_images", line_pitch_mm, line_rate_hz)
            rows["calibrated"] = dict(threshold=cal.pixel_threshold, normal_measured=cal.measured,
                                      **score_events(rec.events(cal.pixel_threshold), strip, line_pitch_mm, line_rate_hz))
        curve = sweep(rec, strip, threshold_grid(rec, n=48, extra=[r["threshold"] for r in rows.values()]),
                      line_pitch_mm=line_pitch_mm, line_rate_hz=line_rate_hz)
        ok = [c for c in curve if c["false_per_100_good"] is not None and c["false_per_100_good"] <= target]
        if ok:
            rows["oracle"] = max(ok, key=lambda c: (c["recall"] or 0.0, -c["threshold"]))
        return {"name": name, "artifact": str(artifact), "model": engine.meta.get("model"),
                "tile": list(rec.tile_hw), "stride": rec.summary["stride"], "width": width, "rows": rows, "curve": curve,
                "training": engine.meta.get("training")}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Test split of `{s['data']}` replayed as a line camera (seed {s['seed']}): "
             f"{res['results'][0]['rows']['default']['good_images'] if res['results'] else 0} good and "
             f"{res['results'][0]['rows']['default']['defective_images'] if res['results'] else 0} defective images; "
             f"target <= {s['target']:g} false events per 100 good images.", "",
             "| artifact | width | tile | threshold | value | recall % (regions) | recall % (images) | precision % | "
             "false / 100 good | false on defective images | per type recall % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for kind, row in r["rows"].items():
            per = ", ".join(f"{t} {_pct(v)}" for t, v in row["recall_per_type"].items())
            f100 = "-" if row["false_per_100_good"] is None else f"{row['false_per_100_good']:.1f}"
            lines.append(f"| {r['name']} | {r['width']} | {r['tile'][0]} | {kind} | {row['threshold']:.4g} | {_pct(row['recall'])} | "
                         f"{_pct(row['image_recall'])} | {_pct(row['precision'])} | {f100} | "
                         f"{row['false_events_defective']} | {per} |")
    lines += ["", "default = the artifact's own threshold; calibrated = lowest threshold with <= target false "
              "events per 100 normal images on the trainer's held-out normal images; oracle = best recall at "
              "<= target chosen on the test split itself (reference only)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in res["results"]:
        pts = sorted((c["false_per_100_good"], 100 * (c["recall"] or 0)) for c in r["curve"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r["name"])
        for kind, mk in (("default", "o"), ("calibrated", "s")):
            if kind in r["rows"]:
                row = r["rows"][kind]
                ax.scatter([row["false_per_100_good"]], [100 * (row["recall"] or 0)], marker=mk, s=60,
                           edgecolors="k", zorder=3)
    ax.axvline(res["settings"]["target"], color="grey", ls="--", lw=1)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("false events per 100 good images")
    ax.set_ylabel("defect recall (% of regions)")
    ax.set_title("event-level curve (o default threshold, s calibrated)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/events.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", action="append", required=True, metavar="NAME=PATH",
                   help="an exported artifact (or model.pt), repeatable")
    p.add_argument("--data", required=True, help="MVTec-layout class folder (test/ and ground_truth/)")
    p.add_argument("--width", type=int, default=None,
                   help="camera line width the images are replayed at (default: the line width a tiled model "
                        "was trained at, else 256)")
    p.add_argument("--target-per-100-good", type=float, default=1.0)
    p.add_argument("--line-pitch-mm", type=float, default=None)
    p.add_argument("--line-rate-hz", type=float, default=None)
    p.add_argument("--no-calibration", action="store_true", help="skip the calibrated-threshold row")
    p.add_argument("--seed", type=int, default=0, help="order of the images on the strip")
    p.add_argument("--out", default="benchmarks/out/events")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    arts: Dict[str, str] = {}
    for item in a.artifact:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = pathlib.Path(item).stem, item
        arts[name] = path
    try:
        normals = None if a.no_calibration else validation_normals(a.data)
        results = [evaluate_artifact(n, p, a.data, a.width, a.target_per_100_good, a.seed, a.line_pitch_mm,
                                     a.line_rate_hz, calibrate_on=normals) for n, p in arts.items()]
    except (ReplayError, EngineError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"schema": SCHEMA, "settings": {"data": a.data, "width": a.width, "target": a.target_per_100_good,
                                          "seed": a.seed, "line_pitch_mm": a.line_pitch_mm,
                                          "line_rate_hz": a.line_rate_hz},
           "command": "python benchmarks/events.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": results}
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / "events.md").write_text(md)
    plot(res, out / "events.png")
    print(md)
    print(f"wrote {out / 'events.json'}, {out / 'events.md'}, {out / 'events.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
