"""MVTec-AD-layout datasets: one class or several at once (unified multi-class training).

Layout of one class folder (MVTec AD):
    <class>/train/good/*.png|jpg        normal training images (required)
    <class>/test/good/*                 normal test images
    <class>/test/<type>/*               defective test images
    <class>/ground_truth/<type>/<stem>_mask.png   mask of test/<type>/<stem>.* (non-zero = defect)
`root` is either one class folder (it has `train/`) or a folder of class folders. Class ids are the
positions in `class_names`, which is the sorted list of the selected classes (so the same selection
gives the same ids on every machine).

Images: any size, gray or colour (8- or 16-bit), PNG / JPEG / BMP / TIFF; resized to the model's
input size with OpenCV INTER_LINEAR (masks INTER_NEAREST, then > 0); gray is replicated to 3
channels when the model wants 3. Bad input raises one `DataError` naming the path and what was
expected (missing mask, unreadable / corrupt file, empty folder, missing train/good, unknown class).

Validation split (`make_datasets`): per class, the ceil(val_fraction * n) train/good images whose
sha1("<seed>:<class>/<file name>") is smallest are held out for validation (normalisation and
threshold statistics) and removed from training. It depends only on the file names, the class and
the seed - not on file order, machine or other classes - and adding images rarely moves old ones.
"""
from __future__ import annotations

import hashlib
import math
import pathlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .base import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = ("_mask.png", ".png")   # tried in this order: <stem>_mask.png (MVTec), <stem>.png


class DataError(ValueError):
    """A dataset problem the user can fix (the message names the path and what was expected)."""


@dataclass(frozen=True)
class Sample:
    path: pathlib.Path
    class_name: str
    class_id: int
    defect_type: str                  # "good" or the defect type (test/<type>)
    label: int                        # 0 normal, 1 defective
    mask_path: Optional[pathlib.Path] = None


