"""Metrics for a tracking server, sent from a background thread so training never waits on it.

A server that dies or hangs mid-run used to stall training for minutes (the MLflow client
retries each request with a growing back-off), then end it with a traceback. Each epoch's
metrics go into the outbox and the training loop goes on; the sender thread delivers them in
order, and when the server does not answer it keeps them and tries again every few seconds
until it is back. Nothing is lost if the process ends first: every epoch's metrics are in
`last.pt`, and a resumed run logs the epochs its MLflow run is missing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from src.errors import one_line


class Outbox:
    def __init__(self, send: Callable[[Any], None], retry_s: float = 2.0) -> None:
        self._send = send
        self._retry_s = retry_s
        self._items: deque[Any] = deque()
        self._changed = threading.Condition()
        self.failing_since: float | None = None  # time.monotonic() of the first failure
        self.last_error = ""
        self._thread = threading.Thread(target=self._deliver, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def pending(self) -> int:
        with self._changed:
            return len(self._items)

    def unreachable_s(self) -> float:
        """How long the server has failed to take the oldest item (0 while it answers)."""
        since = self.failing_since
        return 0.0 if since is None else time.monotonic() - since

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything is sent (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return True

    def _deliver(self) -> None:
        while True:
            with self._changed:
                while not self._items:
                    self._changed.wait()
                item = self._items[0]
            try:
                self._send(item)
            except Exception as e:  # the server is down, hangs, or refuses: keep it, retry
                self.last_error = one_line(e)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                time.sleep(self._retry_s)
                continue
            with self._changed:
                self._items.popleft()
                self.failing_since = None
                self._changed.notify_all()
