"""Every command in README.md, as typed (after `source .venv/bin/activate`, in the repository
root): the script or module exists and its own parser takes the flags, and the experiment file
and `--set` keys load (argparse, MLflow's click commands, torchrun's parser); a `make` target
exists; the Python and TOML blocks parse. Nothing is trained, downloaded or served: that
needs data and GPUs this machine has not; the commands that do run here are tested elsewhere
(`make demo`, `make smoke`, the Demo and tool tests). Also what the README says of the install:
constraints.txt pins every package of requirements.txt within its bounds, at the release this
environment runs."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import src.cli as cli
from tests.command_line import run_here

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Placeholders the README asks the reader to fill in.
PLACEHOLDERS = {"<run id>": "0" * 32, "<parent run id>": "1" * 32}
# Not this repository's programs (shown for how to use them with it) and shell built-ins.
OTHERS = {"ssh", "curl", "trap", "wait", "scontrol"}


def blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced block of `language` in the README."""
    found, lines = [], README.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            if start is None:
                start, lang = number, line[3:].strip()
            else:
                if lang == language:
                    found.append((start + 1, "\n".join(lines[start:number - 1])))  # fmt: skip
                start = None
    return found


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each command in the bash blocks: continuation lines joined, comments,
    `VAR=value` prefixes and a trailing `&` dropped, placeholders filled in, `${...}` removed
    and `$var` read as a word (the SLURM script's lines)."""
    out = []
    for start, text in blocks("bash"):
        for offset, line in enumerate(text.replace("\\\n", " ").splitlines()):
            for placeholder, value in PLACEHOLDERS.items():
                line = line.replace(placeholder, value)
            line = re.sub(r"\$\{[^}]*\}", "", line)
            line = re.sub(r"\$\(.*\)|\$\w+|\$!", "x", line)
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv and argv[-1] == "&":
                argv = argv[:-1]
            if argv and not re.fullmatch(r"\w+=\S*", argv[0]):  # not a shell variable
                out.append((f"README.md:{start + offset}", argv))
    return out


COMMANDS = commands()


class Parsed(BaseException):
    """Raised once a command's arguments (and experiment config) are read: stop there."""


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_readme_command(where, argv, monkeypatch, capsys):
    if argv[0] == "srun":  # SLURM's launcher: its options (--name=value), then the command
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
        assert argv, f"{where}: srun without a command"
    program = argv[0]
    if program in OTHERS:
        return
    if program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE)
        assert set(argv[1:]) <= set(targets), f"{where}: no make target {argv[1:]}"
    elif program in ("python3", ".venv/bin/python") and argv[1:3] in (
        ["-m", "venv"],
        ["-m", "pip"],
    ):
        check_install(where, argv[3:])
    elif program == "source":
        assert (REPO / argv[1]).is_file() or Path(sys.prefix, "bin", "activate").is_file()
    elif program in ("mlflow", ".venv/bin/mlflow"):
        check_mlflow(where, argv[1:])
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        check_python(where, [args.training_script, *args.training_script_args], monkeypatch, capsys)
    elif program == "python":
        check_python(where, argv[1:], monkeypatch, capsys)
    else:
        pytest.fail(f"{where}: {program!r} is not a program this test knows how to check")


def check_python(where: str, argv: list[str], monkeypatch, capsys) -> None:
    """`python ARGV` run here until its arguments are parsed and, for the training commands
    (src/cli.py), until the experiment file and the flags make a config; then stopped."""
    if argv[0] == "-m":
        path = REPO / Path(*argv[1].split("."))
        found = path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
        assert found, f"{where}: no module {argv[1]} in the repository"
    else:
        assert (REPO / argv[0]).is_file(), f"{where}: no {argv[0]}"
    depth = 0

    def stop_after(parse):
        def parse_args(self, *a, **kw):
            nonlocal depth
            depth += 1
            try:
                namespace = parse(self, *a, **kw)
            finally:
                depth -= 1
            if depth == 0 and not isinstance(self, cli.FlagParser):  # else: until the config
                raise Parsed
            return namespace

        return parse_args

    def load_then_stop(*a, **kw):
        original_load(*a, **kw)
        raise Parsed

    original_load = cli.load_from_args
    for mod in list(sys.modules.values()):  # `from src.cli import load_from_args` included
        if getattr(mod, "load_from_args", None) is original_load:
            monkeypatch.setattr(mod, "load_from_args", load_then_stop)
    for cls in (argparse.ArgumentParser, cli.FlagParser):
        monkeypatch.setattr(cls, "parse_args", stop_after(cls.parse_args))
    try:
        out = run_here(argv, REPO, capsys, monkeypatch)
    except Parsed:
        return
    shown = f"{where}: python {shlex.join(argv)}"
    if out.returncode:
        pytest.fail(f"{shown} exits with {out.returncode}: {out.stderr.strip()}")
    pytest.fail(f"{shown} ran to its end without reading its flags")


