"""Predict calls that arrive together are scored together, and each still gets exactly its own answer.

The batcher runs over the session server's real Predictor (version 1, the embedded online store); its pool
is a real single-thread executor that also records the batches it is handed. The last test goes over the wire.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pandas as pd
import pytest

from streamflow.feature_repo.definitions import JOIN_KEY, SNAPSHOT_DATES, TIMESTAMP_FIELD, VIEW_SPECS
from streamflow.server.app import PredictionServer
from streamflow.server.batcher import PredictBatcher
from streamflow.server.domain import Prediction
from streamflow.server.errors import (
    EntityNotFound,
    FeatureError,
    FeaturesStale,
    InvalidUserId,
    ModelNotLoaded,
)
from streamflow.server.model_watcher import ModelWatcher
from streamflow.server.predictor import Predictor
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training.demo_data import table_path
from tests.fixtures.serving import departed_users, prediction_stub

UNKNOWN_USER = "9999-99999"


class RecordingPool(ThreadPoolExecutor):
    """One scoring thread, as the server's, that also keeps the user ids of every batch it runs."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.batches: list[list[str]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.batches.append(list(args[0]))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def pool() -> Iterator[RecordingPool]:
    with RecordingPool() as recording:
        yield recording


def current_users(settings: Settings, count: int) -> list[str]:
    """Users of the last snapshot: every feature present and fresh."""
    table = pd.read_parquet(table_path(settings, VIEW_SPECS[0].table), columns=[JOIN_KEY, TIMESTAMP_FIELD])
    last = table[TIMESTAMP_FIELD].dt.date == SNAPSHOT_DATES[-1]
    return list(table.loc[last, JOIN_KEY].head(count))


async def outcomes(
    batcher: PredictBatcher[Prediction], user_ids: list[str]
) -> list[Prediction | BaseException]:
    """Each call's prediction or exception, calls started together as concurrent Predicts would be."""
    return await asyncio.gather(*(batcher.predict(u) for u in user_ids), return_exceptions=True)


def test_calls_arriving_together_are_scored_in_one_batch_each_with_its_own_answer(
    embedded_server: PredictionServer, pool: RecordingPool
) -> None:
    predictor = embedded_server.predictor
    settings = embedded_server.settings
    stale = departed_users(settings)[0]
    users = [*current_users(settings, 20), UNKNOWN_USER, stale, "bad id!"]
    batcher = PredictBatcher(predictor.score, pool, max_batch_size=1000)

    results = asyncio.run(outcomes(batcher, users))

    # The malformed id failed on its own; every other call went into the one batch.
    assert pool.batches == [users[:-1]]
    assert isinstance(results[-1], InvalidUserId)
    alone = [predictor.score([u])[0] for u in users[:-1]]
    assert results[:20] == alone[:20]  # the predictions, features and model version included
    assert isinstance(results[20], EntityNotFound) and results[20].user_id == UNKNOWN_USER
    assert isinstance(results[21], FeaturesStale) and results[21].user_id == stale
    assert [str(r) for r in results[20:22]] == [str(r) for r in alone[20:22]]


def test_batches_never_exceed_the_maximum_and_keep_arrival_order(
    embedded_server: PredictionServer, pool: RecordingPool
) -> None:
    users = current_users(embedded_server.settings, 7)
    batcher = PredictBatcher(embedded_server.predictor.score, pool, max_batch_size=3)

    results = asyncio.run(outcomes(batcher, users))

    assert pool.batches == [users[:3], users[3:6], users[6:]]
    assert [r.user_id for r in results if isinstance(r, Prediction)] == users


def test_a_failure_of_the_whole_read_reaches_every_call_of_the_batch(
    embedded_settings: Settings, pool: RecordingPool
) -> None:
    never_started = Predictor(embedded_settings, ModelWatcher(embedded_settings))  # no model loaded
    batcher = PredictBatcher(never_started.score, pool, max_batch_size=1000)
    users = current_users(embedded_settings, 3)

    results = asyncio.run(outcomes(batcher, users))

    assert len(pool.batches) == 1
    assert all(isinstance(r, ModelNotLoaded) for r in results)


def scored_where(
    server: PredictionServer, pool: RecordingPool, **limits: float
) -> tuple[PredictBatcher[Prediction], list[bool], list[bool]]:
    """A batcher over the server's predictor whose scoring fails while the returned `failing` list holds
    True, recording per scoring whether it ran on the event loop (asyncio.run's main thread)."""
    on_loop: list[bool] = []
    failing = [False]

    def score(user_ids: Sequence[str]) -> list[Prediction | FeatureError]:
        on_loop.append(threading.current_thread() is threading.main_thread())
        if failing[0]:
            raise ModelNotLoaded("models:/streamflow_churn/Production")
        return server.predictor.score(user_ids)

    batcher: PredictBatcher[Prediction] = PredictBatcher(score, pool, max_batch_size=1000, **limits)
    return batcher, on_loop, failing


