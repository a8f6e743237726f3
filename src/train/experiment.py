"""The experiment: config -> datasets, loaders, model, training loop, early stopping, outputs.

Its public entry is `src.run_experiment` (the tutorial's name): `run(config)` and the command
line `python -m src.run_experiment experiments/X.toml`.

`run(config)` trains in three steps: `set_up` (src/train/build.py: seeds, device, the datasets
checked against the dataset contract, loaders, model, and the training state, restored when
resuming) returns the trainer; `fit` is the epoch loop (train, validate, log, checkpoint, stop
early); `finish` evaluates the best weights again and logs their plots, predictions and per-class
table with the run. The training state (src/train/training_state.py) saves and restores itself.

The other pieces: `src/train/loop.py` (one epoch: `train_one_epoch`, `predict`, `epoch_metrics`),
`src/train/outputs.py` (what a finished run leaves); `src/cli.py` is the command line.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import src.distributed as ddp
import src.interrupts as interrupts
import src.tracking as tracking
import src.train.build as build
import src.train.checkpoint as ckpt_io
import src.train.loop as loop
from src.config import RESUME_MAY_CHANGE, ExperimentConfig, config_mismatch, to_toml
from src.errors import ConfigError, NonFiniteLossError, TrackingError, UserError, one_line
from src.train.build import Trainer, set_up
from src.train.checkpoint import run_lock
from src.train.dataset_contract import label_gaps
from src.train.outputs import log_best_outputs, write_split_outputs
from src.train.training_state import TrainingState, load_weights


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    results_dir: Path | None
    best_epoch: int
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False
    classes_in_means: tuple[int, int] = (0, 0)  # (n, K): the means are over n of K classes


def run(
    config: ExperimentConfig,
    resume: str | Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
) -> RunResult:
    """Run the experiment `config` (train_eval, predict_on_valid or predict_on_test)."""
    device = config.run.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    info = ddp.init_distributed(cuda)
    # Every rank stops at a safe point on Ctrl-C or SIGTERM (rank 0's tracker holds them too).
    with interrupts.held():
        try:
            if info.is_main:  # a server that is down: say so now, not after the data is read
                tracking.check_server(tracking.tracking_uri(config.run.tracking_uri))
            if config.run.task == "train_eval":
                return _train_eval(config, info, resume, parent_run_id, extra_tags, on_epoch)
            return _predict_only(config, info, parent_run_id)
        finally:
            ddp.cleanup()


def _train_eval(config, info, resume, parent_run_id, extra_tags, on_epoch=None) -> RunResult:
    """set_up -> start (or resume) the MLflow run -> fit -> finish."""
    t = set_up(config, info, resume)
    # Rank 0 holds the run folder's lock from here to the end (rank 0 tracks; others get a
    # NullTracker).
    with ExitStack() as lock:
        if t.resume_path is not None:
            t.results_dir = t.resume_path.parent
            if info.is_main:  # before the MLflow run is reopened
                lock.enter_context(run_lock(t.results_dir))
            nothing_left = _nothing_left(config, t.state)
            t.tracker = resume_run(config, t.state.run_id, info.is_main, nothing_left)
        else:
            if info.is_main:  # a results folder that cannot be written: before the run starts
                ckpt_io.writable_folder(Path(config.run.results_dir))
            tags = {**(extra_tags or {}), **_data_tags(t)}
            t.tracker = start_run(config, info.is_main, parent_run_id, tags)
            t.state.run_id = t.tracker.run_id
            t.results_dir = results_dir(config, t.tracker.run_id)
            if info.is_main:
                with tracking.ended_on_error(t.tracker):
                    lock.enter_context(run_lock(t.results_dir))
        # A group of runs says itself how to go on.
        with _ended(t.tracker, t.results_dir, hint=info.is_main and parent_run_id is None):
            if info.is_main:
                t.tracker.log_datasets(_data_inputs(t))
            _catch_up(t)
            fit(t, on_epoch)
            return finish(t)


@contextmanager
def _ended(tracker: Any, results_dir: Path | None = None, hint: bool = False) -> Iterator[None]:
    """The run's status when it does not finish: FAILED on an error, KILLED on Ctrl-C or
    SIGTERM, raised as that interrupt; a user's error, or a file that could not be written (a
    full disk), as one line (`hint`: with the command that resumes `results_dir`)."""
    try:
        # A rank whose peer was stopped (only one machine's launcher signalled) stops too.
        with tracking.ended_on_error(tracker), ddp.stopping_together():
            yield
    except NonFiniteLossError as e:
        last = results_dir / "last.pt"
        kept = (
            f"the last good checkpoint is {last}"
            if last.is_file()
            else "no epoch completed, so there is no checkpoint"
        )
        raise NonFiniteLossError(
            f"Training stopped: {e}; {kept} (try a lower learning rate, or amp = 'off')."
        ) from None
    except (UserError, OSError) as e:  # a disk that filled up, say: once fixed, it resumes
        if isinstance(e, OSError) and e.filename is None:
            raise  # not a file's
        line = one_line(e) if isinstance(e, UserError) else f"{e.strerror}: {e.filename}."
        if hint and (results_dir / "last.pt").is_file():
            line += (
                " Once that is fixed, resume from the last complete epoch with the same command "
                f"and flags plus: --resume {results_dir}"
            )
        raise (type(e) if isinstance(e, UserError) else UserError)(line) from None
    except BaseException as e:
        stop = interrupts.stop_of(e)
        if stop is None:
            raise
        if hint:
            by = "Stopped by SIGTERM" if isinstance(stop, interrupts.Preempted) else "Interrupted"
            print(
                f"\n{by}; last.pt holds the last complete epoch. Resume with the same command "
                f"and flags plus: --resume {results_dir}",
                file=sys.stderr,
                flush=True,
            )
        raise stop from None


def start_run(
    config: ExperimentConfig,
    enabled: bool = True,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> tracking.NullTracker:
    """Create the MLflow run of `config` (rank 0; others get a NullTracker) with what makes it
    reproducible: params = the flattened config; tags = seed, package versions (and the git
    commit), `extra_tags`; artifacts = the resolved config TOML and `pip freeze` (and the git
    diff)."""
    if not enabled:
        return tracking.NullTracker()
    run = config.run
    tags = {"seed": run.seed, "deterministic": run.deterministic, **(extra_tags or {})}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    texts = {
        "config/config.toml": to_toml(config),
        "environment/pip_freeze.txt": tracking.pip_freeze(),
    }
    uri = tracking.tracking_uri(run.tracking_uri)
    tracker = tracking.start(uri, run.experiment_name, run.run_name, tags, config.flat(), texts)
    if run.system_metrics:
        tracker.watch_system()
    return tracker.configure(run.server_wait_s, run.server_unreachable)


def resume_run(
    config: ExperimentConfig, run_id: str, enabled: bool = True, nothing_left: str | None = None
) -> tracking.NullTracker:
    """Reopen the run `run_id` for a resumed training; its params must equal the config's
    (those of RESUME_MAY_CHANGE aside: "train longer" is a tag `resumed.<key>`).
    `nothing_left`: why the resumed state has no epoch to train, the error when the run
    FINISHED (a run stopped during its end resumes: to finish)."""
    if not enabled:
        return tracking.NullTracker()
    uri = tracking.tracking_uri(config.run.tracking_uri)
    hint = "it comes from the checkpoint: resume with the same --tracking-uri as the original run"
    run = tracking.get_run(uri, run_id, hint)
    if nothing_left and run.info.status == "FINISHED":
        raise ConfigError(nothing_left)
    logged = run.data.params
    mismatch = config_mismatch(logged, config, may_differ=RESUME_MAY_CHANGE, as_params=True)
    if mismatch is not None:
        key, theirs, ours = mismatch
        raise TrackingError(
            f"Config key {key} is {ours!r} but the run being resumed used {theirs!r}; resume "
            "with the original config (params cannot change)."
        )
    flat = config.flat()
    changed = {f"resumed.{k}": flat[k] for k in RESUME_MAY_CHANGE if logged.get(k) != str(flat[k])}
    tracker = tracking.reopen(uri, run_id)
    tracker.configure(config.run.server_wait_s, config.run.server_unreachable)
    with tracking.ended_on_error(tracker):
        tracker.set_tags(changed)
    if config.run.system_metrics:
        tracker.watch_system(resumed=True)
    return tracker


def _nothing_left(config: ExperimentConfig, state: TrainingState) -> str | None:
    """Why resuming `state` would train nothing (and log its end again), or None."""
    done = f"Run {state.run_id} finished after {state.epoch} epochs"
    if state.epoch >= config.train.epochs:
        return (
            f"{done} and --epochs is {config.train.epochs}: there is nothing to train; to "
            f"train longer, resume with --epochs above {state.epoch}."
        )
    if state.early.stopped:
        return (
            f"{done}, stopped early by patience {config.train.patience}: there is nothing to "
            "train; to train longer, resume with a larger --patience (0 turns it off)."
        )
    return None


def _data_tags(t: Trainer) -> dict[str, Any]:
    """World size, device, and each split's size, data fingerprint and how it was made; for
    val (and test) the classes its means are over (`val_classes_in_means = "2 of 3"`) and
    those without a positive or a negative, when its label table says."""
    tags: dict[str, Any] = {
        "world_size": t.info.world_size,
        "device": build.device_name(t.batches.device),
    }
    for split, ds in t.datasets.items():
        tags[f"data.{split}.count"] = len(ds)
        if hasattr(ds, "image_ids") and hasattr(ds, "labels"):
            tags[f"data.{split}.fingerprint"] = data_fingerprint(ds)["fingerprint"]
        made = {**getattr(ds, "split_info", {}), **getattr(ds, "source_counts", {})}
        tags.update({f"data.{split}.{key}": value for key, value in made.items()})
        if split != "train" and (gaps := label_gaps(ds)) is not None:
            k = len(ds.label_meanings)
            tags[f"{split}_classes_in_means"] = f"{k - sum(map(len, gaps.values()))} of {k}"
            without = {f"data.{split}.classes_without_{kind}": c for kind, c in gaps.items()}
            tags.update({key: ", ".join(c) for key, c in without.items() if c})
    return tags


def _data_inputs(t: Trainer) -> list[dict[str, Any]]:
    """Each split with a fingerprint (`data_fingerprint`) as an MLflow dataset input: named
    `<dataset class>-<split>`, the fingerprint as its digest, its folder as its source."""
    args = t.config.data.args
    folders = [str(v) for k, v in sorted(args.items()) if k.endswith(("dir", "root")) and v]
    inputs = []
    for split, ds in t.datasets.items():
        if not (hasattr(ds, "image_ids") and hasattr(ds, "labels")):
            continue
        found = getattr(ds, "data_dir", None) or getattr(ds, "root", None)
        source = str(found) if found else (folders[0] if folders else "")
        fingerprint = data_fingerprint(ds)
        inputs.append({
            "name": f"{type(ds).__name__}-{split}", "digest": fingerprint["fingerprint"],
            "source": source, "context": split, "rows": fingerprint["count"],
        })  # fmt: skip
    return inputs


def data_fingerprint(dataset: Any) -> dict[str, Any]:
    """A hash of the ordered image ids and their labels, and the count.

    Two runs whose datasets differ in any id, order or label get different fingerprints.
    """
    ids = list(dataset.image_ids)
    labels = np.asarray(dataset.labels, dtype=np.float32)  # tobytes() is C order
    h = hashlib.sha256("\n".join(ids).encode())
    h.update(str(labels.shape).encode())
    h.update(labels.tobytes())
    return {"fingerprint": h.hexdigest()[:16], "count": len(ids)}


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions, and the CUDA and cuDNN this run can use."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "mlflow", "numpy", "pillow", "scikit-learn"):
        out[name] = importlib.metadata.version(name)  # all of requirements.txt
    # What this torch was built for; "cuda"/"cudnn" only when a GPU is there to use them.
    out["cuda_build"] = torch.version.cuda or "none"
    gpu = torch.cuda.is_available()
    out["cuda"] = out["cuda_build"] if gpu else "none"
    cudnn = gpu and torch.backends.cudnn.is_available()
    out["cudnn"] = str(torch.backends.cudnn.version()) if cudnn else "none"
    return out


def results_dir(config: ExperimentConfig, run_id: str) -> Path:
    """Where a run's checkpoints and tables go: <results_dir>/<experiment>/<run id>."""
    return Path(config.run.results_dir) / tracking.slug(config.run.experiment_name) / run_id


