"""One process per run at a time: a lock on the run's results folder.

A run holds it from start (or resume) to end, so the same run resumed twice at once, or
resumed while it still trains, is refused in one line instead of two processes writing the
same `last.pt` and logging every epoch twice. The lock is the kernel's (`flock`): a process
that dies, even by SIGKILL, lets it go.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from src.errors import CheckpointError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CheckpointError(
                f"The run in {folder} is in use by {holder}; wait for it to end (or stop it) "
                "before resuming it."
            ) from None
        except OSError:  # a file system without locks (some NFS mounts): run unguarded
            pass
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
