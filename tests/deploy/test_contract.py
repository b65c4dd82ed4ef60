"""deploy.contract: the torch-free formulas agree with the graph (deploy.graph.DeployModule) and with the
training side's copy (models.base.ScoreStats) on fresh random inputs; names and formats are one."""
import numpy as np
import pytest
import torch

from deploy import contract
from deploy.graph import DeployModule
from models import checkpoint
from models.base import ScoreStats


def _stats(rng):
    low = float(rng.uniform(-1, 1))
    return ScoreStats(low=low, threshold=low + float(rng.uniform(0.05, 3)), map_low=float(rng.uniform(-0.5, 0.2)),
                      map_threshold=float(rng.uniform(0.3, 2.0)))


@pytest.mark.parametrize("seed", range(4))
def test_score_and_map_normalisation_agree_everywhere(seed):
    rng = np.random.default_rng(seed)
    st = _stats(rng)
    score = rng.normal(st.threshold, 2.0, 97).astype(np.float32)
    amap = rng.normal(st.map_threshold, 1.0, (3, 1, 17, 13)).astype(np.float32)
    c = contract.normalize_score(score, st.low, st.threshold)
    assert c.dtype == np.float32 and 0.0 <= c.min() and c.max() <= 1.0
    np.testing.assert_allclose(c, st.normalize(score), atol=1e-6)
    np.testing.assert_allclose(c, st.normalize(torch.from_numpy(score)).numpy(), atol=1e-6)
    m = contract.map_unit(amap, st.map_low, st.map_threshold)
    np.testing.assert_allclose(m, st.normalize_map(amap), atol=1e-6)
    # exactly 0.5 at the threshold, so verdict = score >= threshold
    assert contract.normalize_score(np.float32(st.threshold), st.low, st.threshold) == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_array_equal(contract.verdict(c), c >= 0.5)
    heat = contract.heat_map(amap, st.map_low, st.map_threshold)
    assert heat.dtype == np.uint8 and heat.shape == amap.shape
    np.testing.assert_array_equal(heat, np.round(m * 255).astype(np.uint8))


class _Identity(torch.nn.Module):
    """A model whose score is the mean of its input: the graph's normalisation is all that varies."""

    def __init__(self, stats):
        super().__init__()
        from models.base import PreprocessConfig

        self.preprocess = PreprocessConfig(input_size=8, channels=1, mean=(0.0,), std=(1.0,))
        self.score_stats = stats

    def forward(self, x):
        return x, x.mean(dim=(1, 2, 3))


def test_graph_computes_the_contracts_normalized_score():
    rng = np.random.default_rng(7)
    st = ScoreStats(low=0.2, threshold=0.6)
    dm = DeployModule(_Identity(st), frame_hw=(8, 8), frame_channels=1).eval()
    frames = rng.integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
    with torch.no_grad():
        _, score, norm = dm(torch.from_numpy(frames))
    np.testing.assert_allclose(norm.numpy(), contract.normalize_score(score.numpy(), st.low, st.threshold),
                               atol=1e-6)
    assert dm.output_names == contract.OUTPUT_NAMES


def test_names_and_formats_are_one():
    assert contract.METADATA_FORMAT == checkpoint.FORMAT
    assert contract.METADATA_FORMAT_VERSION == checkpoint.FORMAT_VERSION
    assert contract.output_names(True) == contract.OUTPUT_NAMES + (contract.FULL_MAP_NAME,)
    assert [contract.channels_of(contract.pixel_format(c)) for c in (1, 3)] == [1, 3]
    with pytest.raises(ValueError, match="1 or 3"):
        contract.pixel_format(2)
    with pytest.raises(ValueError, match="Mono8"):
        contract.channels_of("BayerRG8")


def test_image_files_lists_images_recursively_and_skips_masks_when_asked(tmp_path):
    from deploy.contract import image_files

    names = ["b/2.PNG", "a.jpg", "c/3.tiff", "notes.txt", "ground_truth/crack/4.png", "5_mask.png"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "d.png").mkdir()                       # a folder named like an image is not one
    rel = lambda fs: [f.relative_to(tmp_path).as_posix() for f in fs]   # noqa: E731
    assert rel(image_files(tmp_path)) == ["5_mask.png", "a.jpg", "b/2.PNG", "c/3.tiff", "ground_truth/crack/4.png"]
    assert rel(image_files(tmp_path, skip_masks=True)) == ["a.jpg", "b/2.PNG", "c/3.tiff"]
