"""Set-up of a run: seeds and determinism, the device, and the datasets, model, loaders and
optimizer a config names."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from src import distributed as ddp
from src.config import (
    ConfigError,
    ExperimentConfig,
    import_object,
)


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


def build_scheduler(
    config: ExperimentConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of [optimizer] scheduler, or None for "none"."""
    o = config.optimizer
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    if o.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
    return None


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
