"""DeployModule vs the model applied to the same pre-processing done independently in numpy/cv2."""
import cv2
import numpy as np
import pytest
import torch

from models.base import ScoreStats
from deploy.graph import DeployModule


@pytest.fixture(scope="module")
def model():
    from tests.export.conftest import tiny_dvad

    m = tiny_dvad()
    m.score_stats = ScoreStats(low=0.2, threshold=0.9)
    return m


def reference(model, frames, full=False):
    """cv2 resize (INTER_LINEAR on float32 = half-pixel bilinear, no antialias) + numpy normalise."""
    pp = model.preprocess
    s = pp.input_size
    xs = []
    for f in frames:
        f = f.astype(np.float32)
        if f.shape[2] == 1:
            f = np.repeat(f, 3, axis=2)
        if f.shape[:2] != (s, s):
            f = cv2.resize(f, (s, s), interpolation=cv2.INTER_LINEAR)
        f = (f / 255.0 - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        xs.append(f.transpose(2, 0, 1))
    with torch.no_grad():
        amap, score = model(torch.from_numpy(np.stack(xs)).float())
    norm = model.score_stats.normalize(score.numpy().astype(np.float64))
    out = [amap.numpy(), score.numpy(), norm]
    if full:
        h, w = frames.shape[1:3]
        out.append(np.stack([cv2.resize(m[0], (w, h), interpolation=cv2.INTER_LINEAR)[None] for m in amap.numpy()]))
    return out


@pytest.mark.parametrize("hw,ch", [((37, 45), 1), ((101, 83), 3), ((64, 64), 3), ((64, 64), 1)])
def test_deploy_matches_numpy_cv2_preprocessing(model, hw, ch):
    rng = np.random.default_rng(hash((hw, ch)) % 2**32)
    frames = rng.integers(0, 256, (3, *hw, ch), dtype=np.uint8)
    dm = DeployModule(model, frame_hw=hw, frame_channels=ch, full_res_map=True).eval()
    with torch.no_grad():
        got = [o.numpy() for o in dm(torch.from_numpy(frames))]
    ref = reference(model, frames, full=True)
    assert [g.shape for g in got] == [(3, 1, 64, 64), (3,), (3,), (3, 1, *hw)]
    names = ("anomaly_map", "score", "normalized_score", "anomaly_map_full")
    for name, g, r in zip(names, got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
    assert dm.output_names == names


class _GrayModel(torch.nn.Module):
    """A 1-channel model (forward = per-pixel value as map, mean as score) for the RGB->gray path."""

    score_stats = ScoreStats()

    @property
    def preprocess(self):
        from models.base import PreprocessConfig

        return PreprocessConfig(input_size=48, mean=(0.45,), std=(0.2,), channels=1)

    def forward(self, x):
        return x, x.mean(dim=(1, 2, 3))


def test_rgb_frames_into_gray_model_use_bt601_luma():
    frames = np.random.default_rng(1).integers(0, 256, (2, 30, 70, 3), dtype=np.uint8)
    dm = DeployModule(_GrayModel(), frame_hw=(30, 70), frame_channels=3).eval()
    with torch.no_grad():
        amap, score, _ = dm(torch.from_numpy(frames))
    ref = []
    for f in frames:
        g = cv2.cvtColor(f.astype(np.float32), cv2.COLOR_RGB2GRAY)
        g = cv2.resize(g, (48, 48), interpolation=cv2.INTER_LINEAR)
        ref.append(((g / 255.0 - 0.45) / 0.2)[None])
    ref = np.stack(ref)
    np.testing.assert_allclose(amap.numpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score.numpy(), ref.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_threshold_not_baked_and_normalized_score_formula(model):
    frames = np.random.default_rng(2).integers(0, 256, (4, 40, 40, 1), dtype=np.uint8)
    dm = DeployModule(model, frame_hw=(40, 40), frame_channels=1).eval()
    with torch.no_grad():
        _, score, norm = dm(torch.from_numpy(frames))
    span = model.score_stats.threshold - model.score_stats.low
    expect = np.clip(0.5 * (score.numpy() - model.score_stats.low) / span, 0, 1)
    np.testing.assert_allclose(norm.numpy(), expect, atol=1e-6)
    # no buffer/parameter holds the verdict threshold as a decision constant: only low and 0.5/span
    names = {n for n, _ in dm.named_buffers()}
    assert {"score_low", "score_half_over_span"} <= names and not any("verdict" in n for n in names)


@pytest.mark.parametrize("kw,msg", [({"frame_channels": 2}, "frame_channels"),
                                    ({"frame_hw": (0, 5)}, "frame_hw"),
                                    ({"frame_hw": "big"}, "frame_hw")])
def test_bad_arguments_name_the_field(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        DeployModule(model, **kw)
