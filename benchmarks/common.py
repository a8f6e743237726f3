"""Command-line pieces shared by the benchmarks that measure the PASCAL data path
(`benchmarks.loader`, `benchmarks.tutorial_differences`): which data they read, and one-line
errors (also for `benchmarks.train --whole-run`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from src.config import REPO_ROOT
from src.errors import UserError, print_user_error


def add_source_flags(parser: argparse.ArgumentParser, default_split: str) -> None:
    """--voc-dir or --synthetic N, --sbd-dir, --split and --image-size: the PASCAL data a
    measuring tool reads."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--voc-dir", help="folder holding VOCdevkit/VOC2012")
    source.add_argument(
        "--synthetic", type=int, metavar="N", help="write a temporary tree of N synthetic photos"
    )
    parser.add_argument("--sbd-dir", help="SBD folder (img/, cls/, train_noval.txt)")
    parser.add_argument("--split", choices=("train", "val"), default=default_split)
    parser.add_argument("--image-size", type=int, default=320)


def check_source_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.synthetic is not None and args.synthetic < 1:
        parser.error("--synthetic needs at least 1 image")
    if args.synthetic is not None and args.sbd_dir:
        parser.error("--sbd-dir goes with --voc-dir, not with --synthetic")
    if args.image_size < 1:
        parser.error("--image-size must be at least 1")


def run_in_temporary_folder(run_fn, args: argparse.Namespace, prefix: str) -> int:
    """`run_fn(args, tmp)` with a temporary folder; data errors become one line, exit 2."""
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            return run_fn(args, Path(tmp))
    except (UserError, OSError) as e:  # OSError: a folder or file that cannot be read
        return print_user_error(e)


def timed_command(cmd: list[str], env: dict[str, str], name: str) -> float:
    """Wall seconds of `cmd` run in the repository root with `env`; a command that fails
    ends the benchmark with the last lines of its output, under `name`."""
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    seconds = time.monotonic() - started
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
        raise SystemExit(f"{name} failed:\n{tail}")
    return seconds


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
