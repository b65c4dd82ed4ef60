"""Deterministic synthetic anomaly data: procedural textures and objects with exact defect masks.

Two uses:
  * `generate_dataset(out_dir, ...)` writes an MVTec-AD-layout tree (PNG) for tests and the demo:
        <out>/<class>/train/good/000.png
        <out>/<class>/test/good/000.png
        <out>/<class>/test/<defect>/000.png
        <out>/<class>/ground_truth/<defect>/000_mask.png      (0 / 255, exact)
  * `render_sample(kind, size, rng, defect=None)` returns one image + mask in memory (numpy),
    e.g. for a streaming / camera simulator.
  * `paste_defect(image, defect, rng, opacity)` draws a defect onto a real image (the validation
    set of `models.validation`: synthetic defects on held-out normal training images).

Classes ("kinds"):
  texture  gray smoothed noise (written as 1-channel PNG: exercises the gray input path)
  fabric   colour woven pattern (product of two sinusoids) with random phase
  stripe   colour stripes with random phase and a small angle jitter
  object   a coloured washer (disc with a hole) on a dark background, small random offset

Defects (`DEFECTS`, the default set of `generate_dataset` and of the validation split): scratch
(thin bright/dark polyline), hole (near-black ellipse), stain (blob of overlapping ellipses, a foreign
colour alpha-blended with mottled opacity; near-black on the gray texture), color (region with a strong
colour / brightness shift that keeps the underlying texture). On request (`DEFECT_TYPES`): crack (a
one-pixel jagged line, a random walk of short segments, darkened to 35 % of the surface: thinner and
lower in contrast than a scratch, like the cracks of magnetic tile); band (a band across the whole
image between two gently wavy boundaries, 15-40 % of it and half the time starting at an edge, its
brightness shifted by 45 levels and its texture contrast raised 1.6x: like magnetic tile's "uneven"
surfaces, whole regions ground or lit differently). Each defect is drawn into a binary mask first
(aliasing off) and then only the masked pixels are modified, so the mask is exact: a pixel differs
from the defect-free rendering iff it is in the mask (up to the rare case where the modified value
rounds to the original one).

Determinism: every image is drawn from its own `numpy.random.Generator` seeded with
(seed, kind, split, index), and PNGs are written by OpenCV with fixed parameters, so the same
arguments give byte-identical files (same OpenCV build), independent of generation order.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import Iterable, Optional, Sequence, Tuple

import cv2
import numpy as np

KINDS = ("texture", "fabric", "stripe", "object")
DEFECTS = ("scratch", "hole", "stain", "color")
DEFECT_TYPES = DEFECTS + ("crack", "band")   # every type render_sample / paste_defect / generate_dataset draw
GRAY_KINDS = ("texture",)
_MARKER = ".synthetic.json"
# stain colour per class: far from the surface colour and, for the object, off the
# object-background colour axis (so it is not just a shade of an edge)
_STAIN_RGB = {"texture": (25, 25, 25), "fabric": (80, 50, 20), "stripe": (80, 50, 20), "object": (150, 190, 230)}
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic class {kind!r}; available: {', '.join(KINDS)}")


def _check_defect(defect: Optional[str]) -> None:
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect type {defect!r}; available: {', '.join(DEFECT_TYPES)} (or None)")


# ------------------------------------------------------------------------------------------
# normal renderings (float32 RGB in [0, 255], shape (S, S, 3))
# ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = rng.standard_normal((size, size)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return (n - n.mean()) / (n.std() + 1e-6)


def _render_texture(rng, size):
    base = 128.0 + 35.0 * _smooth_noise(rng, size, max(size / 32.0, 1.0))
    base += 8.0 * rng.standard_normal((size, size)).astype(np.float32)
    return np.repeat(base[:, :, None], 3, axis=2)


def _render_fabric(rng, size):
    period = max(size / 16.0, 4.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = rng.uniform(0, 2 * np.pi, size=2)
    weave = np.sin(2 * np.pi * xx / period + px) * np.sin(2 * np.pi * yy / period + py)
    color = np.array([70.0, 110.0, 165.0], np.float32)
    img = color[None, None, :] + 35.0 * weave[:, :, None]
    img += 5.0 * rng.standard_normal((size, size, 1)).astype(np.float32)
    return img


def _render_stripe(rng, size):
    period = max(size / 8.0, 4.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    phase = rng.uniform(0, period)
    coord = yy * np.cos(angle) + xx * np.sin(angle) + phase
    t = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period)
    c0 = np.array([200.0, 190.0, 170.0], np.float32)
    c1 = np.array([90.0, 120.0, 100.0], np.float32)
    img = c0[None, None, :] * t[:, :, None] + c1[None, None, :] * (1.0 - t[:, :, None])
    img += 4.0 * rng.standard_normal((size, size, 3)).astype(np.float32)
    return img


def _object_geometry(rng, size):
    cx = size / 2.0 + rng.uniform(-0.05, 0.05) * size
    cy = size / 2.0 + rng.uniform(-0.05, 0.05) * size
    return cx, cy, 0.32 * size, 0.11 * size


def _render_object(rng, size):
    cx, cy, r_out, r_in = _object_geometry(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([45.0, 50.0, 60.0], np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    body = (d <= r_out) & (d >= r_in)
    shade = 1.0 - 0.25 * (yy - cy) / max(r_out, 1.0)          # soft vertical lighting gradient
    color = np.array([210.0, 165.0, 70.0], np.float32)
    img[body] = (color[None, :] * shade[body][:, None])
    img += 3.0 * rng.standard_normal((size, size, 3)).astype(np.float32)
    return img, body, (cx, cy, r_out, r_in)


# ------------------------------------------------------------------------------------------
# defects: (img float32 RGB, rng, size, region mask or None) -> mask bool, img modified in place
# ------------------------------------------------------------------------------------------
def _pick_center(rng, size, region: Optional[np.ndarray], margin: float) -> Tuple[int, int]:
    if region is not None:
        ys, xs = np.nonzero(region)
        i = int(rng.integers(len(ys)))
        return int(xs[i]), int(ys[i])
    lo, hi = int(margin * size), int((1.0 - margin) * size)
    return int(rng.integers(lo, max(hi, lo + 1))), int(rng.integers(lo, max(hi, lo + 1)))


def _draw_walk(m: np.ndarray, rng, x: float, y: float, length: float, angle: float, n_seg: int, turn: float,
               thickness: int) -> None:
    """Draw into `m` a polyline of `n_seg` equal segments, `length` long, centred near (x, y), its
    heading starting at `angle` and turning by `turn` x N(0, 1) before each segment."""
    px, py = x - np.cos(angle) * length / 2, y - np.sin(angle) * length / 2
    pts = [(px, py)]
    for _ in range(n_seg):
        angle += turn * rng.standard_normal()
        px, py = px + np.cos(angle) * length / n_seg, py + np.sin(angle) * length / n_seg
        pts.append((px, py))
    pts = np.round(np.array(pts)).astype(np.int32)
    cv2.polylines(m, [pts.reshape(-1, 1, 2)], False, 1, thickness=thickness, lineType=cv2.LINE_8)


def _defect_mask(kind: str, rng, size, region) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    if kind == "scratch":
        x, y = _pick_center(rng, size, region, 0.2)
        length = rng.uniform(0.25, 0.45) * size
        angle = rng.uniform(0, np.pi)
        thick = max(1, int(round(size / 64.0)))
        n_seg = int(rng.integers(1, 4))
        _draw_walk(m, rng, x, y, length, angle, n_seg, 0.3, thick + 1)   # gently bending
    elif kind == "crack":
        x, y = _pick_center(rng, size, region, 0.2)
        length = rng.uniform(0.15, 0.35) * size
        n_seg = int(rng.integers(8, 17))
        angle = rng.uniform(0, np.pi)
        _draw_walk(m, rng, x, y, length, angle, n_seg, 0.5, max(1, int(round(size / 256.0))))   # jagged
    elif kind == "hole":
        x, y = _pick_center(rng, size, region, 0.15)
        ax = max(2, int(rng.uniform(0.04, 0.08) * size))
        ay = max(2, int(ax * rng.uniform(0.6, 1.0)))
        cv2.ellipse(m, (x, y), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    elif kind == "stain":
        x, y = _pick_center(rng, size, region, 0.15)
        r = rng.uniform(0.05, 0.09) * size
        for _ in range(int(rng.integers(3, 6))):
            ox, oy = rng.normal(0, 0.5 * r, size=2)
            ax = max(2, int(r * rng.uniform(0.5, 1.0)))
            ay = max(2, int(r * rng.uniform(0.4, 0.9)))
            cv2.ellipse(m, (int(x + ox), int(y + oy)), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1,
                        cv2.LINE_8)
    elif kind == "band":
        t = np.arange(size, dtype=np.float64)
        width = rng.uniform(0.15, 0.40) * size
        start = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, size - width)

        def wave():
            return 0.04 * size * np.sin(2 * np.pi * t / size * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
        edge_lo = np.full(size, -1.0) if start == 0.0 else start + wave()   # -1: the band starts at the edge
        edge_hi = start + width + wave()
        across = t[:, None]                                               # rows: the band is horizontal
        m[:] = (across >= edge_lo[None, :]) & (across < edge_hi[None, :])
        if rng.random() < 0.5:
            m[:] = m.T.copy()                                             # or vertical
        if rng.random() < 0.5:
            m[:] = m[::-1].copy() if rng.random() < 0.5 else m[:, ::-1].copy()   # from the other edge
        if region is not None:
            m &= region.astype(np.uint8)
    elif kind == "color":
        x, y = _pick_center(rng, size, region, 0.2)
        ax = max(3, int(rng.uniform(0.08, 0.14) * size))
        ay = max(3, int(ax * rng.uniform(0.5, 1.0)))
        cv2.ellipse(m, (x, y), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    else:  # pragma: no cover - guarded by _check_defect
        raise ValueError(kind)
    return m.astype(bool)


def _apply_defect(img: np.ndarray, defect: str, mask: np.ndarray, rng, kind: str) -> None:
    gray = kind in GRAY_KINDS
    if defect == "scratch":
        level = float(img[mask].mean())
        val = 250.0 if level < 140 else 15.0
        img[mask] = val + 3.0 * rng.standard_normal((int(mask.sum()), 1))
    elif defect == "crack":
        img[mask] = 0.35 * img[mask]
    elif defect == "hole":
        img[mask] = 12.0 + 3.0 * rng.standard_normal((int(mask.sum()), 1))
    elif defect == "stain":
        # a dark blob whose colour differs from the surface's (gray: near-black and flat)
        stain = np.array(_STAIN_RGB[kind], np.float32)
        if kind in GRAY_KINDS:
            alpha = 0.9
        else:  # mottled: the opacity varies inside the blob (alpha in [0.45, 0.95])
            blot = _smooth_noise(rng, img.shape[0], 1.5)[mask]
            alpha = (0.7 + 0.25 * np.clip(blot / 2.0, -1.0, 1.0))[:, None]
        img[mask] = (1.0 - alpha) * img[mask] + alpha * stain[None, :]
    elif defect == "band":
        local = cv2.GaussianBlur(img, (0, 0), max(1.0, img.shape[0] / 64.0))
        shift = -45.0 if float(img[mask].mean()) > 128 else 45.0
        img[mask] = local[mask] + shift + 1.6 * (img[mask] - local[mask])
    elif defect == "color":
        if gray:
            level = float(img[mask].mean())
            shift = np.full(3, -70.0 if level > 128 else 70.0, np.float32)
        else:
            shift = np.array([-70.0, 60.0, 60.0], np.float32) if img[mask][:, 0].mean() > 120 else \
                np.array([80.0, -50.0, -40.0], np.float32)
        img[mask] = img[mask] + shift[None, :]


def render_sample(kind: str, size: int = 128, rng: Optional[np.random.Generator] = None,
                  defect: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One image of class `kind` (normal if `defect` is None) and its exact defect mask.

    Returns (image uint8 (size, size, 3) RGB, mask uint8 (size, size) in {0, 1}). Gray kinds have
    three equal channels. `rng`: a numpy Generator (default: a fresh unseeded one).
    """
    _check_kind(kind)
    _check_defect(defect)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng() if rng is None else rng
    region = None
    if kind == "texture":
        img = _render_texture(rng, size)
    elif kind == "fabric":
        img = _render_fabric(rng, size)
    elif kind == "stripe":
        img = _render_stripe(rng, size)
    else:
        img, body, (cx, cy, r_out, r_in) = _render_object(rng, size)
        # defects on the object, away from its edges
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        region = (d <= r_out - 0.06 * size) & (d >= r_in + 0.06 * size)
    mask = np.zeros((size, size), bool)
    if defect is not None:
        mask = _defect_mask(defect, rng, size, region)
        _apply_defect(img, defect, mask, rng, kind)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, mask.astype(np.uint8)


