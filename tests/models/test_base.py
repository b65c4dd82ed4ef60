"""Every registered model feeds its frozen encoder the normalisation that encoder expects; a zoo
checkpoint saved before that fix (no `legacy_imagenet_norm` in its state dict, ImageNet mean/std in
its metadata) still loads with the normalisation it was trained with, so its scores do not change."""
import json

import pytest
import torch
import torch.nn.functional as F

from models import create_model, list_models
from models import checkpoint as C
from models.base import IMAGENET_MEAN, IMAGENET_STD, LEGACY_NORM_BUFFER
from deploy.graph import DeployModule
from models.encoders import create_encoder

TRACKED = [n for n in list_models() if hasattr(create_model(n, pretrained=False), LEGACY_NORM_BUFFER)]


@pytest.mark.parametrize("name", list_models())
def test_preprocess_normalisation_is_the_encoders(name):
    model = create_model(name, pretrained=False)
    enc = getattr(model, "encoder", None)
    assert enc is not None, f"{name} has no frozen encoder attribute"
    pp = model.preprocess
    assert pp.input_size == model.config.input_size
    # independent of the model: a fresh encoder of the configured kind says what it expects
    ref = create_encoder(model.config.encoder, pretrained=False)
    assert pp.mean == pytest.approx(tuple(ref.mean)) and pp.std == pytest.approx(tuple(ref.std))
    # and it is not ImageNet's (the default encoder is EfficientNet-Lite0: (x - 127) / 128)
    if model.config.encoder == "efficientnet_lite0":
        assert pp.mean != pytest.approx(IMAGENET_MEAN) and pp.std != pytest.approx(IMAGENET_STD)


def test_the_zoo_families_track_their_normalisation():
    assert {"omniad", "padim", "adapted_moe", "fewshot"} <= set(TRACKED)


def _tiny(name):
    torch.manual_seed(0)
    cls = type(create_model(name, pretrained=False)).config_class
    cfg = cls.tiny().to_dict() if hasattr(cls, "tiny") else {"input_size": 64}
    net = create_model(name, pretrained=False, **cfg).eval()
    # stand-in for fitted statistics / memories: random where they start at zero, flags set
    with torch.no_grad():
        for key, buf in net.named_buffers():
            if key.startswith("encoder.") or not buf.is_floating_point():
                continue
            if buf.ndim == 0:
                buf.fill_(1.0)
            elif not buf.any():
                buf.copy_(0.3 * torch.randn_like(buf))
        if name == "padim":   # its score is a distance to a random mean otherwise: fit it for real
            net.prepare([torch.randn(6, 3, net.config.input_size, net.config.input_size)])
    return net


def _write_pre_fix_checkpoint(net, path):
    """A checkpoint of the layout without the flag buffer: ImageNet mean/std in the metadata."""
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items() if k != LEGACY_NORM_BUFFER}
    assert len(sd) == len(net.state_dict()) - 1
    meta = C.checkpoint_metadata(net)
    meta["preprocess"].update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    meta["format_version"] = 1          # that layout predates metadata hashing
    torch.save({"meta_json": json.dumps(meta), "state_dict": sd, "sha256": C._digest(sd)}, path)


def _scores_normalised_with(net, frames, mean, std):
    """Independent of DeployModule: resize (half-pixel bilinear), then explicit (x/255 - mean)/std."""
    s = net.preprocess.input_size
    x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(s, s), mode="bilinear", align_corners=False)
    x = (x / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return net(x.float())[1]


@pytest.mark.parametrize("name", TRACKED)
def test_old_checkpoint_keeps_imagenet_and_new_keeps_the_encoders(name, tmp_path):
    net = _tiny(name)
    frames = torch.randint(0, 256, (3, 71, 53, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    enc = create_encoder(net.config.encoder, pretrained=False)
    old_ref = _scores_normalised_with(net, frames, IMAGENET_MEAN, IMAGENET_STD)
    new_ref = _scores_normalised_with(net, frames, tuple(enc.mean), tuple(enc.std))
    assert torch.isfinite(old_ref).all() and torch.isfinite(new_ref).all()
    # the two normalisations really score differently (else this test could not fail)
    assert not torch.allclose(old_ref, new_ref, rtol=1e-3, atol=1e-4), (old_ref, new_ref)

    _write_pre_fix_checkpoint(net, tmp_path / "old.pt")
    old = C.load_checkpoint(tmp_path / "old.pt")
    assert int(getattr(old, LEGACY_NORM_BUFFER)) == 1
    meta, _ = C.read_checkpoint(tmp_path / "old.pt")
    assert old.preprocess.mean == pytest.approx(tuple(meta["preprocess"]["mean"]))
    assert old.preprocess.std == pytest.approx(tuple(meta["preprocess"]["std"]))
    with torch.no_grad():
        deployed = DeployModule(old, frame_hw=(71, 53))(frames)[1]   # what export would bake in
    torch.testing.assert_close(deployed, old_ref, rtol=1e-4, atol=1e-5)
    # re-saved by the new code, it stays ImageNet (the flag is now in its weights)
    C.save_checkpoint(old, tmp_path / "resaved.pt")
    again = C.load_checkpoint(tmp_path / "resaved.pt")
    assert LEGACY_NORM_BUFFER in C.read_checkpoint(tmp_path / "resaved.pt")[1]
    assert again.preprocess.mean == pytest.approx(IMAGENET_MEAN)
    # survives a dtype cast (an integer flag, not float constants)
    assert again.half().preprocess.std == pytest.approx(IMAGENET_STD)

    C.save_checkpoint(net, tmp_path / "new.pt")
    new = C.load_checkpoint(tmp_path / "new.pt")
    assert int(getattr(new, LEGACY_NORM_BUFFER)) == 0
    assert new.preprocess.mean == pytest.approx(tuple(enc.mean))
    with torch.no_grad():
        deployed = DeployModule(new, frame_hw=(71, 53))(frames)[1]
    torch.testing.assert_close(deployed, new_ref, rtol=1e-4, atol=1e-5)