def _catch_up(t: Trainer) -> None:
    """Log the epochs a resumed run's checkpoint holds but the run missed (the process died
    in between)."""
    if not t.info.is_main:
        return
    logged = set(t.tracker.logged_steps("val_loss"))
    for h in t.state.history:
        if h["epoch"] not in logged:
            t.tracker.log_epoch({k: v for k, v in h.items() if k != "epoch"}, int(h["epoch"]))
    t.logged_epochs = logged | {int(h["epoch"]) for h in t.state.history}
    print(
        f"Run {t.tracker.run_id} in MLflow {t.tracker.uri} (experiment "
        f"{t.config.run.experiment_name!r}); checkpoints and tables in {t.results_dir}",
        flush=True,
    )


def fit(t: Trainer, on_epoch: Callable[[int, dict[str, float]], bool] | None = None) -> None:
    """The epoch loop: train, validate, log, checkpoint; until the last epoch or early stop.

    Checkpoints are written by a background thread while the next epoch trains; the loop
    spends only the copy (and any wait for the previous write) on them, logged as
    `checkpoint_seconds` (wall-clock, like train_images_per_s; not kept in the history). `fit`
    returns or raises (Ctrl-C, SIGTERM, an error) only when the last write is complete, so
    `finish`, a resume and the stop hint find it."""
    state, epochs = t.state, t.config.train.epochs
    with state.saves_in_background():
        while state.epoch < epochs and not state.early.stopped:
            epoch = state.epoch + 1
            t.train_loader.sampler.set_epoch(epoch)
            stats = loop.train_one_epoch(
                t.train_net, t.train_loader, state.optimizer, state.scaler, t.batches,
                f"epoch {epoch}/{epochs}",
            )  # fmt: skip
            metrics = _epoch_metrics(t, stats)
            improved = state.end_epoch(metrics)
            if state.scheduler is not None:
                state.scheduler.step()  # after the epoch: the checkpoint holds the next lr
            if t.info.is_main:
                started = time.perf_counter()
                state.save(t.results_dir, t.config.to_dict(), improved)
                seconds = time.perf_counter() - started
                # An epoch is logged while its checkpoint is still being written: a process
                # killed then resumes from the epoch before and trains this one again, without
                # logging it twice.
                if epoch not in t.logged_epochs:
                    t.tracker.log_epoch({**metrics, "checkpoint_seconds": seconds}, epoch)
                _print_epoch(epoch, epochs, metrics, stats["seconds"])
            if on_epoch is not None and on_epoch(epoch, metrics):
                break


