"""One epoch: batches to the device, the training pass, predictions and their metrics.

The names follow torchvision's reference scripts: `train_one_epoch`, then `predict` on the
validation loader and `epoch_metrics` on what it returns.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import src.distributed as ddp
import src.evaluate as evaluate
from src.errors import ConfigError, NonFiniteLossError


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


@dataclass
class BatchSettings:
    """How every batch of a run is treated, travelling as one: moved to the device and
    normalized (`prep`), the loss, mixed precision ('off', 'bf16', 'fp16'), the problem
    ('multilabel' or 'multiclass'), the smoke-run cap (`max_batches`, 0 = all) and how often a
    log file gets a progress line (`progress_every_s`)."""

    prep: BatchPrep
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    amp: str = "off"
    problem: str = "multilabel"
    max_batches: int = 0
    progress_every_s: float = 30.0  # a progress line this often when not on a terminal

    @property
    def device(self) -> torch.device:
        return self.prep.device


class OneHotCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy of logits [B, K] and the loop's one-hot label vectors [B, K]."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels.argmax(1))


# [data] problem -> the loss: a fork changes the loss of a problem with one line here.
LOSSES = {"multilabel": nn.BCEWithLogitsLoss, "multiclass": OneHotCrossEntropy}


def make_loss(problem: str) -> nn.Module:
    """The LOSSES loss of [data] problem ('multilabel' or 'multiclass', checked by src.config)."""
    return LOSSES[problem]()


def to_probs(logits: torch.Tensor, problem: str) -> torch.Tensor:
    return logits.softmax(1) if problem == "multiclass" else logits.sigmoid()


def autocast(device: torch.device, amp: str):
    if amp == "off" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def n_batches(loader: DataLoader, max_batches: int) -> int:
    """Batches per pass: all of them, or at most `max_batches` when it is set (smoke runs)."""
    return min(len(loader), max_batches) if max_batches else len(loader)


def _progress(iterable, total: int, desc: str, every_s: float = 30.0):
    """A bar on a terminal; in a log file (nohup, sbatch, a pipe) a line every `every_s`."""
    if not sys.stderr.isatty():
        return _ProgressLines(iterable, total, desc, every_s)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class _ProgressLines:
    """What a bar shows, as a line every `every_s` seconds for a log file that a bar would
    fill with carriage returns: `epoch 3/100: batch 120/460, 1,920 images, 356 img/s,
    loss 0.4321, epoch ETA 57 s`. Lines come when `set_postfix` is called (every 20 steps:
    the loss is read then), so a fast epoch prints none."""

    def __init__(self, iterable, total: int, desc: str, every_s: float) -> None:
        self.iterable, self.total, self.desc, self.every_s = iterable, total, desc, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            self.done += 1  # counted as taken: set_postfix comes after its step
            yield item

    def set_postfix(self, loss: str, img_s: str, images: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or not self.done:
            return
        self.last = now
        eta = (now - self.start) / self.done * (self.total - self.done)
        print(
            f"{self.desc}: batch {self.done}/{self.total}, {images:,} images, {img_s} img/s, "
            f"loss {loss}, epoch ETA {eta:.0f} s",
            flush=True,
        )

    def close(self) -> None: ...


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    batches: BatchSettings,
    desc: str,
) -> dict[str, float]:
    """One pass over the training loader: loss sum, images, seconds and seconds of waiting
    for data."""
    model.train()
    prep, loss_fn, amp = batches.prep, batches.loss_fn, batches.amp
    loss_sum = torch.zeros((), dtype=torch.float64, device=prep.device)
    n_images, wait, start = 0, 0.0, time.perf_counter()
    steps = n_batches(loader, batches.max_batches)
    bar = _progress(loader, steps, desc, batches.progress_every_s)
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
            img_s = f"{n_images / (time.perf_counter() - start):.0f}"
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=img_s, images=n_images)
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss_sum": loss_sum.item(), "images": n_images, "seconds": seconds, "wait": wait}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, batches: BatchSettings) -> dict[str, Any]:
    """Loss sum, probabilities, labels and image indices over a loader (this rank's share)."""
    model.eval()
    loss_sum, probs, labels, idx = 0.0, [], [], []
    steps = n_batches(loader, batches.max_batches)
    for batch in _progress(itertools.islice(loader, steps), steps, "eval"):
        x, y = batches.prep(batch)
        with autocast(batches.device, batches.amp):
            logits = model(x)["out"].float()
        loss_sum += float(batches.loss_fn(logits, y)) * len(y)
        probs.append(to_probs(logits, batches.problem).cpu())
        labels.append(y.cpu())
        idx.append(batch["img_idx"].cpu())
    cat = (lambda xs: torch.cat(xs).numpy()) if probs else (lambda xs: np.zeros((0, 0)))
    return {"loss_sum": loss_sum, "probs": cat(probs), "labels": cat(labels), "idx": cat(idx)}


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
    metrics = evaluate.compute_metrics(pred["labels"], pred["probs"], label_meanings, problem)
    loss = pred["loss_sum"] / max(1, len(pred["idx"]))
    return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in metrics.items()}}
