"""Set-up of a run: seeds and determinism, the device, and the datasets, model, loaders and
optimizer a config names; `set_up` puts them together into the `Trainer` the epoch loop uses."""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import src.distributed as ddp
import src.train.checkpoint as ckpt_io
from load_dataset.errors import DataError
from load_dataset.images import reader_args
from src.config import (
    IMPORT_PATH,
    SETNAME_PLACEHOLDER,
    ConfigError,
    ExperimentConfig,
    check_choice,
    import_object,
)
from src.train.dataset_contract import check_same_labels, checked_dataset, gaps_note
from src.train.loop import BatchPrep, BatchSettings, make_loss
from src.train.training_state import TrainingState, check_resumable


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
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)  # imports torch._inductor: 3 s
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' = cuda > mps > cpu; under torchrun each process takes cuda:<local rank>."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
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
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device = {name!r} but MPS is not available; use 'auto' or 'cpu'.")
    return device


def resolve_num_workers(value: int | str, local_world_size: int = 1) -> int:
    """An int as given; 'auto' = the cores this process may run on, shared among local ranks."""
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size) - 1)


# What each kind of class a config names must derive from (a transform may also be any class
# of torchvision.transforms), and what the error says when it does not.
_CLASS_KINDS = {
    "dataset": (Dataset, "is not a torch.utils.data.Dataset class; name a Dataset subclass"),
    "model": (nn.Module, "is not an nn.Module class; name an nn.Module subclass"),
    "transform": (
        nn.Module,
        "is neither a torchvision.transforms class nor an nn.Module subclass; name a "
        "transform class",
    ),
}


def import_class(path: Any, key: str, kind: str) -> type:
    """The class at `path` ('package.module:Name') of config key `key`, checked to be a class
    of its `kind` ("dataset", "model", "transform") right after the import, before anything
    calls it: a config, or a run's stored config, names classes and is never a way to call a
    function (`os:system`)."""
    base, refusal = _CLASS_KINDS[kind]
    if not (isinstance(path, str) and IMPORT_PATH.fullmatch(path)):
        raise ConfigError(
            f"{key} = {path!r} must be an import path of the form 'package.module:ClassName'."
        )
    what = f"transform of {key.removesuffix('.class')}" if kind == "transform" else kind
    cls = import_object(path, what)
    transform = kind == "transform" and getattr(cls, "__module__", "").startswith(
        "torchvision.transforms"
    )
    if not (isinstance(cls, type) and (issubclass(cls, base) or transform)):
        raise ConfigError(f"{key} = {path!r} {refusal}.")
    return cls


# [optimizer] name -> the optimizer class: a fork adds an optimizer with one line here. Each
# gets the [optimizer] numbers its constructor takes (lr, momentum, weight_decay).
OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
# [optimizer] scheduler -> the per-epoch learning-rate schedule of an optimizer (None: the lr
# stays); a fork adds a schedule with one line here.
SCHEDULERS: dict[str, Callable[[Any, ExperimentConfig], LRScheduler | None]] = {
    "none": lambda optimizer, config: None,
    "cosine": lambda optimizer, config: CosineAnnealingLR(optimizer, T_max=config.train.epochs),
    "step": lambda optimizer, c: StepLR(optimizer, c.optimizer.step_size, c.optimizer.gamma),
}


def check_names(config: ExperimentConfig) -> None:
    """ConfigError unless the dataset and the model the config names are classes of their kind
    and its optimizer and scheduler are names of the tables above; before any data is read,
    so a wrong model is not found minutes later. (A transform is checked as it is built, before
    the dataset that takes it is called.)"""
    import_class(config.data.dataset, "[data] dataset", "dataset")
    import_class(config.model.model, "[model] model", "model")
    check_choice("optimizer", "name", config.optimizer.name, OPTIMIZERS)
    check_choice("optimizer", "scheduler", config.optimizer.scheduler, SCHEDULERS)


