"""models.train: a tiny DVAD learns to separate synthetic defects; resume == uninterrupted run;
threshold calibration against numpy / sklearn; config parsing; CLI errors."""
import json

import numpy as np
import pytest
import torch

from models import dvad as D
from models.checkpoint import load_checkpoint
from models.data import AnomalyDataset, scan_mvtec
from models.synthetic import generate_dataset
from models.train import (TrainError, f1_optimal_threshold, main, parse_config_overrides, predict,
                          score_stats_from_scores, train)

TINY = D.DVADConfig.tiny().to_dict()
QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    # colour-shift defects are left out: on a gray texture at 64 px they are nearly invisible
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", classes=("texture",), n_train=32,
                            n_test_good=16, n_test_defect=16, size=64, seed=0,
                            defects=("scratch", "hole", "stain"))


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model, summary = train(synth, model="dvad", epochs=12, out=out, batch_size=4, seed=0,
                           config=TINY, **QUIET)
    return model, summary, out


def _test_scores(model, root):
    samples, names = scan_mvtec(root, None, "test")
    pp = model.preprocess
    ds = AnomalyDataset(samples, pp.input_size, pp.channels, pp.mean, pp.std, class_names=names)
    return predict(model, torch.utils.data.DataLoader(ds, batch_size=16))


def test_tiny_dvad_trains_in_seconds_and_separates_defects(trained, synth):
    from sklearn.metrics import roc_auc_score

    model, summary, _ = trained
    pr = _test_scores(model, synth)
    auroc = roc_auc_score(pr["labels"], pr["scores"])
    # measured 0.95-0.97 over seeds 0-2 (an untrained decoder gives 0.35-0.70)
    assert auroc > 0.85, auroc
    hist = summary["loss_history"]
    assert len(hist) == 12 and hist[-1] < 0.8 * hist[0]
    assert summary["feature_cache"] is True and summary["images_per_s"] > 0
    assert summary["train_images"] + summary["val_images"] == 32 and summary["val_images"] >= 1


def test_checkpoint_reproduces_scores_and_threshold_is_the_normal_quantile(trained, synth):
    model, summary, out = trained
    loaded = load_checkpoint(out)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a0, s0 = model.eval()(x)
        a1, s1 = loaded(x)
    assert torch.equal(s0, s1) and torch.equal(a0, a1)
    assert loaded.class_names == ["texture"]
    st = loaded.score_stats
    assert st.to_dict() == summary["score_stats"]
    # recompute the held-out normal scores independently and the 99 % quantile with numpy
    from models.data import make_datasets

    _, val_ds, _, _ = make_datasets(synth, None, loaded.preprocess, 0.1, 0)
    pv = predict(loaded, torch.utils.data.DataLoader(val_ds, batch_size=8))
    assert st.threshold == pytest.approx(float(np.quantile(pv["scores"], 0.99, method="higher")), abs=1e-7)
    assert st.low == pytest.approx(float(np.median(pv["scores"])), abs=1e-7)
    assert st.n_images == len(val_ds) and st.false_alarm_rate == 0.01


def _tiny_run(root, out, epochs, resume=False, config=TINY, **kw):
    return train(root, model="dvad", epochs=epochs, out=out, batch_size=4, seed=3, config=config,
                 resume=resume, **QUIET, **kw)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=10, n_test_good=1,
                            n_test_defect=1, size=64, seed=1)
    full, s_full = _tiny_run(root, tmp_path / "new" / "dir" / "a.pt", 2)   # --out in a folder not yet there
    _tiny_run(root, tmp_path / "b.pt", 1)
    state = torch.load(str(tmp_path / "b.pt") + ".state", weights_only=True)
    assert state["epoch"] == 1
    resumed, s_res = _tiny_run(root, tmp_path / "b.pt", 2, resume=True)
    assert s_res["loss_history"][0] == s_full["loss_history"][0]
    np.testing.assert_allclose(s_res["loss_history"], s_full["loss_history"], rtol=1e-6)
    assert (tmp_path / "new" / "dir" / "a.pt.state").is_file()
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=k)
    # a different config cannot silently resume someone else's state
    with pytest.raises(TrainError, match=r"differs from this run's in d_state \(saved 4, asked 5\)\. Use"):
        train(root, model="dvad", epochs=3, out=tmp_path / "b.pt", batch_size=4, seed=3,
              config=dict(TINY, d_state=5), resume=True, **QUIET)
    with pytest.raises(TrainError, match="written for model 'dvad'; this run asks for 'mambaad'"):
        train(root, model="mambaad", epochs=3, out=tmp_path / "b.pt", batch_size=4, seed=3,
              config=TINY, resume=True, **QUIET)


