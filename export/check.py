"""Parity gate: an exported artifact against the PyTorch model it came from.

    python -m export.check --ckpt model.pt --artifact export_out/model.onnx [--images DIR] [--n 8]

Both sides get the same uint8 frames (real images from a folder, else models.synthetic images) at the artifact's frame size/channels. The artifact runs at batch 1
(frame by frame) and at batch n (when its batch axis allows it). Compared per output: max abs
error against per-output tolerances `|a - b| <= atol + rtol * |b|` (tolerances are data, see
PRESETS), and the rank agreement of the image scores (Spearman and Kendall). The result object
(`ParityResult`) says what failed; every exporter calls `check_artifact` and refuses to finish
(ParityError) when it does not pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from deploy import Engine, load_engine, read_metadata, write_sidecar
from deploy.contract import IMAGE_SUFFIXES, image_files
from deploy.torch_engines import TorchEngine

from ._common import ExportError, load_model



class ParityError(ExportError):
    """The exported artifact disagrees with PyTorch beyond tolerance (message = the report)."""

    def __init__(self, result: "ParityResult", artifact=None):
        self.result = result
        super().__init__(f"parity gate failed for {artifact}:\n{result.report()}")


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass(frozen=True)
class Tolerances:
    """Per-output tolerances (with a default) and minimum rank agreement of image scores."""

    per_output: Dict[str, Tolerance] = field(default_factory=dict)
    default: Tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    min_spearman: float = 0.95
    min_kendall: float = 0.85

    def for_output(self, name: str) -> Tolerance:
        return self.per_output.get(name, self.default)


# fp32: same math, different kernels/fusion order: ~1e-6 typical; the gate leaves headroom.
# fp16 / int8: scores move; the gate then leans on rank agreement and a loose map bound.
PRESETS: Dict[str, Tolerances] = {
    "fp32": Tolerances(per_output={"normalized_score": Tolerance(2e-4, 1e-3)},
                       default=Tolerance(1e-4, 1e-3), min_spearman=0.95, min_kendall=0.85),
    "fp16": Tolerances(default=Tolerance(2e-2, 5e-2), min_spearman=0.9, min_kendall=0.7),
    "int8": Tolerances(default=Tolerance(0.25, 0.25),
                       per_output={"normalized_score": Tolerance(0.25, 0.0)},
                       min_spearman=0.7, min_kendall=0.5),
}


@dataclass
class OutputComparison:
    name: str
    batch: int
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    n_bad: int
    n_total: int
    passed: bool


@dataclass
class ParityResult:
    artifact: str
    source: str                    # where the frames came from
    n_images: int
    outputs: List[OutputComparison]
    spearman: float
    kendall: float
    tolerances: Tolerances
    failures: List[str]
    engine: Dict[str, object] = field(default_factory=dict)   # the deploy engine that ran the artifact

    @property
    def passed(self) -> bool:
        return not self.failures

    def max_abs(self, name: str) -> float:
        vals = [o.max_abs for o in self.outputs if o.name == name]
        return max(vals) if vals else float("nan")

    def report(self) -> str:
        lines = [f"parity {'PASSED' if self.passed else 'FAILED'}: {self.artifact} vs PyTorch on "
                 f"{self.n_images} frames ({self.source}), run by {self.engine.get('class')} "
                 f"({self.engine.get('backend')})",
                 f"  {'output':<18}{'batch':>6}{'max_abs':>12}{'max_rel':>12}{'atol':>10}{'rtol':>10}  bad"]
        for o in self.outputs:
            lines.append(f"  {o.name:<18}{o.batch:>6}{o.max_abs:>12.3e}{o.max_rel:>12.3e}{o.atol:>10.1e}"
                         f"{o.rtol:>10.1e}  {o.n_bad}/{o.n_total}{'' if o.passed else '  <-- over tolerance'}")
        lines.append(f"  image-score rank agreement: Spearman {self.spearman:.4f} (min "
                     f"{self.tolerances.min_spearman}), Kendall {self.kendall:.4f} (min {self.tolerances.min_kendall})")
        for f in self.failures:
            lines.append(f"  FAILED: {f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "source": self.source, "n_images": self.n_images, "engine": self.engine,
                "spearman": self.spearman, "kendall": self.kendall, "failures": list(self.failures),
                "outputs": [dataclasses.asdict(o) for o in self.outputs]}


# ---- frames -----------------------------------------------------------------------------
def read_frame(path, frame_hw, channels: int) -> np.ndarray:
    """One uint8 frame (H, W, C) as the deployed graph takes it: gray or RGB, INTER_AREA resize."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot be decoded as an image")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = frame_hw
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img.reshape(h, w, channels)


