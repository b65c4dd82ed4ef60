"""The deployed-artifact contract, in one torch-free place (numpy and the standard library only).

Every exported artifact, every engine, the Triton server and its Python-backend models, the
stream and the benchmarks speak this contract; docs/design.md section 3 describes it.

    input   frames              uint8 (B, H, W, C), NHWC; C = 1 (Mono8) or 3 (RGB8)
    outputs anomaly_map         float32 (B, 1, S, S) at the model's input size S
            score               float32 (B,)     the model's raw image score
            normalized_score    float32 (B,)     clip(0.5 * (score - low) / (threshold - low), 0, 1)
            [anomaly_map_full]  float32 (B, 1, H, W)  the map resized back to the frame (optional)
    verdict normalized_score >= 0.5, i.e. score >= threshold (never baked into a graph: the
            threshold is metadata, `score_stats`, that a user may change at run time)

Inside the graph (deploy.graph.DeployModule builds it in torch; `preprocess_frames` below is the
numpy twin the Triton Python backend runs): gray->RGB replication or ITU-R 601 luma, bilinear
resize to S x S with half-pixel centres (align_corners=False, no antialias) on float values, then
(x / 255 - mean) / std with the model's own mean/std.

The training side keeps the same formulas in torch (models.base.ScoreStats); tests/deploy/
test_contract.py checks that graph, ScoreStats and these functions agree.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import List, Sequence, Tuple

import numpy as np

# ---- I/O names --------------------------------------------------------------------------------
INPUT_NAME = "frames"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score")
FULL_MAP_NAME = "anomaly_map_full"
VERDICT_NAME = "verdict"
PER_IMAGE_OUTPUTS = ("score", "normalized_score", VERDICT_NAME)   # one value per frame


def output_names(full_res_map: bool = False) -> Tuple[str, ...]:
    return OUTPUT_NAMES + ((FULL_MAP_NAME,) if full_res_map else ())


# ---- metadata (embedded in artifacts and written to their sidecar `<artifact>.json`) -----------
# The schema is the checkpoint's (models.checkpoint writes the same "format" fields; the test
# tests/deploy/test_contract.py keeps both in step).
METADATA_FORMAT = "edge-ad-checkpoint"
# 2: metadata carries its own hash (checkpoints: meta_sha256 beside the weights' sha256;
# sidecars: metadata_sha256). Version-1 files predate it and load with a warning.
METADATA_FORMAT_VERSION = 2
META_KEY = "edge_ad"                       # ONNX metadata_props key / AOTInductor package entry
# Keys only a sidecar has (never embedded in the artifact): the file's hash, the parity gate's
# report, the metadata hash, and `runtime` (settings chosen after export, section below).
SIDECAR_ONLY_KEYS = ("artifact_sha256", "parity", "metadata_sha256", "runtime")
# What metadata_sha256 does not cover: itself and the records of one file / one gate run. Every
# field that decides a verdict (model, config, preprocess, score_stats, class_names, export,
# runtime) is covered.
UNHASHED_KEYS = ("artifact_sha256", "parity", "metadata_sha256")
TRITON_METADATA_SUFFIX = "_metadata"       # runtime.serve: <model>_metadata returns the JSON
TRITON_METADATA_OUTPUT = "edge_ad"

SCORE_STATS_NUMBERS = ("low", "threshold", "map_low", "map_threshold")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


SECTION_TYPES = (("model", str), ("config", dict), ("preprocess", dict), ("score_stats", dict),
                 ("class_names", list), ("training", dict), ("export", dict))


def check_sections(meta: dict, where: str) -> None:
    """Each metadata section present has its JSON type (an object, a list, a string), so every
    reader behind this check can index it. ValueError naming `where` and the field otherwise."""
    for key, typ in SECTION_TYPES:
        if key in meta and meta[key] is not None and not isinstance(meta[key], typ):
            want = {dict: "an object", list: "a list", str: "a string"}[typ]
            raise ValueError(f"{where}: metadata field {key} is {type(meta[key]).__name__}, expected {want}")


def check_score_stats(meta: dict, where: str) -> None:
    """score_stats must be an object whose low / threshold / map_low / map_threshold (those
    present) are finite numbers: they decide every verdict. ValueError naming `where` otherwise."""
    ss = meta.get("score_stats", {})
    if not isinstance(ss, dict):
        raise ValueError(f"{where}: metadata score_stats is {type(ss).__name__}, expected an object")
    for k in SCORE_STATS_NUMBERS:
        if k in ss and not (_is_number(ss[k]) and math.isfinite(ss[k])):
            raise ValueError(f"{where}: metadata score_stats.{k}={ss[k]!r}; expected a finite number")


# ---- the runtime section: settings chosen after export ------------------------------------------
# A sidecar-only, hash-covered object (deploy.artifacts.write_runtime_config writes it; the stream
# applies it when no command-line option overrides it), e.g.
#   {"pixel_threshold": 0.41, "image_threshold": 0.37, "calibration": {"fpr": 0.001, ...}}
# pixel_threshold / image_threshold are on the raw map / score scale (like score_stats'
# map_threshold / threshold). Other keys are kept for their writers; every number anywhere in the
# section must be finite and every value plain JSON.
RUNTIME_THRESHOLDS = ("pixel_threshold", "image_threshold")


def check_runtime_section(runtime, where: str) -> dict:
    """A copy of a valid runtime section, or ValueError naming `where` and the offending field."""
    if not isinstance(runtime, dict):
        raise ValueError(f"{where}: runtime section is {type(runtime).__name__}, expected an object")

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"{where}: runtime{path} has a non-string key {k!r}")
                walk(x, f"{path}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
        elif _is_number(v):
            if not math.isfinite(v):
                raise ValueError(f"{where}: runtime{path}={v!r}; expected a finite number")
        elif not (v is None or isinstance(v, (str, bool))):
            raise ValueError(f"{where}: runtime{path} is a {type(v).__name__}; expected plain JSON")

    walk(runtime, "")
    for k in RUNTIME_THRESHOLDS:
        if k in runtime and not _is_number(runtime[k]):
            raise ValueError(f"{where}: runtime.{k}={runtime[k]!r}; expected a finite number")
    return json.loads(json.dumps(runtime))


# ---- channels ---------------------------------------------------------------------------------
LUMA_RGB = (0.299, 0.587, 0.114)           # ITU-R BT.601 (what cv2.cvtColor(RGB2GRAY) uses)
PIXEL_FORMATS = ("Mono8", "RGB8")


def pixel_format(channels: int) -> str:
    """1 -> "Mono8", 3 -> "RGB8"."""
    if channels not in (1, 3):
        raise ValueError(f"frame channels: expected 1 or 3, got {channels!r}")
    return "Mono8" if channels == 1 else "RGB8"


def channels_of(fmt: str) -> int:
    """"Mono8" -> 1, "RGB8" -> 3."""
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"pixel format: expected one of {PIXEL_FORMATS}, got {fmt!r}")
    return 1 if fmt == "Mono8" else 3


# ---- backends, artifact kinds, precisions ------------------------------------------------------
ENGINE_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "aoti", "torch", "remote")
ORT_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt")
SUFFIX_KIND = {".onnx": "ort", ".engine": "tensorrt", ".plan": "tensorrt", ".pt2": "aoti", ".pt": "torch"}
PRECISIONS = ("fp32", "fp16", "int8")


# ---- score and map normalisation ---------------------------------------------------------------
def _unit(x, low: float, threshold: float) -> np.ndarray:
    span = max(float(threshold) - float(low), 1e-12)
    return np.clip((np.asarray(x, dtype=np.float32) - np.float32(low)) * np.float32(0.5 / span),
                   0.0, 1.0).astype(np.float32)


def normalize_score(score, low: float, threshold: float) -> np.ndarray:
    """clip(0.5 * (score - low) / (threshold - low), 0, 1): 0.5 exactly at the threshold."""
    return _unit(score, low, threshold)


def verdict(normalized) -> np.ndarray:
    return np.asarray(normalized) >= np.float32(0.5)


def map_unit(amap, map_low: float, map_threshold: float) -> np.ndarray:
    """The anomaly map on the same scale as normalized_score: 0 at the normal median, 0.5 at the
    pixel threshold, 1 at twice the distance. Heat maps and overlays are drawn from this."""
    return _unit(amap, map_low, map_threshold)


def heat_map(amap, map_low: float, map_threshold: float) -> np.ndarray:
    """uint8 heat map (same shape as `amap`): 255 * map_unit."""
    return np.round(map_unit(amap, map_low, map_threshold) * np.float32(255.0)).astype(np.uint8)


# ---- pre-processing (the numpy twin of the graph's) --------------------------------------------
def _resize_axis(x: np.ndarray, axis: int, out: int) -> np.ndarray:
    """Bilinear resampling of one axis, half-pixel centres, no antialias (torch's
    F.interpolate(mode="bilinear", align_corners=False, antialias=False) rule)."""
    n = x.shape[axis]
    if n == out:
        return x
    scale = np.float32(n / out)
    src = (np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = (src - i0).astype(np.float32)
    w0 = np.float32(1.0) - w1
    shape = [1] * x.ndim
    shape[axis] = out
    return np.take(x, i0, axis=axis) * w0.reshape(shape) + np.take(x, i1, axis=axis) * w1.reshape(shape)


def preprocess_frames(frames: np.ndarray, input_size: int, mean: Sequence[float], std: Sequence[float],
                      model_channels: int = 3) -> np.ndarray:
    """uint8 frames (B, H, W, C_frame) NHWC -> normalised float32 (B, C_model, S, S) NCHW."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] not in (1, 3):
        raise ValueError(f"frames: expected uint8 (B, H, W, 1|3), got {frames.dtype} {frames.shape}")
    x = frames.transpose(0, 3, 1, 2).astype(np.float32)
    if x.shape[1] == 1 and model_channels == 3:
        x = np.repeat(x, 3, axis=1)
    elif x.shape[1] == 3 and model_channels == 1:
        luma = np.asarray(LUMA_RGB, dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x * luma).sum(axis=1, keepdims=True, dtype=np.float32)
    s = int(input_size)
    x = _resize_axis(_resize_axis(x, 2, s), 3, s)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    scale = np.float32(1.0) / (np.float32(255.0) * std)
    return np.ascontiguousarray((x * scale - mean / std).astype(np.float32))


# ---- image folders (replayed as cameras, calibration frames) --------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def image_files(folder, skip_masks: bool = False) -> List[pathlib.Path]:
    """The image files under `folder` (recursive, sorted); `skip_masks` leaves out an MVTec
    layout's ground-truth masks (ground_truth/ folders, *_mask files)."""
    return sorted(p for p in pathlib.Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not (skip_masks and ("ground_truth" in p.parts or p.stem.endswith("_mask"))))

