"""Demo-0: the unit tests, then pictures of PASCAL samples and of the augmentations.

    python Demo-0-Unit-Tests-and-Visualization.py                  # VOC in data/voc
    python Demo-0-Unit-Tests-and-Visualization.py --voc-dir /data/voc --n-images 8 --show
    python Demo-0-Unit-Tests-and-Visualization.py --tests tests/test_utils.py

1. Runs the tutorial's own unit tests, then those of the label conversion, the data sets,
   the models and the metrics, through pytest (`--tests` picks other test files,
   `--skip-tests` none).
2. For the first `--n-images` VOC 2012 val images: the image, its coloured mask and its
   label names side by side, once at full resolution and once resampled to `--image-size`
   (as the models see them).
3. A gallery of the augmentations a config can choose (`augment` in [data.args]) drawn on
   one image: a VOC val image with its mask, or a TinyData image when VOC is not on disk.
4. What a trained TinyData model looks at: TinyData val images with their true labels, the
   model's probabilities and the heatmap (HiResCAM) of each true class, from `--explain-model`
   (a run id, results folder or model URI) or else the newest finished Demo-2 run in the
   store; left out (the script says so) when there is none yet: run Demo-2 first.

The PNGs are written under `<results-dir>/Demo-0/<run id>/` and logged to one MLflow run.
Without VOC data, step 2 is skipped (the script says so) and the rest still runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
UNIT_TESTS = [
    "tests/test_tutorial_unit_tests.py",
    "tests/test_utils.py",
    "tests/test_custom_tiny.py",
    "tests/test_custom_pascal.py",
    "tests/test_models.py",
    "tests/test_evaluate.py",
]
EXPERIMENT = "Demo-0-Unit-Tests-and-Visualization"
DEMO2_EXPERIMENT = "Demo-2-TinyConv-TinyData"


def make_parser() -> argparse.ArgumentParser:
    from load_dataset.pascal.augment import AUGMENTATIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc-dir", default=str(REPO / "data" / "voc"), help="holds VOCdevkit/")
    p.add_argument("--n-images", type=int, default=4, help="VOC val images to draw")
    p.add_argument("--image-size", type=int, default=320, help="side of the resampled image")
    p.add_argument("--augment", nargs="+", default=list(AUGMENTATIONS), choices=AUGMENTATIONS)
    p.add_argument("--tests", nargs="+", default=UNIT_TESTS, help="test files for pytest")
    p.add_argument("--skip-tests", action="store_true", help="do not run the unit tests")
    p.add_argument("--results-dir", default=str(REPO / "results"), help="where PNGs go")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the repo's mlflow.db)")
    p.add_argument("--experiment-name", default=EXPERIMENT, help="MLflow experiment name")
    p.add_argument("--show", action="store_true", help="also open each figure in a window")
    p.add_argument(
        "--explain-model",
        metavar="SOURCE",
        help="a trained TinyData model (run id, results folder, model URI); default: the "
        "newest finished Demo-2 run",
    )
    return p


def run_unit_tests(files: list[str]) -> int:
    """pytest on `files` (relative to the repository), in a child process; its exit code."""
    print(f"== unit tests: pytest {' '.join(files)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *files], cwd=REPO)


def draw_voc_samples(voc_dir: str, n_images: int, image_size: int, out: Path, show: bool):
    """PNGs of the first VOC val images, unresized and resampled; returns (paths, first image
    and mask at full resolution) or raises DataError when VOC is not on disk."""
    from load_dataset.custom_pascal import PascalVOC2012, save_visualization

    ds = PascalVOC2012("val", voc_dir, image_size=image_size, return_seglabel=True)
    paths = []
    for i in range(min(n_images, len(ds))):
        name = ds.image_ids[i]
        image, mask = ds.full_resolution(i)
        paths.append(save_visualization(image, mask, ds.labels[i], out / f"{name}.png", show))
        sample = ds[i]  # resized: image with antialiasing, mask with nearest neighbour
        resampled = out / f"{name}_resampled_{image_size}.png"
        paths.append(save_visualization(sample["data"], sample["seglabel"], None, resampled, show))
    return paths, ds.full_resolution(0) if len(ds) else (None, None)


def tiny_image():
    """The first TinyData training image (PIL, 32 x 32 RGB) and its file name."""
    from load_dataset.custom_tiny import TinyData
    from load_dataset.images import open_rgb

    ds = TinyData("train")
    return open_rgb(ds.image_paths[0]), ds.image_ids[0]


def newest_demo2_run(uri: str) -> str | None:
    """The id of the newest FINISHED run of Demo-2's experiment in the store, or None."""
    import src.tracking as tracking
    from src.errors import TrackingError

    try:
        finished = "attributes.status = 'FINISHED'"
        runs = tracking.find_runs(uri, DEMO2_EXPERIMENT, finished, newest_first=True, limit=1)
    except TrackingError:  # no Demo-2 experiment in this store yet
        return None
    return runs[0].info.run_id if runs else None