def test_resuming_a_finished_run_rescores_the_same_weights_and_nothing_else(tmp_path):
    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=12, n_test_good=1,
                            n_test_defect=1, size=64, seed=4)
    first, s1 = _tiny_run(root, tmp_path / "r.pt", 2, validate=False)
    scoring = dict(score_topk=0.05, map_strides=[8, 16], blur_sigma=2.0)
    again, s2 = _tiny_run(root, tmp_path / "r.pt", 2, resume=True, validate=False, config=dict(TINY, **scoring))
    assert s2["loss_history"] == s1["loss_history"]            # no epoch ran
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    saved = load_checkpoint(tmp_path / "r.pt")
    assert saved.config.score_topk == 0.05 and tuple(saved.config.map_strides) == (8, 16)
    # recalibrated with the new rule: the threshold is the normal quantile of the re-scored model
    from models.data import make_datasets

    _, val_ds, _, _ = make_datasets(root, None, saved.preprocess, 0.1, 3)
    pv = predict(saved, torch.utils.data.DataLoader(val_ds, batch_size=8))
    assert saved.score_stats.threshold == pytest.approx(float(np.quantile(pv["scores"], 0.99, method="higher")),
                                                        abs=1e-7)
    assert saved.score_stats.threshold != first.score_stats.threshold
    # a field that shaped the weights still refuses, and so does an unfinished run asked to re-score
    with pytest.raises(TrainError, match=r"in lr \(saved [0-9.e-]+, asked 0\.01\)\. Use the same --config"):
        _tiny_run(root, tmp_path / "r.pt", 2, resume=True, config=dict(TINY, lr=0.01))
    with pytest.raises(TrainError, match="stopped after epoch 2 of the 3 this run asks for: pass --epochs 2"):
        _tiny_run(root, tmp_path / "r.pt", 3, resume=True, config=dict(TINY, score_topk=0.05))


def test_uncached_path_trains_and_labelled_val_gives_f1_threshold(tmp_path):
    root = generate_dataset(tmp_path / "d", classes=("texture", "object"), n_train=6, n_test_good=3,
                            n_test_defect=3, size=64, seed=2)
    model, s = train(root, model="mambaad", epochs=1, batch_size=4, config=D.MambaADConfig.tiny().to_dict(),
                     cache_gb=0.0, val_data=root, **QUIET)
    assert s["feature_cache"] is False and np.isfinite(s["final_loss"])
    assert model.score_stats.method == "f1-optimal"
    assert model.class_names == ["object", "texture"]
    dv, _ = train(root, model="dvad", epochs=0, config=TINY, **QUIET)
    assert dv.config.num_classes == 2                   # the class-aware embedding got the count


def test_f1_optimal_threshold_matches_brute_force_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 40
        y = (rng.random(n) < 0.4).astype(int)
        s = np.round(rng.normal(y * 1.0, 1.0), 1)       # rounding creates ties
        t = f1_optimal_threshold(s, y)
        best = max(f1_score(y, (s >= c).astype(int)) for c in np.unique(s))
        assert f1_score(y, (s >= t).astype(int)) == pytest.approx(best, abs=1e-12)


