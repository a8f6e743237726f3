"""Tiny PASCAL VOC 2012 + SBD trees in the real on-disk formats, for tests and demos.

VOC: <voc_dir>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette
"P" PNG, classes 0..20, 255 borders), ImageSets/Segmentation/{train,val,trainval}.txt}.
SBD: <sbd_dir>/{img/<id>.jpg, cls/<id>.mat (struct GTcls with Segmentation uint8 [H, W],
Boundaries (20 x 1 cell of sparse [H, W]), CategoriesPresent), train.txt, val.txt,
train_noval.txt}.

Images are 64 wide x 48 high. Two ids are in both VOC train and SBD train_noval; one of
them, 2008_000002, is annotated differently in SBD (cat instead of person + bicycle), so a
test can tell whose annotation was kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from load_dataset.pascal.labels import voc_colormap

HEIGHT, WIDTH = 48, 64

# id -> objects as (class index, (top, left, bottom, right)), bottom/right exclusive.
Objects = list[tuple[int, tuple[int, int, int, int]]]

VOC_TRAIN: dict[str, Objects] = {
    "2008_000002": [(15, (4, 4, 40, 30)), (2, (10, 36, 30, 60))],  # person, bicycle
    "2008_000003": [(7, (5, 5, 25, 60))],  # car
    # dog on the left; a one-pixel bottle near the bottom-right corner, which a resize to
    # 8 x 8 (nearest: rows 0, 6, .., 42, columns 0, 8, .., 56) does not sample.
    "2008_000005": [(12, (0, 0, 48, 20)), (5, (45, 61, 46, 62))],
}
VOC_VAL: dict[str, Objects] = {
    "2008_000010": [(3, (10, 10, 30, 30))],  # bird
    "2008_000011": [(20, (0, 20, 40, 64))],  # tv_monitor
}
SBD_TRAIN_NOVAL: dict[str, Objects] = {
    "2008_000002": [(8, (4, 4, 40, 30))],  # cat: differs from VOC's annotation of this id
    "2008_000003": [(7, (5, 5, 25, 60))],  # car, as in VOC
    "2008_000020": [(9, (20, 10, 44, 50))],  # chair
    "2008_000021": [(15, (2, 2, 46, 20)), (19, (20, 30, 40, 62))],  # person, train
}
ONE_PIXEL = {"image_id": "2008_000005", "class": 5, "row": 45, "col": 61}


def label_of(objects: Objects) -> list[int]:
    """The 20-entry multi-hot vector of an object list (hand-derivable from the tables)."""
    vector = [0] * 20
    for cls, _ in objects:
        vector[cls - 1] = 1
    return vector


def draw_mask(objects: Objects, void_border: bool) -> np.ndarray:
    """uint8 [HEIGHT, WIDTH]: 0 background, the objects' classes, and (VOC) a 255 border."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    for cls, (top, left, bottom, right) in objects:
        if void_border and bottom - top > 2 and right - left > 2:
            mask[max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1] = 255
        mask[top:bottom, left:right] = cls
    return mask


def draw_image(objects: Objects, seed: int) -> np.ndarray:
    """uint8 [HEIGHT, WIDTH, 3]: a noisy gradient with each object in its VOC colour."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, WIDTH)[None, :, None]
    image = np.broadcast_to(ramp, (HEIGHT, WIDTH, 3)) + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    cmap = voc_colormap()
    for cls, (top, left, bottom, right) in objects:
        image[top:bottom, left:right] = cmap[cls]
    return np.clip(image, 0, 255).astype(np.uint8)


def write_voc_mask(path: Path, mask: np.ndarray) -> None:
    """A palette ("P") PNG with the VOC colours, as in SegmentationClass/."""
    image = Image.fromarray(mask, mode="P")
    image.putpalette(voc_colormap().ravel().tolist())
    image.save(path)


def write_sbd_mat(path: Path, mask: np.ndarray) -> None:
    """An SBD cls/<id>.mat: struct GTcls with Segmentation, Boundaries, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        inside = mask == k + 1
        edge = inside & ~np.pad(inside, 1)[1:-1, 2:]  # right-hand edge pixels are enough here
        boundaries[k, 0] = scipy.sparse.csc_matrix(edge.astype(np.uint8))
    present = np.array([v for v in np.unique(mask) if v], dtype=np.uint8).reshape(-1, 1)
    scipy.io.savemat(
        path,
        {"GTcls": {"Segmentation": mask, "Boundaries": boundaries, "CategoriesPresent": present}},
    )