def paste_defect(image: np.ndarray, defect: str, rng: np.random.Generator, opacity: float = 1.0
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Draw synthetic defect `defect` onto a copy of a real square image (e.g. a held-out normal tile).

    image: uint8 (S, S, 3) RGB (a gray image has three equal channels and gets the gray defects);
    opacity in (0, 1]: the defect is alpha-blended over the original pixels (low values give faint,
    low-contrast defects). Returns (image uint8 (S, S, 3), mask uint8 (S, S) in {0, 1}); outside the
    mask the image is unchanged.
    """
    _check_defect(defect)
    if defect is None:
        raise ValueError("paste_defect needs a defect type")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
        raise ValueError(f"paste_defect: expected a square uint8 (S, S, 3) image, got {image.dtype} {image.shape}")
    if not 0.0 < opacity <= 1.0:
        raise ValueError(f"paste_defect: opacity must be in (0, 1], got {opacity}")
    size = image.shape[0]
    gray = bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all())
    kind = "texture" if gray else "fabric"
    base = image.astype(np.float32)
    img = base.copy()
    mask = _defect_mask(defect, rng, size, None)
    _apply_defect(img, defect, mask, rng, kind)
    img[mask] = (1.0 - opacity) * base[mask] + opacity * img[mask]
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, mask.astype(np.uint8)


# ------------------------------------------------------------------------------------------
# dataset writer
# ------------------------------------------------------------------------------------------
def _sample_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), KINDS.index(kind), _SPLIT_CODES[split], int(index)])


def _write_png(path: pathlib.Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        raise OSError(f"could not encode PNG for {path}")
    path.write_bytes(buf.tobytes())


def _to_file_image(kind: str, rgb: np.ndarray) -> np.ndarray:
    if kind in GRAY_KINDS:
        return np.ascontiguousarray(rgb[:, :, 0])
    return np.ascontiguousarray(rgb[:, :, ::-1])  # RGB -> BGR for OpenCV


def generate_dataset(out_dir, classes: Sequence[str] = ("texture", "object"), n_train: int = 16,
                     n_test_good: int = 8, n_test_defect: int = 8, size: int = 128, seed: int = 0,
                     defects: Sequence[str] = DEFECTS, progress: bool = False) -> pathlib.Path:
    """Write a deterministic MVTec-layout tree under `out_dir`; returns `out_dir` as a Path.

    `n_test_defect` is the number of defective test images per class, spread round-robin over
    `defects` (image i gets defects[i % len(defects)]). An existing class folder is replaced only
    if it was written by this function (it holds a `.synthetic.json` marker); a foreign non-empty
    folder raises FileExistsError instead of being overwritten.
    """
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c]
    for c in classes:
        _check_kind(c)
    for d in defects:
        _check_defect(d)
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate classes in {list(classes)}")
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise ValueError("need n_train >= 1 and non-negative test counts")
    if n_test_defect > 0 and not defects:
        raise ValueError("n_test_defect > 0 needs at least one defect type")
    out = pathlib.Path(out_dir)
    params = dict(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, size=size,
                  seed=seed, defects=list(defects))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(classes) * (n_train + n_test_good + n_test_defect)
    bar = tqdm(total=total, desc="synthetic", unit="img", disable=not progress) if tqdm else None
    for kind in classes:
        cdir = out / kind
        if cdir.exists():
            if (cdir / _MARKER).is_file():
                shutil.rmtree(cdir)
            elif any(cdir.iterdir()):
                raise FileExistsError(f"{cdir} exists and was not written by models.synthetic; "
                                      f"refusing to overwrite it (choose another --out)")
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / _MARKER).write_text(json.dumps(dict(kind=kind, **params), sort_keys=True) + "\n")
        for i in range(n_train):
            img, _ = render_sample(kind, size, _sample_rng(seed, kind, "train", i))
            _write_png(cdir / "train" / "good" / f"{i:03d}.png", _to_file_image(kind, img))
            bar and bar.update(1)
        for i in range(n_test_good):
            img, _ = render_sample(kind, size, _sample_rng(seed, kind, "test_good", i))
            _write_png(cdir / "test" / "good" / f"{i:03d}.png", _to_file_image(kind, img))
            bar and bar.update(1)
        for i in range(n_test_defect):
            d = defects[i % len(defects)]
            img, mask = render_sample(kind, size, _sample_rng(seed, kind, "test_defect", i), defect=d)
            _write_png(cdir / "test" / d / f"{i:03d}.png", _to_file_image(kind, img))
            _write_png(cdir / "ground_truth" / d / f"{i:03d}_mask.png", mask * np.uint8(255))
            bar and bar.update(1)
    if bar:
        bar.close()
    return out


def main(argv: Optional[Iterable[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.synthetic",
                                description="Write a deterministic synthetic MVTec-layout anomaly dataset.")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per class)")
    p.add_argument("--classes", default="texture,object", help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--n-test-good", type=int, default=8)
    p.add_argument("--n-test-defect", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(None if argv is None else list(argv))
    classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    try:
        out = generate_dataset(a.out, classes, n_train=a.n_train, n_test_good=a.n_test_good,
                               n_test_defect=a.n_test_defect, size=a.size, seed=a.seed, progress=True)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    print(f"wrote {', '.join(classes)} to {out}")


if __name__ == "__main__":
    main()
