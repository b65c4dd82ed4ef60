"""The GPU check's results (benchmarks/gpu_check.py writes them after every step): pytest's junit
XML read into counts, the verdicts against issue 14's goals, the Markdown summary that goes into
benchmarks/RESULTS.md, and the tar of the per-step files."""
from __future__ import annotations

import pathlib
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Dict, List, Optional

# (goal, target) -> how to read it from the check's result; moonshots are reported, never required
COPY_SHARE_GOAL, COPY_SHARE_MOON = 0.5, 0.8
AOTI_B1_MS = 2.0
P99_MS = 50.0
TILES_MOON = 1250.0


def _fmt(v, spec=".2f", none="-") -> str:
    return none if v is None else format(v, spec)


def _verdict(ok: Optional[bool], dry: bool) -> str:
    if dry:
        return "n/a (dry run)"
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def _kernel_verdict(res, length: int, batch: int) -> Optional[dict]:
    for v in (res.get("kernels") or {}).get("verdicts", []):
        if v["L"] == length and v["batch"] == batch:
            return v
    return None


def _latency_row(res, model: str, backend: str, precision: str, batch: int) -> Optional[dict]:
    for r in ((res.get("latency") or {}).get(model) or {}).get("rows", []):
        if (r["backend"], r["precision"], r["batch"], r["status"]) == (backend, precision, batch, "ok"):
            return r
    return None


def goals(res: dict) -> List[dict]:
    """Issue 14's goals, each with the measured value and met / missed / not measured."""
    dry = bool(res.get("dry_run"))
    out = []
    t = res.get("tests")
    ok = None if not t else (not t["failed"] and not t["errors"] and t["passed"] > 0)
    out.append({"goal": "every CUDA test passes (pytest --stack cuda)", "target": "0 failed, 0 errors",
                "value": None if not t else f"{t['passed']} passed, {len(t['failed'])} failed, "
                                            f"{len(t['errors'])} errors, {t['skipped']} skipped",
                "verdict": _verdict(ok, False)})
    v = _kernel_verdict(res, 4096, 8)
    share = (v or {}).get("triton_share_of_copy_bw")
    out.append({"goal": "Triton scan share of copy bandwidth, L = 4096, batch 8",
                "target": f">= {COPY_SHARE_GOAL:.0%} (moonshot {COPY_SHARE_MOON:.0%})",
                "value": None if share is None else f"{share:.0%}",
                "verdict": _verdict(None if share is None else share >= COPY_SHARE_GOAL, dry)
                + (" (moonshot met)" if share is not None and share >= COPY_SHARE_MOON and not dry else "")})
    vs = [x for x in (res.get("kernels") or {}).get("verdicts", []) if x.get("triton_vs_best_standard_op")]
    out.append({"goal": "Triton scan faster than the best standard-op form, every shape", "target": "> 1.0x each",
                "value": ", ".join(f"L{x['L']} b{x['batch']} {x['triton_vs_best_standard_op']:.1f}x" for x in vs) or None,
                "verdict": _verdict(all(x["triton_vs_best_standard_op"] > 1 for x in vs) if vs else None, dry)})
    r = _latency_row(res, "dvad", "aoti", "fp32", 1)
    out.append({"goal": "dvad default, batch 1, AOTInductor", "target": f"<= {AOTI_B1_MS:g} ms",
                "value": None if r is None else f"{r['median_ms']:.2f} ms (median)",
                "verdict": _verdict(None if r is None else r["median_ms"] <= AOTI_B1_MS, dry)})
    s = res.get("stream")
    p99 = ((s or {}).get("latency_ms") or {}).get("p99")
    out.append({"goal": f"stream {_fmt((s or {}).get('width'), 'd', '4096')} px at {_fmt((s or {}).get('rate'), 'g', '20000')} "
                        "lines/s: drops", "target": "0",
                "value": None if s is None else f"{s['lines_dropped']} of {s['lines_in']} lines",
                "verdict": _verdict(None if s is None else s["lines_dropped"] == 0, dry)})
    out.append({"goal": "stream: p99 line-to-verdict", "target": f"<= {P99_MS:g} ms",
                "value": None if p99 is None else f"{p99:.1f} ms",
                "verdict": _verdict(None if p99 is None else p99 <= P99_MS, dry)})
    bare = (s or {}).get("bare_tiles_per_s")
    out.append({"goal": "moonshot: stream engine tiles/s (bare, batches of 16)", "target": f">= {TILES_MOON:,.0f}",
                "value": None if bare is None else f"{bare:,.0f}",
                "verdict": _verdict(None if bare is None else bare >= TILES_MOON, dry)})
    return out


