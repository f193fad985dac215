"""A scoring worker's side of the control channel: it follows the model its control plane serves.

The supervisor alone follows the registry (server/control_plane.py). It talks to each worker over a Unix
socket pair of its own, in JSON messages:

- `prepare` (seq, artifact): read the scoring artifact and build the model beside the one serving; reply
  `prepared`, or `unusable` with the error;
- `serve` (seq, stage, aliases, failure): serve the model prepared as `seq` from now on, with what ModelInfo
  reports of it; reply `serving` with the instant of the swap (CLOCK_MONOTONIC, one clock for every
  process).

- `shadow` (seq, artifact, evidence, failure): the shadow model (`STREAMFLOW_SHADOW_MODEL_URI`), loaded at
  once (it never answers, so no two phases), the folder to write its tallies into, and its last refused
  version; no reply. A shadow that cannot be built here is logged and leaves the previous one scoring.

A switch is two-phase: every worker prepares first, then all of them swap on `serve`, which is a reference
assignment, so workers change versions within a few milliseconds of each other. `serve` with the seq already
serving only changes the reported state.

The follower runs on a daemon thread; should it end unexpectedly it is logged and started again, so the
worker never serves unfollowed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from streamflow.server import metrics
from streamflow.server.domain import ReloadFailure
from streamflow.server.heap import settle_after_load
from streamflow.server.loaded_model import LoadedModel, ModelSource
from streamflow.server.scoring_artifact import ScoringArtifact
from streamflow.server.shadow import ShadowModel
from streamflow.server.supervised import SupervisedThread
from streamflow.settings import Settings

log = logging.getLogger(__name__)

MAX_MESSAGE = 65536
"""Largest control message: a path and a reload failure's short sentence fit many times over."""


def send(channel: socket.socket, message: dict[str, Any]) -> None:
    """One message, one datagram: a SOCK_SEQPACKET pair keeps message boundaries."""
    channel.send(json.dumps(message).encode())


def receive(channel: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the other side has closed the channel."""
    raw = channel.recv(MAX_MESSAGE)
    if not raw:
        return None
    message: dict[str, Any] = json.loads(raw)
    return message


def failure_message(failure: ReloadFailure | None) -> dict[str, str] | None:
    if failure is None:
        return None
    return {"version": failure.model_version, "reason": failure.reason, "at": failure.failed_at.isoformat()}


def _failure(message: dict[str, str] | None) -> ReloadFailure | None:
    if message is None:
        return None
    return ReloadFailure(message["version"], message["reason"], datetime.fromisoformat(message["at"]))


class ModelFollower(ModelSource):
    """The model a worker serves, as its control plane tells it (a `ModelSource`)."""

    def __init__(self, settings: Settings, channel: socket.socket) -> None:
        super().__init__()
        self.settings = settings
        self._channel = channel
        self._serving_seq: int | None = None
        self._prepared: tuple[int, LoadedModel] | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self.shadow = ShadowModel()
        """The shadow model the control plane sends, if it follows one."""
        self._shadow_seq: int | None = None
        self._following = SupervisedThread(
            "model-follower", self._run, self._stopping, "follower_restarted", log, "model follower"
        )

    @property
    def alive(self) -> bool:
        return self._following.alive

    def start(self) -> None:
        if not self.alive:
            self._following.start()

    def stop(self) -> None:
        self._stopping.set()
        # Ends the blocking receive; the supervisor sees the worker go when it exits.
        self._channel.shutdown(socket.SHUT_RDWR)
        self._following.join()

    def wait_until_serving(self, timeout_s: float | None = None) -> bool:
        """Block until a model serves (a replacement worker binds its port only then)."""
        return self._ready.wait(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            message = receive(self._channel)
            if message is None:
                if not self._stopping.is_set():
                    log.warning("the control plane closed the channel; serving the current model")
                return
            self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        seq = int(message["seq"])
        if message["op"] == "prepare":
            self._prepare(seq, Path(message["artifact"]))
        elif message["op"] == "serve":
            self._serve(seq, message)
        elif message["op"] == "shadow":
            self._shadow(seq, message)

    def _shadow(self, seq: int, message: dict[str, Any]) -> None:
        model = None
        if message["artifact"] is not None and seq != self._shadow_seq:
            try:
                model = LoadedModel.from_artifact(
                    ScoringArtifact.read(Path(message["artifact"])), self.settings
                )
            except Exception:
                log.exception(
                    "cannot load the shadow's scoring artifact %s; the answers are not affected",
                    message["artifact"],
                )
            else:
                self._shadow_seq = seq
        self.shadow.set(model, _failure(message["failure"]), Path(message["evidence"]))

    def _prepare(self, seq: int, directory: Path) -> None:
        try:
            loaded = LoadedModel.from_artifact(ScoringArtifact.read(directory), self.settings)
        except Exception as exc:
            log.exception("cannot load the scoring artifact %s; still serving %s", directory, self._serving())
            send(self._channel, {"op": "unusable", "seq": seq, "error": f"{type(exc).__name__}: {exc}"})
            return
        settle_after_load()  # before the swap, so no request waits on the collection it runs
        self._prepared = (seq, loaded)
        send(self._channel, {"op": "prepared", "seq": seq})

    def _serve(self, seq: int, message: dict[str, Any]) -> None:
        swapped = seq != self._serving_seq
        if swapped:
            if self._prepared is None or self._prepared[0] != seq:
                return  # never prepared (it was unusable here): the control plane knows and keeps the old
            model = self._prepared[1]
            self._prepared = None
        else:
            assert self._current is not None
            model = self._current
        model = model.with_registry_state(message["stage"], tuple(message["aliases"]))
        self._last_failure = _failure(message["failure"])
        self._current = model
        at = time.monotonic()
        self._serving_seq = seq
        metrics.model_served_by(model)
        if swapped:
            send(self._channel, {"op": "serving", "seq": seq, "at": at})
            self._ready.set()
            self._notify(model)

    def _serving(self) -> str:
        current = self._current
        return "nothing" if current is None else f"version {current.ref.version}"
