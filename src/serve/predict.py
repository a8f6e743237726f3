"""Predictions of a trained model on your own images, and heatmaps of what it looked at.

    python -m src.serve.predict SOURCE IMAGES... [--out predictions.csv] [--threshold T ...]
                          [--explain] [--cam hirescam|gradcam] [--target-layer NAME]

SOURCE: a run id, a run's results folder (holding best.pt) or an MLflow model URI
(`runs:/<run id>/model`, `models:/<name>/<version>`, a downloaded model folder). IMAGES: image
files, folders (their images, sorted by name) and glob patterns (`'photos/**/*.jpg'`).

Writes a CSV with one row per image: its path, the probability of each label (`prob_<label>`)
and the predicted labels (`predicted`, joined by ';'), and prints the first rows. A label is
predicted when its probability reaches its threshold: the one chosen on the validation split
at the end of training (maximum F1), or `--threshold` (one value for every label, or one per
label in the model's order); a multiclass model predicts its most probable class. Images that
cannot be read are listed with the reason and skipped; the exit code is then 1. Images are
read as the datasets read them (`load_dataset.images`), 16 at a time.

`--explain` writes, for each image and each predicted label, the image with the heatmap of
that label laid over it (HiResCAM, or `--cam gradcam`) as `<explain-dir>/<n>_<name>_<label>.png`.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

import src.serve.explain as explain
import src.serve.model_package as model_package
import src.tracking as tracking
import src.train.checkpoint as ckpt_io
from load_dataset.errors import DataError
from load_dataset.images import list_images, open_rgb
from src.config import from_dict
from src.errors import ConfigError, UserError, print_user_error
from src.train.build import pick_device

SHOWN_ROWS = 10
# Images decoded at a time (`predict_batch`): a 2000 x 2000 photo is 12 MB decoded.
BATCH = 16
RUN_ID = re.compile(r"[0-9a-f]{32}")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.serve.predict", description=__doc__.splitlines()[0]
    )
    p.add_argument("source", help="a run id, a results folder or a model URI")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write")
    p.add_argument("--threshold", type=float, nargs="+", metavar="T", help="one, or one per label")
    p.add_argument("--explain", action="store_true", help="write heatmap overlays per label")
    p.add_argument("--explain-dir", help="where they go (default: <out>_explanations/)")
    p.add_argument("--cam", default="hirescam", choices=("hirescam", "gradcam"))
    p.add_argument("--target-layer", default=None, help="module name of the layer to explain")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tracking-uri", help="MLflow store of a run id (default: as for training)")
    return p


def model_uri(source: str, tracking_uri: str | None) -> tuple[str, str]:
    """(the MLflow model URI of SOURCE, the tracking URI it is read from)."""

    path = Path(source).expanduser()
    if "/" in source and ":" in source.split("/")[0] or (path / "MLmodel").is_file():
        uri, run_id, config = source, None, None
    elif (path / "best.pt").is_file():
        best = ckpt_io.load_checkpoint(path / "best.pt", "best.pt")
        run_id, config = best.get("run_id", ""), from_dict(best.get("config") or {})
    elif RUN_ID.fullmatch(source):
        run_id, config = source, None
    else:
        raise ConfigError(
            f"SOURCE {source!r} is neither a run id, a results folder holding best.pt nor a "
            "model URI (runs:/<run id>/model, models:/<name>/<version>)."
        )
    store = tracking_uri or tracking.tracking_uri(config.run.tracking_uri if config else "")
    return (f"runs:/{run_id}/model" if run_id else uri), store


def image_paths(patterns: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, [(argument, why nothing was found)]): files as given, folders' images
    sorted by name, glob patterns' matches sorted."""

    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found += list_images(path)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(str(path), recursive=True))
            found += [Path(m) for m in matches if Path(m).is_file()]
            if not matches:
                missing.append((pattern, "no file matches this pattern"))
        else:
            missing.append((pattern, "no such file or folder"))
    return found, missing


def read_images(paths: list[Path]) -> tuple[list[tuple[Path, Any]], list[tuple[str, str]]]:
    """([(path, uint8 [H, W, 3])], [(path, reason)]) as the datasets decode (`open_rgb`:
    EXIF orientation applied, 16-bit scaled to 8 bits, animations and images over Pillow's
    pixel limit refused)."""

    read, failed = [], []
    for path in paths:
        try:
            read.append((path, np.asarray(open_rgb(path, fix="skipped"))))
        except DataError as e:
            failed.append((str(path), str(e)))
    return read, failed