def load_frames(images, n: int, frame_hw, channels: int) -> Tuple[np.ndarray, str]:
    """n uint8 frames (n, H, W, C) from a folder (evenly spaced over its sorted images)."""
    folder = pathlib.Path(images)
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is not a folder of images")
    files = image_files(folder, skip_masks=True)
    if not files:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    idx = np.linspace(0, len(files) - 1, num=min(n, len(files))).round().astype(int)
    frames = np.stack([read_frame(files[i], frame_hw, channels) for i in idx])
    return frames, f"{len(idx)} images from {folder}"


def random_frames(n: int, frame_hw, channels: int, seed: int = 0) -> np.ndarray:
    """Seeded smooth random textures with a few bright/dark blobs (not white noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = frame_hw
    out = np.empty((n, h, w, channels), np.uint8)
    for i in range(n):
        base = rng.normal(128, 40, (max(h // 8, 2), max(w // 8, 2), channels)).astype(np.float32)
        img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
        img += rng.normal(0, 8, img.shape).astype(np.float32)
        for _ in range(int(rng.integers(0, 3))):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), int(rng.integers(2, max(3, min(h, w) // 6)))
            yy, xx = np.ogrid[:h, :w]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += rng.choice([-90.0, 90.0])
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def synthetic_frames(n: int, frame_hw, channels: int, seed: int = 0) -> Tuple[np.ndarray, str]:
    """n frames from models.synthetic: good and defective 'texture' test images, half each."""
    from models.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        k = max(1, (n + 1) // 2)
        root = generate_dataset(tmp, classes=("texture",), n_train=1, n_test_good=k, n_test_defect=k,
                                size=max(32, min(256, max(frame_hw))), seed=seed)
        frames, _ = load_frames(pathlib.Path(root) / "texture" / "test", n, frame_hw, channels)
    return frames[:n], f"models.synthetic textures (seed {seed})"


def run_in_batches(engine, frames: np.ndarray, batch: int) -> Dict[str, np.ndarray]:
    """engine.infer on consecutive chunks of `batch` frames, outputs concatenated (the gate runs
    every artifact at batch 1 and at batch n; Engine.infer pads for fixed-batch engines)."""
    parts: Dict[str, list] = {}
    for i in range(0, len(frames), batch):
        for name, v in engine.infer(frames[i:i + batch]).items():
            parts.setdefault(name, []).append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---- comparison -------------------------------------------------------------------------
def compare_outputs(ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray], tol: Tolerances,
                    batch: int) -> Tuple[List[OutputComparison], List[str]]:
    comps, failures = [], []
    for name, r in ref.items():
        if name not in got:
            failures.append(f"output {name!r} missing from the artifact (has {sorted(got)})")
            continue
        g = got[name]
        if g.shape != r.shape:
            failures.append(f"output {name!r} at batch {batch}: shape {g.shape}, PyTorch {r.shape}")
            continue
        t = tol.for_output(name)
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        if not np.isfinite(g64).all():
            failures.append(f"output {name!r} at batch {batch}: {int((~np.isfinite(g64)).sum())} non-finite values")
        diff = np.abs(g64 - r64)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        bad = diff > t.atol + t.rtol * np.abs(r64)
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(r64), 1e-12)).max()) if diff.size else 0.0
        c = OutputComparison(name, batch, max_abs, max_rel, t.atol, t.rtol, int(bad.sum()), int(bad.size),
                             not bad.any())
        comps.append(c)
        if not c.passed:
            failures.append(f"output {name!r} at batch {batch}: max abs error {max_abs:.3e} > atol {t.atol:g} + "
                            f"rtol {t.rtol:g} * |ref| at {c.n_bad}/{c.n_total} values")
    return comps, failures


def rank_agreement(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """(Spearman rho, Kendall tau-b) of two score vectors; 1.0 when both are constant."""
    from scipy.stats import kendalltau, spearmanr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return 1.0, 1.0
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0, 1.0
    rho = spearmanr(a, b).statistic
    tau = kendalltau(a, b).statistic
    return (float(rho) if np.isfinite(rho) else 0.0), (float(tau) if np.isfinite(tau) else 0.0)


# the parity gate checks artifacts on the CPU this machine certainly has (AOTInductor packages
# compiled for CUDA: on the GPU they were compiled on)
_CPU_BACKEND = {".onnx": "ort-cpu", ".pt2": "aoti"}


def _compare_batches(engine, frames, ref, batches, tolerances):
    """(comparisons, failures, the artifact's first image scores) over the gate's batch sizes."""
    comps, failures, got_scores = [], [], None
    for b in batches:
        got = run_in_batches(engine, frames, b)
        c, f = compare_outputs(ref, got, tolerances, b)
        comps += c
        failures += f
        if got_scores is None and "score" in got:
            got_scores = got["score"]
    return comps, failures, got_scores


def check_artifact(ckpt, artifact, images=None, n: int = 8, tolerances=None, seed: int = 0,
                   meta: Optional[dict] = None, engine: Optional[Engine] = None) -> ParityResult:
    """Compare `artifact` with the PyTorch model `ckpt` (path or model); returns ParityResult.

    Both sides are deploy engines: the artifact is opened by `deploy.load_engine` (the loader
    runtime.stream and runtime.serve use; `engine` passes one already open, e.g. on a GPU), the
    reference is deploy.TorchEngine (the same DeployModule graph, eager PyTorch).
    tolerances: a Tolerances, a PRESETS key, or None (the preset of the artifact's precision).
    """
    model = load_model(ckpt)
    # the gate may re-examine an artifact it rejected before (model.rejected.onnx)
    meta = meta if meta is not None else read_metadata(artifact, allow_rejected=True)
    ex = meta.get("export", {})
    frame_hw = tuple(ex.get("frame_hw") or (model.preprocess.input_size,) * 2)
    ch = int(ex.get("frame_channels", model.preprocess.channels))
    full = "anomaly_map_full" in (ex.get("outputs") or ())
    if tolerances is None:
        tolerances = ex.get("precision", "fp32")
    if isinstance(tolerances, str):
        if tolerances not in PRESETS:
            raise ValueError(f"tolerances: unknown preset {tolerances!r}; expected one of {sorted(PRESETS)}")
        tolerances = PRESETS[tolerances]
    if images is not None:
        frames, source = load_frames(images, n, frame_hw, ch)
    else:
        frames, source = synthetic_frames(n, frame_hw, ch, seed)
    with TorchEngine(model, frame_hw=frame_hw, frame_channels=ch, full_res_map=full) as reference:
        ref = reference.infer(frames)
    own = engine is None
    if own:
        suffix = pathlib.Path(artifact).suffix.lower()
        # an AOTInductor package runs only on the device it was compiled for (its metadata says which)
        device = (ex.get("device") or "cpu") if suffix == ".pt2" else "cpu"
        engine = load_engine(artifact, backend=_CPU_BACKEND.get(suffix), meta=meta, device=device)
    try:
        batches = [engine.static_batch] if engine.static_batch else sorted({1, len(frames)})
        comps, failures, got_scores = _compare_batches(engine, frames, ref, batches, tolerances)
        used = {"class": f"{type(engine).__module__}.{type(engine).__qualname__}", "backend": engine.backend}
    finally:
        if own:
            engine.close()
    rho, tau = (rank_agreement(ref["score"], got_scores) if got_scores is not None else (0.0, 0.0))
    if len(frames) >= 3:
        if rho < tolerances.min_spearman:
            failures.append(f"image-score Spearman {rho:.4f} < {tolerances.min_spearman}")
        if tau < tolerances.min_kendall:
            failures.append(f"image-score Kendall {tau:.4f} < {tolerances.min_kendall}")
    return ParityResult(str(artifact), source, len(frames), comps, rho, tau, tolerances, failures, used)


def gate(ckpt, artifact, meta: dict, images=None, n: int = 8, tolerances=None, engine=None) -> ParityResult:
    """check_artifact, raising ParityError with the report when it fails."""
    res = check_artifact(ckpt, artifact, images=images, n=n, tolerances=tolerances, meta=meta, engine=engine)
    if not res.passed:
        raise ParityError(res, artifact)
    return res


def gate_and_record(model, path, sidecar, meta: dict, images=None, n: int = 8) -> ParityResult:
    """The exporters' gate: on failure the artifact (and its sidecar) is renamed `*.rejected.*`
    for inspection and ParityError is raised; on success the sidecar records the parity report."""
    import os

    path = pathlib.Path(path)
    parity = check_artifact(model, path, images=images, n=n, meta=meta)
    if not parity.passed:
        rejected = path.with_name(path.stem + ".rejected" + path.suffix)
        os.replace(path, rejected)
        os.replace(sidecar, rejected.with_name(rejected.name + ".json"))
        write_sidecar(rejected, meta, parity=parity.to_dict())
        raise ParityError(parity, f"{path} (kept as {rejected.name} for inspection)")
    write_sidecar(path, meta, parity=parity.to_dict())
    return parity


def main(argv=None) -> int:
    from ._common import run_cli

    ap = argparse.ArgumentParser(prog="python -m export.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint the artifact was exported from")
    ap.add_argument("--artifact", required=True, help="exported artifact (.onnx or .pt2)")
    ap.add_argument("--images", default=None, help="folder of images (default: synthetic frames)")
    ap.add_argument("--n", type=int, default=8, help="number of frames (default 8)")
    ap.add_argument("--tolerances", choices=sorted(PRESETS), default=None,
                    help="tolerance preset (default: the artifact's precision)")
    args = ap.parse_args(argv)
    state = {}

    def body():
        if args.n < 1:
            raise ValueError(f"n: expected >= 1, got {args.n}")
        res = check_artifact(args.ckpt, args.artifact, images=args.images, n=args.n, tolerances=args.tolerances)
        print(res.report())
        state["passed"] = res.passed

    rc = run_cli(body)
    if rc == 0 and not state.get("passed"):
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
