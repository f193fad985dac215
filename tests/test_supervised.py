"""Supervised threads (server/supervised.py): a loop that ends unexpectedly, even by a BaseException, is
logged once and run again on a new thread; one that ends while its owner stops, or returns, is not."""

from __future__ import annotations

import logging
import threading

import pytest

from streamflow.server.supervised import SupervisedThread
from tests.fixtures.metrics import eventually

log = logging.getLogger("tests.supervised")


def test_a_loop_that_dies_is_logged_once_and_replaced_and_join_waits_for_the_replacement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tests.supervised")
    stopping = threading.Event()
    runs: list[str] = []

    def loop() -> None:
        runs.append(threading.current_thread().name)
        if len(runs) == 1:
            raise SystemExit("a library gave up")  # what no guard of a loop catches
        stopping.wait()

    supervised = SupervisedThread("tested", loop, stopping, "tested_restarted", log, "tested loop")
    supervised.start()
    eventually(lambda: len(runs) == 2, "the loop never ran again")
    assert supervised.alive
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == "the tested loop thread ended unexpectedly; starting a new one"
    assert record.exc_info is not None and record.exc_info[0] is SystemExit
    assert record.__dict__["event"] == "tested_restarted"  # set through `extra`
    stopping.set()
    supervised.join()
    assert not supervised.alive
    assert runs == ["tested", "tested"]


def test_a_loop_that_returns_or_fails_while_stopping_is_not_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tests.supervised")
    stopping = threading.Event()
    runs: list[int] = []

    def returns() -> None:
        runs.append(1)

    done = SupervisedThread("returns", returns, stopping, "returns_restarted", log, "returning loop")
    done.start()
    done.join()

    def fails_on_stop() -> None:
        runs.append(2)
        stopping.wait()
        raise RuntimeError("closing under it")

    stopped = SupervisedThread("stops", fails_on_stop, stopping, "stops_restarted", log, "stopping loop")
    stopped.start()
    eventually(lambda: 2 in runs, "the loop never started")
    stopping.set()
    stopped.join()
    assert runs == [1, 2]
    assert not done.alive and not stopped.alive
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
