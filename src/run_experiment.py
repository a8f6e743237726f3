"""The experiment: config -> datasets, loaders, model, training loop, early stopping, outputs.

    python -m src.run_experiment experiments/demo2_tinyconv_tinydata.toml --epochs 5
    torchrun --nproc_per_node=4 -m src.run_experiment experiments/demo3_vgg16_pascal.toml

`run(config)` reads top to bottom: seed, pick the device, build the datasets and loaders
once, build the model, start (or resume) the MLflow run, then for each epoch train, validate,
log, checkpoint and check early stopping. At the end the best weights are evaluated again
and their plots, predictions and per-class table are logged with the run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from src import checkpoint as ckpt_io
from src import distributed as ddp
from src import evaluate, tracking
from src.config import (
    ConfigError,
    ExperimentConfig,
    add_config_flags,
    flatten,
    import_object,
    load_from_args,
)

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ckpt_io.CheckpointError,
    tracking.TrackingError,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    results_dir: Path | None
    best_epoch: int
    best_metrics: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False


# ------------------------------------------------------------------ set-up


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Loader workers are seeded in `_seed_worker`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker as base_seed + worker_id; derive NumPy's and Python's from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_determinism(deterministic: bool, cudnn_benchmark: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' = cuda > mps > cpu; under torchrun each process takes cuda:<local rank>."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available; use 'auto' or 'cpu'.")
    return device


def resolve_num_workers(value: int | str, local_world_size: int = 1) -> int:
    """An int as given; 'auto' = the cores this process may run on, shared among local ranks."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size) - 1)


def build_dataset(config: ExperimentConfig, setname: str) -> Dataset:
    cls = import_object(config.data.dataset, "dataset")
    try:
        return cls(setname, **config.data.args)
    except TypeError as e:
        raise ConfigError(f"[data.args] do not fit {config.data.dataset}: {e}.") from None


def build_model(config: ExperimentConfig) -> nn.Module:
    cls = import_object(config.model.model, "model")
    try:
        return cls(**config.model.args)
    except TypeError as e:
        raise ConfigError(f"[model.args] do not fit {config.model.model}: {e}.") from None


