"""The prediction log's serving side: every served prediction goes to a bounded queue, off the response path.

A record is what a caller got, as the server sent it: `(served_at, request_id, prediction, shadow)`, with
`prediction` the `Prediction` message's bytes (user, label, probability, model version, the 14 feature
values with their event times) and `shadow` the bytes of a shadow model's `Prediction` for the same user
(user, label, probability, model version; no features), or None. A user the shadow also scores is logged
once both halves are known (`AwaitingShadow`). Serializing
the message the response already holds costs a few microseconds; decoding it into columns happens where the
records are written (server/prediction_sink.py), never in a scoring worker, which imports none of pyarrow,
pandas or psycopg.

`RecordQueue` is the one mechanism both sides use: a bounded queue drained by a thread of its own into a
`deliver` function. In a worker of a multi-worker server, `deliver` sends a batch to the supervisor over a
Unix datagram socket every worker inherits (`SocketDelivery`); the supervisor's own queue delivers into the
sink; with one worker the sink runs in the server's process and its queue delivers straight into it.

- Never blocking a call: `offer` appends or, when the queue is full (a sink slow or down), drops and counts
  (`streamflow_prediction_log_dropped_total`), with one log line when an episode of drops starts and one with
  its count when it ends (`DROP_EPISODE_QUIET_S` without a drop, or at shutdown).
- A delivery that fails (the sink down) is logged once per outage, retried after `RETRY_S`, and logged once
  again when it recovers; records arriving meanwhile fill the queue, then are dropped and counted.
- A thread that died (a bug) is noticed at the next `offer`, logged once, and replaced.
- `close` delivers what is queued before returning: the server closes its queue after its last call was
  answered, so a clean shutdown loses nothing.
"""

from __future__ import annotations

import logging
import marshal
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from streamflow.server import metrics
from streamflow.server.logs import event

log = logging.getLogger(__name__)

Record = tuple[float, str, bytes, bytes | None]
"""`(served_at, request_id, prediction, shadow)`: Unix seconds, the call's request id, the `Prediction`
message's bytes, and a shadow model's `Prediction` bytes or None."""

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
WORKER_QUEUE_SIZE = 2_000
"""Records a scoring worker holds at most (about 2 MB; a worker stays under 200 MB): the supervisor reads
the socket at once and its own queue holds the backlog while the sink is slow."""
DELIVERY_BATCH = 256
"""Most records one delivery carries (a datagram of about 200 bytes each stays under 64 KiB)."""
IDLE_S = 1.0
"""Seconds without a record after which the thread calls `idle` (a Parquet sink completes a due file)."""
GATHER_S = 0.1
"""How long records gather before the thread delivers fewer than `DELIVERY_BATCH` of them. Waking it for each
record cost a third of a worker's Predicts/s at concurrency 32 (a thread switch and a datagram per call, and
in the supervisor a Parquet write per record); a full batch still wakes it at once."""
RETRY_S = 1.0
"""Seconds before a failed delivery is tried again."""
DATAGRAM_LIMIT = 60_000
"""Bytes of one datagram to the supervisor at most: a larger batch is split (the kernel's default send
buffer of a Unix socket bounds a datagram at about 200 KiB)."""


