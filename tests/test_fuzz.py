"""Fuzzing the edges a plant engineer touches (Hypothesis; seeded and bounded so CI is deterministic):
source URIs, the stream CLI's numbers, checkpoint and sidecar metadata, and image bytes.

The property everywhere: the run ends with exit 0 and exact line accounting, or with one line
(`error: ...`) and exit 2 - never a traceback, never a hang (every stream is bounded in time).
"""
import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from runtime.stream import StreamError, main, run_stream
from tests.strip_model import SIM, TILE

# CI: 25 examples per property (15 for checkpoints), derandomized. EDGE_AD_FUZZ_EXAMPLES=N scales
# every property to N (the longer runs recorded in benchmarks/RESULTS.md).
SCALE = int(os.environ.get("EDGE_AD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=SCALE or 25,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PLAIN = ["0", "1", "2", "3", "7", "32", "48", "64", "0.05", "0.3", "1.0", "500", "1e3"]
ODD = ["-1", "65", "255", "0.5", "1e9", "1e400", "-1e-9", "inf", "-inf", "nan", "", " ", "abc", "0x10", "9" * 30,
       "1_000", "2.5e3", "100001", "-0"]
NUMBERS = st.sampled_from(PLAIN * 3 + ODD)       # mostly plausible, so most runs get past the checks


def _accounted(s):
    event("streamed")
    assert s["error"] is None, s["error"]
    assert s["lines_in"] == s["lines_scored"] + s["lines_dropped"] == s["lines_in"], s
    assert s["accounting_ok"], s


def _one_line(msg: str):
    event("refused: " + msg.split(": ")[-1][:40])
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg


# ---- source URIs ---------------------------------------------------------------------------------
LINESIM_KEYS = ("width", "rate", "lines", "drop", "corrupt", "stall", "disconnect", "total", "format", "seed",
                "kind", "queue", "page", "pages", "defects", "widht")
VALUES = st.one_of(NUMBERS, NUMBERS, st.sampled_from(["Mono8", "RGB8", "BGR8", "texture", "nope", "10:0.05", "5:-1",
                                                      "1:2:3", "40:30:5:255", "40:30:0", "100,200", "a,b"]),
                   st.text(alphabet=string.printable, max_size=8))


PLAUSIBLE = {"width": ["7", "64", "65", "256", "300"], "rate": ["0", "2000", "20000", "1e5"],
             "lines": ["1", "7", "64", "200"], "drop": ["0", "0.1", "0.5", "1"], "corrupt": ["0", "0.2", "1"],
             "stall": ["100:0.05", "0:0.01"], "disconnect": ["50", "100,400", "0"], "total": ["0", "1", "100", "300"],
             "format": ["Mono8", "RGB8"], "seed": ["0", "7"], "kind": ["texture"], "queue": ["1", "4", "64"],
             "page": ["0", "64", "300"], "pages": ["1", "4"], "defects": ["40:30:5", "40:30:5:255;100:10:3"],
             "widht": ["1"]}


@st.composite
def linesim_params(draw):
    """Up to 4 parameters, each plausible 3 times in 4 (so most runs stream), else anything."""
    keys = draw(st.lists(st.sampled_from(LINESIM_KEYS), max_size=4, unique=True))
    return {k: draw(st.sampled_from(PLAUSIBLE[k]) if draw(st.integers(0, 3)) else VALUES) for k in keys}


@FUZZ
@given(params=linesim_params())
def test_fuzz_linesim_uris(onnx_artifact, params):
    from urllib.parse import urlencode

    q = {"width": "256", "kind": "texture", "page": "128", "rate": "0", "total": "300"}
    q.update(params)
    uri = "linesim://?" + urlencode(q)
    try:
        s = run_stream(onnx_artifact, uri, duration_s=1.0, overload="block")
    except StreamError as e:
        _one_line(str(e))
        return
    _accounted(s)
    if s["source_lines_produced"] is not None:
        assert s["source_lines_produced"] == s["lines_in"]


# camera schemes that would talk to a network or enumerate devices are never generated (the
# Aravis / pylon / GenTL / RTSP sources are fuzzed through their parameters in the runtime tests)
NETWORK = {"rtsp", "aravis", "pylon", "genicam"}
OTHER_URIS = st.one_of(
    st.builds(lambda s, q: f"{s}://{q}", st.sampled_from(["v4l2", "file", "ftp", "x", "linesim"]),
              st.text(alphabet=string.ascii_letters + string.digits + "./?&=:%", max_size=20)),
    st.text(max_size=20)).filter(lambda u: urlsplit(u).scheme.lower() not in NETWORK)


@FUZZ
@given(uri=OTHER_URIS)
def test_fuzz_other_uris_are_one_line(onnx_artifact, uri):
    try:
        s = run_stream(onnx_artifact, uri, duration_s=0.5)
    except StreamError as e:
        _one_line(str(e))
        return
    _accounted(s)


# ---- the stream CLI's numbers ------------------------------------------------------------------------
OPTIONS = ("--tile", "--stride", "--max-batch", "--max-wait-ms", "--pixel-threshold", "--image-threshold",
           "--min-area", "--latency-budget-ms", "--duration", "--metrics-port", "--line-pitch-mm", "--threads")


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(opts=st.dictionaries(st.sampled_from(OPTIONS), NUMBERS, max_size=4))
def test_fuzz_cli_numbers(onnx_artifact, capsys, opts):
    capsys.readouterr()                  # (capsys is shared by the examples: start each one empty)
    argv = ["--engine", str(onnx_artifact), "--source", SIM + "&rate=0&total=256&page=128", "--quiet",
            "--overload", "block"]
    for k, v in opts.items():
        argv += [f"{k}={v}"]
    rc = main(argv)
    out, err = capsys.readouterr()
    if rc == 0:
        _accounted(json.loads(out))
    else:
        lines = [ln for ln in err.splitlines() if not ln.startswith("WARNING")]
        event("refused: " + lines[0].split(": ")[-1][:40] if lines else "refused")
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (argv, rc, err)


# ---- checkpoint and sidecar metadata ------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=6), lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=6)
META_PATHS = (("format_version",), ("model",), ("config",), ("preprocess",), ("score_stats",),
              ("score_stats", "threshold"), ("score_stats", "map_threshold"), ("score_stats", "low"),
              ("class_names",), ("export",), ("export", "frame_hw"), ("export", "frame_channels"),
              ("export", "batch"), ("export", "max_batch"), ("export", "outputs"), ("runtime",),
              ("runtime", "pixel_threshold"), ("runtime", "image_threshold"), ("preprocess", "input_size"))


def _set(meta, path, value):
    cur = meta
    for k in path[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    cur[path[-1]] = value


@FUZZ
@given(path=st.sampled_from(META_PATHS), value=JSON)
@example(path=("preprocess",), value=True)            # found by a 100-example run: a traceback then
@example(path=("export", "frame_hw"), value={"0": 64, "1": 64})
def test_fuzz_artifact_metadata(onnx_artifact, path, value):
    """Metadata a buggy writer signed properly (so every check behind the hashes is reached): the
    ONNX file re-embedded and its sidecar re-written with the fuzzed field."""
    import onnx

    from deploy.artifacts import embed_onnx_metadata, read_metadata, sidecar_path, strip_sidecar_keys

    meta = json.loads(json.dumps(read_metadata(onnx_artifact)))
    _set(meta, path, value)
    with tempfile.TemporaryDirectory() as d:
        art = Path(d) / "model.onnx"
        m = onnx.load(str(onnx_artifact))
        try:
            embed_onnx_metadata(m, strip_sidecar_keys(meta))
        except (TypeError, ValueError):   # not JSON-serialisable: the exporter could not have written it
            return
        onnx.save(m, str(art))
        side = dict(meta)
        side["artifact_sha256"] = hashlib.sha256(art.read_bytes()).hexdigest()
        from deploy.artifacts import metadata_sha256

        side["metadata_sha256"] = metadata_sha256(side)
        sidecar_path(art).write_text(json.dumps(side))
        try:
            s = run_stream(art, SIM + "&rate=0&total=200&page=128", duration_s=1.0, overload="block")
        except StreamError as e:
            _one_line(str(e))
            return
        _accounted(s)


@pytest.fixture(scope="module")
def checkpoint_blob(padim_checkpoint):
    import torch

    return torch.load(padim_checkpoint, weights_only=True)


@settings(FUZZ, max_examples=SCALE or 15)
@given(path=st.sampled_from([p for p in META_PATHS if p[0] not in ("export", "runtime")]), value=JSON,
       whole=st.booleans())
def test_fuzz_checkpoint_metadata(checkpoint_blob, path, value, whole):
    import torch

    meta = json.loads(checkpoint_blob["meta_json"])
    if whole:
        meta = value                          # the metadata itself is any JSON value
    else:
        _set(meta, path, value)
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "model.pt"
        torch.save(dict(checkpoint_blob, meta_json=text, meta_sha256=hashlib.sha256(text.encode()).hexdigest()), ck)
        try:
            s = run_stream(ck, SIM + "&rate=0&total=128&page=128", duration_s=1.0, tile=TILE, overload="block")
        except StreamError as e:
            _one_line(str(e))
            return
        _accounted(s)


# ---- image bytes ---------------------------------------------------------------------------------------
def _encoded(kind):
    img = (np.add.outer(np.arange(48), 3 * np.arange(80)) % 256).astype(np.uint8)
    return cv2.imencode(kind, img)[1].tobytes()


@FUZZ
@given(kind=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]), cut=st.floats(0, 1), flips=st.lists(
    st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=4), junk=st.binary(max_size=64))
def test_fuzz_image_bytes(onnx_artifact, kind, cut, flips, junk):
    data = bytearray(_encoded(kind))
    for where, x in flips:
        data[int(where * (len(data) - 1))] ^= x
    data = bytes(data[: max(0, int(cut * len(data)))]) + junk
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        good = _encoded(".png")
        (folder / "0.png").write_bytes(good)
        (folder / f"1{kind}").write_bytes(data)
        (folder / "2.png").write_bytes(good)
        try:
            s = run_stream(onnx_artifact, f"{folder}?format=Mono8", duration_s=5.0, overload="block")
        except StreamError as e:                 # only when no file of the folder decodes
            pytest.fail(f"a folder with good images failed to start: {e}")
        _accounted(s)
        assert s["frames_in"] == 3 and s["lines_in"] == 3 * 48
        assert s["corrupt_buffers"] in (0, 1)
    shutil.rmtree(folder, ignore_errors=True)
