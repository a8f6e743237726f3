"""load_dataset.custom_pascal on tiny VOC 2012 + SBD trees in the real on-disk formats."""

from __future__ import annotations

import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from load_dataset import custom_pascal
from load_dataset.custom_pascal import (
    PascalVOC2012,
    build_augmentation_gallery,
    get_all_labels_string,
    get_label_vector,
    return_label_names,
    save_visualization,
    voc_colormap,
)
from load_dataset.errors import DataError
from load_dataset.generators.pascal_tree import (
    ONE_PIXEL,
    SBD_TRAIN_NOVAL,
    VOC_TRAIN,
    VOC_VAL,
    label_of,
    make_pascal_tree,
    write_voc_mask,
)
from load_dataset.pascal.visualize import caption

BICYCLE, BOTTLE, CAT, DOG, PERSON = 1, 4, 7, 11, 14  # positions in the 20-vector


@pytest.fixture
def tree(tmp_path: Path):
    return make_pascal_tree(tmp_path)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every host name lookup fails at once (as on a machine without DNS)."""

    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)


def pascal(tree, setname: str = "train", **kwargs) -> PascalVOC2012:
    kwargs.setdefault("image_size", 32)
    return PascalVOC2012(setname, tree.voc_dir, tree.sbd_dir, **kwargs)


# ----------------------------------------------------------------- label conversion


def test_get_label_vector_on_hand_made_masks():
    mask = np.array([[0, 0, 15], [255, 1, 1]], dtype=np.uint8)
    expected = [0] * 20
    expected[0] = 1  # 1 = airplane
    expected[PERSON] = 1  # 15 = person
    assert get_label_vector(mask) == expected
    image = Image.fromarray(mask, mode="P")
    assert get_label_vector(image) == expected
    assert get_label_vector(np.array([[0, 255], [255, 0]])) == [0] * 20
    assert get_label_vector(np.array([[20]], dtype=np.int64)) == [0] * 19 + [1]


@pytest.mark.parametrize("bad", [21, 254, -1, 300])
def test_get_label_vector_rejects_values_outside_the_classes(bad):
    mask = np.array([[0, 15], [bad, 255]], dtype=np.int64)
    with pytest.raises(DataError, match=f"value {bad} "):
        get_label_vector(mask)


def test_get_label_vector_rejects_colour_masks():
    with pytest.raises(DataError, match="RGB"):
        get_label_vector(Image.new("RGB", (4, 4)))


def test_label_names_string_and_colours():
    names = return_label_names()
    assert len(names) == 20
    assert names[0] == "airplane" and names[10] == "dining_table" and names[19] == "tv_monitor"
    vector = [0] * 20
    vector[BICYCLE] = vector[PERSON] = 1
    # The tutorial's string: names joined by one space, '' for no object; figures caption.
    assert get_all_labels_string(vector) == "bicycle person"
    assert get_all_labels_string([0] * 20) == ""
    assert caption(vector) == "bicycle, person"
    assert caption(torch.zeros(20)) == "(no object)"
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128]
    assert cmap[255].tolist() == [224, 224, 192]


# ----------------------------------------------------------------- splits


def test_train_is_voc_train_plus_sbd_without_duplicates(tree):
    ds = pascal(tree, "train")
    # VOC train: 02, 03, 05; SBD train_noval: 02, 03, 20, 21 -> 5 distinct ids, 2 dropped.
    assert ds.image_ids == [
        "2008_000002",
        "2008_000003",
        "2008_000005",
        "2008_000020",
        "2008_000021",
    ]
    assert len(ds) == 5
    assert ds.source_counts == {"voc": 3, "sbd": 2, "duplicates_dropped": 2}
    assert [e.source for e in ds.entries] == ["voc", "voc", "voc", "sbd", "sbd"]
    # 2008_000002 is person + bicycle in VOC but cat in SBD: VOC's annotation is kept.
    shared = ds.labels[0]
    assert shared[PERSON] == 1 and shared[BICYCLE] == 1 and shared[CAT] == 0
    expected = [
        label_of(VOC_TRAIN["2008_000002"]),
        label_of(VOC_TRAIN["2008_000003"]),
        label_of(VOC_TRAIN["2008_000005"]),
        label_of(SBD_TRAIN_NOVAL["2008_000020"]),
        label_of(SBD_TRAIN_NOVAL["2008_000021"]),
    ]
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (5, 20)
    assert ds.labels.tolist() == expected
    assert ds.label_meanings == return_label_names()


def test_without_sbd_train_is_voc_train(tree):
    ds = PascalVOC2012("train", tree.voc_dir, image_size=32)
    assert ds.image_ids == sorted(VOC_TRAIN)
    assert ds.source_counts == {"voc": 3, "sbd": 0, "duplicates_dropped": 0}
    # "" (what --sbd-dir '' gives) also means VOC alone.
    assert PascalVOC2012("train", tree.voc_dir, "", image_size=32).image_ids == ds.image_ids


def test_missing_sbd_folder_says_how_to_do_without_it(tree, tmp_path):
    with pytest.raises(DataError, match="SBD folder not found at .*no-sbd") as info:
        PascalVOC2012("train", tree.voc_dir, tmp_path / "no-sbd", image_size=32)
    assert str(info.value).endswith("or pass --sbd-dir '' to train on VOC 2012 alone.")
    assert _alone(info.value)


def test_val_is_voc_val_and_shares_no_id_with_train(tree):
    train, val = pascal(tree, "train"), pascal(tree, "val")
    assert val.image_ids == sorted(VOC_VAL)
    assert val.labels.tolist() == [label_of(VOC_VAL[k]) for k in sorted(VOC_VAL)]
    assert not set(train.image_ids) & set(val.image_ids)


def test_a_val_id_in_sbd_train_noval_is_refused(tmp_path):
    leaky = {**SBD_TRAIN_NOVAL, "2008_000010": [(3, (1, 1, 9, 9))]}
    tree = make_pascal_tree(tmp_path, sbd_train_noval=leaky)
    for setname in ("train", "val"):
        with pytest.raises(DataError, match="2008_000010.*train_noval"):
            pascal(tree, setname)


def test_unknown_setname_and_augment_are_named(tree):
    with pytest.raises(ValueError, match="'test'.*'train' or 'val'"):
        pascal(tree, "test")
    with pytest.raises(ValueError, match="'rotate'.*'flip_scale_crop'"):
        pascal(tree, augment="rotate")


@pytest.mark.parametrize("given", ["root", "VOCdevkit", "VOC2012"])
def test_voc_dir_may_be_the_root_vocdevkit_or_voc2012(tree, given):
    folder = {
        "root": tree.voc_dir,
        "VOCdevkit": tree.voc_dir / "VOCdevkit",
        "VOC2012": tree.voc2012,
    }[given]
    ds = PascalVOC2012("val", folder, image_size=32)
    assert ds.image_ids == sorted(VOC_VAL)


def test_torchvision_reads_the_same_masks(tree):
    from torchvision.datasets import SBDataset, VOCSegmentation

    voc = VOCSegmentation(str(tree.voc_dir), year="2012", image_set="train")
    for i, path in enumerate(voc.masks):
        assert np.array_equal(custom_pascal.read_mask(path), np.array(voc[i][1]))
    sbd = SBDataset(str(tree.sbd_dir), image_set="train_noval", mode="segmentation")
    for i, path in enumerate(sbd.masks):
        assert np.array_equal(custom_pascal.read_mask(path), np.array(sbd[i][1]))


# ----------------------------------------------------------------- samples


def test_sample_shapes_and_types(tree):
    ds = pascal(tree, "train", image_size=24)
    sample = ds[3]
    assert set(sample) == {"data", "label", "seglabel", "img_idx"}
    assert sample["data"].shape == (3, 24, 24) and sample["data"].dtype == torch.uint8
    assert sample["label"].shape == (20,) and sample["label"].dtype == torch.float32
    assert sample["seglabel"].shape == (24, 24) and sample["seglabel"].dtype == torch.int64
    assert sample["img_idx"] == 3
    assert sample["label"].tolist() == ds.labels[3].tolist()
    assert ds.mean_std == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert "seglabel" not in pascal(tree, "train", return_seglabel=False)[0]


def test_seglabel_is_the_nearest_neighbour_of_the_full_mask(tree):
    ds = pascal(tree, "train", image_size=8)
    full = tree.voc_masks["2008_000002"]  # 48 x 64 with 255 borders
    seglabel = ds[0]["seglabel"].numpy()
    # 48 / 8 = 6 rows and 64 / 8 = 8 columns per output pixel: row 6r, column 8c is sampled.
    assert np.array_equal(seglabel, full[::6, ::8])
    assert set(np.unique(seglabel)) <= set(np.unique(full))


def test_label_comes_from_the_full_resolution_mask(tree):
    ds = pascal(tree, "train", image_size=8)
    i = ds.image_ids.index(ONE_PIXEL["image_id"])
    sample = ds[i]
    assert ONE_PIXEL["class"] not in sample["seglabel"].unique().tolist()  # resizing erased it
    assert sample["label"][BOTTLE] == 1 and sample["label"][DOG] == 1


def test_no_mask_is_decoded_per_sample_without_seglabel_or_crop(tree, monkeypatch):
    datasets = [pascal(tree, augment=a, return_seglabel=False) for a in ("none", "flip")]

    def no_masks(path):
        raise AssertionError(f"mask {path} decoded")

    monkeypatch.setattr(custom_pascal, "read_mask", no_masks)
    for ds in datasets:
        for i in range(len(ds)):
            assert ds[i]["label"].tolist() == ds.labels[i].tolist()


def test_flip_moves_image_and_mask_together(tree):
    plain = pascal(tree, "train", image_size=16)
    flipping = pascal(tree, "train", image_size=16, augment="flip")
    torch.manual_seed(0)
    flipped = 0
    for _ in range(4):
        for i in range(len(plain)):
            a, b = plain[i], flipping[i]
            # The images are gradients, never mirror-symmetric: the data tells a flip.
            if torch.equal(b["data"], a["data"].flip(-1)):
                assert torch.equal(b["seglabel"], a["seglabel"].flip(-1))
                flipped += 1
            else:
                assert torch.equal(b["data"], a["data"])
                assert torch.equal(b["seglabel"], a["seglabel"])
            assert torch.equal(b["label"], a["label"])
    assert 0 < flipped < 4 * len(plain)


def test_cropping_recomputes_the_label_from_the_cropped_mask(tree):
    ds = pascal(tree, "train", image_size=16, augment="flip_scale_crop")
    i = ds.image_ids.index("2008_000002")  # person on the left, bicycle on the right
    full = set(np.flatnonzero(ds.labels[i]).tolist())
    torch.manual_seed(0)
    seen = []
    for _ in range(30):
        sample = ds[i]
        label = set(torch.nonzero(sample["label"]).ravel().tolist())
        in_seglabel = {v - 1 for v in sample["seglabel"].unique().tolist() if 1 <= v <= 20}
        assert in_seglabel <= label <= full
        seen.append(label)
    assert any(label != full for label in seen)  # some crop removed an object
    assert full in seen


def test_cropping_without_seglabel_still_updates_labels(tree):
    ds = pascal(tree, "train", image_size=16, augment="full", return_seglabel=False)
    i = ds.image_ids.index("2008_000002")
    torch.manual_seed(1)
    labels = {tuple(ds[i]["label"].tolist()) for _ in range(30)}
    assert len(labels) > 1


def test_augmentation_follows_torch_seed(tree):
    ds = pascal(tree, "train", image_size=16, augment="full")
    torch.manual_seed(5)
    first = [ds[i] for i in range(len(ds))]
    torch.manual_seed(5)
    second = [ds[i] for i in range(len(ds))]
    for a, b in zip(first, second):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["seglabel"], b["seglabel"])
        assert torch.equal(a["label"], b["label"])
    torch.manual_seed(6)
    third = [ds[i] for i in range(len(ds))]
    assert any(not torch.equal(a["data"], c["data"]) for a, c in zip(first, third))


def test_seeded_loader_workers_repeat_the_augmentations(tree):
    ds = pascal(tree, "train", image_size=16, augment="full")

    def batches():
        loader = torch.utils.data.DataLoader(
            ds, batch_size=5, num_workers=2, generator=torch.Generator().manual_seed(7)
        )
        return [b["data"] for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(), batches()))


def test_validation_is_never_augmented(tree):
    plain = pascal(tree, "val", image_size=16)
    asked = pascal(tree, "val", image_size=16, augment="full")
    assert asked.augment == "none"
    for seed in range(3):
        torch.manual_seed(seed)
        for i in range(len(plain)):
            a, b = plain[i], asked[i]
            assert torch.equal(a["data"], b["data"]) and torch.equal(a["label"], b["label"])


# ----------------------------------------------------------------- label cache


def test_label_table_cache_is_reused_and_notices_changed_masks(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = pascal(tree, "train", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    real_read_mask = custom_pascal.read_mask

    def no_masks(path):
        raise AssertionError(f"mask {path} decoded although cached")

    monkeypatch.setattr(custom_pascal, "read_mask", no_masks)
    second = pascal(tree, "train", cache_dir=cache, return_seglabel=False)
    assert np.array_equal(first.labels, second.labels)

    monkeypatch.setattr(custom_pascal, "read_mask", real_read_mask)
    changed = np.zeros((48, 64), dtype=np.uint8)
    changed[10:20, 10:20] = 10  # 2008_000003 now shows a cow instead of a car
    write_voc_mask(tree.voc_mask("2008_000003"), changed)
    third = pascal(tree, "train", cache_dir=cache)
    assert np.flatnonzero(third.labels[1]).tolist() == [9]
    assert len(list(cache.glob("*.npz"))) == 2


# ----------------------------------------------------------------- user errors


def _alone(error: BaseException) -> bool:
    """True when the error would print without a chained traceback from deep inside."""
    return error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_missing_folder_is_one_clear_error(tree, tmp_path):
    with pytest.raises(DataError, match="not found at .*nowhere.*data_README.md") as info:
        PascalVOC2012("train", tmp_path / "nowhere")
    assert _alone(info.value)


def test_misspelt_folder_suggests_the_close_name(tree):
    with pytest.raises(DataError, match=r"did you mean .*VOC\?"):
        PascalVOC2012("train", tree.voc_dir.parent / "VCO")
    with pytest.raises(DataError, match=r"did you mean .*SBD\?"):
        PascalVOC2012("train", tree.voc_dir, tree.voc_dir.parent / "SDB")


def test_folder_without_vocdevkit_names_the_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="VOCdevkit/VOC2012"):
        PascalVOC2012("train", tmp_path / "empty")


def test_voc2012_outside_vocdevkit_is_explained(tree, tmp_path):
    moved = tmp_path / "elsewhere" / "VOC2012"
    shutil.move(tree.voc2012, moved)
    with pytest.raises(DataError, match="inside a folder named VOCdevkit"):
        PascalVOC2012("train", moved)


def test_incomplete_folders_are_named(tree):
    (tree.sbd_dir / "train_noval.txt").unlink()
    with pytest.raises(DataError, match="train_noval.txt missing"):
        pascal(tree)
    shutil.rmtree(tree.voc2012 / "SegmentationClass")
    with pytest.raises(DataError, match="SegmentationClass missing"):
        pascal(tree)


def test_a_listed_file_that_is_missing_is_named(tree):
    tree.voc_image("2008_000011").unlink()
    with pytest.raises(DataError, match="2008_000011.jpg"):
        pascal(tree, "train")


def test_a_corrupt_jpeg_is_named_when_read(tree):
    path = tree.voc_image("2008_000003")
    path.write_bytes(path.read_bytes()[:200])  # truncated
    ds = pascal(tree, "train")
    with pytest.raises(DataError, match="2008_000003.jpg.*corrupt") as info:
        ds[ds.image_ids.index("2008_000003")]
    assert _alone(info.value)


@pytest.mark.parametrize("damage", ["bytes", "value", "rgb", "mat"])
def test_a_bad_mask_is_named_when_the_dataset_is_built(tree, damage):
    if damage == "bytes":
        path = tree.voc_mask("2008_000005")
        path.write_bytes(b"not a png at all")
    elif damage == "value":
        path = tree.voc_mask("2008_000005")
        mask = tree.voc_masks["2008_000005"].copy()
        mask[0, 0] = 21
        write_voc_mask(path, mask)
    elif damage == "rgb":
        path = tree.voc_mask("2008_000005")
        Image.new("RGB", (64, 48)).save(path)
    else:
        path = tree.sbd_dir / "cls" / "2008_000020.mat"
        path.write_bytes(b"MATLAB 5.0 broken")
    with pytest.raises(DataError, match=path.name) as info:
        pascal(tree, "train")
    if damage == "value":
        assert "value 21" in str(info.value)


def test_download_offline_is_one_clear_error(tmp_path, offline):
    with pytest.raises(DataError, match="PASCAL VOC 2012 from https://.*data_README.md") as info:
        PascalVOC2012("train", tmp_path / "VOC", download=True)
    assert _alone(info.value)


def test_sbd_download_offline_is_one_clear_error(tree, tmp_path, offline):
    with pytest.raises(DataError, match="Downloading SBD from .*data_README.md"):
        PascalVOC2012("train", tree.voc_dir, tmp_path / "SBD-new", download=True)
    (tree.sbd_dir / "train_noval.txt").unlink()
    with pytest.raises(DataError, match="SBD train_noval.txt .*data_README.md"):
        pascal(tree, download=True)


def test_download_is_skipped_when_the_data_is_there(tree, offline):
    assert len(pascal(tree, "train", download=True)) == 5


# ----------------------------------------------------------------- pictures


def _colours(path: Path) -> Counter:
    """Pixels of each RGB colour in a PNG."""
    rgb = Image.open(path).convert("RGB")
    return Counter({c: n for n, c in rgb.getcolors(maxcolors=rgb.width * rgb.height)})


# VOC colours (literal, not from the code's colour map): person, bicycle, dog.
PERSON_RGB, BICYCLE_RGB, DOG_RGB = (192, 128, 128), (0, 128, 0), (64, 0, 128)


def test_save_visualization_writes_a_png(tree, tmp_path):
    ds = pascal(tree, "train")
    image, mask = ds.full_resolution(0)
    out = save_visualization(image, mask, ds.labels[0], tmp_path / "pictures" / "sample.png")
    # 2008_000002: a person and a bicycle, drawn in their VOC colours; no dog.
    colours = _colours(out)
    assert colours[PERSON_RGB] > 200 and colours[BICYCLE_RGB] > 100 and colours[DOG_RGB] == 0
    sample = ds[0]
    out2 = save_visualization(sample["data"], sample["seglabel"], None, tmp_path / "s.png")
    assert _colours(out2)[PERSON_RGB] > 200
    assert Image.open(out2).size == (800, 420)


def test_augmentation_gallery_on_a_pascal_image_and_on_a_tiny_image(tree, tmp_path):
    ds = pascal(tree, "train")
    image, mask = ds.full_resolution(2)
    rng_before = torch.get_rng_state()
    out = build_augmentation_gallery(image, tmp_path / "g.png", mask=mask, n_samples=3)
    assert _colours(out)[DOG_RGB] > 200  # 2008_000005's dog, in every mask row
    assert torch.equal(torch.get_rng_state(), rng_before)
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    out = build_augmentation_gallery(tiny, tmp_path / "tiny.png", augment="full", n_samples=4)
    assert len(_colours(out)) > 500  # random pixels drawn, not a blank canvas
    assert Image.open(out).size[0] == 4 * 180
