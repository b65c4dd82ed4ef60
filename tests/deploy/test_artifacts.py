"""Artifact metadata: embed/read round trip, and every way an artifact must be refused."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy.artifacts import (ArtifactError, embed_onnx_metadata, metadata_sha256, read_metadata, sidecar_path,
                             write_runtime_config, write_sidecar)
from export._common import build_metadata


@pytest.fixture(scope="module")
def model():
    from tests.export.conftest import tiny_dvad

    m = tiny_dvad()
    m.class_names = ["a", "b"]
    return m


def make_onnx(path, meta, weight=1.0):
    w = numpy_helper.from_array(np.full((1,), weight, np.float32), "w")
    g = helper.make_graph([helper.make_node("Cast", ["frames"], ["f"], to=TensorProto.FLOAT),
                           helper.make_node("Mul", ["f", "w"], ["score"])], "g",
                          [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["b", 4, 4, 1])],
                          [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["b", 4, 4, 1])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    embed_onnx_metadata(m, meta)
    onnx.save(m, str(path))
    write_sidecar(path, meta)
    return path


@pytest.fixture
def artifact(tmp_path, model):
    meta = build_metadata(model, format="onnx", frame_hw=[4, 4], frame_channels=1, batch="dynamic",
                          scan="chunked", outputs=["score"])
    return make_onnx(tmp_path / "model.onnx", meta), meta


def test_round_trip(artifact, model):
    path, meta = artifact
    got = read_metadata(path)
    assert {k: v for k, v in got.items() if k not in ("artifact_sha256", "metadata_sha256")} == meta
    assert got["class_names"] == ["a", "b"] and got["config"] == model.config.to_dict()
    assert read_metadata(path, expect={"model": "dvad", "export.frame_hw": (4, 4)})["export"]["scan"] == "chunked"


def test_tampered_artifact_refused(artifact):
    path, _ = artifact
    data = bytearray(path.read_bytes())
    i = data.find(np.float32(1.0).tobytes())
    data[i:i + 4] = np.float32(1.5).tobytes()          # a changed weight, still a valid ONNX file
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sha256 .* does not match .*modified or replaced"):
        read_metadata(path)


def test_swapped_sidecar_refused(tmp_path, model, artifact):
    path, meta = artifact
    other_meta = json.loads(json.dumps(meta))
    other_meta["export"]["frame_hw"] = [8, 8]
    other = make_onnx(tmp_path / "other.onnx", other_meta)
    # same-looking sidecar copied over, hash rewritten to match: embedded metadata disagrees
    side = json.loads(sidecar_path(other).read_text())
    side["artifact_sha256"] = json.loads(sidecar_path(path).read_text())["artifact_sha256"]
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match=r"embedded metadata and sidecar .* disagree on \['export'\]"):
        read_metadata(path)


def test_replaced_artifact_with_stale_sidecar_refused(tmp_path, model, artifact):
    path, meta = artifact
    other = make_onnx(tmp_path / "other.onnx", meta, weight=2.0)
    shutil.copyfile(other, path)
    with pytest.raises(ArtifactError, match="does not match its sidecar"):
        read_metadata(path)


def test_missing_file_and_missing_sidecar(tmp_path, artifact):
    path, _ = artifact
    with pytest.raises(ArtifactError, match="artifact file not found"):
        read_metadata(tmp_path / "nope.onnx")
    sidecar_path(path).unlink()
    with pytest.raises(ArtifactError, match="sidecar metadata model.onnx.json not found"):
        read_metadata(path)
    assert read_metadata(path, require_sidecar=False)["model"] == "dvad"   # embedded copy still readable


def test_engine_needs_sidecar_and_hash(tmp_path, artifact):
    _, meta = artifact
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"plan bytes")
    with pytest.raises(ArtifactError, match="not found next to the artifact"):
        read_metadata(eng)
    write_sidecar(eng, meta)
    assert read_metadata(eng)["export"]["format"] == "onnx"
    eng.write_bytes(b"other plan")
    with pytest.raises(ArtifactError, match="does not match"):
        read_metadata(eng)


def test_mismatched_expectation_and_foreign_metadata(tmp_path, model, artifact):
    path, meta = artifact
    with pytest.raises(ArtifactError, match=r"export.frame_channels is 1, expected 3"):
        read_metadata(path, expect={"export.frame_channels": 3})
    bad = json.loads(json.dumps(meta))
    bad["format_version"] = 99
    p = make_onnx(tmp_path / "new.onnx", bad)
    with pytest.raises(ArtifactError, match="format_version 99 not supported"):
        read_metadata(p)
    bad = json.loads(json.dumps(meta))
    bad["format"] = "someone-else"
    p = make_onnx(tmp_path / "foreign.onnx", bad)
    with pytest.raises(ArtifactError, match="format 'someone-else'"):
        read_metadata(p)
    sidecar_path(p).write_text("{not json")
    with pytest.raises(ArtifactError, match="sidecar is not valid JSON"):
        read_metadata(p)


def test_checkpoint_read_through_same_function(tmp_path, model):
    from models.checkpoint import save_checkpoint

    p = save_checkpoint(model, tmp_path / "model.pt")
    assert read_metadata(p)["model"] == "dvad"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="model.pt"):
        read_metadata(p)


# ---- integrity of what decides a verdict (issue 16) ---------------------------------------------
def _edit_sidecar(path, fn):
    side = json.loads(sidecar_path(path).read_text())
    fn(side)
    sidecar_path(path).write_text(json.dumps(side))


def test_sidecar_metadata_hash_covers_the_thresholds(tmp_path, artifact):
    path, meta = artifact
    side = json.loads(sidecar_path(path).read_text())
    assert side["metadata_sha256"] == metadata_sha256(side) == metadata_sha256(meta)
    # a TensorRT plan has no embedded copy: before the metadata hash, an edited threshold in its
    # sidecar passed every check
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"plan bytes")
    write_sidecar(eng, meta)
    _edit_sidecar(eng, lambda s: s["score_stats"].update(threshold=99.0))
    with pytest.raises(ArtifactError, match="does not match its metadata_sha256"):
        read_metadata(eng)
    _edit_sidecar(eng, lambda s: s.pop("metadata_sha256"))
    with pytest.raises(ArtifactError, match="has no metadata_sha256"):
        read_metadata(eng)
    # every covered field, not only the thresholds
    for key, value in (("class_names", ["x"]), ("preprocess", {}), ("config", {}), ("model", "padim")):
        write_sidecar(eng, meta)
        _edit_sidecar(eng, lambda s: s.update({key: value}))
        with pytest.raises(ArtifactError, match="metadata_sha256"):
            read_metadata(eng)


def test_version_1_sidecar_without_hash_loads_with_a_warning(tmp_path, artifact, caplog):
    import logging

    _, meta = artifact
    old = dict(meta, format_version=1)
    eng = tmp_path / "old.engine"
    eng.write_bytes(b"plan")
    write_sidecar(eng, old)
    _edit_sidecar(eng, lambda s: s.pop("metadata_sha256"))
    with caplog.at_level(logging.WARNING, logger="deploy.artifacts"):
        assert read_metadata(eng)["format_version"] == 1
    assert any("predates metadata hashing" in r.getMessage() for r in caplog.records)


def test_runtime_section_is_signed_applied_and_validated(artifact):
    path, meta = artifact
    before = path.read_bytes()
    write_runtime_config(path, {"pixel_threshold": 0.25, "image_threshold": 0.5,
                                "calibration": {"fpr": 1e-3, "images": 40, "units": "mm"}})
    assert path.read_bytes() == before                      # the artifact itself is not rewritten
    got = read_metadata(path)                               # embedded (no runtime) still agrees
    assert got["runtime"]["pixel_threshold"] == 0.25 and got["runtime"]["calibration"]["images"] == 40
    assert got["metadata_sha256"] == metadata_sha256(got) != metadata_sha256(meta)
    _edit_sidecar(path, lambda s: s["runtime"].update(pixel_threshold=9.0))   # a hand edit
    with pytest.raises(ArtifactError, match="metadata_sha256"):
        read_metadata(path)
    with pytest.raises(ArtifactError, match="metadata_sha256"):   # nor signed over by the writer
        write_runtime_config(path, {"pixel_threshold": 9.0})
    write_sidecar(path, meta)                               # (as exported)
    write_runtime_config(path, {"pixel_threshold": 0.3})   # re-signing replaces the whole section
    assert read_metadata(path)["runtime"] == {"pixel_threshold": 0.3}
    write_runtime_config(path, {})
    assert "runtime" not in read_metadata(path)
    for bad, needle in (({"pixel_threshold": float("nan")}, "pixel_threshold=nan"),
                        ({"image_threshold": "0.5"}, "image_threshold='0.5'"),
                        ({"calibration": {"x": [1.0, float("inf")]}}, r"calibration.x\[1\]=inf"),
                        ({"pixel_threshold": True}, "pixel_threshold=True"),
                        ([0.5], "expected an object")):
        with pytest.raises(ValueError, match=needle):
            write_runtime_config(path, bad)
    assert read_metadata(path)["export"]["frame_hw"] == [4, 4]   # a refused write changed nothing


def test_rejected_artifact_refused_unless_allowed(artifact, caplog):
    import logging

    path, meta = artifact
    report = {"passed": False, "failures": ["anomaly_map max abs diff 0.3 > 0.01"]}
    write_sidecar(path, meta, parity=report)
    with pytest.raises(ArtifactError, match=r"parity gate REJECTED .*max abs diff 0.3.*--allow-rejected"):
        read_metadata(path)
    with caplog.at_level(logging.WARNING, logger="deploy.artifacts"):
        assert read_metadata(path, allow_rejected=True)["parity"]["passed"] is False
    assert any("rejected" in r.getMessage() for r in caplog.records)
    write_sidecar(path, meta, parity={"passed": True})
    assert read_metadata(path)["parity"]["passed"] is True
