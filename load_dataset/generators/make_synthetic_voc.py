"""Writes a synthetic PASCAL VOC 2012 tree with photo-sized JPEGs, for benchmarks anywhere.

    python -m load_dataset.generators.make_synthetic_voc --out /tmp/synthvoc --n 200

Layout (what PascalVOC2012 reads): <out>/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg,
SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val,trainval}.txt}.

Images have the sizes of VOC photos (500 x 375 mostly, some portrait or 500 x 333) and
photo-like content, so that decoding costs what a real one costs: a smooth background
lit from one side with a colour cast, 1-4 objects (ellipses, boxes, polygons) with their own
colour, shading and texture, texture mostly in brightness as in real photos, sensor-like
noise, saved as JPEG quality 90
with 4:2:0 chroma subsampling (~65-70 KB per image). Masks are
palette PNGs with the objects' class indices (1..20) on 0 background and the VOC void
border (255, 4 pixels wide) around each object. The output is a function of the seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from load_dataset.generators.pascal_tree import make_voc_folders, write_voc_lists, write_voc_mask
from load_dataset.pascal.labels import VOID

# (height, width) of VOC photos: the longer side is 500; landscape 4:3 is the commonest.
SIZES = ((375, 500), (375, 500), (375, 500), (333, 500), (500, 375))
JPEG_QUALITY = 90
VOID_WIDTH = 4


def _smooth_field(
    rng: np.random.Generator, height: int, width: int, cells: int, channels: int = 1
) -> np.ndarray:
    """float32 [H, W, channels] in about [-1, 1]: a coarse random grid, upsampled bicubic.

    `cells` grid rows over the height: 3-6 gives lighting and colour casts, 20-80 texture.
    """
    grid = (cells, max(2, cells * width // height))
    planes = []
    for _ in range(channels):
        coarse = Image.fromarray(rng.uniform(-1, 1, grid).astype(np.float32), mode="F")
        planes.append(np.asarray(coarse.resize((width, height), Image.BICUBIC)))
    return np.stack(planes, axis=-1)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 1]: luminance detail at two scales (real photos vary mostly in brightness)."""
    return 14 * _smooth_field(rng, height, width, 24) + 14 * _smooth_field(rng, height, width, 70)


def draw_photo(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic photo and its mask: uint8 [H, W, 3] RGB and uint8 [H, W] (0..20, 255)."""
    base = rng.uniform(50, 200, 3)
    light = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.3), width)[None, :, None]
    image = base * light + 40 * _smooth_field(rng, height, width, 4)  # brightness
    image = image + 20 * _smooth_field(rng, height, width, 3, channels=3)  # colour cast
    image = image + _texture(rng, height, width)
    mask = Image.new("L", (width, height), 0)
    owner_img = Image.new("L", (width, height), 0)  # which object (1-based) owns each pixel
    n_objects = int(rng.integers(1, 5))
    for k in range(n_objects):
        cls = int(rng.integers(1, 21))
        h, w = rng.uniform(0.2, 0.6) * height, rng.uniform(0.15, 0.5) * width
        top, left = rng.uniform(0, height - h), rng.uniform(0, width - w)
        kind = ("ellipse", "box", "polygon")[int(rng.integers(3))]
        if kind == "polygon":
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            cx, cy = left + w / 2, top + h / 2
            shape = [(cx + w / 2 * np.cos(a), cy + h / 2 * np.sin(a)) for a in angles]
        else:
            shape = [left, top, left + w, top + h]
        for canvas, fill, outline in ((mask, cls, VOID), (owner_img, k + 1, k + 1)):
            draw = ImageDraw.Draw(canvas)
            if kind == "ellipse":
                draw.ellipse(shape, fill=fill, outline=outline, width=VOID_WIDTH)
            elif kind == "box":
                draw.rectangle(shape, fill=fill, outline=outline, width=VOID_WIDTH)
            else:
                draw.polygon(shape, fill=fill, outline=outline, width=VOID_WIDTH)
    owner = np.asarray(owner_img)
    for k in range(n_objects):
        inside = owner == k + 1
        shading = 40 * _smooth_field(rng, height, width, 5) + _texture(rng, height, width)
        image[inside] = rng.uniform(20, 235, 3) + shading[inside]
    noise = rng.normal(0, 8, (height, width, 1)) + rng.normal(0, 1, (height, width, 3))
    photo = np.clip(image + noise, 0, 255).astype(np.uint8)
    return photo, np.asarray(mask, dtype=np.uint8)


def write_synthetic_voc(
    out: str | Path, n_train: int, n_val: int | None = None, seed: int = 0
) -> Path:
    """Writes `n_train` + `n_val` (default n_train // 8, at least 1) images; returns `out`.

    Ids are 2012_000000, 2012_000001, ... in order; the first `n_train` form train.txt.
    """
    out = Path(out)
    n_val = max(1, n_train // 8) if n_val is None else n_val
    voc = out / "VOCdevkit" / "VOC2012"
    make_voc_folders(voc)
    rng = np.random.default_rng(seed)
    ids = [f"2012_{n:06d}" for n in range(n_train + n_val)]
    for image_id in ids:
        height, width = SIZES[int(rng.integers(len(SIZES)))]
        photo, mask = draw_photo(rng, height, width)
        Image.fromarray(photo).save(
            voc / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY, subsampling="4:2:0"
        )
        write_voc_mask(voc / "SegmentationClass" / f"{image_id}.png", mask)
    write_voc_lists(voc, ids[:n_train], ids[n_train:])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write VOCdevkit/VOC2012 into")
    parser.add_argument("--n", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--n-val", type=int, default=None, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_synthetic_voc(args.out, args.n, args.n_val, args.seed)
    print(f"wrote {root / 'VOCdevkit' / 'VOC2012'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