def build_dataset(config: ExperimentConfig, setname: str) -> Dataset:
    """The config's dataset for one split, checked against the dataset contract.

    Called as `Cls(setname, **args)`; when a string in `[data.args]` holds `{setname}`
    (torchvision's `ImageFolder(root="data/x/{setname}")`), as `Cls(**args)` with it filled
    in. A table with a `class` key (a transform) is built from it first. A torchvision folder
    dataset (ImageFolder, DatasetFolder) gets the repository's image reader as its `loader`.
    """
    name = config.data.dataset
    cls = import_class(name, "[data] dataset", "dataset")
    args = {k: _arg_value(v, f"data.args.{k}", setname) for k, v in config.data.args.items()}
    args = {**reader_args(cls, args), **args}  # ImageFolder reads images as ours do
    by_placeholder = SETNAME_PLACEHOLDER in str(config.data.args)  # in any string, nested too
    try:
        dataset = cls(**args) if by_placeholder else cls(setname, **args)
    except TypeError as e:
        raise ConfigError(f"[data.args] do not fit {name}: {e}.") from None
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{name} ('{setname}' split): {' '.join(str(e).split())}") from None
    return checked_dataset(dataset, name, setname, config.data.problem)


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
    path = table["class"]
    cls = import_class(path, f"{key}.class", "transform")
    kwargs = {k: _arg_value(v, f"{key}.{k}", setname) for k, v in table.items() if k != "class"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} does not fit {path}: {' '.join(str(e).split())}.") from None


def build_model(config: ExperimentConfig) -> nn.Module:
    cls = import_class(config.model.model, "[model] model", "model")
    try:
        return cls(**config.model.args)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"[model.args] do not fit {config.model.model}: {' '.join(str(e).split())}"
        ) from None


def check_input(model: nn.Module, datasets: dict[str, Any], prep: BatchPrep, config) -> None:
    """ConfigError unless the model takes the first image of each split as a batch of one and
    returns {'out': [1, K]}, K the labels: said before a run starts, not as a traceback in
    its first step. In eval mode without gradients; the random states are put back (a sample
    may be drawn at random), so a seeded run trains exactly as it would without the check."""
    name = config.model.model
    states, training = (random.getstate(), np.random.get_state()), model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for split, ds in datasets.items():
                sample, k = ds[0], len(ds.label_meanings)
                batch = {key: torch.stack([sample[key]]) for key in ("data", "label")}
                x, _ = prep(batch)  # a batch of one, as the loader stacks it
                try:
                    out = model(x)
                except (RuntimeError, ValueError) as e:  # a layer, or the model, refuses
                    size, why = " x ".join(map(str, sample["data"].shape)), str(e).rstrip(".")
                    raise ConfigError(
                        f"The model {name} fails on the {split} split's images of {size} "
                        f"([C, H, W]): {' '.join(why.split())}; resize the images to the "
                        "size the model takes (in the dataset or its transform), or use a "
                        "model for any size (models.any_size:TinyConvAnySize)."
                    ) from None
                logits = out.get("out") if isinstance(out, dict) else None
                shape = list(logits.shape) if isinstance(logits, torch.Tensor) else None
                if shape != [1, k]:
                    got = f"'out' of shape {shape}" if shape else f"a {type(out).__name__}"
                    raise ConfigError(
                        f"The model {name} returns {got} for a batch of one image and the "
                        f"dataset has {k} labels; forward must return {{'out': logits [B, {k}]}} "
                        f"(set [model.args] n_outputs = {k})."
                    )
    finally:
        model.train(training)
        random.setstate(states[0])
        np.random.set_state(states[1])


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
    sampler = None
    if train:
        sampler = DistributedSampler(
            dataset, info.world_size, info.rank, shuffle=True, seed=config.run.seed, drop_last=True
        )
    elif info.enabled:
        dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))
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
        generator=torch.Generator().manual_seed(config.run.seed),
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


def build_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The OPTIMIZERS class of [optimizer] name, given the [optimizer] numbers it takes."""
    o = config.optimizer
    takes = inspect.signature(OPTIMIZERS[o.name]).parameters
    numbers = {k: getattr(o, k) for k in ("lr", "momentum", "weight_decay") if k in takes}
    return OPTIMIZERS[o.name](model.parameters(), **numbers)


def build_scheduler(config: ExperimentConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The SCHEDULERS schedule of [optimizer] scheduler (an LRScheduler), or None for "none"."""
    return SCHEDULERS[config.optimizer.scheduler](optimizer, config)


