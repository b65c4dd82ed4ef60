"""model.pt: exact round trip, and one CheckpointError (naming the file) for every bad file."""
import hashlib
import io
import json
import logging
import zipfile

import pytest
import torch

import models
from models import dvad as D
from models.base import ScoreStats
from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = models.create_model("dvad", **D.DVADConfig.tiny(num_classes=2).to_dict())
    with torch.no_grad():   # make every part matter, including the zero-initialised adapter gates
        for m in model.modules():
            if isinstance(m, D.HyperAdapter):
                m.gate.normal_()
    model.score_stats = ScoreStats(low=0.1, threshold=0.4, map_low=0.05, map_threshold=0.4,
                                   method="quantile", false_alarm_rate=0.01, n_images=7)
    model.class_names = ["a", "b"]
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    save_checkpoint(model, path)
    return model.eval(), path


def _assert_one_clear_error(path, match=None):
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    if match:
        assert match in msg, msg
    return msg


def test_round_trip_reproduces_scores_exactly(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert loaded.score_stats == model.score_stats and loaded.class_names == ["a", "b"]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        a0, s0 = model(x)
        a1, s1 = loaded(x)
    assert torch.equal(s0, s1) and torch.equal(a0, a1)
    # weights_only loading works on the raw file too (the format promise)
    blob = torch.load(path, weights_only=True)
    assert json.loads(blob["meta_json"])["model"] == "dvad"


def test_mambaad_round_trip(tmp_path):
    torch.manual_seed(1)
    m = models.create_model("mambaad", **D.MambaADConfig.tiny().to_dict()).eval()
    save_checkpoint(m, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x)[1], loaded(x)[1])
    assert loaded.model_name == "mambaad" and loaded.config.use_hyper is False


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        _assert_one_clear_error(p)


def test_foreign_files(tmp_path):
    p = tmp_path / "text.pt"
    p.write_text("hello")
    _assert_one_clear_error(p, "not a PyTorch zip checkpoint")
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("readme.txt", "not torch")
    _assert_one_clear_error(z)
    t = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), t)
    _assert_one_clear_error(t, "not an edge-ad checkpoint")
    d = tmp_path / "dict.pt"
    torch.save({"state_dict": {}, "meta_json": json.dumps({"format": "something-else"})}, d)
    _assert_one_clear_error(d, "format")
    # a pickle that would run code / build arbitrary objects is refused by weights_only
    e = tmp_path / "evil.pt"
    torch.save({"meta_json": "{}", "state_dict": {}, "obj": io.BytesIO(b"x")}, e)
    msg = _assert_one_clear_error(e, "weights_only")
    assert "BytesIO" in msg and "weights_only=False" not in msg and "Re-running" not in msg
    _assert_one_clear_error(tmp_path / "absent.pt", "not found")


def _signed(blob, meta):
    """The blob with new metadata and a matching meta_sha256 (a consistent file a buggy writer
    could produce), to reach the checks behind the hash."""
    text = json.dumps(meta)
    return dict(blob, meta_json=text, meta_sha256=hashlib.sha256(text.encode()).hexdigest())


def test_tampered_weights_and_metadata(saved, tmp_path):
    _, path = saved
    blob = torch.load(path, weights_only=True)
    sd = dict(blob["state_dict"])
    k = next(k for k in sd if k.endswith("in_proj.weight"))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] += 1e-3
    p = tmp_path / "tampered.pt"
    torch.save(dict(blob, state_dict=sd), p)
    _assert_one_clear_error(p, "sha256")
    meta = json.loads(blob["meta_json"])
    meta["format_version"] = 99
    p2 = tmp_path / "newer.pt"
    torch.save(_signed(blob, meta), p2)
    _assert_one_clear_error(p2, "newer")
    meta = json.loads(blob["meta_json"])
    meta["config"]["dims"] = [64, 32, 16, 16]          # config that no longer fits the weights
    p3 = tmp_path / "mismatch.pt"
    torch.save(_signed(blob, meta), p3)
    _assert_one_clear_error(p3, "do not fit")
    meta = json.loads(blob["meta_json"])
    meta["config"]["no_such_field"] = 1
    p4 = tmp_path / "badcfg.pt"
    torch.save(_signed(blob, meta), p4)
    _assert_one_clear_error(p4, "no_such_field")


def test_edited_threshold_is_refused_by_the_metadata_hash(saved, tmp_path):
    """Issue 16: the weights' hash alone let an edited threshold (99: no event ever) through."""
    _, path = saved
    blob = torch.load(path, weights_only=True)
    assert blob["meta_sha256"] == hashlib.sha256(blob["meta_json"].encode()).hexdigest()
    meta = json.loads(blob["meta_json"])
    meta["score_stats"]["threshold"] = 99.0
    p = tmp_path / "edited.pt"
    torch.save(dict(blob, meta_json=json.dumps(meta)), p)
    _assert_one_clear_error(p, "does not match its stored meta_sha256")
    unsigned = dict(blob)
    del unsigned["meta_sha256"]
    torch.save(unsigned, p)                      # a version-2 file without its hash
    _assert_one_clear_error(p, "has no meta_sha256")


def test_version_1_checkpoint_loads_with_a_warning(saved, tmp_path, caplog):
    model, path = saved
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta_json"])
    meta["format_version"] = 1
    old = {k: v for k, v in blob.items() if k != "meta_sha256"}
    old["meta_json"] = json.dumps(meta)
    p = tmp_path / "v1.pt"
    torch.save(old, p)
    with caplog.at_level(logging.WARNING, logger="models.checkpoint"):
        loaded = load_checkpoint(p)
    assert loaded.score_stats == model.score_stats
    assert any("predates metadata hashing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("meta,needle", [
    ([1, 2, 3], "holds a JSON list, expected an object"),
    ("text", "holds a JSON str"),
    ({"format": "edge-ad-checkpoint", "format_version": "2"}, "format_version '2'; expected an integer"),
    ({"format": "edge-ad-checkpoint", "format_version": 1.5}, "format_version 1.5"),
    ({"format": "edge-ad-checkpoint", "format_version": True}, "format_version True"),
    ({"format": "edge-ad-checkpoint", "format_version": 2, "model": "dvad", "score_stats": {"threshold": "x"}},
     "score_stats.threshold='x'"),
    ({"format": "edge-ad-checkpoint", "format_version": 2, "model": "dvad", "score_stats": {"threshold": float("nan")}},
     "score_stats.threshold=nan"),
    ({"format": "edge-ad-checkpoint", "format_version": 2, "model": "dvad", "class_names": [1]}, "class_names"),
    ({"format": "edge-ad-checkpoint", "format_version": 2, "config": []}, "field config is list"),
])
def test_malformed_metadata_is_one_clear_error(saved, tmp_path, meta, needle):
    _, path = saved
    blob = torch.load(path, weights_only=True)
    p = tmp_path / "bad.pt"
    torch.save(_signed(blob, meta), p)
    _assert_one_clear_error(p, needle)


def test_flipped_bytes_never_escape_as_other_errors(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    for i, pos in enumerate((len(data) // 3, len(data) // 2, 2 * len(data) // 3)):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        p = tmp_path / f"flip{i}.pt"
        p.write_bytes(bytes(bad))
        try:
            meta, sd = read_checkpoint(p)
        except CheckpointError as e:
            assert str(p) in str(e)
        else:   # the flip hit a byte that does not matter (zip padding): must still load the same
            assert meta["model"] == "dvad" and len(sd) > 0