def parse_junit(path: pathlib.Path) -> dict:
    """Counts, failures (test id + first line) and skip reasons (grouped) from pytest's junit XML."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, errors, skips, passed = [], [], Counter(), 0
    for tc in cases:
        tid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        f, e, s = tc.find("failure"), tc.find("error"), tc.find("skipped")
        if f is not None:
            failed.append({"test": tid, "message": (f.get("message") or "").splitlines()[0][:300] if f.get("message") else ""})
        elif e is not None:
            errors.append({"test": tid, "message": (e.get("message") or "")[:300]})
        elif s is not None:
            skips[(s.get("message") or "").strip()[:200]] += 1
        else:
            passed += 1
    return {"total": len(cases), "passed": passed, "failed": failed, "errors": errors,
            "skipped": sum(skips.values()), "skip_reasons": dict(skips.most_common())}


def pack_details(work: pathlib.Path, dest: pathlib.Path, limit: int = 15 << 20) -> None:
    """The per-step files (no checkpoints or artifacts) as one tar.gz under `limit` bytes; logs
    are dropped first when it would be larger."""
    files = [p for p in (work / "latency").rglob("*") if p.is_file()] if (work / "latency").is_dir() else []
    files += [work / n for n in ("env.json", "models.json", "kernels.json", "stream.json", "stream_export.json",
                                 "junit.xml") if (work / n).is_file()]
    logs = sorted((work / "logs").glob("*.log")) if (work / "logs").is_dir() else []
    for with_logs in (True, False):
        with tarfile.open(dest, "w:gz") as tar:
            for p in files + (logs if with_logs else []):
                tar.add(p, arcname=str(p.relative_to(work)))
        if dest.stat().st_size <= limit:
            return


# ---- Markdown ---------------------------------------------------------------------------------
def _machine(res) -> str:
    e = res.get("env") or {}
    g = e.get("gpu") or {}
    pk = e.get("packages") or {}
    gpu = (f"{g['name']} (compute {g['capability']}, {g['sm_count']} SMs, {g['memory_gib']} GiB, L2 {g['l2_mib']} MiB)"
           if g else "no GPU (CPU dry run)")
    smi = (e.get("nvidia_smi") or "").splitlines()
    return (f"Machine: {gpu}; {e.get('cpu_count')} CPU cores ({e.get('cpu')}); Python {e.get('python')}, torch "
            f"{e.get('torch')} (CUDA {e.get('torch_cuda')}), triton {pk.get('triton')}, numpy {e.get('numpy')}, "
            f"onnxruntime {pk.get('onnxruntime')}, cuda-bindings {pk.get('cuda-bindings')}."
            + (f"\nnvidia-smi: `{smi[1]}` ({smi[0]})" if len(smi) > 1 else ""))


def _steps_table(res) -> List[str]:
    lines = ["| step | phase | status | seconds (limit) | expected on the H200 | note |", "|---|---|---|---|---|---|"]
    for s in res["steps"]:
        note = (s.get("reason") or "").replace("|", "/")[:160]
        lines.append(f"| {s['name']} | {s.get('phase', '')} | {s.get('status')} | {_fmt(s.get('seconds'), '.0f')} "
                     f"({_fmt(s.get('limit_s'), '.0f')}) | ~{_fmt(s.get('est_s'), '.0f')} | {note} |")
    return lines


def _tests(res) -> List[str]:
    t = res.get("tests")
    if not t:
        return ["Not run (see the steps table)."]
    lines = [f"{t['passed']} passed, {len(t['failed'])} failed, {len(t['errors'])} errors, {t['skipped']} skipped "
             f"({t['total']} selected by `--stack cuda`)."]
    for f in t["failed"] + t["errors"]:
        lines.append(f"- FAILED `{f['test']}`: {f['message']}")
    if t["skip_reasons"]:
        lines += ["", "Skipped:"] + [f"- {n} x {msg}" for msg, n in t["skip_reasons"].items()]
    return lines


def _kernels(res) -> List[str]:
    k = res.get("kernels")
    if not k:
        return ["Not run (see the steps table)."]
    copy = (k.get("copy") or {}).get("gbytes_per_s")
    lines = [f"Device copy bandwidth (bytes read + written): **{_fmt(copy, ',.0f')} GB/s**; {k['reps']} timed calls "
             "per row (median), inputs rotated past the L2 cache. Error: max |y - ref| / max |ref| against float64.",
             "", "| op | shape | batch | method | ms | GB/s | % of copy | rel. error | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in k["rows"]:
        shape = f"L={r['L']} D={r['D']}" if r["op"] == "selective_scan" else "x".join(map(str, r["shape"][1:]))
        if r.get("status") != "ok":
            lines.append(f"| {r['op']} | {shape} | {r['batch']} | {r['method']} | - | - | - | - | "
                         f"{r.get('status')}: {(r.get('reason') or '')[:120]} |")
            continue
        share = r["gbytes_per_s"] / copy if copy else None
        note = f"first call {r['first_call_s']:.1f} s" if r.get("method") == "compiled" and "first_call_s" in r else ""
        lines.append(f"| {r['op']} | {shape} | {r['batch']} | {r['method']} | {r['median_ms']:.3f} | "
                     f"{r['gbytes_per_s']:,.0f} | {_fmt(share, '.0%')} | {_fmt(r.get('rel_err_vs_fp64_ref'), '.1e')} | "
                     f"{note} |")
    return lines


def _latency(res, md_paths: Dict[str, pathlib.Path]) -> List[str]:
    warmed = sorted(s["name"].split(":", 1)[1] for s in res["steps"]
                    if s["name"].startswith("warm:") and s.get("status") in ("ok", "stopped"))
    lines = ["", f"Warmed up in phase 1: {', '.join(warmed)}. For those models `first call ms` of compile is a "
                 "call with Inductor's caches warm, and the AOTInductor package was built in phase 1 (its `load s` "
                 "is the load of the package, not the export; gpu_check.json has each row's notes)."] if warmed else []
    for name, path in md_paths.items():
        model = name.split(":", 1)[1]
        lines += ["", f"### {model}", ""]
        info = ((res.get("models") or {}).get("models") or {}).get(model) or {}
        if info.get("params"):
            lines.append(f"{info['params'] / 1e6:.2f} M parameters, input {info.get('input_size')} px, encoder "
                         f"weights {info.get('encoder_weights')}; untrained (prepared and calibrated on synthetic "
                         "images: timings only).")
        lines.append(pathlib.Path(path).read_text().strip() if pathlib.Path(path).is_file()
                     else "Not measured (see the steps table).")
    return lines or ["Not run (see the steps table)."]


def _stream(res) -> List[str]:
    s = res.get("stream")
    if not s:
        return ["Not run (see the steps table)."]
    lat = s.get("latency_ms") or {}
    b = s.get("bench") or {}
    paced = b.get("paced") or {}
    eng = s.get("engine") or {}
    return [f"Engine: {eng.get('backend', '?')} `{pathlib.Path(str(eng.get('path', '?'))).name}` on {s['device']}; "
            f"source `{s['uri']}` for {s['seconds']:g} s; tile {s.get('tile')}, stride {s.get('stride')}, "
            f"{s['tiles_per_line']:.3f} tiles per line.", "",
            "| | lines/s | tiles/s | dropped lines | line-to-verdict p50 / p95 / p99 ms |", "|---|---|---|---|---|",
            f"| bare engine (batches of {b.get('max_batch', 16)}) | {_fmt(s.get('bare_lines_per_s'), ',.0f')} | "
            f"{_fmt(s.get('bare_tiles_per_s'), ',.0f')} | | |",
            f"| pipeline unpaced (benchmarks/stream.py) | {_fmt(b.get('stream_lines_per_s_last_round'), ',.0f')} | "
            f"{_fmt((b.get('stream_tiles_per_s') or [None])[-1], ',.0f')} | | |",
            f"| pipeline paced at {paced.get('load', 0.7):.0%} of capacity | {_fmt(paced.get('lines_per_s'), ',.0f')} | | "
            f"{_fmt(sum((paced.get('dropped') or {}).values()) if paced.get('dropped') else 0, 'd')} | "
            f"{_fmt((paced.get('latency_ms') or {}).get('p50'), '.0f')} / {_fmt((paced.get('latency_ms') or {}).get('p95'), '.0f')}"
            f" / {_fmt((paced.get('latency_ms') or {}).get('p99'), '.0f')} |",
            f"| runtime.stream at {s['rate']:g} lines/s | {s['lines_per_s']:,.0f} | {s['tiles_per_s']:,.0f} | "
            f"{s['lines_dropped']} of {s['lines_in']} | {_fmt(lat.get('p50'), '.0f')} / {_fmt(lat.get('p95'), '.0f')} / "
            f"{_fmt(lat.get('p99'), '.0f')} |", "",
            f"Accounting exact: {s['accounting_ok']}; drops by reason: {s['dropped']}; engine busy "
            f"{s['engine_time_s']:.1f} s in {s['engine_calls']} calls. runtime.stream starts its engine cold "
            "(no warm-up call), so drops while the first calls load count."]


def markdown(res: dict, latency_md: Dict[str, pathlib.Path]) -> str:
    dry = res.get("dry_run")
    lines = ["# GPU check (`benchmarks/gpu_check.py`)", ""]
    if dry:
        lines += ["**Dry run on the CPU** (Triton under its interpreter, test-sized models): the code paths ran; "
                  "the timings mean nothing.", ""]
    if res.get("fatal"):
        lines += [f"**Stopped: {res['fatal']}**", ""]
    lines += [_machine(res), f"Command: `{res['command']}`; started {res['created']}, budget {res['budget_s']:.0f} s, "
              f"wall {res['wall_s']:.0f} s.", "", "## Goals (issue 14)", "", "| goal | target | measured | verdict |",
              "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['value'] or '-'} | {g['verdict']} |" for g in res["goals"]]
    lines += ["", "## Steps", ""] + _steps_table(res)
    if res.get("rerun"):
        lines += ["", f"Not reached or cut at their limit; to run just those: `{res['rerun']}`"]
    lines += ["", "## Correctness on CUDA: `pytest --stack cuda`", ""] + _tests(res)
    lines += ["", "## Kernel speed: `benchmarks/gpu_kernels.py`", ""] + _kernels(res)
    lines += ["", "## Model latency: `benchmarks/latency.py` per model"] + _latency(res, latency_md)
    lines += ["", "## Stream: `runtime.stream` on a simulated line camera", ""] + _stream(res)
    return "\n".join(lines) + "\n"
