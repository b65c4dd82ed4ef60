"""The demo's data view: capped per class and type, class names kept, masks carried along."""
import collections

from models.data import scan_mvtec
from models.synthetic import generate_dataset


def test_subset_folder_caps_and_keeps_classes_and_masks(tmp_path):
    import demo

    src = generate_dataset(tmp_path / "src", classes=("texture", "object"), n_train=7, n_test_good=3,
                           n_test_defect=5, size=32, seed=4)
    view = demo.subset_folder(src, tmp_path / "view", max_train=4, max_test=1)
    train, names = scan_mvtec(view, None, "train")
    test, _ = scan_mvtec(view, None, "test")
    assert names == ["object", "texture"]
    assert collections.Counter(s.class_name for s in train) == {"object": 4, "texture": 4}
    per = collections.Counter((s.class_name, s.defect_type) for s in test)
    src_types = {(s.class_name, s.defect_type) for s in scan_mvtec(src, None, "test")[0]}
    assert set(per) == src_types and set(per.values()) == {1}
    assert all(s.mask_path is not None for s in test if s.label == 1)