# ------------------------------------------------------------------ the trainer


@dataclass
class Trainer:
    """Everything the epoch loop uses, built once by `set_up`; `tracker` and `results_dir`
    are set when the MLflow run starts."""

    config: ExperimentConfig
    info: ddp.DistInfo
    datasets: dict[str, Dataset]
    train_loader: DataLoader
    val_loader: DataLoader
    batches: BatchSettings
    state: TrainingState
    train_net: nn.Module  # compiled, and wrapped in DDP under torchrun
    eval_net: nn.Module  # compiled, unwrapped: each rank predicts its own share
    resume_path: Path | None = None
    tracker: Any = None
    results_dir: Path | None = None
    logged_epochs: set[int] = field(default_factory=set)  # epochs the MLflow run holds

    @property
    def label_meanings(self) -> list[str]:
        return list(self.datasets["train"].label_meanings)


def set_up(config: ExperimentConfig, info: ddp.DistInfo, resume: str | Path | None) -> Trainer:
    """Seeds, device, datasets (checked), loaders, model, optimizer and the training state,
    restored from `resume` (a run's results folder or last.pt) when given."""
    check_names(config)
    device = pick_device(config.run.device, info.local_rank)
    seed_everything(config.run.seed)
    set_determinism(
        config.run.deterministic, config.train.cudnn_benchmark and device.type == "cuda"
    )
    saved, resume_path = None, None
    if resume is not None:
        resume_path = ckpt_io.resolve_checkpoint(resume)
        saved = ckpt_io.load_checkpoint(resume_path)
        check_resumable(saved, config, resume_path)
    splits = ("train", "val", "test") if config.run.use_test_set else ("train", "val")
    datasets = {split: build_dataset(config, split) for split in splits}
    check_same_labels(datasets, config.data.dataset)
    train_loader = build_loader(datasets["train"], config, info, device, train=True)
    val_loader = build_loader(datasets["val"], config, info, device, train=False)
    if info.is_main:
        print_setup(device, datasets, config, info)
    channels_last = config.train.channels_last and device.type == "cuda"
    batches = BatchSettings(
        BatchPrep(datasets["train"], device, channels_last),
        make_loss(config.data.problem),
        config.train.amp if device.type == "cuda" else "off",
        config.data.problem,
        config.train.max_batches,
        config.run.progress_every_s,
    )
    model = build_model(config).to(device, memory_format=batches.prep.memory_format)
    check_input(model, datasets, batches.prep, config)
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler("cuda") if batches.amp == "fp16" else None
    scheduler = build_scheduler(config, optimizer)
    state = TrainingState(model, optimizer, scheduler, scaler, config.train.patience)
    if saved is not None:
        state.load_state_dict(saved, resume_path)
    net = torch.compile(model) if config.train.compile else model
    train_net = net
    if info.enabled:
        ids = [device] if device.type == "cuda" else None
        train_net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    return Trainer(
        config, info, datasets, train_loader, val_loader, batches, state, train_net, net,
        resume_path,
    )  # fmt: skip


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def print_setup(device: torch.device, datasets: dict[str, Any], config, info) -> None:
    """The device picked and each split's size; a note when a batch holds the whole split,
    and one for each evaluated split with classes that its metric means leave out."""
    sizes = ", ".join(f"{split} {len(ds):,}" for split, ds in datasets.items())
    procs = f" x {info.world_size} processes" if info.world_size > 1 else ""
    auto = config.run.device == "auto"
    why = ", picked by device = auto: CUDA, else MPS, else the CPU" if auto else ""
    print(f"Device: {device_name(device)} ({device}{why}){procs}. Images: {sizes}.", flush=True)
    n_train = len(datasets["train"]) // info.world_size
    if not train_drop_last(len(datasets["train"]), info.world_size, config.data.batch_size):
        print(
            f"Note: the training split ({n_train} images per process) is smaller than "
            f"batch_size {config.data.batch_size}: each epoch trains on one batch of "
            f"{n_train} images.",
            flush=True,
        )
    for split, ds in datasets.items():
        if split != "train" and (note := gaps_note(ds, split)):
            print(note, flush=True)