def check_outputs(model: nn.Module, label_meanings: list[str], config: ExperimentConfig) -> None:
    """ConfigError when the model's last linear layer has another width than the labels."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linear and linear[-1].out_features != len(label_meanings):
        raise ConfigError(
            f"The model {config.model.model} has {linear[-1].out_features} outputs but the "
            f"dataset has {len(label_meanings)} labels; set [model.args] n_outputs = "
            f"{len(label_meanings)}."
        )


def build_loader(
    dataset: Dataset,
    config: ExperimentConfig,
    info: ddp.DistInfo,
    device: torch.device,
    train: bool,
) -> DataLoader:
    """Training: shuffled per epoch by (seed, epoch), split across ranks, last partial batch
    dropped. Evaluation: in order; under torchrun each rank takes every world_size-th sample
    so the whole set is seen exactly once (no padding)."""
    workers = resolve_num_workers(config.data.num_workers, info.local_world_size)
    if train:
        sampler = DistributedSampler(
            dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=config.run.seed,
            drop_last=True,
        )
    else:
        sampler = None
        if info.enabled:
            dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    generator = torch.Generator()
    generator.manual_seed(config.run.seed)
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=train,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


# ------------------------------------------------------------------ one epoch


class BatchPrep:
    """Moves a batch to the device; uint8 images are scaled and normalized there."""

    def __init__(self, dataset: Any, device: torch.device, channels_last: bool) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        mean_std = getattr(dataset, "mean_std", None)
        self.mean = self.std = None
        if mean_std is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32, device=device) for v in mean_std)
            self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        x = batch["data"].to(self.device, non_blocking=nb)
        if x.dtype == torch.uint8:
            if self.mean is None:
                raise ConfigError("The dataset returns uint8 images but sets no mean_std.")
            x = (x.float().div_(255) - self.mean) / self.std
        x = x.contiguous(memory_format=self.memory_format)
        return x, batch["label"].to(self.device, non_blocking=nb)


def make_loss(problem: str) -> nn.Module:
    if problem == "multiclass":
        ce = nn.CrossEntropyLoss()
        return lambda logits, labels: ce(logits, labels.argmax(1))  # type: ignore[return-value]
    return nn.BCEWithLogitsLoss()


def to_probs(logits: torch.Tensor, problem: str) -> torch.Tensor:
    return logits.softmax(1) if problem == "multiclass" else logits.sigmoid()


def autocast(device: torch.device, amp: str):
    if amp == "off" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def n_batches(loader: DataLoader, max_batches: int) -> int:
    """Batches per pass: all of them, or at most `max_batches` when it is set (smoke runs)."""
    return min(len(loader), max_batches) if max_batches else len(loader)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing when the output is a file or a pipe.
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    prep: BatchPrep,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp: str,
    desc: str,
    max_batches: int = 0,
) -> dict[str, float]:
    """One pass over the training loader; returns loss, images/s and the data-wait share."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=prep.device)
    n_images, wait, start = 0, 0.0, time.perf_counter()
    steps = n_batches(loader, max_batches)
    bar = _progress(loader, steps, desc)
    it = iter(bar)
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        x, y = prep(batch)
        with autocast(prep.device, amp):
            loss = loss_fn(model(x)["out"].float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        n_images += len(y)
        if step % 20 == 0 or step == steps - 1:
            # Checking here, not every step, keeps the GPU from syncing on each batch.
            mean_loss = loss_sum.item() / n_images
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"the training loss became {mean_loss} at step {step}")
            bar.set_postfix(
                loss=f"{mean_loss:.4f}",
                img_s=f"{n_images / (time.perf_counter() - start):.0f}",
            )
    bar.close()
    elapsed = time.perf_counter() - start
    return {
        "loss_sum": loss_sum.item(),
        "images": n_images,
        "seconds": elapsed,
        "wait": wait,
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    prep: BatchPrep,
    loss_fn,
    problem: str,
    amp: str,
    max_batches: int = 0,
) -> dict[str, Any]:
    """Loss sum, probabilities, labels and image indices over a loader (this rank's share)."""
    model.eval()
    loss_sum, probs, labels, idx = 0.0, [], [], []
    steps = n_batches(loader, max_batches)
    for batch in _progress(itertools.islice(loader, steps), steps, "eval"):
        x, y = prep(batch)
        with autocast(prep.device, amp):
            logits = model(x)["out"].float()
        loss_sum += float(loss_fn(logits, y)) * len(y)
        probs.append(to_probs(logits, problem).cpu())
        labels.append(y.cpu())
        idx.append(batch["img_idx"].cpu())
    cat = (lambda xs: torch.cat(xs).numpy()) if probs else (lambda xs: np.zeros((0, 0)))
    return {
        "loss_sum": loss_sum,
        "probs": cat(probs),
        "labels": cat(labels),
        "idx": cat(idx),
    }


def gather_predictions(part: dict[str, Any], info: ddp.DistInfo) -> dict[str, Any]:
    """Every rank's share joined and put back in dataset order."""
    parts = [p for p in ddp.all_gather_objects(part, info) if len(p["idx"])]
    idx = np.concatenate([p["idx"] for p in parts])
    order = np.argsort(idx, kind="stable")
    return {
        "loss_sum": sum(p["loss_sum"] for p in parts),
        "probs": np.concatenate([p["probs"] for p in parts])[order],
        "labels": np.concatenate([p["labels"] for p in parts])[order],
        "idx": idx[order],
    }


def epoch_metrics(pred: dict[str, Any], label_meanings: list[str], problem: str, prefix: str):
    # Batch losses are means over their images, summed weighted by batch size: / n is the mean.
    out = {f"{prefix}_loss": pred["loss_sum"] / max(1, len(pred["idx"]))}
    for key, value in evaluate.compute_metrics(
        pred["labels"], pred["probs"], label_meanings, problem
    ).items():
        out[f"{prefix}_{key}"] = value
    return out


# ------------------------------------------------------------------ the run