# ------------------------------------------------------------------------------------------
# scanning
# ------------------------------------------------------------------------------------------
def _is_image(p: pathlib.Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: pathlib.Path) -> List[pathlib.Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of images, but it does not exist")
    files = sorted(p for p in folder.iterdir() if _is_image(p))
    if not files:
        raise DataError(f"{folder}: folder holds no images (expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return files


def _parse_classes(classes) -> Optional[List[str]]:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = classes.split(",")
    out = [str(c).strip() for c in classes if str(c).strip()]
    return out or None


def find_classes(root) -> Tuple[pathlib.Path, List[str]]:
    """(parent folder, sorted class names) for a class folder or a folder of class folders."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist or is not a folder")
    root = root.resolve()
    if (root / "train").is_dir() or (root / "test").is_dir():
        return root.parent, [root.name]
    names = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and
                   ((p / "train").is_dir() or (p / "test").is_dir()))
    if not names:
        raise DataError(f"{root}: expected an MVTec-layout class folder (with train/good and test/) "
                        f"or a folder of such class folders; found neither")
    return root, names


def _select(root: pathlib.Path, available: List[str], classes) -> List[str]:
    wanted = _parse_classes(classes)
    if wanted is None:
        return available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(f"{root}: unknown class(es) {', '.join(unknown)}; available: {', '.join(available)}")
    if len(set(wanted)) != len(wanted):
        raise DataError(f"duplicate classes in selection {wanted}")
    return sorted(wanted)


def _mask_for(cdir: pathlib.Path, defect: str, img: pathlib.Path) -> pathlib.Path:
    gt = cdir / "ground_truth" / defect
    for suf in MASK_SUFFIXES:
        cand = gt / (img.stem + suf)
        if cand.is_file():
            return cand
    raise DataError(f"{img}: defect image has no mask; expected {gt / (img.stem + MASK_SUFFIXES[0])}")


def scan_mvtec(root, classes=None, split: str = "train", id_names: Optional[Sequence[str]] = None
               ) -> Tuple[List[Sample], List[str]]:
    """List the samples of `split` ("train" = train/good, "test" = test/*) for the selected classes.

    Returns (samples, class_names); `classes` is None (all), a list or a comma-separated string.
    class_id = position in class_names = the sorted selection. With `id_names` (e.g. a trained
    model's `class_names`) the ids are positions in `id_names` instead, class_names is returned as
    `list(id_names)`, and a selected class missing from `id_names` is a DataError: use it to score a
    subset of the classes a multi-class model was trained on.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parent, available = find_classes(root)
    names = _select(pathlib.Path(root), available, classes)
    if id_names is not None:
        id_names = [str(n) for n in id_names]
        missing = [n for n in names if n not in id_names]
        if missing:
            raise DataError(f"{root}: class(es) {', '.join(missing)} not among the model's classes "
                            f"({', '.join(id_names)})")
    samples: List[Sample] = []
    for name in names:
        cid = names.index(name) if id_names is None else id_names.index(name)
        cdir = parent / name
        if split == "train":
            if not (cdir / "train" / "good").is_dir():
                raise DataError(f"{cdir / 'train' / 'good'}: missing; every class needs train/good "
                                f"with normal training images")
            for p in _list_images(cdir / "train" / "good"):
                samples.append(Sample(p, name, cid, "good", 0, None))
        else:
            tdir = cdir / "test"
            if not tdir.is_dir():
                raise DataError(f"{tdir}: missing; expected test/good and test/<defect type> folders")
            types = sorted(p.name for p in tdir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not types:
                raise DataError(f"{tdir}: holds no sub-folders; expected test/good and test/<defect type>")
            for t in types:
                for p in _list_images(tdir / t):
                    if t == "good":
                        samples.append(Sample(p, name, cid, "good", 0, None))
                    else:
                        samples.append(Sample(p, name, cid, t, 1, _mask_for(cdir, t, p)))
    return samples, (names if id_names is None else id_names)


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------
def _read_raw(path) -> np.ndarray:
    path = pathlib.Path(path)
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None or img.size == 0:
        raise DataError(f"{path}: not a readable image (expected a valid PNG/JPEG/BMP/TIFF file)")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    return img


def load_image(path, channels: int = 3) -> np.ndarray:
    """Decode an image file into uint8 (H, W, channels), RGB order for 3 channels.

    Gray files are replicated to 3 channels; colour files are converted to gray for channels=1;
    an alpha channel is dropped.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    img = _read_raw(path)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 2:
        return img[:, :, None] if channels == 1 else np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"{path}: unsupported image shape {img.shape} (expected gray, RGB or RGBA)")
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]
    return np.ascontiguousarray(img[:, :, ::-1])


def load_mask(path) -> np.ndarray:
    """Decode a mask file into bool (H, W): non-zero (in any channel) = defect."""
    m = _read_raw(path)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > 0


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------
class AnomalyDataset(Dataset):
    """Samples -> dict(image (C,S,S) float32 normalised, mask (1,S,S) float32 {0,1}, label, class_id, index)."""

    def __init__(self, samples: Sequence[Sample], input_size: int = 256, channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 class_names: Optional[Sequence[str]] = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if channels == 1 and len(mean) == 3:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {mean} / {std}")
        if int(input_size) < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.samples = list(samples)
        self.input_size = int(input_size)
        self.channels = channels
        self.mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(-1, 1, 1)
        self.class_names = list(class_names) if class_names is not None else \
            sorted({s.class_name for s in self.samples})

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], np.int64)

    def load_raw(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, C) at file resolution, mask bool (H, W)) of sample i."""
        s = self.samples[i]
        img = load_image(s.path, self.channels)
        if s.mask_path is None:
            mask = np.zeros(img.shape[:2], bool)
        else:
            mask = load_mask(s.mask_path)
            if mask.shape != img.shape[:2]:
                raise DataError(f"{s.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from "
                                f"its image {s.path} ({img.shape[1]}x{img.shape[0]}); expected the same size")
        return img, mask

    def __getitem__(self, i: int):
        img, mask = self.load_raw(i)
        S = self.input_size
        return self.make_item(resize_image(img, S), resize_mask(mask, S), self.samples[i], i)

    def make_item(self, img: np.ndarray, mask: np.ndarray, s: Sample, index: int) -> dict:
        """The item of an image already at the input size (S, S, C) uint8 and its (S, S) mask:
        normalised (C, S, S) float image, (1, S, S) float mask, label, class id, index."""
        x = img.astype(np.float32).transpose(2, 0, 1) / 255.0
        x = (x - self.mean) / self.std
        return dict(image=torch.from_numpy(np.ascontiguousarray(x)),
                    mask=torch.from_numpy(mask.astype(np.float32)[None]),
                    label=int(s.label), class_id=int(s.class_id), index=int(index))


def split_val(samples: Sequence[Sample], val_fraction: float = 0.1, seed: int = 0
              ) -> Tuple[List[Sample], List[Sample]]:
    """Deterministic (train, val) split of normal training samples, per class (see module doc)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_set = set()
    by_class = {}
    for s in samples:
        by_class.setdefault(s.class_name, []).append(s)
    for name, group in by_class.items():
        k = math.ceil(val_fraction * len(group)) if val_fraction > 0 else 0
        k = min(k, len(group) - 1)   # always keep at least one training image
        key = lambda s: hashlib.sha1(f"{seed}:{name}/{s.path.name}".encode()).hexdigest()  # noqa: E731
        val_set.update(s.path for s in sorted(group, key=key)[:k])
    train = [s for s in samples if s.path not in val_set]
    val = [s for s in samples if s.path in val_set]
    return train, val


def make_datasets(root, classes=None, preprocess: Optional[PreprocessConfig] = None,
                  val_fraction: float = 0.1, seed: int = 0, require_test: bool = True,
                  id_names: Optional[Sequence[str]] = None):
    """(train_ds, val_ds, test_ds, class_names). val = held-out slice of train/good (module doc).

    With `require_test=False` a dataset without test/ folders gives test_ds = None. `id_names`: as
    in `scan_mvtec`.
    """
    pp = preprocess or PreprocessConfig()
    train_s, names = scan_mvtec(root, classes, "train", id_names)
    selected = sorted({s.class_name for s in train_s})
    train_s, val_s = split_val(train_s, val_fraction, seed)
    try:
        test_s, _ = scan_mvtec(root, selected, "test", id_names)
    except DataError:
        parent, _ = find_classes(root)
        if require_test or any((parent / n / "test").exists() for n in selected):
            raise
        test_s = None
    kw = dict(input_size=pp.input_size, channels=pp.channels, mean=pp.mean, std=pp.std, class_names=names)
    test_ds = AnomalyDataset(test_s, **kw) if test_s is not None else None
    return AnomalyDataset(train_s, **kw), AnomalyDataset(val_s, **kw), test_ds, names
