"""Log lines on stderr: JSON or text (`STREAMFLOW_LOG_FORMAT`), an access line per call, lifecycle events.

- `configure_logging` sets up every command's logging once, before MLflow or Feast are imported: one stderr
  handler, Python warnings through it, and the noise a new user saw silenced (SQLAlchemy's `noload`
  deprecation warning at each start, Feast's "Registry cache expired, so refreshing" ten times per model load,
  MLflow's own coloured handler, its download progress bars and the INFO lines of its schema migrations at
  each start). No line carries ANSI colour codes.
- Lifecycle events (a model loaded, refused or swapped, the online store down and back, a worker restarted)
  are ordinary log calls with `extra=event("name", key=value, ...)`: JSON lines get `"event": "name"` and
  each key as a field; text lines read as before.
- `AccessLog` is the call observer that writes one `"event": "access"` line per call, at most
  `STREAMFLOW_ACCESS_LOG_RATE` lines per second per process, so a flood cannot fill a disk. Errors have a
  budget of their own of the same size, so a flood of successes never hides them; what a second drops is
  counted in one `access_dropped` line when it ends. A line is formatted only when it is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from streamflow.settings import LogFormat, Settings

if TYPE_CHECKING:
    from streamflow.server.rpc import Call

ACCESS_LOGGER = "streamflow.access"
"""The logger of access lines, so an operator can route or silence them apart from the rest."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# The access line: its message template and the names of its arguments, in order. The JSON formatter pairs
# them up; nothing is formatted for a line the rate limit drops.
_ACCESS_MESSAGE = "%s %s %.3f ms request_id=%s trace_id=%s model_version=%s users=%d caller=%s peer=%s"
_ACCESS_FIELDS = (
    "method",
    "code",
    "duration_ms",
    "request_id",
    "trace_id",
    "model_version",
    "users",
    "caller",
    "peer",
)


def event(name: str, **fields: object) -> dict[str, object]:
    """`extra=` of a lifecycle event's log call: JSON lines carry `"event": name` and each field."""
    return {"event": name, "fields": fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and `event` plus its fields
    for lifecycle events and access lines; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if record.msg is _ACCESS_MESSAGE:
            line["event"] = "access"
            line.update(zip(_ACCESS_FIELDS, record.args or (), strict=True))
            line["duration_ms"] = round(line["duration_ms"], 3)
            return json.dumps(line)
        line["message"] = _ANSI.sub("", record.getMessage())
        name = getattr(record, "event", None)
        if name is not None:
            line["event"] = name
            line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = _ANSI.sub("", self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, without ANSI colour codes."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.msg is _ACCESS_MESSAGE else _ANSI.sub("", text)


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message holds `text` (for loggers with few lines)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self._text not in record.getMessage()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not when the handler was made: a process
    that swaps stderr (pytest's capture, a daemonizing wrapper) would otherwise leave the handler writing to
    a closed file."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # fixed to the current sys.stderr


def configure_logging(settings: Settings) -> None:
    """Set up this process's logging (the CLI calls it before anything imports MLflow or Feast)."""
    # MLflow otherwise installs a handler of its own on `mlflow` (coloured, not propagating), and draws
    # progress bars on stderr for each artifact download.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if settings.log_style is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # warnings become log lines in the same format
    # MLflow's SQLAlchemy store uses the `noload` strategy SQLAlchemy 2 deprecates: a warning at every start
    # that no user can act on. Dropped as a log line: an import puts a `once` filter for every
    # DeprecationWarning ahead of any `ignore` set here.
    logging.getLogger("py.warnings").addFilter(_DropMessage("``noload`` loader strategy is deprecated"))
    # MLflow's SQLite store runs its schema migrations at each start: eight alembic INFO lines per process.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Feast refreshes its registry cache per FeatureService lookup while a model loads: an INFO line each.
    logging.getLogger("feast.infra.registry.registry").addFilter(_DropMessage("Registry cache expired"))
    # urllib3 warns "Retrying ..." at each retry of MLflow's HTTP client: every failed registry poll of every
    # worker (276 lines in 70 s during an outage). The watcher logs the outage and its end once each.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class AccessLog:
    """Call observer: one access line per call, at most `rate` per second for successes and as many again
    for errors; 0 turns the access log off."""

    def __init__(self, rate: int, trace_ids: bool = False) -> None:
        self._rate = rate
        self._trace_ids = trace_ids
        self._log = logging.getLogger(ACCESS_LOGGER)
        self._window = 0  # the current second (monotonic), whose lines are counted below
        self._written_ok = 0
        self._written_errors = 0
        self._dropped_ok = 0
        self._dropped_errors = 0

    def started(self, call: Call) -> None:
        pass

    def finished(self, call: Call) -> None:
        if self._rate == 0:
            return
        window = int(time.monotonic())
        if window != self._window:
            self._flush()
            self._window = window
        ok = call.code.value[0] == 0
        if ok:
            if self._written_ok >= self._rate:
                self._drop(ok)
                return
            self._written_ok += 1
        else:
            if self._written_errors >= self._rate:
                self._drop(ok)
                return
            self._written_errors += 1
        if self._trace_ids:
            from streamflow.server.tracing import current_trace_id  # tracing on: the module is loaded already

            trace_id = current_trace_id()
        else:
            trace_id = ""
        self._log.log(
            logging.INFO if ok else logging.WARNING,
            _ACCESS_MESSAGE,
            f"/{call.service}/{call.method}",
            call.code.name,
            call.seconds * 1000.0,
            call.request_id,
            trace_id,
            call.model_version,
            call.users,
            call.caller,
            call.context.peer(),
        )

    def _drop(self, ok: bool) -> None:
        if not (self._dropped_ok or self._dropped_errors):
            # The second's summary is due when it ends, even if no call comes after the flood.
            asyncio.get_running_loop().call_later(1.0, self._flush_if_over, self._window)
        if ok:
            self._dropped_ok += 1
        else:
            self._dropped_errors += 1

    def _flush_if_over(self, window: int) -> None:
        if window == self._window:
            self._flush()
            self._window = int(time.monotonic())

    def _flush(self) -> None:
        """Log how many lines the ending second dropped, and start counting afresh."""
        dropped_ok, dropped_errors = self._dropped_ok, self._dropped_errors
        self._written_ok = self._written_errors = self._dropped_ok = self._dropped_errors = 0
        if dropped_ok or dropped_errors:
            self._log.warning(
                "access log: %d successful and %d failed calls not logged in one second (at most %d of each "
                "per second, STREAMFLOW_ACCESS_LOG_RATE)",
                dropped_ok,
                dropped_errors,
                self._rate,
                extra=event("access_dropped", ok=dropped_ok, errors=dropped_errors, rate=self._rate),
            )
