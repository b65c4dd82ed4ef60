"""Which defects each model misses: image and pixel AUROC per defect type, from `models.evaluate` results.

    python benchmarks/defect_types.py --data ../shared/data/magnetic_tile \\
        --eval padim=eval_padim/metrics.json --eval dvad=eval_s0/metrics.json --eval dvad=eval_s1/metrics.json \\
        [--out benchmarks/out/defect_types]

Each --eval NAME=PATH is the metrics.json `python -m models.evaluate --ckpt M.pt --data DIR --out EVAL`
writes for the test split; entries sharing a NAME (seeds of one recipe) are averaged, with their
sample standard deviation. Per class and defect type (the test/ folders of --data), the image AUROC of
that type's images against the class's normal images (`models.evaluate.defect_type_breakdown`,
recomputed from the saved per-image scores, so results written before the breakdown existed work too),
and the pixel AUROC of the same images where the result has it (`models.evaluate` saves it per type;
results written before that count no pixel run). Writes defect_types.md (per class an image and a
pixel table), defect_types.json and defect_types.png (grouped bars, one group per defect type, image
AUROC above pixel AUROC, the seed spread as error bars) under --out, and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Dict, List, Sequence

if __package__ in (None, ""):   # `python benchmarks/defect_types.py`: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np


class DefectTypesError(ValueError):
    """A bad --eval entry or a result that does not fit --data (the message says which and why)."""


def load_eval(item: str, samples) -> tuple:
    """'NAME=PATH' -> (name, {"image" | "pixel": {class: ({type: AUROC}, AUROC over all types)}}) of a
    test-split result (pixel values NaN where it has none)."""
    from models.evaluate import defect_type_breakdown

    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise DefectTypesError(f"--eval {item}: expected NAME=PATH to a models.evaluate metrics.json")
    p = pathlib.Path(path)
    try:
        res = json.loads(p.read_text())
        idx, scores = res["scores"]["index"], res["scores"]["score"]
        thr, split, per_class = float(res["threshold"]["value"]), res["split"], res["per_class"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DefectTypesError(f"--eval {item}: {p} is not a models.evaluate metrics.json ({e!r})") from None
    if split != "test":
        raise DefectTypesError(f"--eval {item}: {p} scores the {split} split; the test split is expected")
    if len(idx) != len(samples) or sorted(int(i) for i in idx) != list(range(len(samples))):
        raise DefectTypesError(f"--eval {item}: {p} scores {len(idx)} images, the test split of --data has "
                               f"{len(samples)}: not an evaluation of this data")
    per_type = defect_type_breakdown(samples, scores, idx, thr)
    aurocs = {c: {t: r["image_auroc"] for t, r in types.items() if t != "good"} for c, types in per_type.items()}
    saved = res.get("per_type") or {}
    pixel = {c: {t: float(saved.get(c, {}).get(t, {}).get("pixel_auroc", np.nan)) for t in aurocs[c]} for c in aurocs}
    return name, {"image": {c: (aurocs[c], float(per_class[c]["image_auroc"])) for c in aurocs},
                  "pixel": {c: (pixel[c], float(per_class[c].get("pixel_auroc", np.nan))) for c in aurocs}}


def summarise(data, evals: Sequence[str], classes=None) -> dict:
    """{"classes": {class: {"types": [..], "n": {type: images}, "rows": [{name, runs, all, all_sd,
    types: {type: mean}, sd: {type: sd}, pixel: {the same keys for the pixel AUROC, over the runs
    whose result has it per type}}]}}} over the --eval entries, grouped by name."""
    from models.data import scan_mvtec

    samples, _ = scan_mvtec(data, classes, "test")
    grouped: Dict[str, List[dict]] = {}
    for item in evals:
        name, levels = load_eval(item, samples)
        grouped.setdefault(name, []).append(levels)
    out: dict = {"data": str(data), "classes": {}}
    for cls in sorted({s.class_name for s in samples}):
        types = sorted({s.defect_type for s in samples if s.class_name == cls} - {"good"})
        n = {t: sum(1 for s in samples if s.class_name == cls and s.defect_type == t) for t in types}
        rows = []
        for name, runs in grouped.items():
            row = _stats([r["image"][cls] for r in runs], types)
            # pixel values over the runs whose result has them per type (older results do not)
            row["pixel"] = _stats([r["pixel"][cls] for r in runs
                                   if all(np.isfinite(r["pixel"][cls][0][t]) for t in types)], types)
            rows.append(dict(name=name, **row))
        out["classes"][cls] = dict(types=types, n=n, rows=rows)
    return out


def _stats(runs: Sequence[tuple], types) -> dict:
    """Mean and sample sd over runs of ({type: AUROC}, AUROC over all types); NaN where too few."""
    n = len(runs)
    per = np.array([[r[0][t] for t in types] for r in runs], np.float64).reshape(n, len(types))
    alls = np.array([r[1] for r in runs], np.float64)
    sd = per.std(axis=0, ddof=1) if n > 1 else np.full(len(types), np.nan)
    mean = per.mean(axis=0) if n else np.full(len(types), np.nan)
    return dict(runs=n, all=float(alls.mean()) if n else float("nan"),
                all_sd=float(alls.std(ddof=1)) if n > 1 else float("nan"),
                types=dict(zip(types, mean.tolist())), sd=dict(zip(types, sd.tolist())))


def _cell(mean: float, sd: float) -> str:
    return "-" if not np.isfinite(mean) else f"{100 * mean:.1f}" + (f" +- {100 * sd:.1f}" if np.isfinite(sd) else "")


def markdown(res: dict) -> str:
    lines = []
    for cls, c in res["classes"].items():
        for what, pick, against in (("Image", lambda r: r, "each type's images against the class's normal images"),
                                    ("Pixel", lambda r: r["pixel"], "each type's defect pixels against every normal "
                                     "pixel of those images and of the class's normal images")):
            if what == "Pixel" and not any(np.isfinite(v) for r in c["rows"] for v in r["pixel"]["types"].values()):
                continue
            lines += [f"{what} AUROC (%) per defect type of `{cls}` ({against}; "
                      f"mean +- sd over runs sharing a name):", "",
                      "| model | runs | all | " + " | ".join(f"{t} ({c['n'][t]})" for t in c["types"]) + " |",
                      "| --- " * (len(c["types"]) + 3) + "|"]
            for r in c["rows"]:
                v = pick(r)
                lines.append(f"| {r['name']} | {v['runs']} | {_cell(v['all'], v['all_sd'])} | "
                             + " | ".join(_cell(v["types"][t], v["sd"][t]) for t in c["types"]) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    """Grouped bars per defect type: image AUROC, and below it the pixel AUROC where results have it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for cls, c in res["classes"].items():
        panels.append((cls, c, "image", lambda r: r))
        if any(r["pixel"]["runs"] for r in c["rows"]):
            panels.append((cls, c, "pixel", lambda r: r["pixel"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.2, 4.4 * len(panels)), squeeze=False)
    for ax, (cls, c, what, pick) in zip(axes[:, 0], panels):
        x = np.arange(len(c["types"]))
        width = 0.8 / max(1, len(c["rows"]))
        for k, r in enumerate(c["rows"]):
            v = pick(r)
            ys = [100 * v["types"][t] for t in c["types"]]
            err = [100 * v["sd"][t] for t in c["types"]] if v["runs"] > 1 else None
            label = (f"{r['name']} ({100 * v['all']:.1f}, {v['runs']} run{'s' if v['runs'] > 1 else ''})"
                     if v["runs"] else f"{r['name']} (no per-type {what} values)")
            ax.bar(x + (k - (len(c["rows"]) - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, [f"{t}\n({c['n'][t]})" for t in c["types"]])
        vals = [100 * pick(r)["types"][t] for r in c["rows"] for t in c["types"]]
        lo = min([v for v in vals if np.isfinite(v)] + [50.0])
        ax.set_ylim(max(0.0, np.floor(lo / 10) * 10 - 5), 100)
        ax.set_ylabel(f"{what} AUROC (%)")
        against = "its images against the normal ones" if what == "image" else "its defect pixels against normal ones"
        ax.set_title(f"{cls}: {what} AUROC per defect type, {against} (legend: all types, runs; bars: sd)",
                     fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/defect_types.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the MVTec-layout folder the results were evaluated on")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=METRICS_JSON",
                   help="a models.evaluate test-split metrics.json (repeatable; a repeated NAME is averaged)")
    p.add_argument("--classes", default=None, help="comma-separated classes (default: all the results scored)")
    p.add_argument("--out", default="benchmarks/out/defect_types")
    a = p.parse_args(argv)
    from models.data import DataError

    try:
        if not a.eval:
            raise DefectTypesError("give at least one --eval NAME=METRICS_JSON")
        res = summarise(a.data, a.eval, a.classes)
    except (DefectTypesError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(res)
    (out / "defect_types.md").write_text(text)
    (out / "defect_types.json").write_text(json.dumps(res, indent=1, default=float))
    plot(res, out / "defect_types.png")
    print(text + f"wrote {out / 'defect_types.md'}, defect_types.json and defect_types.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
