"""The supervisor's control plane: it alone follows the registry and hands every worker the same model.

The registry watcher (server/model_watcher.py) resolves, loads and validates each new version once, here. Its
scoring artifact is written once into a private directory, and the workers switch to it together in two
phases over their control channels (server/model_follower.py): every worker prepares the model beside the
one it serves, then all swap on one `serve` message. The spread of their swap instants is the version skew,
logged with each switch and kept as a metric. A change of stage, aliases or of the last refused version only
updates what the workers report.

A worker that starts (or replaces a dead one) is sent the serving artifact at once, and one that was attached
while a switch was under way is brought to the new version right after it.

With `STREAMFLOW_SHADOW_MODEL_URI` set, a second watcher follows the shadow model the same way; each version
it validates is written once and sent to every worker in a `shadow` message (no two phases: the shadow never
answers), with the folder the workers write their shadow tallies into. The control plane sums those tallies,
logs them and records them in the registry (server/shadow_evidence.py). A shadow that fails to load is
logged once by its watcher and reported by the workers; it never changes health or the served model.

With `STREAMFLOW_HEALTH_PORT` set, the supervisor answers `grpc.health.v1` on that port itself, off the
workers' event loops, so a probe answers in time however hard the workers are flooded: SERVING while a model
is published and at least one worker runs, NOT_SERVING from the moment the server starts to stop.
"""

from __future__ import annotations

import contextlib
import logging
import select
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from streamflow.server import metrics
from streamflow.server.health import NOT_SERVING, SERVING, HealthService
from streamflow.server.logs import event
from streamflow.server.model_follower import failure_message, receive, send
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.server.shadow import read_totals
from streamflow.server.shadow_evidence import EvidenceRecorder
from streamflow.settings import Settings

log = logging.getLogger(__name__)

PREPARE_TIMEOUT_S = 120.0
"""How long workers may take to build a new model before the switch goes ahead without the late ones."""
SERVE_TIMEOUT_S = 5.0
"""How long to wait for the workers' swap instants."""


@dataclass
class _Worker:
    channel: socket.socket
    seq: int | None = None
    """The artifact the worker serves (as far as the control plane has told it)."""