@dataclass
class PascalTree:
    """Where the tiny trees lie and what their masks hold."""

    voc_dir: Path  # holds VOCdevkit/VOC2012
    sbd_dir: Path  # holds img/, cls/, train_noval.txt
    voc_masks: dict[str, np.ndarray] = field(default_factory=dict)
    sbd_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def voc2012(self) -> Path:
        return self.voc_dir / "VOCdevkit" / "VOC2012"

    def voc_image(self, image_id: str) -> Path:
        return self.voc2012 / "JPEGImages" / f"{image_id}.jpg"

    def voc_mask(self, image_id: str) -> Path:
        return self.voc2012 / "SegmentationClass" / f"{image_id}.png"


def _write_list(path: Path, ids: list[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


def make_voc_folders(voc2012: Path) -> None:
    """The folders of a VOC 2012 segmentation tree under `voc2012` (VOCdevkit/VOC2012)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc2012 / sub).mkdir(parents=True, exist_ok=True)


def write_voc_lists(voc2012: Path, train_ids: list[str], val_ids: list[str]) -> None:
    """ImageSets/Segmentation/{train,val,trainval}.txt, one id a line, sorted."""
    lists = voc2012 / "ImageSets" / "Segmentation"
    for name, ids in (("train", train_ids), ("val", val_ids), ("trainval", train_ids + val_ids)):
        _write_list(lists / f"{name}.txt", sorted(ids))


def make_pascal_tree(
    root: Path,
    voc_train: dict[str, Objects] | None = None,
    voc_val: dict[str, Objects] | None = None,
    sbd_train_noval: dict[str, Objects] | None = None,
) -> PascalTree:
    """Writes the trees under root/VOC and root/SBD (defaults: the tables above)."""
    voc_train = VOC_TRAIN if voc_train is None else voc_train
    voc_val = VOC_VAL if voc_val is None else voc_val
    sbd = SBD_TRAIN_NOVAL if sbd_train_noval is None else sbd_train_noval
    tree = PascalTree(voc_dir=root / "VOC", sbd_dir=root / "SBD")

    make_voc_folders(tree.voc2012)
    for n, (image_id, objects) in enumerate(sorted({**voc_train, **voc_val}.items())):
        Image.fromarray(draw_image(objects, seed=n)).save(tree.voc_image(image_id), quality=90)
        mask = draw_mask(objects, void_border=True)
        write_voc_mask(tree.voc_mask(image_id), mask)
        tree.voc_masks[image_id] = mask
    write_voc_lists(tree.voc2012, list(voc_train), list(voc_val))

    for sub in ("img", "cls"):
        (tree.sbd_dir / sub).mkdir(parents=True, exist_ok=True)
    for n, (image_id, objects) in enumerate(sorted(sbd.items())):
        path = tree.sbd_dir / "img" / f"{image_id}.jpg"
        Image.fromarray(draw_image(objects, seed=100 + n)).save(path, quality=90)
        mask = draw_mask(objects, void_border=False)
        write_sbd_mat(tree.sbd_dir / "cls" / f"{image_id}.mat", mask)
        tree.sbd_masks[image_id] = mask
    _write_list(tree.sbd_dir / "train_noval.txt", sorted(sbd))
    # The real SBD also ships train.txt and val.txt (whose ids overlap VOC 2012 val);
    # this repository reads only train_noval.txt.
    _write_list(tree.sbd_dir / "train.txt", sorted(sbd))
    _write_list(tree.sbd_dir / "val.txt", [])
    return tree
