"""Shared fixtures for the runtime tests: a small real model fitted on the simulated strip."""
import numpy as np
import pytest
import torch

TILE = 64
WIDTH = 256
SIM = f"linesim://?width={WIDTH}&kind=texture&seed=3&page=512"


def _normal_tiles(n, seed):
    from runtime.sources import open_source

    src = open_source(SIM + "&rate=0")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = int(rng.integers(0, 4 * 512 - TILE))
        x = int(rng.integers(0, WIDTH - TILE))
        out.append(src.strip_lines(y, TILE)[:, x:x + TILE])
    return np.stack(out)[..., None]          # (n, T, T, 1) uint8 Mono8


@pytest.fixture(scope="session")
def padim_checkpoint(tmp_path_factory):
    """models.padim fitted on defect-free tiles of the simulated strip, calibrated on held-out
    tiles (map threshold just above the largest normal pixel), saved as a checkpoint."""
    import models
    from models.base import ScoreStats
    from models.checkpoint import save_checkpoint
    from models.deploy import DeployModule

    torch.manual_seed(0)
    model = models.create_model("padim", input_size=TILE).eval()
    dep = DeployModule(model, frame_hw=(TILE, TILE), frame_channels=1)
    train = torch.from_numpy(_normal_tiles(96, 0))
    with torch.no_grad():
        model.prepare([dep.preprocess(train[i:i + 32]) for i in range(0, len(train), 32)])
        held = torch.from_numpy(_normal_tiles(48, 1))
        amap, score = model(dep.preprocess(held))
    thr_map = float(amap.max()) * 1.15
    thr = float(score.max()) * 1.15
    model.score_stats = ScoreStats(low=float(score.min()), threshold=thr, map_low=float(amap.min()),
                                   map_threshold=thr_map, method="test: 1.15 x max of held-out normal",
                                   n_images=int(held.shape[0]))
    path = tmp_path_factory.mktemp("padim") / "model.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def torch_engine(padim_checkpoint):
    from runtime.engines import load_engine

    return load_engine(padim_checkpoint, backend="torch", frame_hw=(TILE, TILE), frame_channels=1)


def export_onnx_artifact(checkpoint, out, batch=None):
    """An ONNX artifact of the fitted model under the deployed-artifact contract (input "frames"
    uint8 NHWC, metadata_props + sidecar via export.artifacts). Uses export.onnx when present."""
    try:
        from export.onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        return export_onnx(checkpoint, out, batch=batch or "dynamic", frame_hw=(TILE, TILE),
                           frame_channels=1, check=False, quiet=True).path
    pytest.importorskip("export.artifacts", reason="export.artifacts not available yet")
    from export.artifacts import build_metadata, embed_onnx_metadata, write_sidecar
    import onnx
    from models.checkpoint import load_checkpoint
    from models.deploy import DeployModule, output_names

    model = load_checkpoint(checkpoint)
    dep = DeployModule(model, frame_hw=(TILE, TILE), frame_channels=1).eval()
    frames = dep.example_frames(batch or 2)
    dyn = None if batch else {"frames": {0: "batch"}, **{n: {0: "batch"} for n in output_names()}}
    torch.onnx.export(dep, (frames,), str(out), input_names=["frames"], output_names=list(output_names()),
                      dynamic_axes=dyn, opset_version=17, dynamo=False)
    meta = build_metadata(model, format="onnx", opset=17, frame_hw=[TILE, TILE], frame_channels=1,
                          batch=batch if batch else "dynamic", outputs=list(output_names()))
    m = onnx.load(str(out))
    embed_onnx_metadata(m, meta)
    onnx.save(m, str(out))
    write_sidecar(out, meta)
    return out


@pytest.fixture(scope="session")
def onnx_artifact(padim_checkpoint, tmp_path_factory):
    return export_onnx_artifact(padim_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx")
