"""A command line run in the test's own process: `python SCRIPT ARGS` or `python -m MODULE ARGS`.

The script or module runs as `__main__` (runpy) with its own argv and working folder, as the
interpreter would run it, without paying 5-10 s of imports for a new interpreter. For the
cases where the process itself is not what is tested: signals, torchrun, a second process
holding a lock and a damaged file found mid-training still run as real processes.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
import warnings
from pathlib import Path


def run_here(argv: list[str], cwd: Path, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`python *argv` here: the exit code, stdout and stderr, as `subprocess.run` gives them."""
    monkeypatch.chdir(cwd)
    module = argv[1] if argv[0] == "-m" else None
    args = argv[2:] if module else argv[1:]
    monkeypatch.setattr(sys, "argv", [module or str(argv[0]), *args])
    capsys.readouterr()
    try:
        with warnings.catch_warnings():  # "... found in sys.modules": imported by the tests
            warnings.simplefilter("ignore", RuntimeWarning)
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(argv[0]), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)