class RecordQueue:
    """A bounded queue of records, delivered in batches by a thread of its own (see the module's docstring).

    `where` names the queue in metrics and log lines (`worker`, `supervisor`, `server`); `drop_quiet_s`
    (default `DROP_EPISODE_QUIET_S`) is how long without a drop ends an episode of drops."""

    def __init__(
        self,
        deliver: Callable[[list[Record]], None],
        capacity: int,
        where: str,
        idle: Callable[[], None] | None = None,
        drop_quiet_s: float | None = None,
    ) -> None:
        self._deliver = deliver
        self._idle = idle
        self._capacity = capacity
        self._where = where
        self._queue: deque[Record] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._closing = False
        self._batch: list[Record] = []  # taken by the thread, not delivered yet (a replacement resumes it)
        self._dropping = 0  # records dropped in the current episode
        self._dropped_at = 0.0  # monotonic time of the episode's last drop
        self._drop_quiet_s = DROP_EPISODE_QUIET_S if drop_quiet_s is None else drop_quiet_s
        self._down_since: float | None = None
        self._dropped = metrics.PREDICTION_LOG_DROPPED.labels(where)
        self._thread = self._start_thread()

    def offer(self, records: Sequence[Record]) -> None:
        """Queue `records`, or drop (and count) those that do not fit; never blocks on the sink."""
        if not self._thread.is_alive() and not self._closing:
            self._replace_thread()
        with self._ready:
            room = self._capacity - len(self._queue)
            if room >= len(records):
                self._queue.extend(records)
                self._end_quiet_drop_episode()
            else:
                self._queue.extend(records[: max(room, 0)])
                self._drop(len(records) - max(room, 0))
            if len(self._queue) >= DELIVERY_BATCH:
                self._ready.notify()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Deliver what is queued, then stop the thread; False if it could not within `timeout_s`."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if not self._thread.is_alive():
            self._replace_thread()
        self._thread.join(timeout_s)
        with self._ready:
            if self._dropping:
                self._end_drop_episode()
            left = len(self._queue) + len(self._batch)
        if left:
            self._dropped.inc(left)
            log.error(
                "prediction log (%s): %d records not delivered at shutdown",
                self._where,
                left,
                extra=event("prediction_log_lost", where=self._where, records=left),
            )
        return not left

    @property
    def queued(self) -> int:
        """Records waiting for delivery now."""
        return len(self._queue)

    def _drop(self, count: int) -> None:
        if not self._dropping:
            log.warning(
                "prediction log (%s): queue full (%d records), dropping records until the sink catches up",
                self._where,
                self._capacity,
                extra=event("prediction_log_dropping", where=self._where, capacity=self._capacity),
            )
        self._dropping += count
        self._dropped_at = time.monotonic()
        self._dropped.inc(count)

    def _end_quiet_drop_episode(self) -> None:
        """End the episode of drops once none happened for `DROP_EPISODE_QUIET_S` (under `_ready`)."""
        if self._dropping and time.monotonic() - self._dropped_at >= self._drop_quiet_s:
            self._end_drop_episode()

    def _end_drop_episode(self) -> None:
        log.warning(
            "prediction log (%s): %d records dropped while the queue was full",
            self._where,
            self._dropping,
            extra=event("prediction_log_dropped", where=self._where, records=self._dropping),
        )
        self._dropping = 0

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"prediction-log-{self._where}", daemon=True)
        thread.start()
        return thread

    def _replace_thread(self) -> None:
        with self._ready:
            if self._thread.is_alive():
                return
            log.error(
                "prediction log (%s): the delivery thread died; starting another",
                self._where,
                extra=event("prediction_log_thread_replaced", where=self._where),
            )
            # The replacement delivers the batch the dead one held: a sink may then hold it twice, never
            # lose it.
            self._thread = self._start_thread()

    def _run(self) -> None:
        # The supervisor takes its signals with sigtimedwait (server/workers.py): none may land here.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        while True:
            with self._ready:
                self._end_quiet_drop_episode()  # also when no record is offered any more
                if not self._batch:
                    if len(self._queue) < DELIVERY_BATCH and not self._closing:
                        # Records gather meanwhile: a full batch or a close wakes the thread sooner.
                        self._ready.wait(GATHER_S if self._queue else IDLE_S)
                    if self._queue:
                        count = min(len(self._queue), DELIVERY_BATCH)
                        self._batch = [self._queue.popleft() for _ in range(count)]
                    elif self._closing:
                        return  # all delivered
            if not self._batch:  # a second without records (not under the lock: offers go on meanwhile)
                if self._idle is not None:
                    self._idle()
                continue
            try:
                self._deliver(self._batch)
            except Exception:
                self._delivery_failed()
                if self._closing and self._gave_up():
                    return
                time.sleep(RETRY_S)
                continue
            with self._ready:
                self._batch = []
            if self._down_since is not None:
                log.warning(
                    "prediction log (%s): the sink is back after %.1f s",
                    self._where,
                    time.monotonic() - self._down_since,
                    extra=event("prediction_log_sink_recovered", where=self._where),
                )
                self._down_since = None

    def _gave_up(self) -> bool:
        """At shutdown, a sink down for `SHUTDOWN_RETRY_S` is given up on (`close` counts what is lost)."""
        return self._down_since is not None and time.monotonic() - self._down_since > SHUTDOWN_RETRY_S

    def _delivery_failed(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error(
                "prediction log (%s): delivery failed; retrying every %.0f s, dropping what does not fit "
                "the queue meanwhile",
                self._where,
                RETRY_S,
                exc_info=True,
                extra=event("prediction_log_sink_down", where=self._where),
            )


DROP_EPISODE_QUIET_S = 5.0
"""An episode of drops ends once no record was dropped for this long. Ending it at the first record that fits
again split one outage into several episodes whenever the delivery thread took a batch meanwhile, and a sink
that stays slow into two log lines per delivery."""
SHUTDOWN_RETRY_S = 5.0
"""At shutdown, how long a sink that is down is still retried before its records are counted as lost."""


class SocketDelivery:
    """Delivers a worker's batches to the supervisor: one datagram per batch (marshal of the records) on the
    Unix datagram socket all workers inherit. A full socket blocks this thread, not a call."""

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=fd)

    def __call__(self, records: list[Record]) -> None:
        payload = marshal.dumps(records)
        if len(payload) > DATAGRAM_LIMIT and len(records) > 1:
            half = len(records) // 2
            self(records[:half])
            self(records[half:])
            return
        self._socket.send(payload)

    def close(self) -> None:
        self._socket.close()


