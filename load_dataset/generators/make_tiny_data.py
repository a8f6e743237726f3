"""Generates the shipped TinyData: 32 x 32 PNGs of coloured strokes and blobs, and their labels.

    python -m load_dataset.generators.make_tiny_data        # rewrites load_dataset/tiny_data
    python -m load_dataset.generators.make_tiny_data --out /tmp/td --seed 1

Each image has a background, 0-2 shapes in distractor colours (green, purple, grey,
orange, cyan, pink, brown) and 0-3 of the three labelled colours (red, blue, yellow),
each of those drawn as 2-3 shapes. Label k is 1 exactly when colour k is drawn; no
background or distractor colour is any of the three. The output is a function of the
seed and the counts only: re-running writes byte-identical files (with the same Pillow).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
# The tutorial's TinyConv (two 3x3 stride-3 convs) sees only the top-left 27 x 27 pixels;
# every labelled colour keeps enough pixels there so the labels are learnable from its view.
SEEN = 27
MIN_SEEN_PIXELS = 16

LABEL_COLOURS = {  # CSV column -> RGB
    "LabelRed": (255, 0, 0),
    "LabelBlue": (0, 0, 255),
    "LabelYellow": (255, 255, 0),
}
DISTRACTOR_COLOURS = [
    (20, 160, 60),  # green
    (130, 40, 170),  # purple
    (140, 140, 140),  # grey
    (235, 130, 40),  # orange: half way between red and yellow in green
    (0, 190, 200),  # cyan
    (240, 140, 200),  # pink
    (120, 70, 30),  # brown
]
BACKGROUND_COLOURS = [
    (10, 10, 10),
    (50, 50, 55),
    (200, 200, 200),
    (25, 70, 40),
    (20, 100, 100),
    (70, 45, 30),
    (180, 170, 200),
]
SPLITS = ("train", "val", "test")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tiny_data"


def draw_background(rng: np.random.Generator) -> Image.Image:
    """A solid, two-part or gradient 32 x 32 background from BACKGROUND_COLOURS."""
    i, j = rng.choice(len(BACKGROUND_COLOURS), size=2, replace=False)
    a, b = np.array(BACKGROUND_COLOURS[i]), np.array(BACKGROUND_COLOURS[j])
    kind = rng.choice(["solid", "split", "gradient"], p=[0.5, 0.25, 0.25])
    if kind == "solid":
        weight = np.zeros(SIZE)
    elif kind == "split":
        weight = (np.arange(SIZE) >= rng.integers(8, 24)).astype(float)
    else:
        weight = np.linspace(0.0, 1.0, SIZE)
    row = (1 - weight)[:, None] * a + weight[:, None] * b  # [32, 3]
    pixels = np.repeat(row[None], SIZE, axis=0)  # constant along axis 0: a vertical pattern
    if rng.random() < 0.5:
        pixels = pixels.transpose(1, 0, 2)
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def draw_shape(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, colour: tuple, large: bool
) -> None:
    """A filled ellipse, rectangle or thick line centred in the seen region.

    Large shapes (for labelled colours) span 10-17 px and lines are 5-6 px thick; small
    ones (for distractors) span 6-11 px and lines are 3-4 px thick.
    """
    margin = 6 if large else 4
    cx, cy = rng.integers(margin, SEEN - margin + 1, size=2)
    kind = rng.choice(["blob", "box", "stroke"])
    if kind == "blob":
        rx, ry = rng.integers(5, 9, size=2) if large else rng.integers(3, 6, size=2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    elif kind == "box":
        w, h = rng.integers(8, 15, size=2) if large else rng.integers(4, 9, size=2)
        draw.rectangle([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=colour)
    else:
        angle = rng.uniform(0, np.pi)
        half = rng.integers(7, 13) if large else rng.integers(4, 8)
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        points = [(float(cx - dx), float(cy - dy)), (float(cx + dx), float(cy + dy))]
        width = rng.integers(5, 7) if large else rng.integers(3, 5)
        draw.line(points, fill=colour, width=int(width))


def seen_pixel_count(image: Image.Image, colour: tuple) -> int:
    """How many pixels in the top-left SEEN x SEEN square have exactly `colour`."""
    pixels = np.asarray(image)[:SEEN, :SEEN]
    return int(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).sum())


def make_image(rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """One image and its labels (one 0/1 per LABEL_COLOURS entry, in order)."""
    labels = [int(v) for v in rng.random(len(LABEL_COLOURS)) < 0.5]
    colours = [c for c, on in zip(LABEL_COLOURS.values(), labels) if on]
    while True:  # redraw while a labelled colour is (nearly) hidden under other shapes
        image = draw_background(rng)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(0, 3)):
            colour = DISTRACTOR_COLOURS[rng.integers(len(DISTRACTOR_COLOURS))]
            draw_shape(draw, rng, colour, large=False)
        # Two or three large shapes per colour: the tutorial's TinyConv, trained on 150
        # images, learns "colour present anywhere" reliably only when it covers several
        # of the 3 x 3 regions its last layer looks at.
        shapes = [c for c in colours for _ in range(rng.integers(2, 4))]
        for k in rng.permutation(len(shapes)):
            draw_shape(draw, rng, shapes[k], large=True)
        if all(seen_pixel_count(image, c) >= MIN_SEEN_PIXELS for c in colours):
            return image, labels


def make_tiny_data(
    out_dir: str | Path = DEFAULT_OUT, seed: int = 0, counts: Sequence[int] = (150, 50, 50)
) -> Path:
    """Writes `<out_dir>/tiny_labels.csv` and `<out_dir>/{train,val,test}/<split>_NNN.png`.

    `counts` are the numbers of train, val and test images. Each split has its own
    random stream, so changing one split's count leaves the other splits as they were.
    Earlier generated images (`<split>_*.png`) and a stale mean/std cache are removed.
    Returns the output folder.
    """
    out_dir = Path(out_dir)
    rows = []
    for split_index, (split, count) in enumerate(zip(SPLITS, counts)):
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{split}_*.png"):
            old.unlink()
        rng = np.random.default_rng([seed, split_index])
        digits = max(3, len(str(count)))
        for i in range(1, count + 1):
            image, labels = make_image(rng)
            name = f"{split}_{i:0{digits}d}.png"
            image.save(folder / name, format="PNG", optimize=True)
            rows.append([name, *labels])
    with (out_dir / "tiny_labels.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Filename", *LABEL_COLOURS])
        writer.writerows(rows)
    (out_dir / "mean_std_cache.json").unlink(missing_ok=True)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (shipped data: 0)")
    parser.add_argument(
        "--counts",
        type=int,
        nargs=3,
        default=(150, 50, 50),
        metavar=("TRAIN", "VAL", "TEST"),
        help="images per split (shipped data: 150 50 50)",
    )
    args = parser.parse_args(argv)
    out = make_tiny_data(args.out, seed=args.seed, counts=args.counts)
    print(f"Wrote {sum(args.counts)} images and tiny_labels.csv to {out}")


if __name__ == "__main__":
    main()
