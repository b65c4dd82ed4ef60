"""`model.pt`: state dict + JSON config + normalisation + threshold + class names + versions.

Loads with `torch.load(weights_only=True)` only: never unpickles arbitrary objects. A truncated,
foreign or tampered file gets one `CheckpointError` naming the file and what was wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import zipfile

import torch

from .base import ScoreStats
from .registry import create_model

FORMAT = "edge-ad-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def versions() -> dict:
    import numpy

    return {"torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "edge_ad": _package_version()}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("edge-ad")
    except Exception:
        return "0+unknown"


def _digest(state_dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def checkpoint_metadata(model) -> dict:
    """The JSON-able description of a model (also what exporters embed in artifacts). "training":
    the geometry it was trained at (models.tiles: tiles or whole images, and the scale), when known."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.model_name,
        "config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "score_stats": model.score_stats.to_dict(),
        "class_names": list(model.class_names),
        "versions": versions(),
    }
    if getattr(model, "training_geometry", None):
        meta["training"] = dict(model.training_geometry)
    return meta


def save_checkpoint(model, path, extra: dict | None = None) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = checkpoint_metadata(model)
    if extra:
        meta["extra"] = extra
    blob = {"meta_json": json.dumps(meta), "state_dict": sd, "sha256": _digest(sd)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path):
    """Return (meta dict, state_dict) after validating the file; raises CheckpointError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (truncated or a foreign file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read safely (weights_only=True): {first}") from None
    if not isinstance(blob, dict) or "meta_json" not in blob or "state_dict" not in blob:
        raise CheckpointError(f"{path}: not an edge-ad checkpoint (expected keys meta_json, state_dict)")
    try:
        meta = json.loads(blob["meta_json"])
    except Exception:
        raise CheckpointError(f"{path}: field meta_json is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is newer than "
                              f"this toolkit's {FORMAT_VERSION}; upgrade edge-ad")
    sd = blob["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: field state_dict is not a dict of tensors")
    if blob.get("sha256") != _digest(sd):
        raise CheckpointError(f"{path}: weights do not match the stored sha256 (file tampered or corrupted)")
    return meta, sd


def load_checkpoint(path, map_location="cpu"):
    """Build the registered model described by the checkpoint and load its weights (eval mode)."""
    meta, sd = read_checkpoint(path)
    try:
        model = create_model(meta["model"], pretrained=False, **meta["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: config does not build model {meta.get('model')!r}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else "")
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r} with its config "
                              f"({detail})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r} "
                              f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    model.score_stats = ScoreStats.from_dict(meta.get("score_stats"))
    model.class_names = list(meta.get("class_names", []))
    model.training_geometry = meta.get("training")
    model.checkpoint_meta = meta
    return model.to(map_location).eval()