def test_score_stats_from_scores_quantile_and_errors():
    rng = np.random.default_rng(1)
    normal = rng.normal(size=200)
    st = score_stats_from_scores(normal, far=0.05, map_low=0.25)
    assert st.threshold == float(np.quantile(normal, 0.95, method="higher"))
    assert (normal >= st.threshold).mean() <= 0.05 + 1 / 200
    assert st.low == float(np.median(normal)) and st.map_low == 0.25
    assert st.map_threshold == st.threshold and st.false_alarm_rate == 0.05
    assert st.normalize(st.threshold) == pytest.approx(0.5)
    with pytest.raises(TrainError, match="far"):
        score_stats_from_scores(normal, far=1.5)
    with pytest.raises(TrainError, match="held-out"):
        score_stats_from_scores([], far=0.01)


def test_parse_config_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"d_state": 12, "scan": "hilbert8"}))
    got = parse_config_overrides(['{"expand": 1}', "dims=64,32,16,16", "use_moe=false", str(f),
                                  "encoder=resnet18"])
    assert got == {"expand": 1, "dims": [64, 32, 16, 16], "use_moe": False, "d_state": 12,
                   "scan": "hilbert8", "encoder": "resnet18"}
    # a single value for a tuple field is its 1-tuple, in every model's config
    one = parse_config_overrides(["map_strides=16"])
    assert D.DVADConfig.from_dict(one).map_strides == (16,)
    from models.omniad import OmniADConfig

    assert OmniADConfig.from_dict(one).map_strides == (16,)
    with pytest.raises(TrainError, match="not valid JSON"):
        parse_config_overrides(["{oops"])
    with pytest.raises(TrainError, match="key=value"):
        parse_config_overrides(["nonsense"])


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--data", str(empty), "--epochs", "0", "--out", str(tmp_path / "m.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and err[0].startswith("error:")
    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=3, n_test_good=1,
                            n_test_defect=1, size=64, seed=0)
    assert main(["--data", str(root), "--config", "no_such_field=1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no_such_field" in err and "unknown config field" in err
    assert main(["--data", str(root), "--model", "nope", "--no-progress"]) == 2
    assert "registered" in capsys.readouterr().err


def test_statistics_models_are_fitted_by_train(synth):
    """Models without gradient training (PaDiM) get their prepare() call from models.train: the
    fitted model differs from a fresh one and its threshold comes from its own held-out scores."""
    import models

    model, s = train(synth, model="padim", epochs=0, config={"input_size": 64}, **QUIET)
    fresh = models.create_model("padim", input_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x)[1], fresh(x)[1])
    assert s["images_seen"] == s["train_images"] and model.score_stats.n_images == s["val_images"]
    pr = _test_scores(model, synth)
    assert np.std(pr["scores"]) > 0


def test_resume_refuses_a_state_saved_with_another_normalisation(tmp_path):
    """A zoo state written before the encoder-normalisation fix (no `legacy_imagenet_norm`
    buffer: the model then keeps ImageNet mean/std) must not silently resume on data normalised
    the new way."""
    from models import adapted_moe as A

    root = generate_dataset(tmp_path / "d", classes=("texture",), n_train=8, n_test_good=2, n_test_defect=2,
                            size=64, seed=1, defects=("scratch",))
    cfg = A.AdaptedMoEConfig.tiny(input_size=64).to_dict()
    out = tmp_path / "m.pt"
    train(root, model="adapted_moe", epochs=1, out=out, batch_size=4, config=cfg, **QUIET)
    state_path = tmp_path / "m.pt.state"
    blob = torch.load(state_path, map_location="cpu", weights_only=True)
    assert "legacy_imagenet_norm" in blob["model_state"]
    # the same state resumes fine ...
    train(root, model="adapted_moe", epochs=2, out=out, batch_size=4, config=cfg, resume=True, **QUIET)
    # ... but not once it looks like a pre-fix one
    blob = torch.load(state_path, map_location="cpu", weights_only=True)
    del blob["model_state"]["legacy_imagenet_norm"]
    torch.save(blob, state_path)
    with pytest.raises(TrainError, match="another input normalisation"):
        train(root, model="adapted_moe", epochs=3, out=out, batch_size=4, config=cfg, resume=True, **QUIET)
