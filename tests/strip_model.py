"""A small real model fitted on the simulated strip, shared by the deploy and runtime tests:
PaDiM fitted on defect-free Mono8 tiles of `linesim`, calibrated on held-out tiles (thresholds
just above the largest normal score / pixel), and its ONNX export by the product's exporter."""
import numpy as np
import torch

TILE = 64
WIDTH = 256
SIM = f"linesim://?width={WIDTH}&kind=texture&seed=3&page=512"


def normal_tiles(n, seed):
    """n random defect-free (TILE, TILE, 1) uint8 tiles of the simulated strip."""
    from runtime.sources import open_source

    src = open_source(SIM + "&rate=0")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = int(rng.integers(0, 4 * 512 - TILE))
        x = int(rng.integers(0, WIDTH - TILE))
        out.append(src.strip_lines(y, TILE)[:, x:x + TILE])
    return np.stack(out)[..., None]


def fit_padim_checkpoint(path):
    """Fit, calibrate and save the model (see module docstring); returns `path`."""
    import models
    from deploy.graph import DeployModule
    from models.base import ScoreStats
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = models.create_model("padim", input_size=TILE).eval()
    dep = DeployModule(model, frame_hw=(TILE, TILE), frame_channels=1)
    train = torch.from_numpy(normal_tiles(96, 0))
    with torch.no_grad():
        model.prepare([dep.preprocess(train[i:i + 32]) for i in range(0, len(train), 32)])
        held = torch.from_numpy(normal_tiles(48, 1))
        amap, score = model(dep.preprocess(held))
    model.score_stats = ScoreStats(low=float(score.min()), threshold=float(score.max()) * 1.15,
                                   map_low=float(amap.min()), map_threshold=float(amap.max()) * 1.15,
                                   method="test: 1.15 x max of held-out normal", n_images=int(held.shape[0]))
    save_checkpoint(model, path)
    return path


def export_onnx_artifact(checkpoint, out, batch=None):
    """The checkpoint's ONNX artifact by export.onnx (Mono8 TILE x TILE frames, no parity gate)."""
    from export.onnx import export_onnx

    return export_onnx(checkpoint, out, batch=batch or "dynamic", frame_hw=(TILE, TILE), frame_channels=1,
                       check=False, quiet=True).path
