"""Every registered model should feed its frozen encoder the normalisation that encoder expects."""
import pytest

from models import create_model, list_models
from models.encoders import create_encoder

# Known bug (tracked in the session note): these families build PreprocessConfig with ImageNet
# mean/std while their default EfficientNet-Lite0 encoder expects (x - 127) / 128. Fixing it changes
# their trained behaviour (checkpoints, Adapted-MoE's TTA margins), so it waits for a retrain.
KNOWN_WRONG = {"omniad", "padim", "adapted_moe", "fewshot"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="ImageNet mean/std fed to Lite0 (known bug)"))
    if n in KNOWN_WRONG else n for n in list_models()])
def test_preprocess_normalisation_is_the_encoders(name):
    model = create_model(name, pretrained=False)
    enc = getattr(model, "encoder", None)
    assert enc is not None, f"{name} has no frozen encoder attribute"
    pp = model.preprocess
    assert pp.input_size == model.config.input_size
    # independent of the model: a fresh encoder of the configured kind says what it expects
    ref = create_encoder(model.config.encoder, pretrained=False)
    assert pp.mean == pytest.approx(tuple(ref.mean)) and pp.std == pytest.approx(tuple(ref.std))


@pytest.mark.parametrize("name", list_models())
def test_encoder_stays_frozen_when_the_model_trains(name):
    model = create_model(name, pretrained=False).train()
    assert model.training and not model.encoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert not set(map(id, model.encoder.parameters())) & set(map(id, model.trainable_parameters()))
