"""Artifact metadata: what the runtime needs, embedded in the artifact and in a sidecar JSON.

Torch-free (json, hashlib, zipfile; `onnx` only to read an ONNX file's embedded copy). Layout (the
deployed artifact contract, deploy/contract.py and docs/design.md section 4):
- metadata = the checkpoint's metadata (models.checkpoint.checkpoint_metadata: format, model,
  config, preprocess, score_stats, class_names, versions) + {"export": {format, scan, opset,
  frame_hw, frame_channels, batch, outputs, created, ...}} (export._common.build_metadata)
- ONNX: metadata_props["edge_ad"] = JSON of the metadata.
- AOTInductor .pt2: the same JSON in the package metadata (`aot_inductor.metadata["edge_ad"]`).
- TensorRT .engine: a plain plan; metadata only in the sidecar.
- Every artifact: sidecar `<artifact>.json` = metadata + {"artifact_sha256": sha256 of the file}
  (+ "parity": the parity-gate result, when one ran).

`read_metadata(path)` checks everything it can and raises one `ArtifactError` naming the file
and the problem: missing file or sidecar, hash mismatch (tampered / replaced artifact),
embedded metadata that disagrees with the sidecar, a foreign or newer format, and (optionally)
fields that disagree with what the caller expects.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Dict, Optional

from .contract import META_KEY, METADATA_FORMAT, METADATA_FORMAT_VERSION, SIDECAR_ONLY_KEYS


class ArtifactError(ValueError):
    """An exported artifact that must not be used; the message names the file and the problem."""


def sidecar_path(artifact) -> pathlib.Path:
    p = pathlib.Path(artifact)
    return p.with_name(p.name + ".json")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---- ONNX -------------------------------------------------------------------------------
def embed_onnx_metadata(onnx_model, meta: Dict[str, Any]):
    """Set metadata_props[edge_ad] (replacing an old value) on an onnx.ModelProto; returns it."""
    keep = [p for p in onnx_model.metadata_props if p.key != META_KEY]
    del onnx_model.metadata_props[:]
    for p in keep:
        onnx_model.metadata_props.add(key=p.key, value=p.value)
    onnx_model.metadata_props.add(key=META_KEY, value=json.dumps(meta, sort_keys=True))
    return onnx_model


def _onnx_embedded(path: pathlib.Path) -> Optional[Dict[str, Any]]:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for p in m.metadata_props:
        if p.key == META_KEY:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                raise ArtifactError(f"{path}: metadata_props[{META_KEY!r}] is not valid JSON") from None
    return None


def _pt2_embedded(path: pathlib.Path) -> Optional[Dict[str, Any]]:
    """Metadata stored inside an AOTInductor package (read from the zip, no model loading)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not an AOTInductor package (not a zip file)")
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(f"{META_KEY}_metadata.json"):
                try:
                    return json.loads(z.read(name))
                except json.JSONDecodeError:
                    raise ArtifactError(f"{path}: {name} inside the package is not valid JSON") from None
    return None


def read_embedded(path) -> Optional[Dict[str, Any]]:
    """Metadata embedded in the artifact itself (None for formats without, e.g. .engine)."""
    path = pathlib.Path(path)
    suf = path.suffix.lower()
    if suf == ".onnx":
        return _onnx_embedded(path)
    if suf == ".pt2":
        return _pt2_embedded(path)
    return None


# ---- sidecar ----------------------------------------------------------------------------
def write_sidecar(artifact, meta: Dict[str, Any], parity: Optional[Dict[str, Any]] = None) -> pathlib.Path:
    """Write `<artifact>.json` = meta + artifact_sha256 (+ parity); atomic replace."""
    artifact = pathlib.Path(artifact)
    side = dict(meta)
    side["artifact_sha256"] = sha256_file(artifact)
    if parity is not None:
        side["parity"] = parity
    out = sidecar_path(artifact)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def strip_sidecar_keys(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The metadata proper (as embedded): without artifact_sha256 / parity of one artifact file."""
    return {k: v for k, v in meta.items() if k not in SIDECAR_ONLY_KEYS}


def _check_expect(path, meta: Dict[str, Any], expect: Dict[str, Any]) -> None:
    """expect: dotted keys -> values, e.g. {"model": "dvad", "export.frame_hw": [256, 256]}."""
    for key, want in expect.items():
        cur: Any = meta
        for part in key.split("."):
            if not isinstance(cur, dict) or part not in cur:
                raise ArtifactError(f"{path}: metadata has no field {key!r} (expected {want!r})")
            cur = cur[part]
        if isinstance(want, tuple):
            want = list(want)
        if cur != want:
            raise ArtifactError(f"{path}: metadata field {key} is {cur!r}, expected {want!r} "
                                "(artifact does not match this configuration)")


def read_metadata(path, expect: Optional[Dict[str, Any]] = None, require_sidecar: bool = True) -> Dict[str, Any]:
    """Validated metadata of an artifact (.onnx, .engine/.plan, .pt2, .pt checkpoint).

    Raises ArtifactError (missing / tampered / mismatched). For .pt the checkpoint's own
    validation applies (models.checkpoint.read_checkpoint) and no sidecar is needed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact file not found")
    if path.suffix.lower() == ".pt":
        from models.checkpoint import CheckpointError, read_checkpoint

        try:
            meta, _ = read_checkpoint(path)
        except CheckpointError as e:
            raise ArtifactError(str(e)) from None
        if expect:
            _check_expect(path, meta, expect)
        return meta
    side_p = sidecar_path(path)
    side = None
    if side_p.is_file():
        try:
            side = json.loads(side_p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{side_p}: sidecar is not valid JSON") from None
        if not isinstance(side, dict):
            raise ArtifactError(f"{side_p}: sidecar is not a JSON object")
        want = side.get("artifact_sha256")
        if not want:
            raise ArtifactError(f"{side_p}: sidecar has no artifact_sha256")
        got = sha256_file(path)
        if got != want:
            raise ArtifactError(f"{path}: sha256 {got[:16]}... does not match its sidecar's artifact_sha256 "
                                f"{str(want)[:16]}... (artifact modified or replaced after export; re-export it)")
    embedded = read_embedded(path)   # after the hash check: a tampered file gets the hash message
    if side is None and (require_sidecar or embedded is None):
        raise ArtifactError(f"{path}: sidecar metadata {side_p.name} not found next to the artifact "
                            "(export writes both; copy them together)")
    if embedded is not None and side is not None and strip_sidecar_keys(side) != embedded:
        diff = sorted(k for k in set(strip_sidecar_keys(side)) | set(embedded) if strip_sidecar_keys(side).get(k) != embedded.get(k))
        raise ArtifactError(f"{path}: embedded metadata and sidecar {side_p.name} disagree on {diff} "
                            "(mixed-up files)")
    meta = side if side is not None else embedded
    if meta.get("format") != METADATA_FORMAT:
        raise ArtifactError(f"{path}: metadata format {meta.get('format')!r}, expected {METADATA_FORMAT!r}")
    try:
        fv = int(meta.get("format_version", -1))
    except (TypeError, ValueError):
        fv = -1
    if fv < 1 or fv > METADATA_FORMAT_VERSION:
        raise ArtifactError(f"{path}: metadata format_version {meta.get('format_version')!r} not supported "
                            f"(this toolkit reads 1..{METADATA_FORMAT_VERSION})")
    if not isinstance(meta.get("export"), dict):
        raise ArtifactError(f"{path}: metadata has no 'export' section (not an exported artifact)")
    if expect:
        _check_expect(path, meta, expect)
    return meta
