"""Artifact metadata: what the runtime needs, embedded in the artifact and in a sidecar JSON.

Torch-free (json, hashlib, zipfile; `onnx` only to read an ONNX file's embedded copy). Layout (the
deployed artifact contract, deploy/contract.py and docs/design.md section 4):
- metadata = the checkpoint's metadata (models.checkpoint.checkpoint_metadata: format, model,
  config, preprocess, score_stats, class_names, versions) + {"export": {format, scan, opset,
  frame_hw, frame_channels, batch, outputs, created, ...}} (export._common.build_metadata)
- ONNX: metadata_props["edge_ad"] = JSON of the metadata.
- AOTInductor .pt2: the same JSON in the package metadata (`aot_inductor.metadata["edge_ad"]`).
- TensorRT .engine: a plain plan; metadata only in the sidecar.
- Every artifact: sidecar `<artifact>.json` = metadata + {"artifact_sha256": sha256 of the file,
  "metadata_sha256": sha256 of the canonical JSON of the metadata} (+ "parity": the parity-gate
  result, when one ran; + "runtime": settings chosen after export, `write_runtime_config`).

`read_metadata(path)` checks everything it can and raises one `ArtifactError` naming the file
and the problem: missing file or sidecar, hash mismatch (tampered / replaced artifact), metadata
edited after it was signed (metadata_sha256), embedded metadata that disagrees with the sidecar,
a foreign or newer format, non-finite thresholds, an artifact the parity gate rejected (unless
allow_rejected), and (optionally) fields that disagree with what the caller expects.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Dict, Optional

from .contract import (META_KEY, METADATA_FORMAT, METADATA_FORMAT_VERSION, SIDECAR_ONLY_KEYS, UNHASHED_KEYS,
                       check_runtime_section, check_score_stats, check_sections)

log = logging.getLogger("deploy.artifacts")


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
def metadata_sha256(meta: Dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, compact) of `meta` without UNHASHED_KEYS: it
    covers every field that decides a verdict, the runtime section included."""
    body = {k: v for k, v in meta.items() if k not in UNHASHED_KEYS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_sidecar(artifact, meta: Dict[str, Any], parity: Optional[Dict[str, Any]] = None) -> pathlib.Path:
    """Write `<artifact>.json` = meta + artifact_sha256 + metadata_sha256 (+ parity: the given
    report, else the one `meta` carries); atomic replace."""
    artifact = pathlib.Path(artifact)
    side = {k: v for k, v in meta.items() if k not in UNHASHED_KEYS}
    if "runtime" in side:
        side["runtime"] = check_runtime_section(side["runtime"], str(artifact))
    side["artifact_sha256"] = sha256_file(artifact)
    side["metadata_sha256"] = metadata_sha256(side)
    parity = parity if parity is not None else meta.get("parity")
    if parity is not None:
        side["parity"] = parity
    out = sidecar_path(artifact)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(side, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def write_runtime_config(artifact, runtime: Dict[str, Any]) -> pathlib.Path:
    """Replace the artifact's `runtime` section (docs/design.md section 5) and re-sign its sidecar;
    the artifact file itself is not rewritten. An empty dict removes the section. To change one
    key: `rt = read_metadata(a).get("runtime", {}); rt["pixel_threshold"] = x;
    write_runtime_config(a, rt)`. The artifact must verify first (ArtifactError otherwise);
    values must be plain JSON with finite numbers (ValueError names the field)."""
    artifact = pathlib.Path(artifact)
    meta = read_metadata(artifact, allow_rejected=True)
    if artifact.suffix.lower() == ".pt":
        raise ArtifactError(f"{artifact}: a checkpoint has no sidecar; export it, then set the runtime "
                            "section of the exported artifact")
    runtime = check_runtime_section(runtime, str(artifact))
    meta = {k: v for k, v in meta.items() if k != "runtime"}
    if runtime:
        meta["runtime"] = runtime
    return write_sidecar(artifact, meta)


def strip_sidecar_keys(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The metadata proper (as embedded): without SIDECAR_ONLY_KEYS (the records of one artifact
    file and the runtime section)."""
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


def _format_version(meta: Dict[str, Any], where) -> int:
    fv = meta.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1 or fv > METADATA_FORMAT_VERSION:
        raise ArtifactError(f"{where}: metadata format_version {fv!r} not supported "
                            f"(this toolkit reads 1..{METADATA_FORMAT_VERSION})")
    return fv


def _check_signature(side: Dict[str, Any], side_p: pathlib.Path) -> None:
    """metadata_sha256 must match the sidecar's metadata; version-1 sidecars predate it."""
    want = side.get("metadata_sha256")
    if want is None:
        if side.get("format_version") == 1:
            log.warning("%s: sidecar predates metadata hashing (format_version 1): its thresholds, "
                        "normalisation and classes are not integrity-checked; re-export to sign them",
                        side_p)
            return
        raise ArtifactError(f"{side_p}: sidecar has no metadata_sha256 (its metadata cannot be verified; "
                            "re-export the artifact)")
    if want != metadata_sha256(side):
        raise ArtifactError(f"{side_p}: metadata does not match its metadata_sha256 (edited after export? "
                            "thresholds change only through deploy.artifacts.write_runtime_config; "
                            "re-export or restore the sidecar)")


def _check_parity(side: Dict[str, Any], path: pathlib.Path, allow_rejected: bool) -> None:
    parity = side.get("parity")
    if parity is None:
        return
    if not isinstance(parity, dict) or not isinstance(parity.get("passed"), bool):
        raise ArtifactError(f"{sidecar_path(path)}: field parity is not a parity-gate report")
    if parity["passed"]:
        return
    why = "; ".join(str(f) for f in (parity.get("failures") or [])[:3]) or "see its parity report"
    if not allow_rejected:
        raise ArtifactError(f"{path}: the parity gate REJECTED this artifact ({why}); it may not score "
                            "like its model. Re-export it, or pass --allow-rejected (allow_rejected=True) "
                            "to run it anyway")
    log.warning("%s: running an artifact the parity gate rejected (%s)", path, why)


def read_metadata(path, expect: Optional[Dict[str, Any]] = None, require_sidecar: bool = True,
                  allow_rejected: bool = False) -> Dict[str, Any]:
    """Validated metadata of an artifact (.onnx, .engine/.plan, .pt2, .pt checkpoint).

    Raises ArtifactError (missing / tampered / mismatched / rejected by the parity gate unless
    `allow_rejected`). For .pt the checkpoint's own validation applies
    (models.checkpoint.read_checkpoint) and no sidecar is needed.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, not an artifact file")
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
        _check_signature(side, side_p)
    embedded = read_embedded(path)   # after the hash check: a tampered file gets the hash message
    if embedded is not None and not isinstance(embedded, dict):
        raise ArtifactError(f"{path}: embedded metadata is not a JSON object")
    if side is None and (require_sidecar or embedded is None):
        raise ArtifactError(f"{path}: sidecar metadata {side_p.name} not found next to the artifact "
                            "(export writes both; copy them together)")
    if embedded is not None and side is not None and strip_sidecar_keys(side) != embedded:
        proper = strip_sidecar_keys(side)
        diff = sorted(k for k in set(proper) | set(embedded) if proper.get(k) != embedded.get(k))
        raise ArtifactError(f"{path}: embedded metadata and sidecar {side_p.name} disagree on {diff} "
                            "(mixed-up files)")
    meta = side if side is not None else embedded
    if meta.get("format") != METADATA_FORMAT:
        raise ArtifactError(f"{path}: metadata format {meta.get('format')!r}, expected {METADATA_FORMAT!r}")
    _format_version(meta, path)
    if not isinstance(meta.get("export"), dict):
        raise ArtifactError(f"{path}: metadata has no 'export' section (not an exported artifact)")
    try:
        check_sections(meta, str(path))
        check_score_stats(meta, str(path))
        if "runtime" in meta:
            check_runtime_section(meta["runtime"], str(side_p))
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    if side is not None:
        _check_parity(side, path, allow_rejected)
    if expect:
        _check_expect(path, meta, expect)
    return meta
