"""load_dataset.pascal.cache through PascalVOC2012(cache_dir=...), and the uint8 fast path."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from load_dataset import custom_pascal
from load_dataset.custom_pascal import PascalVOC2012, read_image
from load_dataset.errors import DataError
from load_dataset.generators.pascal_tree import ONE_PIXEL, make_pascal_tree, write_voc_mask
from load_dataset.pascal import cache as pascal_cache
from load_dataset.pascal.augment import PascalAugment
from load_dataset.pascal.cache import CacheWarning
from load_dataset.pascal.labels import label_vector_from_mask
from load_dataset.utils import IMAGENET_STD, to_tensor_and_normalize
from src.train.loop import BatchPrep

BOTTLE, COW, DOG = 4, 9, 11  # positions in the 20-vector


@pytest.fixture
def tree(tmp_path: Path):
    return make_pascal_tree(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def pascal(tree, setname: str = "train", **kwargs) -> PascalVOC2012:
    kwargs.setdefault("image_size", 8)
    return PascalVOC2012(setname, tree.voc_dir, tree.sbd_dir, **kwargs)


def samples(ds: PascalVOC2012, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    return [ds[i] for i in range(len(ds))]


def assert_same_samples(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        assert x["img_idx"] == y["img_idx"]
        for key in set(x) - {"img_idx"}:
            assert x[key].dtype == y[key].dtype, key
            assert torch.equal(x[key], y[key]), (key, x["img_idx"])


def stem_files(cache: Path, suffix: str) -> list[Path]:
    return sorted(cache.glob(f"pascal_train_8px_*{suffix}"))


def fail(kind: str):
    def reader(path, *args, **kwargs):
        raise AssertionError(f"{kind} {path} decoded although the cache holds it")

    return reader


# ----------------------------------------------------------------- build and reuse


def test_build_writes_the_resized_images_masks_and_labels(tree, cache):
    ds = pascal(tree, cache_dir=cache)
    [images_path] = stem_files(cache, ".images.npy")
    [masks_path] = stem_files(cache, ".masks.npy")
    [meta_path] = stem_files(cache, ".json")
    assert len(list(cache.glob("pascal_train_labels_*.npz"))) == 1
    images, masks = np.load(images_path), np.load(masks_path)
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert masks.dtype == np.uint8 and masks.shape == (5, 8, 8)
    assert images_path.stat().st_size == 128 + 5 * 8 * 8 * 3  # .npy v1 header: 128 bytes
    # 48 x 64 -> 8 x 8 nearest: row 6r, column 8c of the full-resolution mask.
    assert np.array_equal(masks[0], tree.voc_masks["2008_000002"][::6, ::8])
    assert np.array_equal(masks[3], tree.sbd_masks["2008_000020"][::6, ::8])
    meta = json.loads(meta_path.read_text())
    assert meta["image_ids"] == ds.image_ids and meta["image_size"] == 8
    # The labels come from the full-resolution masks: the one-pixel bottle counts.
    i = ds.image_ids.index(ONE_PIXEL["image_id"])
    assert ONE_PIXEL["class"] not in masks[i]
    assert ds.labels[i, BOTTLE] == 1 and ds.labels[i, DOG] == 1
    assert ds.cache.nbytes == 5 * (3 * 64 + 64)


@pytest.mark.parametrize("augment", ["none", "flip"])
@pytest.mark.parametrize("seglabel", [True, False])
def test_cached_samples_equal_uncached_samples(tree, cache, augment, seglabel):
    kwargs = {"augment": augment, "return_seglabel": seglabel, "image_size": 20}
    uncached = pascal(tree, **kwargs)
    built = pascal(tree, cache_dir=cache, **kwargs)  # builds the cache
    reused = pascal(tree, cache_dir=cache, **kwargs)  # reads it
    for seed in (0, 1):
        expected = samples(uncached, seed)
        assert_same_samples(samples(built, seed), expected)
        assert_same_samples(samples(reused, seed), expected)
    assert np.array_equal(reused.labels, uncached.labels)
    if augment == "flip":  # the seeds above flip some samples and not others
        flipped = [
            torch.equal(a["data"], b["data"].flip(-1)) and not torch.equal(a["data"], b["data"])
            for a, b in zip(samples(reused, 0), samples(pascal(tree, image_size=20), 0))
        ]
        assert 0 < sum(flipped) < len(flipped)


def test_second_construction_decodes_no_file(tree, cache, monkeypatch):
    first = samples(pascal(tree, cache_dir=cache))
    monkeypatch.setattr(custom_pascal, "read_image", fail("image"))
    monkeypatch.setattr(custom_pascal, "read_mask", fail("mask"))
    second = pascal(tree, cache_dir=cache)
    assert_same_samples(samples(second), first)


def test_loader_workers_read_the_cache(tree, cache):
    uncached = pascal(tree, return_seglabel=False, augment="flip")
    cached = pascal(tree, return_seglabel=False, augment="flip", cache_dir=cache)
    expected = samples(uncached)
    assert_same_samples(samples(cached), expected)  # opens the memory maps
    # What a spawned worker receives: the dataset without the memory maps in it.
    copy = pickle.loads(pickle.dumps(cached))
    assert copy.cache._images is None and copy.cache._masks is None
    assert_same_samples(samples(copy), expected)

    def batches(ds):
        gen = torch.Generator().manual_seed(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, generator=gen)
        return [b["data"] for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(cached), batches(uncached)))


def test_cached_crops_come_from_the_resized_image(tree, cache):
    ds = pascal(tree, augment="flip_scale_crop", cache_dir=cache)
    i = ds.image_ids.index(ONE_PIXEL["image_id"])  # dog + a bottle the 8 x 8 resize erases
    torch.manual_seed(0)
    labels = []
    for _ in range(40):
        sample = ds[i]
        label = set(torch.nonzero(sample["label"]).ravel().tolist())
        in_seglabel = {v - 1 for v in sample["seglabel"].unique().tolist() if 1 <= v <= 20}
        assert in_seglabel <= label <= {DOG}  # the erased bottle can never come back
        assert sample["data"].shape == (3, 8, 8)
        labels.append(label)
    assert {DOG} in labels and set() in labels  # some crops miss the dog on the left


# ----------------------------------------------------------------- staleness


def test_a_changed_mask_or_image_rebuilds_the_cache(tree, cache):
    old = samples(pascal(tree, cache_dir=cache))
    changed = np.zeros((48, 64), dtype=np.uint8)
    changed[:, 32:] = 10  # 2008_000003 now shows a cow on the right half instead of a car
    write_voc_mask(tree.voc_mask("2008_000003"), changed)
    ds = pascal(tree, cache_dir=cache)
    assert len(stem_files(cache, ".json")) == 2
    assert np.flatnonzero(ds.labels[1]).tolist() == [COW]
    assert ds[1]["seglabel"].tolist() == [[0] * 4 + [10] * 4] * 8

    Image.new("RGB", (64, 48), (200, 30, 90)).save(tree.voc_image("2008_000005"), quality=95)
    ds = pascal(tree, cache_dir=cache)
    assert len(stem_files(cache, ".json")) == 3
    data = ds[2]["data"].int()
    colour = torch.tensor([200, 30, 90]).view(3, 1, 1)
    assert (data - colour).abs().max() <= 3  # JPEG's rounding of a flat colour
    assert_same_samples(samples(ds), samples(pascal(tree)))
    assert not torch.equal(ds[2]["data"], old[2]["data"])


# ----------------------------------------------------------------- damage


def _damage(cache: Path, how: str) -> None:
    [images] = stem_files(cache, ".images.npy")
    [masks] = stem_files(cache, ".masks.npy")
    [meta] = stem_files(cache, ".json")
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:200])
    elif how == "one byte too many":
        masks.write_bytes(masks.read_bytes() + b"\0")
    elif how == "header":
        data = bytearray(images.read_bytes())
        data[:6] = b"GARBAG"
        images.write_bytes(bytes(data))
    elif how == "altered row":
        data = bytearray(images.read_bytes())
        data[128:140] = bytes(~np.frombuffer(bytes(data[128:140]), np.uint8))
        images.write_bytes(bytes(data))
    elif how == "masks missing":
        masks.unlink()
    elif how == "json":
        meta.write_text("{not json")


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncated", "truncated"),
        ("one byte too many", "masks.npy: the file has 449 bytes, expected 448"),
        ("header", "truncated or not a .npy"),
        ("altered row", "row 0 does not match its CRC"),
        ("masks missing", "missing"),
        ("json", "JSON file cannot be read"),
    ],
)
def test_a_damaged_cache_is_named_and_rebuilt(tree, cache, how, reason):
    expected = samples(pascal(tree))
    pascal(tree, cache_dir=cache)
    _damage(cache, how)
    with pytest.warns(CacheWarning, match=f"unusable .*{reason}.*rebuilding it") as record:
        ds = pascal(tree, cache_dir=cache)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert_same_samples(samples(ds), expected)
    assert len(stem_files(cache, ".json")) == 1


def test_a_failed_build_leaves_nothing_that_looks_valid(tree, cache, monkeypatch):
    real_read_image, calls = custom_pascal.read_image, []

    def dies_on_the_fourth(path, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise DataError(f"Image {path} cannot be decoded (simulated).")
        return real_read_image(path, **kwargs)

    monkeypatch.setattr(custom_pascal, "read_image", dies_on_the_fourth)
    with pytest.raises(DataError, match="simulated"):
        pascal(tree, cache_dir=cache)
    left = sorted(p.name for p in cache.iterdir())
    assert [n for n in left if not n.endswith(".lock")] == []  # no .npy, .json or .tmp

    monkeypatch.setattr(custom_pascal, "read_image", real_read_image)
    stem = stem_files(cache, ".lock")[0].name[: -len(".lock")]
    leftover = cache / f".{stem}.images.npy.x1y2.tmp"  # what a SIGKILLed build leaves
    leftover.write_bytes(b"half")
    assert_same_samples(samples(pascal(tree, cache_dir=cache)), samples(pascal(tree)))
    assert not leftover.exists()


def _build_in_child(args: tuple[Path, Path, Path, int]) -> list[list[int]]:
    voc_dir, sbd_dir, cache, size = args
    torch.set_num_threads(1)  # as a DataLoader worker does: no intra-op pool after a fork
    ds = PascalVOC2012("train", voc_dir, sbd_dir, image_size=size, cache_dir=cache)
    return [ds[i]["data"].sum().item() for i in range(len(ds))] + [ds.labels.tolist()]


def test_ranks_building_at_once_agree(tree, cache):
    args = (tree.voc_dir, tree.sbd_dir, cache, 8)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_in_child, [args] * 3)
    assert results[0] == results[1] == results[2] == _build_in_child(args)
    assert len(stem_files(cache, ".json")) == 1
    assert not list(cache.glob("*.tmp"))


# ----------------------------------------------------------------- fast path == float path


@pytest.mark.parametrize("size", [24, 40])
def test_uint8_batches_normalised_on_the_device_match_the_float_path(tree, size):
    ds = pascal(tree, image_size=size, return_seglabel=False)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    assert batch["data"].dtype == torch.uint8
    x, y = BatchPrep(ds, torch.device("cpu"), channels_last=False)(batch)
    reference = torch.stack(
        [
            to_tensor_and_normalize(
                Image.open(e.image_path).convert("RGB").resize((size, size), Image.BILINEAR)
            )
            for e in ds.entries
        ]
    )
    assert x.dtype == torch.float32 and x.shape == reference.shape == (5, 3, size, size)
    # Both resize with antialiased bilinear weights; uint8 rounding may differ by one level.
    assert (x - reference).abs().max() <= 1 / 255 / min(IMAGENET_STD) + 1e-5
    assert torch.equal(y, torch.from_numpy(ds.labels))


def test_batch_normalisation_by_hand(tree):
    ds = pascal(tree, image_size=4, return_seglabel=False)
    batch = {"data": torch.tensor([255, 0, 51], dtype=torch.uint8).view(1, 3, 1, 1)}
    batch["label"] = torch.zeros(1, 20)
    x, _ = BatchPrep(ds, torch.device("cpu"), channels_last=False)(batch)
    # (255/255 - 0.485) / 0.229, (0 - 0.456) / 0.224, (51/255 - 0.406) / 0.225
    expected = [2.2489083, -2.0357143, -0.9155556]
    assert x.ravel().tolist() == pytest.approx(expected, abs=1e-6)


def test_cache_dir_that_cannot_be_made_is_one_clear_error(tree, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cache_dir .*a-file.* cannot be created"):
        pascal(tree, cache_dir=blocker / "cache")


def test_fingerprint_follows_ids_size_and_files(tree):
    entries = pascal(tree).entries
    fp = pascal_cache.split_fingerprint(entries, "train", 8)
    assert fp == pascal_cache.split_fingerprint(list(entries), "train", 8)
    assert fp != pascal_cache.split_fingerprint(entries, "train", 16)
    assert fp != pascal_cache.split_fingerprint(entries[:-1], "train", 8)
    tree.voc_image("2008_000003").write_bytes(tree.voc_image("2008_000003").read_bytes() + b"\0")
    assert fp != pascal_cache.split_fingerprint(entries, "train", 8)


# ----------------------------------------------------------------- per-image work


def test_padded_read_resizes_to_the_same_pixels(tree, tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(np.arange(48 * 64).reshape(48, 64).astype(np.uint8)).save(grey)  # mode L
    resize = PascalAugment("none", 20)
    for path in (str(tree.voc_image("2008_000002")), str(grey)):
        rgb, padded = read_image(path), read_image(path, padded=True)
        assert rgb.shape == (3, 48, 64) and padded.shape == (4, 48, 64)
        assert torch.equal(padded[:3], rgb)
        small = resize(padded)[0]
        assert small.shape == (3, 20, 20) and torch.equal(small, resize(rgb)[0])
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])  # grey -> R = G = B


@pytest.mark.parametrize(
    "mask, classes",
    [
        ([[5]], [5]),
        ([[5, 0], [0, 0]], [5]),  # only the first pixel
        ([[0, 0], [0, 7]], [7]),  # only the last pixel
        ([[0, 3, 3, 0], [255, 255, 0, 20]], [3, 20]),
        ([[1, 1], [1, 1]], [1]),
    ],
)
def test_labels_from_run_starts_see_every_value(mask, classes):
    label = label_vector_from_mask(np.array(mask, dtype=np.uint8))
    assert (np.flatnonzero(label) + 1).tolist() == classes


def test_labels_from_run_starts_match_a_set_of_all_pixels():
    rng = np.random.default_rng(0)
    values = np.array([0, 255, 2, 9, 15, 20], dtype=np.uint8)
    for _ in range(20):
        mask = np.repeat(rng.choice(values, (30, 8)), rng.integers(1, 6), axis=1)
        expected = sorted(v for v in set(mask.ravel().tolist()) if 1 <= v <= 20)
        assert (np.flatnonzero(label_vector_from_mask(mask)) + 1).tolist() == expected
    assert label_vector_from_mask(np.zeros((0, 0), np.uint8)).tolist() == [0.0] * 20
    with pytest.raises(DataError, match="value 21 "):
        label_vector_from_mask(np.array([[0, 0, 21]], dtype=np.uint8))