def chosen_thresholds(classifier: Any, given: list[float] | None) -> list[float] | None:
    """--threshold: one value for every label, or one per label; None keeps the stored ones."""
    if given is None:
        return None
    k = len(classifier.spec.label_meanings)
    if classifier.spec.problem == "multiclass":
        raise ConfigError("--threshold does not apply to a multiclass model (it predicts argmax).")
    if len(given) not in (1, k):
        raise ConfigError(f"--threshold takes one value or {k} (one per label), got {len(given)}.")
    return list(given) * k if len(given) == 1 else list(given)


def predictions_table(classifier: Any, read: list[tuple[Path, Any]], thresholds) -> Any:
    """DataFrame: path, prob_<label> per label, predicted (labels joined by ';')."""

    meanings = classifier.spec.label_meanings
    probs = classifier.probabilities([image for _, image in read])
    probs = probs.reshape(len(read), len(meanings))
    chosen = classifier.predicted(probs, thresholds)
    table = pd.DataFrame({"path": [str(p) for p, _ in read]})
    for k, name in enumerate(meanings):
        table[f"prob_{name}"] = probs[:, k]
    table["predicted"] = [";".join(np.asarray(meanings)[row]) for row in chosen]
    return table


def predict_batch(
    classifier: Any, paths: list[Path], thresholds, args: argparse.Namespace, first: int
) -> tuple[Any, list[tuple[str, str]]]:
    """(the predictions table of the images of `paths` that can be read, or None when none
    can; [(path, reason)] of the others), and their heatmaps with --explain. The decoded
    images live only in this call: predict's memory is bounded by a batch, not by a folder."""

    read, failed = read_images(paths)
    if not read:
        return None, failed
    table = predictions_table(classifier, read, thresholds)
    if args.explain:
        write_explanations(classifier, read, table, args, first)
    return table, failed


def explain_folder(args: argparse.Namespace) -> Path:
    return Path(args.explain_dir or Path(args.out).with_suffix("").as_posix() + "_explanations")


def write_explanations(
    classifier: Any, read, table, args: argparse.Namespace, first: int = 0
) -> Path:
    """For each image and each predicted label: the overlay of that label's heatmap, named
    by the image's row in the whole table (`first`: the row of read[0])."""

    folder = explain_folder(args)
    folder.mkdir(parents=True, exist_ok=True)
    layer = classifier.spec.target_layer if args.target_layer is None else args.target_layer
    meanings = classifier.spec.label_meanings
    for n, ((path, image), predicted) in enumerate(zip(read, table["predicted"]), first):
        classes = [meanings.index(m) for m in predicted.split(";") if m]
        x = classifier.model_inputs([image])
        (maps,) = explain.heatmaps(classifier.net, x, [classes], args.cam, layer)
        for k, heatmap in zip(classes, maps):
            picture = explain.overlay(image, heatmap)
            name = re.sub(r"[^\w.-]+", "-", f"{n:04d}_{path.stem}_{meanings[k]}")
            Image.fromarray(picture).save(folder / f"{name}.png")
    return folder


def report(table: Any, out: Path, failed: list[tuple[str, str]]) -> None:

    with pd.option_context("display.width", 120, "display.max_columns", 8):
        shown = table.head(SHOWN_ROWS).copy()
        shown["path"] = [Path(p).name for p in shown["path"]]
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    more = f" (the first {SHOWN_ROWS} above)" if len(table) > SHOWN_ROWS else ""
    print(f"{len(table)} image(s) predicted{more}: {out}")
    if failed:
        print(f"{len(failed)} image(s) skipped, they could not be read:", file=sys.stderr)
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        uri, store = model_uri(args.source, args.tracking_uri)
        with tracking.tracking_uri_set(store):  # MLflow reads models:/ and runs:/ there
            classifier = model_package.load(uri).to(pick_device(args.device))
        thresholds = chosen_thresholds(classifier, args.threshold)
        paths, failed = image_paths(args.images)
        tables = []
        for start in range(0, len(paths), BATCH):
            first = sum(map(len, tables))  # the row of the batch's first image
            batch = paths[start : start + BATCH]
            table, unreadable = predict_batch(classifier, batch, thresholds, args, first)
            tables += [] if table is None else [table]
            failed += unreadable
        if not tables:
            raise ConfigError(f"No image could be read from {' '.join(args.images)}.")
        table = pd.concat(tables, ignore_index=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        report(table, out, failed)
        if args.explain:
            print(f"heatmaps: {explain_folder(args)}")
    except UserError as e:
        return print_user_error(e)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
