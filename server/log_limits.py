"""Log lines that a flood cannot multiply: the first event of a kind at once, then one line per interval
that counts what happened meanwhile."""

from __future__ import annotations

import logging
import threading
import time


class ThrottledLog:
    """Per kind of event: logs the first at once, then at most one line per `interval_s` with the count of
    events not logged since. Thread-safe; costs a dict lookup per suppressed event."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # kind -> monotonic time of its last line
        self._suppressed: dict[str, int] = {}

    def event(self, kind: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        """Record one event of `kind`; logs `message % args` unless a line of that kind was logged within
        the interval."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d more like it in the last %.0f s were not logged)"
            args = (*args, suppressed, now - (last or now))
        self._log.log(level, message, *args, exc_info=exc_info)
