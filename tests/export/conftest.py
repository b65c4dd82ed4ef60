"""Shared fixtures for export tests: ONE tiny DVAD checkpoint and ONE export per scan lowering per
session (export is the slow part: ~1 min each on 2 cores)."""
import contextlib
import io

import numpy as np
import pytest
import torch

FRAME_HW = (37, 45)          # odd, non-square, smaller than the model input (64): resize in-graph
PLUGIN_FRAME_HW = (70, 50)   # larger than the input on one axis: up- and down-sampling


def tiny_dvad():
    from models import create_model
    from models.dvad import DVADConfig

    torch.manual_seed(0)
    cfg = DVADConfig.tiny(dims=(16, 8, 8, 8), depths=(1, 0, 0, 1)).to_dict()
    return create_model("dvad", pretrained=False, **cfg).eval()


def export_through_cli(model, out):
    """Save `model` as a checkpoint in `out` and export it with `python -m export.onnx` (frames
    FRAME_HW, gray): (checkpoint, model.onnx)."""
    from export.onnx import main
    from models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(model, out / "m.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--ckpt", str(ckpt), "--out", str(out / "onnx"), "--frame-size",
                     f"{FRAME_HW[0]}x{FRAME_HW[1]}", "--frame-channels", "1", "--n", "4"]) == 0
    return ckpt, out / "onnx" / "model.onnx"


def fresh_frames(n, hw, ch, seed):
    """Uniform noise mixed with a smooth gradient: unlike anything the exporter saw."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    out = []
    for _ in range(n):
        grad = (yy * rng.uniform(-3, 3) + xx * rng.uniform(-3, 3) + rng.uniform(0, 255))[..., None]
        img = 0.5 * grad + 0.5 * rng.uniform(0, 255, (h, w, ch))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="session")
def tiny_model():
    from models.base import ScoreStats
    from deploy.graph import DeployModule

    m = tiny_dvad()
    with torch.no_grad():
        s = DeployModule(m, FRAME_HW, 1)(torch.from_numpy(fresh_frames(6, FRAME_HW, 1, 99)))[1]
    lo, hi = float(s.min()), float(s.max())
    # threshold inside the observed range, so normalized_score is not saturated at 0 or 1
    m.score_stats = ScoreStats(low=lo - 0.5 * (hi - lo) - 1e-3, threshold=0.5 * (lo + hi) + 1e-4,
                               method="test", n_images=6)
    m.class_names = ["tile"]
    return m


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory):
    from models.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="session")
def onnx_chunked(tiny_ckpt, tmp_path_factory):
    """The chunked export, made through the CLI entry point: (path, stdout, exit code)."""
    from export.onnx import main

    out = tmp_path_factory.mktemp("onnx_chunked")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--ckpt", str(tiny_ckpt), "--out", str(out), "--frame-size", f"{FRAME_HW[0]}x{FRAME_HW[1]}",
                   "--frame-channels", "1", "--n", "6"])
    return out / "model.onnx", buf.getvalue(), rc


@pytest.fixture(scope="session")
def onnx_plugin(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("onnxruntime_extensions", reason="plugin graphs run in ORT through onnxruntime-extensions")
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx_plugin")
    return export_onnx(tiny_ckpt, out, frame_hw=PLUGIN_FRAME_HW, frame_channels=3, full_res_map=True,
                       scan="plugin", n=6, quiet=True)
