"""A background thread that is replaced when it ends unexpectedly.

The long-lived threads of a server process (the model follower, the shadow's scorer and evidence recorder,
the prediction log's collector, the drift gauge) each run their loop through a `SupervisedThread`. A loop
that ends with an exception its own guards did not catch (even a BaseException, such as a library's
SystemExit) is logged once, as critical with the thread's event name, and a new thread runs the loop again:
nothing stays silently missing while health says SERVING. A loop that returns, or that ends while its owner
is stopping, is not replaced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from streamflow.server.logs import event


class SupervisedThread:
    """Runs `loop` on a daemon thread named `name`, replaced when it ends unexpectedly (see the module)."""

    def __init__(
        self,
        name: str,
        loop: Callable[[], None],
        stopping: threading.Event,
        restarted_event: str,
        logger: logging.Logger,
        what: str,
    ) -> None:
        """`stopping` is the owner's: once set, a loop that ends is not replaced. `what` names the thread
        in the log line ("the <what> thread ended unexpectedly"), `restarted_event` in its `event` field."""
        self.name = name
        self._loop = loop
        self._stopping = stopping
        self._restarted_event = restarted_event
        self._log = logger
        self._what = what
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        """Wait for the thread, and for any replacement it started before it saw the stop (set `stopping`
        first); a no-op on the thread itself."""
        thread = self._thread
        while thread is not None and thread is not threading.current_thread():
            thread.join()
            if thread is self._thread:
                return
            thread = self._thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            if self._stopping.is_set():
                return
            self._log.critical(
                "the %s thread ended unexpectedly; starting a new one",
                self._what,
                exc_info=True,
                extra=event(self._restarted_event),
            )
            self.start()
