"""The errors a user can cause and fix, in one place; this module imports nothing of the project.

Every one derives from `UserError`: its message is one sentence naming the file, key or value
and saying what to do, and every command catches `UserError` in one place (`src.cli.main`,
through `exit_on_user_error`) and prints it as one line with exit code 2. The second base says
what kind of mistake it is to code that catches the built-in types.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake the user can fix; `str(e)` is one sentence saying what and how."""


class ConfigError(UserError, ValueError):
    """A config file, key, value or flag is wrong."""


class DataError(UserError, ValueError):
    """A data file, folder or value is missing or wrong, or a dataset breaks the contract."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the experiment."""


class TrackingError(UserError, RuntimeError):
    """MLflow cannot be reached, or a run or experiment is not what the command needs."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


class PretrainedWeightsError(UserError, RuntimeError):
    """The ImageNet weights for VGG-16 can be neither found on disk nor downloaded."""


def one_line(e: BaseException) -> str:
    """The user-facing sentence of an error, also when re-raised from a DataLoader worker."""
    text = str(e)
    if "Original Traceback" in text:  # DataLoader worker: the original message is last
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def print_user_error(e: BaseException) -> int:
    """Print `e` as the one line `error: ...` on stderr; return the exit code 2."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2