def _epoch_metrics(t: Trainer, stats: dict[str, float]) -> dict[str, float]:
    """The epoch's training figures summed over ranks, and the validation metrics."""
    info = t.info
    loss_sum, images, wait, seconds = ddp.sum_across_ranks(
        [stats["loss_sum"], stats["images"], stats["wait"], stats["seconds"]], info
    )
    val = loop.gather_predictions(loop.predict(t.eval_net, t.val_loader, t.batches), info)
    return {
        "train_loss": loss_sum / max(1, images),
        **loop.epoch_metrics(val, t.label_meanings, t.config.data.problem, "val"),
        "train_images_per_s": images / max(1e-9, seconds / info.world_size),
        "data_wait_fraction": wait / max(1e-9, seconds),
        "lr": t.state.optimizer.param_groups[0]["lr"],
    }


def _print_epoch(epoch: int, epochs: int, m: dict[str, float], seconds: float) -> None:
    print(
        f"epoch {epoch:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_auroc_mean {m['val_auroc_mean']:.4f}  "
        f"val_ap_mean {m['val_ap_mean']:.4f}  {m['train_images_per_s']:.0f} img/s  "
        f"{seconds:.1f} s",
        flush=True,
    )


def finish(t: Trainer) -> RunResult:
    """The best weights evaluated again, their outputs logged, the run FINISHED."""
    ddp.barrier(t.info)
    main, early = t.info.is_main, t.state.early
    best_metrics = log_best_outputs(t) if main else {}
    ddp.barrier(t.info)
    t.tracker.end("FINISHED")
    if main and not t.config.run.keep_last_pt:  # only best.pt is wanted
        (t.results_dir / "last.pt").unlink(missing_ok=True)
    return RunResult(
        t.tracker.run_id, t.tracker.experiment_id, t.results_dir if main else None,
        early.best_epoch, best_metrics, len(t.state.history), early.stopped,
        classes_in_means(t.state.history[-1] if t.state.history else {}, "val"),
    )  # fmt: skip