def draw_explanations(source: str, uri: str, n_images: int, out: Path) -> Path:
    """plots of `n_images` TinyData val images explained by the model of `source`."""
    import numpy as np

    import src.serve.explain as explain
    import src.serve.model_package as model_package
    import src.tracking as tracking
    from load_dataset.custom_tiny import TinyData
    from load_dataset.images import open_rgb
    from src.serve.predict import model_uri

    model, store = model_uri(source, uri)
    with tracking.tracking_uri_set(store):  # MLflow reads runs:/ and models:/ there
        classifier = model_package.load(model)
    ds = TinyData("val")
    rows = explain.gallery_rows(ds.labels, ds.labels, n_images)
    images = [np.asarray(open_rgb(ds.image_paths[i])) for i in rows]
    probs = classifier.probabilities(images)
    classes = [explain.classes_to_show(ds.labels[i], p) for i, p in zip(rows, probs)]
    x = classifier.model_inputs(images)
    maps = explain.heatmaps(classifier.net, x, classes, "hirescam", classifier.spec.target_layer)
    meanings = classifier.spec.label_meanings
    return explain.save_gallery(images, ds.labels[rows], probs, maps, meanings, out)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not args.skip_tests:
        code = run_unit_tests(args.tests)
        if code != 0:
            print(f"error: the unit tests failed (pytest exit code {code}).", file=sys.stderr)
            return 1

    import src.tracking as tracking
    from load_dataset.errors import DataError
    from load_dataset.pascal.visualize import build_augmentation_gallery
    from src.errors import UserError, print_user_error

    uri = tracking.tracking_uri(args.tracking_uri or "")
    try:
        tracker = tracking.start(uri, args.experiment_name, "visualization", {"demo": "Demo-0"})
    except UserError as e:
        return print_user_error(e)
    out = Path(args.results_dir).expanduser().resolve() / "Demo-0" / tracker.run_id
    try:
        print(f"== pictures of VOC 2012 val images from {args.voc_dir}", flush=True)
        try:
            paths, (image, mask) = draw_voc_samples(
                args.voc_dir, args.n_images, args.image_size, out / "voc_val", args.show
            )
            for p in paths:
                tracker.log_artifact(p, "voc_val")
            print(f"wrote {len(paths)} pictures to {out / 'voc_val'}")
        except DataError as e:
            print(f"skipped: the VOC pictures ({e})")
            image, mask = None, None
        if image is None:
            image, name = tiny_image()
            print(f"== augmentation gallery on TinyData {name} (VOC is not on disk)")
        else:
            print("== augmentation gallery on the first VOC val image and its mask")
        gallery = build_augmentation_gallery(
            image, out / "augmentation_gallery.png", args.augment, mask=mask, show=args.show
        )
        tracker.log_artifact(gallery)
        print(f"wrote {gallery}")
        source = args.explain_model or newest_demo2_run(uri)
        if source is None:
            print(f"no explanations: no finished {DEMO2_EXPERIMENT} run yet (run Demo-2 first)")
        else:
            print(f"== what the TinyData model {source} looks at")
            picture = draw_explanations(source, uri, args.n_images, out / "explanations.png")
            tracker.log_artifact(picture)
            print(f"wrote {picture}")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    print(tracking.ui_hint(uri, tracker.experiment_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
