"""Frozen encoders: real EfficientNet-Lite0 weights, torchvision ResNet trunks, shapes, errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import encoders as E


def _sample_image(name, size=224):
    ds = pytest.importorskip("sklearn.datasets")
    img = np.array(ds.load_sample_image(name))                    # (H, W, 3) uint8, a real photo
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _norm(x, mean, std):
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def lite0():
    return E.load_efficientnet_lite0()


def test_lite0_weights_load_strictly_and_match_the_file(lite0):
    sd = torch.load(E.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    mine = lite0.state_dict()
    assert set(mine) == set(sd)
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k


def test_lite0_strict_load_rejects_a_file_that_does_not_fit(tmp_path):
    sd = torch.load(E.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    sd.pop("_blocks.3._depthwise_conv.weight")
    p = tmp_path / "broken.pth"
    torch.save(sd, p)
    with pytest.raises(E.EncoderWeightsError, match="broken.pth"):
        E.load_efficientnet_lite0(p)
    with pytest.raises(E.EncoderWeightsError, match="not found"):
        E.load_efficientnet_lite0(tmp_path / "absent.pth")


@pytest.mark.parametrize("image, plausible", [
    # china.jpg: a Chinese temple -> bell cote, dome, palace, church, castle, monastery, stupa, mosque
    ("china.jpg", {442, 538, 698, 497, 483, 663, 832, 668}),
    ("flower.jpg", {985}),  # daisy
])
def test_lite0_recognises_real_photos(lite0, image, plausible):
    """The whole classifier (our MBConv/ReLU6/SAME-padding graph + the shipped weights) labels real
    photos sensibly; a wrong padding, activation or block order would not."""
    x = _norm(_sample_image(image), E.LITE_MEAN, E.LITE_STD)
    with torch.no_grad():
        top5 = set(lite0(x).topk(5).indices[0].tolist())
    assert top5 & plausible, f"{image}: top-5 {sorted(top5)}"


def test_lite0_encoder_features_are_informative():
    enc = E.create_encoder("efficientnet_lite0")
    x = torch.cat([_norm(_sample_image(n), enc.mean, enc.std) for n in ("china.jpg", "flower.jpg")])
    feats = enc(x)
    assert [f.shape[1] for f in feats] == list(enc.channels) == [24, 40, 112]
    for f in feats:
        assert torch.isfinite(f).all()
        # non-degenerate: most channels vary over space, and the two photos give different features
        assert (f[0].flatten(1).std(1) > 1e-3).float().mean() > 0.5
        cos = F.cosine_similarity(f[0].flatten(), f[1].flatten(), dim=0)
        assert cos < 0.9


@pytest.mark.parametrize("hw", [(64, 64), (97, 131), (33, 50)])
def test_lite0_feature_shapes_for_odd_sizes(hw):
    enc = E.create_encoder("efficientnet_lite0")
    feats = enc(torch.randn(2, 3, *hw))
    for f, s, c in zip(feats, (4, 8, 16), enc.channels):
        assert f.shape == (2, c, math.ceil(hw[0] / s), math.ceil(hw[1] / s))
    assert enc.feature_sizes(*hw) == [tuple(f.shape[-2:]) for f in feats]


def test_encoder_is_frozen_and_stays_in_eval_mode():
    enc = E.create_encoder("efficientnet_lite0")
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    enc(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- torchvision ResNets ----------------------------------------------------------------------
def _tv(name):
    import torchvision.models as tvm

    torch.manual_seed(0)
    return getattr(tvm, name)(weights=None).eval()


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256)), ("resnet50", (256, 512, 1024))])
def test_resnet_from_user_file_matches_torchvision(tmp_path, name, channels):
    ref = _tv(name)
    p = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), p)                      # full torchvision state dict, fc included
    enc = E.create_encoder(name, weights=str(p))
    x = torch.randn(2, 3, 75, 99)
    with torch.no_grad():
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        r1 = ref.layer1(h)
        r2 = ref.layer2(r1)
        r3 = ref.layer3(r2)
        feats = enc(x)
    assert tuple(enc.channels) == channels
    for a, b in zip(feats, (r1, r2, r3)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resnet_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = E.torchvision_cache_path("resnet34")
    assert str(path).startswith(str(tmp_path))
    with pytest.raises(E.EncoderWeightsError) as ei:
        E.create_encoder("resnet34")
    msg = str(ei.value)
    assert str(path) in msg and "encoder_weights" in msg and "https://" in msg
    path.parent.mkdir(parents=True)
    ref = _tv("resnet34")
    torch.save(ref.state_dict(), path)
    enc = E.create_encoder("resnet34")
    torch.testing.assert_close(enc.net.layer3[0].conv1.weight, ref.layer3[0].conv1.weight, rtol=0, atol=0)


def test_resnet_wrong_file_gives_one_clear_error(tmp_path):
    p = tmp_path / "lite.pth"
    torch.save(torch.load(E.efficientnet_lite0_weights_path(), weights_only=True), p)
    with pytest.raises(E.EncoderWeightsError, match="does not fit"):
        E.create_encoder("resnet18", weights=str(p))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(E.EncoderWeightsError, match="junk.pth"):
        E.create_encoder("wide_resnet50_2", weights=str(junk))  # fails before building
    with pytest.raises(ValueError, match="expected one of"):
        E.create_encoder("vgg16")