def test_a_lone_call_on_a_quiet_server_is_scored_on_the_loop_and_load_or_a_failure_sends_it_to_the_thread(
    embedded_server: PredictionServer, pool: RecordingPool
) -> None:
    users = current_users(embedded_server.settings, 3)
    # Every scoring counts as fast: what sends calls to the thread here is a batch of several or a failure.
    hold_s = 0.2
    batcher, on_loop, failing = scored_where(
        embedded_server, pool, coalesced_hold_s=hold_s, inline_budget_s=60
    )

    async def scenario() -> list[Prediction | BaseException]:
        answers: list[Prediction | BaseException] = [await batcher.predict(users[0])]  # quiet: on the loop
        answers += await outcomes(batcher, users[:2])  # a batch of two: on the thread
        answers.append(await batcher.predict(users[2]))  # alone, but right after a batch: on the thread
        await asyncio.sleep(hold_s)
        failing[0] = True
        answers += await outcomes(batcher, users[:1])  # quiet again: on the loop, and it fails
        failing[0] = False
        answers.append(await batcher.predict(users[1]))  # after a failure: on the thread
        answers.append(await batcher.predict(users[2]))  # that scoring succeeded: on the loop again
        return answers

    answers = asyncio.run(scenario())

    assert on_loop == [True, False, False, True, False, True]
    assert pool.batches == [users[:2], users[2:3], users[1:2]]
    assert isinstance(answers[4], ModelNotLoaded)
    expected = [users[0], *users[:2], users[2], None, users[1], users[2]]
    assert [a.user_id if isinstance(a, Prediction) else None for a in answers] == expected


def test_a_scoring_over_the_budget_sends_lone_calls_to_the_thread(
    embedded_server: PredictionServer, pool: RecordingPool
) -> None:
    users = current_users(embedded_server.settings, 3)
    batcher, on_loop, _ = scored_where(embedded_server, pool, inline_budget_s=0)  # every scoring is slow

    async def one_by_one() -> list[Prediction | FeatureError]:
        return [await batcher.predict(user_id) for user_id in users]

    answers = asyncio.run(one_by_one())

    assert on_loop == [True, False, False]  # a slow store is waited for off the loop
    assert [a.user_id for a in answers if isinstance(a, Prediction)] == users


def test_a_call_given_up_on_leaves_the_others_and_later_calls_answered(
    embedded_server: PredictionServer, pool: RecordingPool
) -> None:
    users = current_users(embedded_server.settings, 3)
    batcher = PredictBatcher(embedded_server.predictor.score, pool, max_batch_size=1000)

    async def scenario() -> tuple[list[Prediction | BaseException], Prediction]:
        calls = [asyncio.ensure_future(batcher.predict(u)) for u in users]
        await asyncio.sleep(0)  # every call has joined the pending batch
        calls[1].cancel()
        first = await asyncio.gather(*calls, return_exceptions=True)
        later = await batcher.predict(users[1])
        return first, later

    first, later = asyncio.run(scenario())

    assert isinstance(first[1], asyncio.CancelledError)
    assert [r.user_id for r in first if isinstance(r, Prediction)] == [users[0], users[2]]
    assert later.user_id == users[1]


def test_concurrent_predicts_over_the_wire_equal_the_batch_answer(embedded_server: PredictionServer) -> None:
    users = [*current_users(embedded_server.settings, 30), UNKNOWN_USER]
    with prediction_stub(embedded_server.local_address) as stub:
        calls = [stub.Predict.future(pb.PredictRequest(user_id=u), timeout=60) for u in users]
        batch = stub.BatchPredict(pb.BatchPredictRequest(user_ids=users), timeout=60)
        answers = [call.result() for call in calls[:-1]]
        with pytest.raises(grpc.RpcError) as unknown:
            calls[-1].result()

    assert [a.prediction for a in answers] == [r.prediction for r in batch.results[:-1]]
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert batch.results[-1].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_batch_that_fails_as_a_whole_still_answers_every_caller(pool: RecordingPool) -> None:
    def miscounted(user_ids: Sequence[str]) -> list[str | FeatureError]:
        answers: list[str | FeatureError] = ["one answer", "two answers"]
        return answers[: len(user_ids) - 1]  # a scoring bug: one answer short

    batcher: PredictBatcher[str] = PredictBatcher(miscounted, pool, max_batch_size=10)

    async def together() -> list[str | BaseException]:
        calls = asyncio.gather(*(batcher.predict(f"user-{i}") for i in range(3)), return_exceptions=True)
        # A bound for liveness only: before the fix, these callers waited forever.
        return await asyncio.wait_for(calls, timeout=60)

    answers = asyncio.run(together())

    assert len(answers) == 3
    assert all(isinstance(answer, ValueError) for answer in answers)  # zip(strict=True) on the short list