class ControlPlane:
    """Follows the registry and keeps every attached worker on the model it serves."""

    def __init__(self, settings: Settings, watcher: ModelWatcher, shadow: ModelWatcher | None = None) -> None:
        self.settings = settings
        self.watcher = watcher
        self._directory = Path(tempfile.mkdtemp(prefix="streamflow-artifacts-"))
        self._lock = threading.Lock()  # the workers' table: attached by the main thread, switched here
        self._workers: dict[int, _Worker] = {}
        self._published: tuple[int, Path, ScoringArtifact] | None = None
        self._seq = 0
        self._health: _HealthEndpoint | None = None
        watcher.subscribe_changes(self._changed)
        self.shadow = shadow
        self._evidence = self._directory / "shadow"
        self._shadow_message: dict[str, Any] | None = None
        self._shadow_published: tuple[ScoringArtifact, Path] | None = None
        self._shadow_seq = 0
        self._recorder: EvidenceRecorder | None = None
        if shadow is not None:
            self._evidence.mkdir(mode=0o700)
            self._recorder = EvidenceRecorder(settings, lambda: read_totals(self._evidence))
            shadow.subscribe_changes(self._shadow_changed)

    def start(self) -> None:
        """Follow the registry and, with a health port, answer probes on it."""
        if self.settings.health_port:
            self._health = _HealthEndpoint(self.settings)
        self.watcher.start()
        if self.shadow is not None and self._recorder is not None:
            self.shadow.start()
            self._recorder.start()

    def draining(self) -> None:
        """The server has started to stop: probes get NOT_SERVING from now on."""
        if self._health is not None:
            self._health.drain()

    def stop(self) -> None:
        if self._health is not None:
            self._health.close()
        self.watcher.stop()
        if self.shadow is not None and self._recorder is not None:
            self.shadow.stop()
            self._recorder.stop()  # the workers have exited: their last tallies are in
        with self._lock:
            for worker in self._workers.values():
                worker.channel.close()
            self._workers.clear()
        shutil.rmtree(self._directory, ignore_errors=True)

    @property
    def serving(self) -> bool:
        """Whether a model has been published to the workers."""
        return self._published is not None

    def attach(self, slot: int) -> socket.socket:
        """A control channel for the worker about to start in `slot`; returns the worker's end. It is sent
        the serving model at once, so it serves from its first read of the channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with self._lock:
            old = self._workers.pop(slot, None)
            if old is not None:
                old.channel.close()
            worker = self._workers[slot] = _Worker(ours)
            if self._published is not None:
                self._bring_up_to_date(worker)
            if self._shadow_message is not None:
                with contextlib.suppress(OSError):
                    send(worker.channel, self._shadow_message)
            self._report_health()
        return theirs

    def detach(self, slot: int) -> None:
        """The worker in `slot` is gone."""
        with self._lock:
            worker = self._workers.pop(slot, None)
            self._report_health()
        if worker is not None:
            worker.channel.close()

    def _bring_up_to_date(self, worker: _Worker) -> None:
        assert self._published is not None
        seq, path, _ = self._published
        try:
            send(worker.channel, {"op": "prepare", "seq": seq, "artifact": str(path)})
            send(worker.channel, self._serve_message(seq))
            worker.seq = seq
        except OSError:
            pass  # it died meanwhile: the supervisor replaces it and attaches the replacement

    def _report_health(self) -> None:
        """(Under the lock.) SERVING while a model is published and a worker runs."""
        if self._health is not None:
            self._health.set(SERVING if self._published is not None and self._workers else NOT_SERVING)

    def _serve_message(self, seq: int) -> dict[str, Any]:
        current = self.watcher.current
        assert current is not None
        return {
            "op": "serve",
            "seq": seq,
            "stage": current.stage,
            "aliases": list(current.aliases),
            "failure": failure_message(self.watcher.last_failure),
        }

    def _changed(self) -> None:  # on the watcher's thread, after a poll that changed something
        artifact = self.watcher.artifact
        if artifact is None:
            return
        published = self._published
        if published is None or published[2] is not artifact:
            self._switch(artifact)
            return
        with self._lock:
            message = self._serve_message(published[0])
            for worker in self._workers.values():
                with contextlib.suppress(OSError):  # a dead worker: the supervisor replaces it
                    send(worker.channel, message)

    def _shadow_changed(self) -> None:  # on the shadow watcher's thread, after a poll that changed something
        assert self.shadow is not None
        artifact = self.shadow.artifact
        published = self._shadow_published
        stale = None
        if artifact is not None and (published is None or published[0] is not artifact):
            self._shadow_seq += 1
            path = artifact.write(self._directory / f"shadow-{self._shadow_seq}")
            self._shadow_published = (artifact, path)
            stale = published
        current = self._shadow_published
        message = {
            "op": "shadow",
            "seq": self._shadow_seq,
            "artifact": None if current is None else str(current[1]),
            "evidence": str(self._evidence),
            "failure": failure_message(self.shadow.last_failure),
        }
        with self._lock:
            self._shadow_message = message
            for worker in self._workers.values():
                with contextlib.suppress(OSError):  # a dead worker: the supervisor replaces it
                    send(worker.channel, message)
        if artifact is not None and stale is not artifact:
            log.info(
                "shadow %s version %s sent to the workers",
                artifact.ref.name,
                artifact.ref.version,
                extra=event("shadow_published", shadow_version=artifact.ref.version),
            )
        if stale is not None:
            # Each worker reads an artifact as its message arrives; the one before is long read.
            shutil.rmtree(stale[1], ignore_errors=True)

    def _switch(self, artifact: ScoringArtifact) -> None:
        """Write the artifact, have every worker prepare it, then have them all swap at once."""
        self._seq += 1
        seq = self._seq
        path = artifact.write(self._directory / str(seq))
        with self._lock:
            workers = dict(self._workers)
        if not workers:  # loaded before any worker started: each gets it as it attaches
            with self._lock:
                self._published = (seq, path, artifact)
                self._report_health()
            log.info(
                "%s version %s ready for the workers as they start",
                artifact.ref.name,
                artifact.ref.version,
                extra=event("model_published", model_version=artifact.ref.version),
            )
            return
        prepared = self._exchange(workers, {"op": "prepare", "seq": seq, "artifact": str(path)}, "prepared")
        # Published even if no worker prepared it (they died meanwhile, say): the watcher validated it by
        # building it as a worker does; every worker not on it is brought to it below, a replacement at start.
        unusable = sorted(slot for slot in workers if slot not in prepared)
        previous = self._published
        with self._lock:
            self._published = (seq, path, artifact)
            message = self._serve_message(seq)
            self._report_health()
        swapped = self._exchange({slot: workers[slot] for slot in prepared}, message, "serving")
        instants = [float(reply["at"]) for reply in swapped.values()]
        skew_s = max(instants) - min(instants) if instants else 0.0
        if instants:
            metrics.model_switch(artifact.ref.name, skew_s)
        log.info(
            "%d worker(s) serve %s version %s (version skew %.1f ms)%s",
            len(swapped),
            artifact.ref.name,
            artifact.ref.version,
            skew_s * 1000,
            f"; worker slot(s) {unusable} could not load it" if unusable else "",
            extra=event(
                "model_switched",
                model_version=artifact.ref.version,
                workers=len(swapped),
                skew_ms=round(skew_s * 1000, 3),
            ),
        )
        with self._lock:
            for slot, worker in self._workers.items():
                if slot in swapped and worker is workers.get(slot):
                    worker.seq = seq
                elif worker.seq != seq:  # attached mid-switch, or could not load it then
                    self._bring_up_to_date(worker)
        if previous is not None:
            shutil.rmtree(previous[1], ignore_errors=True)

    def _exchange(
        self, workers: dict[int, _Worker], message: dict[str, Any], reply: str
    ) -> dict[int, dict[str, Any]]:
        """Send `message` to each worker and collect the replies named `reply` to its seq; a worker that
        dies, answers otherwise or is late is left out."""
        pending: dict[socket.socket, int] = {}
        for slot, worker in workers.items():
            try:
                send(worker.channel, message)
                pending[worker.channel] = slot
            except OSError:
                continue
        replies: dict[int, dict[str, Any]] = {}
        timeout = PREPARE_TIMEOUT_S if message["op"] == "prepare" else SERVE_TIMEOUT_S
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(list(pending), [], [], left)
            for channel in readable:
                try:
                    answer = receive(channel)
                except OSError:
                    answer = None
                if answer is None:
                    pending.pop(channel)
                    continue
                if answer.get("seq") != message["seq"]:
                    continue  # a late answer to an earlier message
                slot = pending.pop(channel)
                if answer["op"] == reply:
                    replies[slot] = answer
                else:
                    log.error("worker slot %d could not load the new model: %s", slot, answer.get("error"))
        return replies


class _HealthEndpoint:
    """`grpc.health.v1` on the health port, served by the supervisor on an event loop of its own."""

    def __init__(self, settings: Settings) -> None:
        # The supervisor's alone: server/app.py (gRPC servers) is not otherwise imported before workers start.
        from streamflow.server.app import HEALTH_SERVICES, EventLoopThread, bind, health_only_server
        from streamflow.server.observers import call_observers
        from streamflow.server.rpc import CallGuard

        self._event_loop = EventLoopThread()
        self._service = HealthService(HEALTH_SERVICES)
        guard = CallGuard(settings.max_concurrent_rpcs, call_observers(settings))

        async def started() -> grpc.aio.Server:
            # Made on the loop it serves from; it joins the port the supervisor claimed (SO_REUSEPORT).
            server = health_only_server(self._service, guard, reuse_port=True)
            bind(server, settings.listen_host, settings.health_port, None)
            await server.start()
            return server

        self._server = self._event_loop.run(started())
        log.info(
            "health, plaintext, on %s:%d, answered by the supervisor",
            settings.listen_host,
            settings.health_port,
        )

    def set(self, status: int) -> None:
        self._event_loop.loop.call_soon_threadsafe(self._service.set, status)

    def drain(self) -> None:
        self._event_loop.loop.call_soon_threadsafe(self._service.start_drain)

    def close(self) -> None:
        self._event_loop.run(self._server.stop(None))
        self._event_loop.close()
