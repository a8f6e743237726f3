"""Metrics sent from a background thread, so training never waits on the MLflow store.

A server that dies or hangs mid-run used to stall training for minutes (the MLflow client
retries each request with a growing back-off), then end it with a traceback; and even a local
SQLite store costs tens of milliseconds a write, a visible share of a short epoch. Each
epoch's metrics go into the outbox and the training loop goes on. The sender thread delivers
them in order, everything waiting as one write: after `linger_s` (epochs of a fast run go
together) or at once when the run needs the store for something else (`drain`). When a server
does not answer, it keeps them and tries again every few seconds until it is back; a local
store's failure is kept in `error` for the training thread to raise. Nothing is lost if the
process ends first: every epoch's metrics are in `last.pt`, and a resumed run logs the epochs
its MLflow run is missing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from src.errors import one_line


class Outbox:
    """Items are lists; the sender is given the items waiting, joined into one list."""

    def __init__(
        self,
        send: Callable[[list[Any]], None],
        retry_s: float = 2.0,
        linger_s: float = 0.0,
        retry: bool = True,
    ) -> None:
        self._send = send
        self._retry_s = retry_s
        self._linger_s = linger_s
        self._retry = retry
        self._items: deque[list[Any]] = deque()
        self._changed = threading.Condition()
        self._waiting_since = 0.0  # time.monotonic() when the oldest waiting item came
        self._hurry = False  # a drain waits: send without lingering
        self._closed = False
        self.failing_since: float | None = None  # time.monotonic() of the first failure
        self.last_error = ""
        self.error: Exception | None = None  # what stopped an outbox that does not retry
        self._thread = threading.Thread(target=self._deliver, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, item: list[Any]) -> None:
        with self._changed:
            if not self._items:
                self._waiting_since = time.monotonic()
            self._items.append(item)
            self._changed.notify_all()

    def pending(self) -> int:
        with self._changed:
            return len(self._items)

    def unreachable_s(self) -> float:
        """How long the store has failed to take the oldest item (0 while it answers)."""
        since = self.failing_since
        return 0.0 if since is None else time.monotonic() - since

    def drain(self, timeout_s: float) -> bool:
        """Send what waits now and wait until it is sent (True), or until `timeout_s` passed
        or the outbox stopped on an error (False)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._hurry = True
            self._changed.notify_all()
            while self._items and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
            return self.error is None

    def close(self) -> None:
        """The thread ends (what still waits is dropped: `drain` first to send it)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _take(self) -> list[list[Any]] | None:
        """The items waiting, once there is one and it has lingered; None once closed (lock
        held)."""
        while not self._items and not self._closed:
            self._changed.wait()
        if self._closed:
            return None
        deadline = self._waiting_since + self._linger_s
        while not self._hurry and (left := deadline - time.monotonic()) > 0:
            self._changed.wait(left)
        return list(self._items)

    def _deliver(self) -> None:
        while True:
            with self._changed:
                taken = self._take()
            if taken is None:
                return
            try:
                self._send([x for item in taken for x in item])
            except Exception as e:  # a server down, hanging or refusing: keep them, retry
                self.last_error = one_line(e)
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                if not self._retry:
                    with self._changed:
                        self.error = e
                        self._changed.notify_all()
                    return
                time.sleep(self._retry_s)
                continue
            with self._changed:
                for _ in taken:
                    self._items.popleft()
                self.failing_since = None
                if self._items:  # they came during the write: they linger in turn
                    self._waiting_since = time.monotonic()
                else:
                    self._hurry = False
                self._changed.notify_all()
