"""What the training loop costs: this repository's training step against a bare PyTorch step,
and the whole Demo-2 process against a bare script doing the same work.

    python -m benchmarks.train                  # VGG16 (Demo-3) and TinyConv (Demo-2) steps
    python -m benchmarks.train --config experiments/demo3_vgg16_pascal.toml --image-size 96
    python -m benchmarks.train --amp off bf16 --channels-last off on --compile
    python -m benchmarks.train --whole-run --repeats 3

Step benchmark. The model of each --config (default: Demo-3's VGG16 with 20 outputs, then
Demo-2's TinyConv with 3) with its --set overrides, randomly initialized (as --no-pretrained:
nothing is downloaded), is trained on one synthetic batch shaped as the repository's samples,
{'data': images, 'label': float32 [B, K] multi-hot}, the images as its dataset gives them.
A model that takes `image_size` (the VGG-16 models) gets uint8 [B, 3, S, S] images,
normalized on the device as PascalVOC2012's, at --image-size (default 320 on CUDA; on the
CPU 96, the smallest the VGG-16 models take); one that does not (TinyConv) gets float32
images, already normalized as TinyData's, at TinyData's 32 px. --pixels sets the kind for
every model. The batch is --batch-size (default: the config's; on the CPU 8 for the VGG-16
models), pinned on CUDA as the DataLoader hands it over. No dataset is read. Two steps share
the model, the config's optimizer, the batch and the device:

| step | per batch                                                                         |
| ---- | --------------------------------------------------------------------------------- |
| repo | src.train.loop.train_one_epoch over a list of --steps batches: BatchPrep, autocast, |
|      | loss, zero_grad, backward, step, the loss sum, a NaN check every 20 steps, tqdm    |
| bare | written below: to the device (uint8 normalized there), forward, BCEWithLogits,     |
|      | backward, optimizer.step, zero_grad                                                |

After --warmup steps of each (not timed; torch.compile compiles here), --repeats passes of
--steps steps (default: as many as take about PASS_SECONDS, at least 3), the two taking
turns; the median pass counts. A row per model and variant of the grid --amp x
--channels-last x --compile (defaults: the config's; amp and channels_last off on the CPU,
where the loop ignores them): images/s of both, the overhead ratio (repo / bare seconds per
step; the goal is at most STEP_GOAL), the loop's own data_wait_fraction, and on CUDA the
model FLOPs utilisation of the repo step: the FLOPs of one training step (forward + backward,
counted by FlopCounterMode) per second, over the GPU's dense bf16 peak (BF16_PEAK_TFLOPS;
another GPU: no MFU), whatever the --amp. A variant that fails (torch.compile on the CPU, out
of memory) is a row with a note. Written to --out (default results/benchmark_train):
results.csv and images_per_s.png.

--whole-run: `python Demo-2-TinyConv-TinyData.py --epochs N --patience 0` (N = --epochs,
default the config's; patience 0 so that both train N epochs), with its MLflow model and
heatmap gallery, MLflow and its results in a temporary folder, against a bare script
(BARE_DEMO2) training the same TinyConv on the same TinyData with the same SGD for N epochs,
with validation and per-class AUROC each epoch and no tracking (the goal is at most
WHOLE_RUN_GOAL). Separate processes, --repeats rounds taking turns, medians; written to
whole_run.csv.

Exit codes: 0 done, 1 a Demo or bare process failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import run_in_temporary_folder
from benchmarks.loader import cpu_model
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD
from src.cli import load_from_args
from src.config import AMP_MODES, REPO_ROOT, ExperimentConfig, load
from src.errors import ConfigError, UserError, one_line, print_user_error
from src.train.build import (
    build_model,
    build_optimizer,
    device_name,
    import_class,
    pick_device,
    seed_everything,
    set_determinism,
)
from src.train.loop import BatchPrep, BatchSettings, make_loss, train_one_epoch

DEFAULT_OUT = REPO_ROOT / "results" / "benchmark_train"
DEMO2 = REPO_ROOT / "Demo-2-TinyConv-TinyData.py"
DEMO2_CONFIG = REPO_ROOT / "experiments" / "demo2_tinyconv_tinydata.toml"
DEFAULT_CONFIGS = [REPO_ROOT / "experiments" / "demo3_vgg16_pascal.toml", DEMO2_CONFIG]
# On the CPU: the smallest images the VGG-16 models take (models.components.MIN_IMAGE_SIZE).
CPU_IMAGE_SIZE = 96
TINY_IMAGE_SIZE = 32  # TinyData's images, the size TinyConv's linear layer is made for
PASS_SECONDS = 1.0  # a timed pass lasts about this long unless --steps says otherwise
STEP_GOAL, WHOLE_RUN_GOAL = 1.10, 1.6  # repo / bare
# Dense bf16 peak in TFLOP/s by a piece of torch.cuda.get_device_name(); the first match wins.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)
CSV_COLUMNS = [
    "device", "model", "image_size", "batch", "amp", "channels_last", "compile",
    "repo_images_per_s", "bare_images_per_s", "overhead_ratio", "data_wait_fraction", "mfu",
    "note",
]  # fmt: skip


@dataclass
class Variant:
    amp: str
    channels_last: bool
    compile: bool

    @property
    def label(self) -> str:
        on = {True: "on", False: "off"}
        return f"amp {self.amp}, channels_last {on[self.channels_last]}, compile {on[self.compile]}"


@dataclass
class StepModel:
    """One model of the step benchmark: its config (image size and random weights set) and
    the batch it is timed on. `steps` is --steps, or found by the first variant timed."""

    config: ExperimentConfig
    name: str
    image_size: int
    batch: int
    pixels: str
    n_labels: int
    n_params: int
    flops: float | None
    steps: int | None = None


@dataclass
class Row:
    """One model and variant: median seconds per step of both steps, or the note of its
    failure."""

    model: StepModel
    variant: Variant
    repo_s: float = float("nan")
    bare_s: float = float("nan")
    wait_fraction: float = float("nan")
    mfu: float | None = None
    note: str = ""

    @property
    def repo_images_per_s(self) -> float:
        return self.model.batch / self.repo_s

    @property
    def bare_images_per_s(self) -> float:
        return self.model.batch / self.bare_s

    @property
    def overhead_ratio(self) -> float:
        return self.repo_s / self.bare_s


# ------------------------------------------------------------------ the two steps


def synthetic_batch(batch: int, size: int, n_labels: int, pixels: str, pin: bool) -> dict:
    """A collated batch as the DataLoader gives it: 'data' uint8 [B, 3, S, S] (or float32
    [B, 3, S, S], normalized), 'label' float32 [B, K] of 0/1, 'img_idx' int64 [B]."""
    g = torch.Generator().manual_seed(0)
    if pixels == "uint8":
        data = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    else:
        data = torch.randn(batch, 3, size, size, generator=g)
    label = torch.randint(0, 2, (batch, n_labels), generator=g).float()
    out = {"data": data, "label": label, "img_idx": torch.arange(batch)}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


def bare_steps(model, optimizer, batches, device, variant: Variant, mean_std) -> None:
    """Plain PyTorch: one training step per batch; nothing counted, nothing checked."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    amp = variant.amp
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    model.train()
    for batch in batches:
        x = batch["data"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = (x.float() / 255 - mean_std[0]) / mean_std[1]
        x = x.contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype, enabled=amp != "off"):
            loss = loss_fn(model(x)["out"].float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def training_step_flops(config, x_shape: tuple[int, ...], n_labels: int) -> float | None:
    """FLOPs of one forward + backward pass, counted on the meta device (nothing computed);
    None when the model cannot be built or run there."""
    try:
        with torch.device("meta"):
            model = build_model(config)
            x, y = torch.empty(x_shape), torch.empty(x_shape[0], n_labels)
        with FlopCounterMode(display=False) as counter:
            out = model(x)["out"].float()
            torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
        return float(counter.get_total_flops())
    except Exception:  # a model that cannot run on meta has no FLOP count, hence no MFU
        return None


def bf16_peak_tflops(device_name: str) -> float | None:
    for piece, tflops in BF16_PEAK_TFLOPS:
        if piece.lower() in device_name.lower():
            return tflops
    return None


def synced_seconds(run, device: torch.device) -> float:
    """Wall seconds of `run()`, the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_steps(m: StepModel, variant: Variant, args: argparse.Namespace, device) -> tuple:
    """Seconds per step of each timed pass of the repo step and of the bare step, and the
    loop's data_wait_fraction of each repo pass; after the warm-up, the two taking turns."""
    seed_everything(m.config.run.seed)
    model = build_model(m.config).to(device)
    if variant.channels_last:  # as src.train.build does
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if variant.compile else model
    optimizer = build_optimizer(m.config, model)
    scaler = torch.amp.GradScaler("cuda") if variant.amp == "fp16" else None
    uint8 = m.pixels == "uint8"
    dataset = argparse.Namespace(mean_std=(IMAGENET_MEAN, IMAGENET_STD) if uint8 else None)
    prep = BatchPrep(dataset, device, variant.channels_last)
    settings = BatchSettings(prep, make_loss("multilabel"), variant.amp)
    batch = synthetic_batch(m.batch, m.image_size, m.n_labels, m.pixels, device.type == "cuda")
    waits = []

    def repo(n: int) -> None:
        stats = train_one_epoch(net, [batch] * n, optimizer, scaler, settings, "repo step")
        waits.append(stats["wait"] / max(1e-9, stats["seconds"]))

    def bare(n: int) -> None:
        bare_steps(net, optimizer, [batch] * n, device, variant, (prep.mean, prep.std))

    repo(args.warmup)
    bare(args.warmup)
    if m.steps is None:  # enough steps for a pass of about PASS_SECONDS
        n, seconds = 1, 0.0
        while seconds < PASS_SECONDS / 10:  # a sample long enough to outlast the clock's noise
            n *= 2
            seconds = synced_seconds(lambda k=n: bare(k), device)
        m.steps = max(3, math.ceil(n * PASS_SECONDS / seconds))
    waits.clear()
    repo_s, bare_s = [], []
    for _ in range(args.repeats):
        repo_s.append(synced_seconds(lambda: repo(m.steps), device) / m.steps)
        bare_s.append(synced_seconds(lambda: bare(m.steps), device) / m.steps)
    return repo_s, bare_s, waits


def measure_variant(m: StepModel, variant: Variant, args: argparse.Namespace, device) -> Row:
    """The row of a model and variant: medians of `time_steps`, MFU on a known GPU; a failure
    is a note."""
    row = Row(m, variant)
    try:
        repo_s, bare_s, waits = time_steps(m, variant, args, device)
    except Exception as e:  # torch.compile, out of memory: a row with a note, not a traceback
        row.note = f"{type(e).__name__}: {one_line(e)}"[:300]
        return row
    row.repo_s, row.bare_s = statistics.median(repo_s), statistics.median(bare_s)
    row.wait_fraction = statistics.median(waits)
    if device.type == "cuda" and m.flops:
        peak = bf16_peak_tflops(torch.cuda.get_device_name(device))
        row.mfu = m.flops / row.repo_s / (peak * 1e12) if peak else None
    return row


# ------------------------------------------------------------------ step benchmark: report


def format_rows(rows: list[Row]) -> str:
    head = f"{'variant':<45} {'repo img/s':>10} {'bare img/s':>10} {'overhead':>8} "
    head += f"{'wait':>6} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.note:
            lines.append(f"{r.variant.label:<45} failed: {r.note}")
            continue
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(
            f"{r.variant.label:<45} {r.repo_images_per_s:>10.1f} {r.bare_images_per_s:>10.1f} "
            f"{r.overhead_ratio:>7.3f}x {r.wait_fraction:>6.3f} {mfu:>6}"
        )
    return "\n".join(lines)


def write_csv(rows: list[Row], device: str, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            v, m = r.variant, r.model
            figures = ["", "", "", "", ""]
            if not r.note:
                mfu = "" if r.mfu is None else f"{r.mfu:.4f}"
                figures = [f"{r.repo_images_per_s:.2f}", f"{r.bare_images_per_s:.2f}"]
                figures += [f"{r.overhead_ratio:.4f}", f"{r.wait_fraction:.4f}", mfu]
            writer.writerow(
                [device, m.name, m.image_size, m.batch, v.amp, v.channels_last, v.compile]
                + [*figures, r.note]
            )


def write_chart(rows: list[Row], title: str, path: Path) -> None:
    """Two horizontal bars per row that ran: the repo step (blue), the bare step (grey), on a
    log axis."""
    done = [r for r in rows if not r.note][::-1]
    fig = Figure(figsize=(8, 0.8 * max(1, len(done)) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(done))
    for offset, name, colour, values in (
        (0.2, "repo step", "tab:blue", [r.repo_images_per_s for r in done]),
        (-0.2, "bare step", "tab:gray", [r.bare_images_per_s for r in done]),
    ):
        bars = ax.barh(y + offset, values, height=0.38, color=colour, label=name)
        ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values], padding=3, fontsize=8)
    labels = [f"{r.model.name} {r.model.image_size} px\n{r.variant.label}" for r in done]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")  # models differ ~1000-fold
    ax.set_xlabel("images per second (log scale)")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_model(path: str | Path, args: argparse.Namespace, cuda: bool) -> StepModel:
    """The model of the experiment at `path` with --set, its image size and random weights
    (--no-pretrained, where the model takes vgginit or pretrained), and its batch."""
    config = load_from_args(path, argparse.Namespace(set=args.set))
    params = inspect.signature(import_class(config.model.model, "[model] model", "model"))
    params = set(params.parameters)
    sized = "image_size" in params  # the VGG-16 models; TinyConv is made for 32 px
    size = (args.image_size or (320 if cuda else CPU_IMAGE_SIZE)) if sized else TINY_IMAGE_SIZE
    batch = args.batch_size or (8 if sized and not cuda else config.data.batch_size)
    flags = argparse.Namespace(set=args.set, image_size=size if sized else None)
    flags.no_pretrained = bool({"vgginit", "pretrained"} & params)
    config = load_from_args(path, flags)
    with torch.device("meta"):  # shapes only: nothing allocated, nothing computed
        probe = build_model(config)
        linear = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]
        x = torch.empty(1, 3, size, size)
        n_labels = linear[-1].out_features if linear else probe(x)["out"].shape[1]
    flops = training_step_flops(config, (batch, 3, size, size), n_labels)
    name = config.model.model.rsplit(":", 1)[-1]
    n_params = sum(p.numel() for p in probe.parameters())
    pixels = args.pixels or ("uint8" if sized else "float32")
    return StepModel(config, name, size, batch, pixels, n_labels, n_params, flops, args.steps)