def build_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.name == "SGD":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
        )
    cls = torch.optim.Adam if o.name == "Adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


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
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    early = {
        "best_val_loss": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped": False,
    }
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        early, history, start_epoch = (
            state["early_stopping"],
            state["history"],
            state["epoch"] + 1,
        )
        ckpt_io.set_rng_state(state["rng"])
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
        for epoch in range(start_epoch, config.train.epochs):
            if early["stopped"]:
                break
            train_loader.sampler.set_epoch(epoch)
            desc = f"epoch {epoch + 1}/{config.train.epochs}"
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
            improved = metrics["val_loss"] < early["best_val_loss"]
            if improved:
                early.update(best_val_loss=metrics["val_loss"], best_epoch=epoch, bad_epochs=0)
            else:
                early["bad_epochs"] += 1
            early["stopped"] = bool(
                config.train.patience and early["bad_epochs"] >= config.train.patience
            )
            history.append({"epoch": epoch, **metrics})
            if info.is_main:
                _save_epoch(
                    results_dir,
                    model,
                    optimizer,
                    scaler,
                    early,
                    history,
                    epoch,
                    config,
                    tracker.run_id,
                    improved,
                )
                tracker.log_epoch(metrics, epoch)
                _print_epoch(epoch, config.train.epochs, metrics, seconds / info.world_size)
        ddp.barrier(info)
        result = RunResult(
            tracker.run_id,
            tracker.experiment_id,
            results_dir if info.is_main else None,
            int(early["best_epoch"]),
            {},
            len(history),
            bool(early["stopped"]),
        )
        if info.is_main:
            result.best_metrics = _finish(
                config,
                model,
                datasets,
                prep,
                loss_fn,
                amp,
                device,
                tracker,
                results_dir,
                history,
                early,
            )
        ddp.barrier(info)
        tracker.end("FINISHED")
        return result
    except KeyboardInterrupt:
        tracker.end("KILLED")
        if info.is_main:
            print(
                f"\nInterrupted. Resume with: --resume {results_dir}",
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


def _metrics_of(h: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in h.items() if k != "epoch"}


def _print_epoch(epoch: int, epochs: int, m: dict[str, float], seconds: float) -> None:
    print(
        f"epoch {epoch + 1:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_auroc_mean {m['val_auroc_mean']:.4f}  "
        f"val_ap_mean {m['val_ap_mean']:.4f}  {m['train_images_per_s']:.0f} img/s  "
        f"{seconds:.1f} s",
        flush=True,
    )


def _save_epoch(
    results_dir,
    model,
    optimizer,
    scaler,
    early,
    history,
    epoch,
    config,
    run_id,
    improved,
) -> None:
    if improved:
        ckpt_io.save_atomic(
            {
                "kind": "best",
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
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch,
            "early_stopping": dict(early),
            "history": history,
            "rng": ckpt_io.rng_state(),
            "run_id": run_id,
            "config": config.to_dict(),
        },
        results_dir / "last.pt",
    )


def _finish(
    config,
    model,
    datasets,
    prep,
    loss_fn,
    amp,
    device,
    tracker,
    results_dir,
    history,
    early,
) -> dict[str, float]:
    """Evaluate the best weights once more and log plots, predictions, tables and weights."""
    best_path = results_dir / "best.pt"
    if not best_path.is_file():
        return {}
    best = ckpt_io.load_checkpoint(best_path, "best.pt")
    model.load_state_dict(best["model"])
    summary: dict[str, float] = {"best_epoch": float(best["epoch"])}
    single = ddp.DistInfo()
    for split, ds in datasets.items():
        if split == "train":
            continue
        loader = build_loader(ds, config, single, device, train=False)
        pred = predict(
            model, loader, prep, loss_fn, config.data.task, amp, config.train.max_batches
        )
        metrics = epoch_metrics(pred, list(ds.label_meanings), config.data.task, split)
        summary.update({f"best_{k}": v for k, v in metrics.items() if "/" not in k})
        _write_outputs(tracker, results_dir, split, ds, pred, metrics)
    # A run resumed to train longer whose best epoch did not change has logged this already.
    if int(best["epoch"]) not in tracker.logged_steps("best_epoch"):
        tracker.log_epoch(summary, int(best["epoch"]))
    curves = evaluate.plot_learning_curves(history, results_dir / "plots" / "learning_curves.png")
    tracker.log_artifact(curves, "plots")
    tracker.log_artifact(best_path, "model")
    return summary


def _write_outputs(tracker, results_dir: Path, split: str, ds, pred, metrics) -> None:
    """ROC/PR plots, a predictions CSV and a per-class metrics CSV for one split."""
    import pandas as pd

    meanings = list(ds.label_meanings)
    plots = evaluate.plot_roc_pr(
        pred["labels"],
        pred["probs"],
        meanings,
        results_dir / "plots" / split,
        f"{split} (best epoch)",
    )
    for p in plots:
        tracker.log_artifact(p, f"plots/{split}")
    ids = getattr(ds, "image_ids", None)
    names = [ids[i] if ids is not None else str(i) for i in pred["idx"].astype(int)]
    table = pd.DataFrame({"name": names})
    for k, m in enumerate(meanings):
        table[f"prob_{m}"] = pred["probs"][:, k]
    for k, m in enumerate(meanings):
        table[f"label_{m}"] = pred["labels"][:, k].astype(int)
    (results_dir / "tables").mkdir(parents=True, exist_ok=True)
    pred_csv = results_dir / "tables" / f"{split}_predictions.csv"
    table.to_csv(pred_csv, index=False)
    prefix = f"{split}_"
    per_class = evaluate.per_class_table(
        {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)},
        pred["labels"],
        meanings,
    )
    class_csv = results_dir / "tables" / f"{split}_per_class_metrics.csv"
    per_class.to_csv(class_csv, index=False)
    tracker.log_artifact(pred_csv, "tables")
    tracker.log_artifact(class_csv, "tables")


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
        tracker.log_epoch(metrics, 0)
        _write_outputs(tracker, results_dir, split, ds, pred, metrics)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return RunResult(
        tracker.run_id,
        tracker.experiment_id,
        results_dir,
        int(weights["epoch"]),
        metrics,
        0,
        False,
    )


