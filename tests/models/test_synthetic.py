"""models.synthetic: determinism, exact masks, MVTec layout, and that defects are detectable."""
import hashlib

import cv2
import numpy as np
import pytest

from models import synthetic
from models.synthetic import DEFECT_TYPES, DEFECTS, KINDS, generate_dataset, render_sample


def _tree_digest(root):
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_same_seed_gives_byte_identical_tree(tmp_path):
    kw = dict(classes=("texture", "object", "fabric", "stripe"), n_train=3, n_test_good=2,
              n_test_defect=5, size=48)
    a = _tree_digest(generate_dataset(tmp_path / "a", seed=7, **kw))
    b = _tree_digest(generate_dataset(tmp_path / "b", seed=7, **kw))
    c = _tree_digest(generate_dataset(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert len(a) == 4 * (1 + 3 + 2 + 2 * 5)          # marker + images + defect masks
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in images) == len(images)  # another seed changes every file


def test_regenerating_into_same_folder_replaces_it(tmp_path):
    generate_dataset(tmp_path, classes=("stripe",), n_train=5, n_test_good=1, n_test_defect=4, size=32)
    first = _tree_digest(tmp_path)
    generate_dataset(tmp_path, classes=("stripe",), n_train=2, n_test_good=1, n_test_defect=4, size=32)
    second = _tree_digest(tmp_path)
    assert len(list((tmp_path / "stripe" / "train" / "good").iterdir())) == 2
    assert set(second) < set(first)


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "texture").mkdir()
    (tmp_path / "texture" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="texture"):
        generate_dataset(tmp_path, classes=("texture",), n_train=1, size=32)
    assert (tmp_path / "texture" / "precious.txt").exists()


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="available: texture"):
        render_sample("marble", 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="scratch"):
        render_sample("texture", 32, np.random.default_rng(0), defect="dent")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_is_exact(kind, defect):
    # The defect is drawn after the normal rendering from the same generator, so the same seed
    # gives the same defect-free image: every changed pixel must be in the mask, and (almost) every
    # mask pixel must have changed.
    for seed in range(3):
        size = [64, 77, 128][seed]
        normal, m0 = render_sample(kind, size, np.random.default_rng(seed))
        bad, mask = render_sample(kind, size, np.random.default_rng(seed), defect=defect)
        assert normal.shape == bad.shape == (size, size, 3) and normal.dtype == np.uint8
        assert mask.shape == (size, size) and set(np.unique(mask)) <= {0, 1}
        assert m0.sum() == 0 and mask.sum() >= 4
        changed = np.any(normal != bad, axis=2)
        assert not np.any(changed & (mask == 0)), "pixels changed outside the mask"
        assert changed[mask == 1].mean() > 0.9
        # visible: mean absolute change inside the mask is large
        diff = np.abs(normal.astype(int) - bad.astype(int)).max(axis=2)[mask == 1]
        assert diff.mean() > 30


def test_layout_and_files(tmp_path):
    root = generate_dataset(tmp_path, classes=("texture", "fabric"), n_train=2, n_test_good=1,
                            n_test_defect=6, size=40, seed=3)
    for kind in ("texture", "fabric"):
        c = root / kind
        assert len(list((c / "train" / "good").glob("*.png"))) == 2
        assert len(list((c / "test" / "good").glob("*.png"))) == 1
        defect_imgs = sorted(p for p in (c / "test").rglob("*.png") if p.parent.name != "good")
        assert len(defect_imgs) == 6
        assert {p.parent.name for p in defect_imgs} == set(DEFECTS)
        for p in defect_imgs:
            m = cv2.imread(str(c / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert m.ndim == 2 and m.shape == (40, 40) and set(np.unique(m)) == {0, 255}
        img = cv2.imread(str(c / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
        assert img.ndim == (2 if kind == "texture" else 3)   # gray class written as 1-channel PNG


def test_cli_writes_tree(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--classes", "object", "--n-train", "2", "--n-test-good", "1",
                    "--n-test-defect", "2", "--size", "32", "--seed", "1"])
    assert len(list((tmp_path / "object" / "train" / "good").glob("*.png"))) == 2
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--classes", "nope"])


def _patch_features(imgs, k=5, stride=2):
    # simple patch descriptors: k x k x 3 neighbourhoods, every `stride` pixels
    feats = []
    for im in imgs:
        x = im.astype(np.float32) / 255.0
        H, W, C = x.shape
        p = np.lib.stride_tricks.sliding_window_view(x, (k, k, C))[::stride, ::stride, 0]
        feats.append(p.reshape(p.shape[0], p.shape[1], -1))
    return np.stack(feats)


@pytest.mark.parametrize("kind", KINDS)
def test_defects_are_found_by_a_tiny_reconstruction_model(kind):
    # A PCA patch "autoencoder" fitted in milliseconds on normal images must rank defective images
    # above normal ones: the generator's defects are visible to a feature-reconstruction model.
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(123)
    size = 64
    train = [render_sample(kind, size, rng)[0] for _ in range(12)]
    test, labels = [], []
    for i in range(16):
        d = None if i % 2 == 0 else DEFECTS[(i // 2) % len(DEFECTS)]
        test.append(render_sample(kind, size, rng, defect=d)[0])
        labels.append(int(d is not None))
    ftr = _patch_features(train)
    X = ftr.reshape(-1, ftr.shape[-1])
    mu = X.mean(0)
    _, _, vt = np.linalg.svd(X - mu, full_matrices=False)
    basis = vt[:12]
    fte = _patch_features(test) - mu
    resid = fte - (fte @ basis.T) @ basis
    err = (resid ** 2).sum(-1)                      # (N, h, w) reconstruction error map
    scores = err.reshape(len(test), -1).max(1)
    assert roc_auc_score(labels, scores) >= 0.9