def _predict_only(config: ExperimentConfig, info: ddp.DistInfo, parent_run_id) -> RunResult:
    """predict_on_valid / predict_on_test: the weights of `run.checkpoint` on one split."""
    if not config.run.checkpoint:
        raise ConfigError(
            f"task = '{config.run.task}' needs run.checkpoint: the best.pt (or results folder) "
            "of a trained run, e.g. --set run.checkpoint='results/...'."
        )
    split = "val" if config.run.task == "predict_on_valid" else "test"
    problem = config.data.problem
    device = build.pick_device(config.run.device)
    build.seed_everything(config.run.seed)
    path = ckpt_io.resolve_checkpoint(config.run.checkpoint, "best.pt")
    weights = ckpt_io.load_checkpoint(path)
    ds = build.build_dataset(config, split)
    model = build.build_model(config).to(device)
    load_weights(model, weights, config, path)
    prep = loop.BatchPrep(ds, device, channels_last=False)
    build.check_input(model, {split: ds}, prep, config)
    batches = loop.BatchSettings(prep, loop.make_loss(problem), problem=problem)
    ckpt_io.writable_folder(Path(config.run.results_dir))
    tracker = start_run(config, info.is_main, parent_run_id, {"task": config.run.task})
    folder, epoch = results_dir(config, tracker.run_id), int(weights["epoch"])
    with _ended(tracker):
        loader = build.build_loader(ds, config, ddp.DistInfo(), device, train=False)
        pred = loop.predict(model, loader, batches)
        metrics = loop.epoch_metrics(pred, list(ds.label_meanings), problem, split)
        tracker.log_epoch(metrics, epoch)
        for file, artifact_folder in write_split_outputs(folder, split, ds, pred, metrics):
            tracker.log_artifact(file, artifact_folder)
        tracker.end("FINISHED")
    in_means = classes_in_means(metrics, split)
    return RunResult(
        tracker.run_id, tracker.experiment_id, folder, epoch, metrics, classes_in_means=in_means
    )


def classes_in_means(metrics: dict[str, float], split: str) -> tuple[int, int]:
    """(n, K): n of the K classes have an AUROC on `split` (a positive and a negative), and
    the `<split>_auroc_mean` and `_ap_mean` of `metrics` are means over them."""
    aurocs = [v for key, v in metrics.items() if key.startswith(f"{split}_auroc/")]
    return sum(not math.isnan(v) for v in aurocs), len(aurocs)
