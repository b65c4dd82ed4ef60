"""The formats table drives argument validation, the CLIs and the README table."""
import argparse

import pytest

from export.formats import FORMATS, ExportArgError, add_cli_args, markdown_table, parse_frame_size, validate_args


def test_table_lists_every_format_and_its_flags():
    md = markdown_table()
    for f in FORMATS:
        assert f"python -m {f.module}" in md and f.artifact in md
    assert "--frame-size" in md and "--precision" in md


@pytest.mark.parametrize("fmt,kw,msg", [
    ("onnx", {"precision": "fp16"}, r"onnx export does not take argument\(s\) \['precision'\]"),
    ("onnx", {"batch": 0}, "batch: expected 1..4096"),
    ("onnx", {"batch": "many"}, "batch: expected 'dynamic'"),
    ("onnx", {"opset": 12}, "opset: expected 18..23"),
    ("onnx", {"scan": "loop"}, "scan: expected one of chunked, plugin"),
    ("onnx", {"frame_channels": 2}, "frame_channels: expected one of 1, 3"),
    ("onnx", {"frame_hw": "256by256"}, r"frame_hw \(--frame-size\): expected HxW"),
    ("tensorrt", {"min_batch": 4, "opt_batch": 2, "max_batch": 8}, "need min <= opt <= max"),
    ("tensorrt", {"workspace": -1}, "workspace"),
    ("triton", {"format": "savedmodel"}, "format: expected one of onnx, plan"),
    ("nope", {}, "unknown export format 'nope'"),
])
def test_bad_arguments(fmt, kw, msg):
    with pytest.raises(ExportArgError, match=msg):
        validate_args(fmt, **kw)


def test_values_are_normalised():
    a = validate_args("tensorrt", frame_hw="37x45", opset="20", workspace="2.5", precision="int8", min_batch="1")
    assert a["frame_hw"] == (37, 45) and a["opset"] == 20 and a["workspace"] == 2.5 and a["min_batch"] == 1
    assert parse_frame_size(256) == (256, 256) and parse_frame_size("64") == (64, 64)
    assert validate_args("onnx", batch="dynamic")["batch"] == "dynamic" and validate_args("onnx", batch="4")["batch"] == 4


def test_cli_parsers_only_have_the_formats_flags():
    for f in FORMATS:
        ap = add_cli_args(argparse.ArgumentParser(), f.name)
        flags = {o for a in ap._actions for o in a.option_strings} - {"-h", "--help"}
        expected = {("--frame-size" if a == "frame_hw" else "--" + a.replace("_", "-")) for a in f.args}
        assert flags - {"--no-check"} == expected
    ap = add_cli_args(argparse.ArgumentParser(), "onnx")
    with pytest.raises(SystemExit):
        ap.parse_args(["--ckpt", "m.pt", "--precision", "fp16"])
