"""`model.pt`: state dict + JSON config + normalisation + threshold + class names + versions.

Loads with `torch.load(weights_only=True)` only: never unpickles arbitrary objects. A truncated,
foreign or tampered file gets one `CheckpointError` naming the file and what was wrong.

Integrity: `sha256` covers the weights, `meta_sha256` the metadata JSON exactly as stored (model,
config, preprocess, score_stats - the thresholds -, class_names, versions): editing either is
refused at load. Checkpoints of format_version 1 predate `meta_sha256` and load with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import re
import zipfile

import torch

from .base import ScoreStats
from .registry import create_model, saved_config

FORMAT = "edge-ad-checkpoint"
FORMAT_VERSION = 2      # 2: meta_sha256 (version 1 stored only the weights' hash)

log = logging.getLogger("models.checkpoint")


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
    meta_json = json.dumps(meta)
    blob = {"meta_json": meta_json, "state_dict": sd, "sha256": _digest(sd), "meta_sha256": _meta_digest(meta_json)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def _meta_digest(meta_json: str) -> str:
    return hashlib.sha256(meta_json.encode("utf-8")).hexdigest()


def _refusal(e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused, without PyTorch's advice to load unsafely."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        what = f"a pickled Python object ({m.group(1)})"
    elif "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error: ([^\n.]+)", text)
        what = f"pickled data the safe loader does not accept ({m.group(1) if m else 'not plain tensors'})"
    else:
        return text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return (f"it holds {what}; edge-ad never unpickles such objects (that could run code). Save the model "
            "with models.checkpoint.save_checkpoint")


def _check_fields(meta, path) -> int:
    """The checkpoint metadata's types (one CheckpointError naming the field); its format_version."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: field meta_json holds a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    fv = meta.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise CheckpointError(f"{path}: format_version {fv!r}; expected an integer 1..{FORMAT_VERSION}")
    if fv > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {fv} is newer than this toolkit's {FORMAT_VERSION}; "
                              "upgrade edge-ad")
    for key, typ in (("model", str), ("config", dict), ("preprocess", dict), ("score_stats", dict),
                     ("class_names", list)):
        if key in meta and not isinstance(meta[key], typ):
            raise CheckpointError(f"{path}: field {key} is {type(meta[key]).__name__}, expected {typ.__name__}")
    if not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{path}: field model (the registry name) is missing")
    for k, v in meta.get("score_stats", {}).items():
        if k in ("low", "threshold", "map_low", "map_threshold") and \
                (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise CheckpointError(f"{path}: field score_stats.{k}={v!r}; expected a finite number")
    if not all(isinstance(c, str) for c in meta.get("class_names", [])):
        raise CheckpointError(f"{path}: field class_names must be a list of strings")
    return fv


def read_checkpoint(path):
    """Return (meta dict, state_dict) after validating the file; raises CheckpointError."""
    meta, sd, _ = _read(path)
    return meta, sd


def _read(path):
    """(meta, state_dict, {"weights_sha256", "meta_sha256"}) of a validated checkpoint."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (truncated or a foreign file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors are long and advise unsafe loading: say why, briefly
        raise CheckpointError(f"{path}: refused by the safe loader (weights_only=True): {_refusal(e)}") from None
    if not isinstance(blob, dict) or "meta_json" not in blob or "state_dict" not in blob:
        raise CheckpointError(f"{path}: not an edge-ad checkpoint (expected keys meta_json, state_dict)")
    if not isinstance(blob["meta_json"], str):
        raise CheckpointError(f"{path}: field meta_json is not a JSON string")
    try:
        meta = json.loads(blob["meta_json"])
    except Exception:
        raise CheckpointError(f"{path}: field meta_json is not valid JSON") from None
    fv = _check_fields(meta, path)
    stored = blob.get("meta_sha256")
    if stored is None and fv >= 2:
        raise CheckpointError(f"{path}: has no meta_sha256 (format_version {fv} stores one): its thresholds "
                              "and config cannot be verified")
    if stored is None:
        log.warning("%s: checkpoint predates metadata hashing (format_version 1): its thresholds, "
                    "normalisation and classes are not integrity-checked; re-save it to sign them", path)
    elif stored != _meta_digest(blob["meta_json"]):
        raise CheckpointError(f"{path}: metadata (thresholds, normalisation, classes, config) does not match "
                              "its stored meta_sha256 (edited after saving; restore the file or retrain)")
    sd = blob["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: field state_dict is not a dict of tensors")
    if blob.get("sha256") != _digest(sd):
        raise CheckpointError(f"{path}: weights do not match the stored sha256 (file tampered or corrupted)")
    return meta, sd, {"weights_sha256": blob["sha256"], "meta_sha256": stored}


def load_checkpoint(path, map_location="cpu"):
    """Build the registered model described by the checkpoint and load its weights (eval mode)."""
    meta, sd, hashes = _read(path)
    try:
        model = create_model(meta["model"], pretrained=False, **saved_config(meta["model"], meta["config"]))
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
    try:
        model.score_stats = ScoreStats.from_dict(meta.get("score_stats"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: field score_stats: {e}") from None
    model.class_names = list(meta.get("class_names", []))
    model.training_geometry = meta.get("training")
    model.checkpoint_meta = meta
    model.checkpoint_hashes = hashes
    return model.to(map_location).eval()