def check_install(where: str, args: list[str]) -> None:
    """`python3 -m venv` / `.venv/bin/python -m pip`: the requirement and constraint files the
    command names are this repository's."""
    for flag, name in zip(args, args[1:]):
        if flag in ("-r", "-c", "--requirement", "--constraint"):
            assert (REPO / name).is_file(), f"{where}: no {name}"


def check_mlflow(where: str, args: list[str]) -> None:
    """MLflow's own command line (click): the subcommand exists and takes the options."""
    import click
    from mlflow.cli import cli

    command: click.Command = cli
    try:
        context = command.make_context("mlflow", list(args))
        while isinstance(command, click.Group):
            rest = [*context._protected_args, *context.args]
            name, command, rest = command.resolve_command(context, rest)
            context = command.make_context(name, rest, parent=context)
    except click.ClickException as e:
        pytest.fail(f"{where}: mlflow {shlex.join(args)}: {e.format_message()}")
    assert Path(sys.executable).with_name("mlflow").is_file()  # what `make` installed


@pytest.mark.parametrize("start, text", blocks("python"), ids=lambda v: str(v)[:12])
def test_readme_python_blocks_compile(start, text):
    compile(text, f"README.md:{start}", "exec")


@pytest.mark.parametrize("start, text", blocks("toml"), ids=lambda v: str(v)[:12])
def test_readme_toml_blocks_parse(start, text):
    tomllib.loads(text)


def test_the_readme_shows_commands_of_each_kind():
    """The parsing above found what the README holds (not an empty list after an edit)."""
    programs = {argv[0] for _, argv in COMMANDS}
    assert {"make", "python", "torchrun", ".venv/bin/mlflow", "mlflow"} <= programs, programs
    assert len(COMMANDS) >= 25


def requirement_lines(name: str) -> list[Requirement]:
    """The requirements (or pins) of a file of the repository, comments left out."""
    lines = (line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pins() -> dict[str, Requirement]:
    """constraints.txt: canonical package name -> its pin."""
    return {canonicalize_name(p.name): p for p in requirement_lines("constraints.txt")}


def test_constraints_pin_every_requirement_within_its_bounds():
    found = pins()
    # Every pin holds from the Python `make constraints` ran on: `python_version >= "X.Y"`.
    markers = {str(p.marker) for p in found.values()}
    (python,) = {re.fullmatch(r'python_version >= "(\d+\.\d+)"', m)[1] for m in markers}
    needed = [
        r
        for r in requirement_lines("requirements.txt")
        if not r.marker or r.marker.evaluate({"python_version": python})
    ]
    assert {"torch", "mlflow", "tomli-w"} <= {canonicalize_name(r.name) for r in needed}
    for req in needed:
        pin = found.get(canonicalize_name(req.name))
        assert pin is not None, f"constraints.txt does not pin {req.name}; run make constraints"
        (exact,) = pin.specifier
        assert exact.operator == "==", pin
        assert req.specifier.contains(exact.version), f"constraints.txt: {pin} is outside {req}"


def test_this_environment_runs_the_pinned_releases():
    """The suite passes with the releases constraints.txt pins, where they hold (this Python);
    a CPU build of torch, `2.14.1+cpu`, is the pinned `2.14.1`."""
    found = pins()
    for req in requirement_lines("requirements.txt"):
        pin = found.get(canonicalize_name(req.name))
        if pin is None or not pin.marker.evaluate() or (req.marker and not req.marker.evaluate()):
            continue  # not pinned (the test above says so), or not for this Python
        installed = version(req.name)
        assert pin.specifier.contains(installed), (
            f"{req.name} {installed} is installed but constraints.txt pins {pin.specifier}: "
            "make install, or make constraints after make test passes"
        )
