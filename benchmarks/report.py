"""Report writers of benchmarks/latency.py: console table, Markdown, CSV, PNG plot, comparison with an
earlier run, and the `make bench` block of benchmarks/RESULTS.md."""
from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Dict, List, Optional, Tuple

ROW_FIELDS = (
    "backend", "precision", "batch", "device", "status", "reason", "model", "role",
    "n", "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "images_per_s",
    "load_s", "first_call_ms", "host_load_mib", "host_first_call_mib", "host_infer_peak_mib",
    "host_mem_method", "device_load_mib", "device_torch_peak_mib", "device_used_delta_mib",
    "score_max_abs_diff", "artifact", "notes",
)
"""Every "ok" row carries all of these keys (values may be null where a quantity does not apply)."""


def _row_key(row) -> Tuple:
    return (row["backend"], row["precision"], row["batch"], row["device"])


def compare_results(new: dict, old: dict) -> List[dict]:
    """Match ok rows by (backend, precision, batch, device): latency ratio new/old, speedup old/new."""
    old_rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    out = []
    for r in new.get("rows", []):
        o = old_rows.get(_row_key(r))
        if r.get("status") != "ok" or o is None:
            continue
        out.append({
            "backend": r["backend"], "precision": r["precision"], "batch": r["batch"], "device": r["device"],
            "old_median_ms": o["median_ms"], "new_median_ms": r["median_ms"],
            "latency_ratio": r["median_ms"] / o["median_ms"],
            "speedup": o["median_ms"] / r["median_ms"],
            "throughput_ratio": r["images_per_s"] / o["images_per_s"],
            "p99_ratio": r["p99_ms"] / o["p99_ms"],
        })
    return out


def _fmt(v, nd=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _table_rows(result) -> Tuple[List[str], List[List[str]]]:
    head = ["backend", "precision", "batch", "median ms", "p90 ms", "p99 ms", "img/s", "load s",
            "first call ms", "host MiB", "dev MiB", "score diff"]
    body = []
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        dev = r["device_torch_peak_mib"] if r["device_torch_peak_mib"] is not None else r["device_used_delta_mib"]
        host = sum(v for v in (r["host_load_mib"], r["host_first_call_mib"], r["host_infer_peak_mib"])
                   if v is not None)
        body.append([r["backend"] + (" (ref)" if r["role"] == "reference" else ""), r["precision"],
                     str(r["batch"]), _fmt(r["median_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                     _fmt(r["images_per_s"], 1), _fmt(r["load_s"]), _fmt(r["first_call_ms"], 0),
                     _fmt(host, 1), _fmt(dev, 1),
                     "-" if r["score_max_abs_diff"] is None else f"{r['score_max_abs_diff']:.1e}"])
    return head, body


def format_table(result) -> str:
    head, body = _table_rows(result)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    un = [r for r in result["rows"] if r["status"] != "ok"]
    if un:
        lines += ["", "not run:"]
        lines += [f"  {r['backend']} {r['precision']}" + (f" b{r['batch']}" if r["batch"] else "")
                  + f": {r['status']} - {r['reason']}" for r in un]
    return "\n".join(lines)


def format_markdown(result, command: str) -> str:
    h = result["host"]
    m = result["model"]
    head, body = _table_rows(result)
    lines = [
        f"Machine: {h['cpu']} ({h['cpu_count']} cores, {h['torch_threads']} torch threads, load average "
        f"{_fmt((h.get('loadavg_at_start') or [None])[0])} at start)"
        + (f", GPU {h['gpu']}" if h.get("gpu") else "") + f"; torch {h['torch']}, onnxruntime "
        f"{h.get('onnxruntime')}; {result['created']}.",
        f"Model: {m['name']} ({m['params'] / 1e6:.2f} M parameters; {result.get('model_source', '')}), "
        f"reference PaDiM {result['reference_model']['params'] / 1e6:.2f} M; input "
        f"{result['settings']['size']}x{result['settings']['size']} uint8 frames, device "
        f"{result['settings']['device']}, {result['settings']['reps']} interleaved rounds after warm-up.",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", "Latency per batch call, uint8 frames in, numpy results out. first call = lazy compile / "
              "set-up; host MiB = rise of the process's peak resident memory while loading, during the "
              "first call and during a later call (backends share one process: weights loaded once count "
              "once); score diff = max |score - PyTorch eager fp32 score| on the same frames."]
    un = [r for r in result["rows"] if r["status"] != "ok"]
    if un:
        lines += ["", "Not run here:"]
        lines += [f"- {r['backend']} {r['precision']}: {r['reason']}" for r in un]
    return "\n".join(lines) + "\n"


def write_csv(result, path):
    cols = list(ROW_FIELDS)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in result["rows"]:
            d = {k: r.get(k) for k in cols if k in r}
            w.writerow(d)


def write_plot(result, path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): no plot"
    series: Dict[str, List[Tuple[int, float, float]]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['backend']} {r['precision']}", []).append(
                (r["batch"], r["median_ms"], r["images_per_s"]))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in sorted(series.items()):
        pts.sort()
        b = [p[0] for p in pts]
        a1.plot(b, [p[1] for p in pts], marker="o", label=name)
        a2.plot(b, [p[2] for p in pts], marker="o", label=name)
    batches = sorted({p[0] for pts in series.values() for p in pts})
    for ax, yl, t in ((a1, "median latency per batch (ms)", "latency vs batch"),
                      (a2, "images / s", "throughput vs batch")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(yl)
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=8)
    h = result["host"]
    fig.suptitle(f"{result['model']['name']} {result['settings']['size']}px, {result['settings']['device']}: "
                 f"{h.get('gpu') or h['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(result, out_dir, command: str) -> Dict[str, str]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latency.json", "csv": out / "latency.csv", "png": out / "latency.png",
             "md": out / "latency.md"}
    result["command"] = command
    plot_err = write_plot(result, paths["png"])
    if plot_err:
        result.setdefault("warnings", []).append(plot_err)
        del paths["png"]
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_csv(result, paths["csv"])
    paths["md"].write_text(format_markdown(result, command))
    return {k: str(v) for k, v in paths.items()}


RESULTS_MD = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
BLOCK_START, BLOCK_END = "<!-- make-bench:start -->", "<!-- make-bench:end -->"


def refresh_results_block(results_md: pathlib.Path, table_md: str) -> pathlib.Path:
    """Replace the text between the make-bench markers of RESULTS.md with `table_md` (the markers
    and a heading are appended when the file has none); everything else is left as it was."""
    text = results_md.read_text() if results_md.exists() else "# Results\n"
    block = f"{BLOCK_START}\n{table_md.strip()}\n{BLOCK_END}"
    if BLOCK_START in text and BLOCK_END in text and text.index(BLOCK_START) < text.index(BLOCK_END):
        head, rest = text.split(BLOCK_START, 1)
        text = head + block + rest.split(BLOCK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## `make bench` (latest run)\n\n" + block + "\n"
    results_md.write_text(text)
    return results_md