# ------------------------------------------------------------------ command line


def one_line(e: BaseException) -> str:
    """The user-facing sentence of an error, also when re-raised from a loader worker."""
    text = str(e)
    if "Original Traceback" in text:  # DataLoader worker: the original message is last
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def user_errors() -> tuple[type[BaseException], ...]:
    from load_dataset.errors import DataError

    return (*USER_ERRORS, DataError, NonFiniteLossError)


def make_parser(default_config: str | None, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    if default_config is None:
        parser.add_argument("config", help="experiment TOML file, e.g. experiments/demo2.toml")
    else:
        parser.add_argument("--config", default=default_config, help="experiment TOML file")
    add_config_flags(parser)
    parser.add_argument("--resume", metavar="PATH", help="a run's results folder or its last.pt")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="run once per seed, as child runs of one parent run with mean and std",
    )
    return parser


def main(
    argv: list[str] | None = None,
    default_config: str | None = None,
    description: str = __doc__.splitlines()[0],
) -> int:
    """Parse flags, run, print the outcome; user errors become one line and exit code 2."""
    args = make_parser(default_config, description).parse_args(argv)
    try:
        config = load_from_args(args.config, args)
        if args.seeds:
            from src.multirun import run_seeds

            if args.resume:
                raise ConfigError("--seeds and --resume cannot be combined; resume one child run.")
            run_seeds(config, args.seeds)
            return 0
        result = run(config, resume=args.resume)
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if result.results_dir is not None:
        report(config, result)
    return 0


def report(config: ExperimentConfig, result: RunResult) -> None:
    m = result.best_metrics
    if config.run.task == "train_eval":
        auroc, ap = m.get("best_val_auroc_mean", math.nan), m.get("best_val_ap_mean", math.nan)
        print(
            f"\nBest at epoch {result.best_epoch + 1} of {result.epochs_run} "
            f"(MLflow step {result.best_epoch}): val_auroc_mean {auroc:.4f}, val_ap_mean {ap:.4f}"
            + (" (stopped early)" if result.stopped_early else "")
        )
        print(f"Checkpoints: {result.results_dir}")
    else:
        split = "val" if config.run.task == "predict_on_valid" else "test"
        auroc, ap = m.get(f"{split}_auroc_mean", math.nan), m.get(f"{split}_ap_mean", math.nan)
        print(
            f"\n{split} predictions of the weights of epoch {result.best_epoch + 1} "
            f"({config.run.checkpoint}): {split}_auroc_mean {auroc:.4f}, {split}_ap_mean {ap:.4f}"
        )
        print(f"Predictions and per-class tables: {result.results_dir / 'tables'}")
    print(tracking.ui_hint(tracking.tracking_uri(config), result.experiment_id))


if __name__ == "__main__":
    sys.exit(main())