def decode_datagram(payload: bytes) -> list[Record]:
    """The records of one datagram a worker sent (`SocketDelivery`)."""
    records: list[Record] = marshal.loads(payload)
    return records


class PredictionLog:
    """What the server holds: `served(request_id, predictions)` on the event loop, `close()` at shutdown."""

    def __init__(self, queue: RecordQueue, on_close: Callable[[], None] | None = None) -> None:
        self._queue = queue
        self._on_close = on_close

    def served(
        self,
        request_id: str,
        predictions: Sequence[bytes],
        awaiting: Sequence[AwaitingShadow | None] = (),
    ) -> None:
        """Log the serialized `Prediction` messages one call answered. `awaiting`, when given, holds one
        entry per prediction: one the shadow also scores is logged with its result (`AwaitingShadow`)."""
        now = time.time()
        if not any(awaiting):
            self._queue.offer([(now, request_id, p, None) for p in predictions])
            return
        direct: list[Record] = []
        for prediction, pending in zip(predictions, awaiting, strict=True):
            if pending is None:
                direct.append((now, request_id, prediction, None))
            else:
                pending.served(self, (now, request_id, prediction, None))
        if direct:
            self._queue.offer(direct)

    def record(self, record: Record) -> None:
        self._queue.offer([record])

    def close(self) -> bool:
        """Deliver what is queued (then close whatever is behind it); False when records were lost."""
        delivered = self._queue.close()
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:  # a sink that cannot close must not fail the server's stop
                log.exception("prediction log: closing the sink failed")
                return False
        return delivered


class AwaitingShadow:
    """The log record of a prediction the shadow also scores. It goes to the log with the shadow's result
    once the answer was served and the shadow has compared it (or given it up), whichever comes last, so
    neither the call nor the shadow waits for the other. A prediction never served (its caller gave up) is
    not logged, like any other."""

    __slots__ = ("_compared", "_lock", "_served", "_shadow")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: tuple[PredictionLog, Record] | None = None
        self._shadow: bytes | None = None
        self._compared = False

    def served(self, log: PredictionLog, record: Record) -> None:
        """The answer went out: `record` is its log record, without the shadow's result."""
        with self._lock:
            self._served = (log, record)
            if not self._compared:
                return
        self._send()

    def compared(self, shadow: bytes | None) -> None:
        """The shadow's `Prediction` bytes, or None when it gave the user up; a second call is ignored."""
        with self._lock:
            if self._compared:
                return
            self._compared, self._shadow = True, shadow
            if self._served is None:
                return
        self._send()

    def _send(self) -> None:
        """Both halves are in (and neither changes again)."""
        assert self._served is not None
        log, record = self._served
        log.record((*record[:3], self._shadow))


def forwarding_log(fd: int, capacity: int) -> PredictionLog:
    """A worker's log: its queue (at most `WORKER_QUEUE_SIZE` records of `capacity`) sends batches to the
    supervisor on the inherited socket `fd`."""
    delivery = SocketDelivery(fd)
    return PredictionLog(RecordQueue(delivery, min(capacity, WORKER_QUEUE_SIZE), "worker"), delivery.close)