def model_line(m: StepModel) -> str:
    gflop = "not counted" if m.flops is None else f"{m.flops / m.batch / 1e9:.4g} GFLOP"
    return (
        f"model: {m.name} ({m.n_params:,} parameters, {m.n_labels} outputs, random init) at "
        f"{m.image_size} px, batch {m.batch} of {m.pixels} images; training step "
        f"(forward + backward) {gflop} per image"
    )


def step_benchmark(args: argparse.Namespace) -> int:
    first = load_from_args(args.config[0], argparse.Namespace(set=args.set))
    device = pick_device(args.device or first.run.device)
    cuda = device.type == "cuda"
    args.warmup = args.warmup or (5 if cuda else 1)
    amps = args.amp or [first.train.amp if cuda else "off"]
    if not cuda and amps != ["off"]:
        raise ConfigError(
            "--amp bf16/fp16 needs CUDA: the training loop runs float32 on the CPU; use --amp off."
        )
    layouts = args.channels_last or [first.train.channels_last and cuda]
    compiles = args.compile or [first.train.compile]
    variants = [Variant(a, c, k) for a in amps for c in layouts for k in compiles]
    models = [step_model(path, args, cuda) for path in args.config]  # config errors first
    set_determinism(first.run.deterministic, first.train.cudnn_benchmark and cuda)
    name = device_name(device) if cuda else cpu_model()
    print(
        f"device: {name} ({device}); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for m in models:
        print()
        print(model_line(m))
        rows += [measure_variant(m, v, args, device) for v in variants]
        print(format_rows([r for r in rows if r.model is m]))
        print(
            f"timing: {args.warmup} warm-up steps, then {args.repeats} x {m.steps or '-'} "
            "steps of each, taking turns; medians"
        )
    if cuda and bf16_peak_tflops(name) is None:
        print(f"MFU not reported: no bf16 peak known for {name} (BF16_PEAK_TFLOPS).")
    worst = {}
    for r in rows:
        if not r.note:
            key = f"{r.model.name} at {r.model.image_size} px"
            worst[key] = max(worst.get(key, 0.0), r.overhead_ratio)
    ratios = ", ".join(f"{key} {ratio:.2f}x" for key, ratio in worst.items())
    print(f"\nrepo / bare step, the largest per model: {ratios} (goal <= {STEP_GOAL:.2f}x each)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "results.csv", out / "images_per_s.png"
    write_csv(rows, name, csv_path)
    title = f"Training step: this repository's loop against a bare step\n{name}"
    write_chart(rows, title, png_path)
    print(f"wrote {csv_path} and {png_path}")
    return 0


# ------------------------------------------------------------------ whole run (Demo-2)

# The Demo-2 run without the repository's machinery: the same data, model, optimizer and
# epochs, validation with per-class AUROC each epoch; no tracking, checkpoints or reports.
BARE_DEMO2 = """\
import sys
sys.path.insert(0, {repo!r})
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from load_dataset.custom_tiny import TinyData
from models.custom_models_base import TinyConv

torch.manual_seed({seed})
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
train, val = TinyData("train", **{data_args!r}), TinyData("val", **{data_args!r})
pin = device.type == "cuda"
train_loader = DataLoader(train, batch_size={batch_size}, shuffle=True, pin_memory=pin,
                          drop_last=len(train) >= {batch_size})
val_loader = DataLoader(val, batch_size={batch_size}, pin_memory=pin)
model = TinyConv(**{model_args!r}).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr={lr!r}, momentum={momentum!r},
                            weight_decay={weight_decay!r})
loss_fn = torch.nn.BCEWithLogitsLoss()
for epoch in range(1, {epochs} + 1):
    model.train()
    for batch in train_loader:
        x, y = batch["data"].to(device), batch["label"].to(device)
        loss = loss_fn(model(x)["out"], y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    val_loss, probs, labels = 0.0, [], []
    with torch.no_grad():
        for batch in val_loader:
            x, y = batch["data"].to(device), batch["label"].to(device)
            logits = model(x)["out"]
            val_loss += loss_fn(logits, y).item() * len(y)
            probs.append(logits.sigmoid().cpu())
            labels.append(y.cpu())
    probs, labels = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    auroc = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(labels.shape[1])]
    print(f"epoch {{epoch}}  val_loss {{val_loss / len(val):.4f}}  "
          f"val_auroc_mean {{np.mean(auroc):.4f}}", flush=True)
"""


def bare_demo2_script(config, epochs: int) -> str:
    """BARE_DEMO2 with the settings of `config` (Demo-2's) filled in, for `python -c`."""
    o = config.optimizer
    return BARE_DEMO2.format(
        repo=str(REPO_ROOT), seed=config.run.seed, data_args=dict(config.data.args),
        batch_size=config.data.batch_size, model_args=dict(config.model.args), lr=o.lr,
        momentum=o.momentum, weight_decay=o.weight_decay, epochs=epochs,
    )  # fmt: skip


class ProcessFailed(Exception):
    """A timed process ended with an exit code other than 0."""


def time_processes(
    commands: dict[str, list[str]], repeats: int, env: dict[str, str], cwd: Path
) -> dict[str, list[float]]:
    """Seconds of each command (name: argv), run `repeats` times, the commands taking turns.
    ProcessFailed, at once, when one exits with another code than 0."""
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
            runs[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [""]
                raise ProcessFailed(f"{name} exited with code {done.returncode}: {tail[0]}")
    return runs


def summary_line(runs: dict[str, list[float]]) -> str:
    """The ratio of the medians; and, as a machine whose neighbours come and go moves both
    by seconds, the ratios round by round (the processes of a round ran one after another)."""
    demo, bare = (statistics.median(runs[name]) for name in ("Demo-2", "bare loop"))
    ratios = sorted(a / b for a, b in zip(runs["Demo-2"], runs["bare loop"]))
    spread = f", {ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else ""
    return (
        f"whole run: Demo-2 {demo:.1f} s, bare loop {bare:.1f} s, ratio {demo / bare:.2f} "
        f"(round by round {statistics.median(ratios):.2f}{spread}; goal <= {WHOLE_RUN_GOAL}x)"
    )


def whole_run(args: argparse.Namespace, tmp: Path) -> int:
    config = load(DEMO2_CONFIG)
    epochs = args.epochs or config.train.epochs
    store = tmp / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    demo = [sys.executable, str(DEMO2), "--epochs", str(epochs), "--patience", "0"]
    commands = {
        "Demo-2": demo + ["--results-dir", str(tmp / "results")],
        "bare loop": [sys.executable, "-c", bare_demo2_script(config, epochs)],
    }
    # A new SQLite store takes seconds to create; a user's store exists already: not timed.
    start = time.perf_counter()
    init = "from mlflow.tracking import MlflowClient as C; import os; "
    init += "C(tracking_uri=os.environ['MLFLOW_TRACKING_URI']).search_experiments()"
    try:
        time_processes({"creating the MLflow store": [sys.executable, "-c", init]}, 1, env, tmp)
        print(f"MLflow store {store} created in {time.perf_counter() - start:.1f} s (not timed)")
        where = "CUDA" if torch.cuda.is_available() else "the CPU"
        print(f"Demo-2: {epochs} epochs, patience 0, both on {where}")
        runs = time_processes(commands, args.repeats, env, tmp)
    except ProcessFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    print(f"{'process':<14} {'median s':>9}   rounds (s, in order)")
    for name, seconds in runs.items():
        rounds = " ".join(f"{s:.2f}" for s in seconds)
        print(f"{name:<14} {statistics.median(seconds):>9.2f}   {rounds}")
    print()
    print(summary_line(runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "whole_run.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["process", "round", "seconds", "epochs"])
        for name, seconds in runs.items():
            for i, s in enumerate(seconds, start=1):
                writer.writerow([name, i, f"{s:.3f}", epochs])
    print(f"wrote {out / 'whole_run.csv'}")
    return 0


# ------------------------------------------------------------------ command line


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in the one line `error: ...` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"takes on or off, not {text!r}")
    return text == "on"


STEP_FLAGS = ("config", "image_size", "batch_size", "device", "amp", "channels_last", "compile")
STEP_FLAGS += ("steps", "warmup", "pixels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m benchmarks.train",
        description="This repository's training step (or whole Demo-2 run) against bare PyTorch.",
    )
    a = parser.add_argument
    a("--config", nargs="+", help="experiment TOMLs of the models (default: Demo-3's, Demo-2's)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    a("--image-size", type=int, help="side of the VGG-16 models' images (320 on CUDA, 96 on CPU)")
    a("--batch-size", type=int, help="default: the config's (on the CPU 8 for VGG-16)")
    a("--device", help="auto, cpu, cuda, cuda:1 (default: the config's)")
    a("--amp", nargs="+", choices=AMP_MODES, help="variants, e.g. off bf16 (CUDA only)")
    on_or_off = {"nargs": "*", "type": on_off, "metavar": "{off,on}"}
    a("--channels-last", **on_or_off, help="variants: on (no value), off, or off on")
    a("--compile", **on_or_off, help="variants: on (no value), off, or off on")
    a("--pixels", choices=("uint8", "float32"), help="sample images (default: as the dataset's)")
    a("--steps", type=int, help=f"timed steps per pass (default: about {PASS_SECONDS:g} s of them)")
    a("--warmup", type=int, help="untimed steps first (default 5 on CUDA, 1 on the CPU)")
    a("--repeats", type=int, default=3, help="timed passes (rounds with --whole-run)")
    a("--whole-run", action="store_true", help="time whole Demo-2 processes instead")
    a("--epochs", type=int, help="--whole-run: epochs of both (default: Demo-2's config)")
    a("--out", default=str(DEFAULT_OUT), help="folder for the CSV and the chart")
    args = parser.parse_args(argv)
    for flag, values in (("--channels-last", args.channels_last), ("--compile", args.compile)):
        if values == []:  # the flag alone means on
            setattr(args, flag[2:].replace("-", "_"), [True])
    numbers = ("repeats", "image_size", "batch_size", "steps", "warmup", "epochs")
    for name in numbers:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.whole_run:
        given = [f for f in STEP_FLAGS if getattr(args, f) is not None] + ["set"] * bool(args.set)
        if given:
            flag = given[0].replace("_", "-")
            parser.error(f"--{flag} applies to the step benchmark, not to --whole-run")
    elif args.epochs is not None:
        parser.error("--epochs goes with --whole-run")
    args.config = args.config or [str(path) for path in DEFAULT_CONFIGS]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.whole_run:
        return run_in_temporary_folder(whole_run, args, "benchmark_train_")
    try:
        return step_benchmark(args)
    except (UserError, OSError) as e:
        return print_user_error(e)


if __name__ == "__main__":
    sys.exit(main())
