"""The experiment: config -> datasets, loaders, model, training loop, early stopping, outputs.

    python -m src.run_experiment experiments/demo2_tinyconv_tinydata.toml --epochs 5
    torchrun --nproc_per_node=4 -m src.run_experiment experiments/demo3_vgg16_pascal.toml

`run(config)` reads top to bottom: seed, pick the device, build the datasets and loaders
once, build the model, start (or resume) the MLflow run, then for each epoch train, validate,
log, checkpoint and check early stopping. At the end the best weights are evaluated again
and their plots, predictions and per-class table are logged with the run.

The pieces it calls: `src/build.py` (seeds, device, datasets, model, loaders, optimizer),
`src/loop.py` (one epoch: `train_one_epoch`, `predict`, `epoch_metrics`), `src/outputs.py`
(what a finished run leaves) and `src/cli.py` (flags, one-line errors, the closing report).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src import checkpoint as ckpt_io
from src import distributed as ddp
from src import tracking
from src.build import (
    build_dataset,
    build_loader,
    build_model,
    build_optimizer,
    build_scheduler,
    check_outputs,
    pick_device,
    seed_everything,
    set_determinism,
)
from src.config import (
    ConfigError,
    ExperimentConfig,
    flatten,
)
from src.early_stopping import early_stopping_state, improved_at_last_epoch
from src.loop import (
    BatchPrep,
    NonFiniteLossError,
    epoch_metrics,
    gather_predictions,
    make_loss,
    predict,
    train_one_epoch,
)
from src.outputs import log_best_outputs, write_split_outputs

# Epochs are counted from 1 everywhere a person reads them: printed lines, MLflow steps,
# best_epoch, plot axes, checkpoints. Checkpoints carry this to tell them from older ones.
FIRST_EPOCH = 1


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    results_dir: Path | None
    best_epoch: int
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False


def _uses_cuda(config: ExperimentConfig) -> bool:
    name = config.run.device
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def run(
    config: ExperimentConfig,
    resume: str | Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> RunResult:
    """Run the experiment `config` (train_eval, predict_on_valid or predict_on_test)."""
    info = ddp.init_distributed(_uses_cuda(config))
    try:
        if info.is_main:  # a server that is down: say so now, not after the data is read
            tracking.check_server(tracking.tracking_uri(config))
        if config.run.task == "train_eval":
            return _train_eval(config, info, resume, parent_run_id, extra_tags)
        return _predict_only(config, info, parent_run_id)
    finally:
        ddp.cleanup()


def _check_resume_state(state: dict[str, Any], config: ExperimentConfig, path: Path) -> None:
    if state.get("kind") != "last" or "run_id" not in state:
        raise ckpt_io.CheckpointError(
            f"{path} is not a resumable checkpoint (a run's last.pt); pass the run's results "
            "folder or its last.pt."
        )
    if state.get("first_epoch") != FIRST_EPOCH:
        raise ckpt_io.CheckpointError(
            f"{path} was written by an earlier version of this repository that counted epochs "
            "from 0; it cannot be resumed here. Start a new run (its best.pt still predicts)."
        )
    saved_name = state.get("config", {}).get("run", {}).get("experiment_name")
    if saved_name != config.run.experiment_name:
        raise ckpt_io.CheckpointError(
            f"{path} is a checkpoint of another experiment ({saved_name!r}, the config says "
            f"{config.run.experiment_name!r}); pass the config it was made with."
        )
    _check_same_experiment(
        state, config, path, ("data", "model", "optimizer", "train"), tracking.RESUME_MAY_CHANGE
    )


def _check_same_experiment(
    state: dict[str, Any],
    config: ExperimentConfig,
    path: Path,
    sections: tuple[str, ...],
    may_differ: tuple[str, ...] = (),
) -> None:
    """CheckpointError naming the first key of `sections` where `state` was made differently.

    Resuming compares everything that shapes the training (not names, seeds or folders);
    predicting compares the model, whose weights must fit.
    """
    saved = flatten(state.get("config", {}))
    now = config.flat()
    for key in sorted(set(saved) | set(now)):
        if key.split(".")[0] not in sections or key in may_differ:
            continue
        if saved.get(key) != now.get(key):
            raise ckpt_io.CheckpointError(
                f"{path} does not fit this experiment: it was made with {key} = "
                f"{saved.get(key)!r}, the config says {now.get(key)!r}; use the config and "
                "flags of the run that wrote it."
            )


def _record_data(tracker: tracking.NullTracker, datasets: dict[str, Any], info, device) -> None:
    tags: dict[str, Any] = {
        "world_size": info.world_size,
        "device": _device_name(device),
    }
    for split, ds in datasets.items():
        if hasattr(ds, "image_ids") and hasattr(ds, "labels"):
            fp = tracking.data_fingerprint(ds)
            tags[f"data.{split}.fingerprint"] = fp["fingerprint"]
            tags[f"data.{split}.count"] = fp["count"]
        else:
            tags[f"data.{split}.count"] = len(ds)
        for key, value in getattr(ds, "split_info", {}).items():
            tags[f"data.{split}.{key}"] = value
        for key, value in getattr(ds, "source_counts", {}).items():
            tags[f"data.{split}.{key}"] = value
    tracker.set_tags(tags)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _results_dir(config: ExperimentConfig, run_id: str) -> Path:
    return Path(config.run.results_dir) / tracking._slug(config.run.experiment_name) / run_id


def _train_eval(config, info, resume, parent_run_id, extra_tags) -> RunResult:
    device = pick_device(config.run.device, info.local_rank)
    seed_everything(config.run.seed)
    set_determinism(
        config.run.deterministic, config.train.cudnn_benchmark and device.type == "cuda"
    )
    state, resume_path = None, None
    if resume is not None:
        resume_path = ckpt_io.resolve_checkpoint(resume)
        state = ckpt_io.load_checkpoint(resume_path)
        _check_resume_state(state, config, resume_path)

    datasets = {
        "train": build_dataset(config, "train"),
        "val": build_dataset(config, "val"),
    }
    if config.run.use_test_set:
        datasets["test"] = build_dataset(config, "test")
    label_meanings = list(datasets["train"].label_meanings)
    train_loader = build_loader(datasets["train"], config, info, device, train=True)
    val_loader = build_loader(datasets["val"], config, info, device, train=False)
    if info.is_main:
        _print_setup(device, datasets, config, info)
    prep = BatchPrep(
        datasets["train"], device, config.train.channels_last and device.type == "cuda"
    )
    loss_fn = make_loss(config.data.task)
    amp = config.train.amp if device.type == "cuda" else "off"

    model = build_model(config).to(device)
    check_outputs(model, label_meanings, config)
    if prep.memory_format == torch.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    history: list[dict[str, float]] = []
    start_epoch = FIRST_EPOCH
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, start_epoch = state["history"], state["epoch"] + 1
        ckpt_io.set_rng_state(state["rng"])
    patience = config.train.patience
    net = torch.compile(model) if config.train.compile else model
    train_net = (
        nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None
        )
        if info.enabled
        else net
    )

    if state is not None:
        tracker = tracking.resume(config, state["run_id"], enabled=info.is_main)
    else:
        tags = {**(extra_tags or {}), "world_size": info.world_size}
        tracker = tracking.start(config, info.is_main, parent_run_id, tags)
    results_dir = resume_path.parent if resume_path else _results_dir(config, tracker.run_id)
    try:
        if info.is_main:
            if state is None:
                _record_data(tracker, datasets, info, device)
            # Epochs checkpointed but not yet logged when the previous process died.
            logged = set(tracker.logged_steps("val_loss"))
            for h in history:
                if h["epoch"] not in logged:
                    tracker.log_epoch(_metrics_of(h), int(h["epoch"]))
            print(f"Run {tracker.run_id}: results in {results_dir}", flush=True)
        for epoch in range(start_epoch, config.train.epochs + 1):
            if early_stopping_state(_val_losses(history), patience).stopped:
                break
            train_loader.sampler.set_epoch(epoch)
            desc = f"epoch {epoch}/{config.train.epochs}"
            stats = train_one_epoch(
                train_net,
                train_loader,
                prep,
                loss_fn,
                optimizer,
                scaler,
                amp,
                desc,
                config.train.max_batches,
            )
            loss_sum, images, wait, seconds = ddp.sum_across_ranks(
                [stats["loss_sum"], stats["images"], stats["wait"], stats["seconds"]],
                info,
            )
            val = gather_predictions(
                predict(
                    net,
                    val_loader,
                    prep,
                    loss_fn,
                    config.data.task,
                    amp,
                    config.train.max_batches,
                ),
                info,
            )
            metrics = {
                "train_loss": loss_sum / max(1, images),
                **epoch_metrics(val, label_meanings, config.data.task, "val"),
                "train_images_per_s": images / max(1e-9, seconds / info.world_size),
                "data_wait_fraction": wait / max(1e-9, seconds),
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append({"epoch": epoch, **metrics})
            improved = improved_at_last_epoch(_val_losses(history))
            if scheduler is not None:
                scheduler.step()  # after the epoch: the checkpoint holds the next epoch's lr
            if info.is_main:
                _save_epoch(
                    results_dir,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    history,
                    epoch,
                    config,
                    tracker.run_id,
                    improved,
                )
                tracker.log_epoch(metrics, epoch)
                _print_epoch(epoch, config.train.epochs, metrics, seconds / info.world_size)
        ddp.barrier(info)
        early = early_stopping_state(_val_losses(history), patience)
        result = RunResult(
            tracker.run_id,
            tracker.experiment_id,
            results_dir if info.is_main else None,
            early.best_epoch,
            {},
            len(history),
            early.stopped,
        )
        if info.is_main:
            result.best_metrics = log_best_outputs(
                config,
                model,
                datasets,
                prep,
                loss_fn,
                amp,
                tracker,
                results_dir,
                history,
            )
        ddp.barrier(info)
        tracker.end("FINISHED")
        return result
    except KeyboardInterrupt:
        tracker.end("KILLED")
        if info.is_main:
            print(
                f"\nInterrupted; last.pt holds the last complete epoch. Resume with the same "
                f"command and flags plus: --resume {results_dir}",
                file=sys.stderr,
                flush=True,
            )
        raise
    except NonFiniteLossError as e:
        tracker.end("FAILED")
        raise NonFiniteLossError(
            f"Training stopped: {e}; the last good checkpoint is {results_dir / 'last.pt'} "
            "(try a lower learning rate, or amp = 'off')."
        ) from None
    except BaseException:
        tracker.end("FAILED")
        raise


def _val_losses(history: list[dict[str, float]]) -> list[float]:
    return [h["val_loss"] for h in history]


def _print_setup(device: torch.device, datasets: dict[str, Any], config, info) -> None:
    sizes = ", ".join(f"{split} {len(ds):,}" for split, ds in datasets.items())
    procs = f" x {info.world_size} processes" if info.world_size > 1 else ""
    print(f"Device: {_device_name(device)} ({device}){procs}. Images: {sizes}.", flush=True)
    n_train = len(datasets["train"]) // info.world_size
    if n_train < config.data.batch_size:
        print(
            f"Note: the training split ({n_train} images per process) is smaller than "
            f"batch_size {config.data.batch_size}: each epoch trains on one batch of "
            f"{n_train} images.",
            flush=True,
        )


def _metrics_of(h: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in h.items() if k != "epoch"}


def _print_epoch(epoch: int, epochs: int, m: dict[str, float], seconds: float) -> None:
    print(
        f"epoch {epoch:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_auroc_mean {m['val_auroc_mean']:.4f}  "
        f"val_ap_mean {m['val_ap_mean']:.4f}  {m['train_images_per_s']:.0f} img/s  "
        f"{seconds:.1f} s",
        flush=True,
    )


def _save_epoch(
    results_dir,
    model,
    optimizer,
    scheduler,
    scaler,
    history,
    epoch,
    config,
    run_id,
    improved,
) -> None:
    # Best epoch, bad epochs and "stopped" are not stored: they follow from the history.
    if improved:
        ckpt_io.save_atomic(
            {
                "kind": "best",
                "first_epoch": FIRST_EPOCH,
                "model": model.state_dict(),
                "epoch": epoch,
                "config": config.to_dict(),
                "run_id": run_id,
                "metrics": history[-1],
            },
            results_dir / "best.pt",
        )
    ckpt_io.save_atomic(
        {
            "kind": "last",
            "first_epoch": FIRST_EPOCH,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch,
            "history": history,
            "rng": ckpt_io.rng_state(),
            "run_id": run_id,
            "config": config.to_dict(),
        },
        results_dir / "last.pt",
    )


def weights_epoch(state: dict[str, Any]) -> int:
    """The epoch (counted from 1) a checkpoint's weights come from, also in older checkpoints
    that counted from 0."""
    return int(state["epoch"]) + (0 if state.get("first_epoch") == FIRST_EPOCH else 1)


def _predict_only(config: ExperimentConfig, info, parent_run_id) -> RunResult:
    """predict_on_valid / predict_on_test: the weights of `run.checkpoint` on one split."""
    if not config.run.checkpoint:
        raise ConfigError(
            f"task = '{config.run.task}' needs run.checkpoint: the best.pt (or results folder) "
            "of a trained run, e.g. --set run.checkpoint='results/...'."
        )
    split = "val" if config.run.task == "predict_on_valid" else "test"
    device = pick_device(config.run.device)
    seed_everything(config.run.seed)
    weights = ckpt_io.load_checkpoint(config.run.checkpoint, "best.pt")
    _check_same_experiment(weights, config, Path(config.run.checkpoint), ("model",))
    ds = build_dataset(config, split)
    model = build_model(config).to(device)
    check_outputs(model, list(ds.label_meanings), config)
    model.load_state_dict(weights["model"])
    prep = BatchPrep(ds, device, False)
    loss_fn = make_loss(config.data.task)
    tracker = tracking.start(config, info.is_main, parent_run_id, {"task": config.run.task})
    results_dir = _results_dir(config, tracker.run_id)
    try:
        loader = build_loader(ds, config, ddp.DistInfo(), device, train=False)
        pred = predict(model, loader, prep, loss_fn, config.data.task, "off")
        metrics = epoch_metrics(pred, list(ds.label_meanings), config.data.task, split)
        tracker.log_epoch(metrics, weights_epoch(weights))
        write_split_outputs(tracker, results_dir, split, ds, pred, metrics)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return RunResult(
        tracker.run_id,
        tracker.experiment_id,
        results_dir,
        weights_epoch(weights),
        metrics,
        0,
        False,
    )


if __name__ == "__main__":
    from src.cli import main

    sys.exit(main())
