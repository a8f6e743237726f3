"""Set-up of a run: seeds and determinism, the device, and the datasets, model, loaders and
optimizer a config names."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from load_dataset.errors import DataError
from src import distributed as ddp
from src.config import (
    SETNAME_PLACEHOLDER,
    ConfigError,
    ExperimentConfig,
    import_object,
)
from src.dataset_contract import checked_dataset


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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device = {name!r} but this machine has {torch.cuda.device_count()} GPU(s), "
            "numbered from 0; pick one of them or 'auto'."
        )
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise ConfigError(f"device = {name!r} but MPS is not available; use 'auto' or 'cpu'.")
    return device


def resolve_num_workers(value: int | str, local_world_size: int = 1) -> int:
    """An int as given; 'auto' = the cores this process may run on, shared among local ranks."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size) - 1)


def build_dataset(config: ExperimentConfig, setname: str) -> Dataset:
    """The config's dataset for one split, checked against the dataset contract.

    Called as `Cls(setname, **args)`; when a string in `[data.args]` holds `{setname}`
    (torchvision's `ImageFolder(root="data/x/{setname}")`), as `Cls(**args)` with it filled
    in. A table with a `class` key (a transform) is built from it first.
    """
    name = config.data.dataset
    cls = import_object(name, "dataset")
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise ConfigError(
            f"[data] dataset = {name!r} is not a torch.utils.data.Dataset class; name a "
            "Dataset subclass."
        )
    args = {k: _arg_value(v, f"data.args.{k}", setname) for k, v in config.data.args.items()}
    by_placeholder = any(_has_placeholder(v) for v in config.data.args.values())
    try:
        dataset = cls(**args) if by_placeholder else cls(setname, **args)
    except TypeError as e:
        raise ConfigError(f"[data.args] do not fit {name}: {e}.") from None
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{name} ('{setname}' split): {' '.join(str(e).split())}") from None
    return checked_dataset(dataset, name, setname, config.data.task)


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return SETNAME_PLACEHOLDER in value
    if isinstance(value, dict):
        return any(_has_placeholder(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_placeholder(v) for v in value)
    return False


def _arg_value(value: Any, key: str, setname: str) -> Any:
    """`{setname}` filled in; a table {class = "module:Name", ...} built as Name(**rest)."""
    if isinstance(value, str):
        return value.replace(SETNAME_PLACEHOLDER, setname)
    if isinstance(value, list):
        return [_arg_value(v, f"{key}[{i}]", setname) for i, v in enumerate(value)]
    if isinstance(value, dict) and "class" in value:
        return _build_transform(value, key, setname)
    if isinstance(value, dict):
        return {k: _arg_value(v, f"{key}.{k}", setname) for k, v in value.items()}
    return value


def _build_transform(table: dict[str, Any], key: str, setname: str) -> Any:
    # Only classes of torchvision.transforms or nn.Module subclasses: a config names data
    # processing, it is never a way to call an arbitrary function.
    path = table["class"]
    cls = import_object(path, f"transform of {key}") if isinstance(path, str) else None
    allowed = isinstance(cls, type) and (
        issubclass(cls, nn.Module) or cls.__module__.startswith("torchvision.transforms")
    )
    if not allowed:
        raise ConfigError(
            f"{key}.class = {path!r} is neither a torchvision.transforms class nor an "
            "nn.Module subclass; name a transform class."
        )
    kwargs = {k: _arg_value(v, f"{key}.{k}", setname) for k, v in table.items() if k != "class"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} does not fit {path}: {' '.join(str(e).split())}.") from None


def build_model(config: ExperimentConfig) -> nn.Module:
    cls = import_object(config.model.model, "model")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"[model] model = {config.model.model!r} is not an nn.Module class; name an "
            "nn.Module subclass."
        )
    try:
        return cls(**config.model.args)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"[model.args] do not fit {config.model.model}: {' '.join(str(e).split())}"
        ) from None


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
    """Training: shuffled per epoch by (seed, epoch), split across ranks, and the last partial
    batch dropped when there is at least one full batch (`train_drop_last`). Evaluation: in
    order; under torchrun each rank takes every world_size-th sample so the whole set is seen
    exactly once (no padding)."""
    workers = resolve_num_workers(config.data.num_workers, info.local_world_size)
    drop_last = train and train_drop_last(len(dataset), info.world_size, config.data.batch_size)
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
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )


def train_drop_last(n_images: int, world_size: int, batch_size: int) -> bool:
    """Whether training drops the last partial batch of each process's share of the split.

    It is dropped (a batch of a few images gives a noisy step at the full learning rate) only
    when the share holds at least one full batch: a split smaller than a batch trains as one
    batch of all its images, never as zero batches. DistributedSampler first trims the split
    to a multiple of the processes (at most world_size - 1 images). A split with fewer images
    than processes is a DataError.
    """
    per_process = n_images // world_size
    if per_process == 0:
        raise DataError(
            f"The training split has {n_images} image(s) for {world_size} processes, so a "
            "process would train on nothing; add training images or launch fewer processes."
        )
    return per_process >= batch_size


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
