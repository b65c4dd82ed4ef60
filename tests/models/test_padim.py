"""models.padim: a numpy Mahalanobis reference, synthetic-defect separation, ONNX == PyTorch."""
import numpy as np
import pytest
import torch

from models.padim import Padim, PadimConfig
from tests.models.synthetic_defects import synthetic_defect_aurocs


def _numpy_reference(train_feats: np.ndarray, test_feats: np.ndarray, eps: float) -> np.ndarray:
    """Per position: np.cov + eps*I, np.linalg.inv, sqrt(d^T S^-1 d) one vector at a time (float64)."""
    _, p, d = train_feats.shape
    out = np.zeros((test_feats.shape[0], p))
    for j in range(p):
        mu = train_feats[:, j].mean(0)
        cov = np.cov(train_feats[:, j], rowvar=False) + eps * np.eye(d)
        inv = np.linalg.inv(cov)
        for b in range(test_feats.shape[0]):
            delta = test_feats[b, j] - mu
            out[b, j] = np.sqrt(delta @ inv @ delta)
    return out


@pytest.mark.parametrize("size,stride,layers,n_features", [(72, 8, (0, 1, 2), 20), (52, 4, (1, 2), 7)])
def test_distance_equals_numpy_mahalanobis(size, stride, layers, n_features):
    torch.manual_seed(size)
    cfg = PadimConfig(input_size=size, feature_stride=stride, layers=layers, n_features=n_features,
                      seed=size, eps=0.05)
    model = Padim(cfg, pretrained=False).eval()   # random encoder weights: the maths is what is tested
    train = torch.randn(11, 3, size, size)
    test = torch.randn(3, 3, size, size) * 1.5
    model.prepare([train[:4], {"image": train[4:9]}, (train[9:], None)])   # every item form
    assert int(model.n_fit) == 11
    with torch.no_grad():
        f_train = model.features(train).double().numpy()
        f_test = model.features(test).double().numpy()
        dist = model.distance_map(test)
        amap, score = model(test)
    gh, gw = model.grid
    assert dist.shape == (3, 1, gh, gw) and amap.shape == (3, 1, size, size) and score.shape == (3,)
    ref = _numpy_reference(f_train, f_test, cfg.eps)
    np.testing.assert_allclose(dist.reshape(3, -1).double().numpy(), ref, rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(model.mean.double().numpy(), f_train.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, amap.amax(dim=(1, 2, 3)))
    # batch independence: one sample alone gives the same output
    with torch.no_grad():
        a1, s1 = model(test[1:2])
    torch.testing.assert_close(a1, amap[1:2], rtol=1e-4, atol=1e-4)


def test_prepare_rejects_too_few_images():
    model = Padim(PadimConfig(input_size=32, n_features=4), pretrained=False)
    with pytest.raises(ValueError, match="at least 2"):
        model.prepare([torch.randn(1, 3, 32, 32)])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="feature_stride"):
        PadimConfig(feature_stride=5)
    with pytest.raises(ValueError, match="n_features"):
        Padim(PadimConfig(input_size=32, n_features=10_000), pretrained=False)


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_separates_synthetic_defects(kind):
    model = Padim(PadimConfig(input_size=96), pretrained=True).eval()   # offline lite0 weights
    image, pixel = synthetic_defect_aurocs(model, kind, 96)
    assert image >= 0.9, f"image AUROC {image:.3f} on {kind}"
    assert pixel >= 0.8, f"pixel AUROC {pixel:.3f} on {kind}"


def test_onnx_export_equals_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    size = 68
    torch.manual_seed(0)
    model = Padim(PadimConfig(input_size=size, n_features=24), pretrained=False).eval()
    model.prepare([torch.randn(6, 3, size, size), torch.randn(5, 3, size, size)])
    with torch.no_grad():   # one eager call first: models.layers caches the blur taps (lru_cache),
        model(torch.randn(1, 3, size, size))   # and a cache filled while tracing holds a fake tensor
    path = tmp_path / "padim.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), input_names=["x"],
                      output_names=["anomaly_map", "score"], dynamic_shapes=({0: batch},), dynamo=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, 3, size, size) * 1.3
        with torch.no_grad():
            amap, score = model(x)
        o_map, o_score = sess.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(o_map, amap.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(o_score, score.numpy(), rtol=1e-4, atol=1e-4)
