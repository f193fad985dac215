"""Predict calls that arrive together are scored together, and each still gets exactly its own answer.

The batcher runs over the session server's real Predictor (version 1, the embedded online store), recording
each batch it scores and where (on the event loop or on its pool, a real single-thread executor). One test
goes over the wire.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

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
Answer = TypeVar("Answer")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as one_thread:  # as the server's
        yield one_thread


@dataclass
class Recorded:
    """The batches a scoring function was handed, whether each ran on the event loop (asyncio.run's main
    thread), and a switch that makes it fail."""

    batches: list[list[str]] = field(default_factory=list)
    on_loop: list[bool] = field(default_factory=list)
    failing: bool = False


Score = Callable[[Sequence[str]], Sequence[Answer]]


def recorded(score: Score[Answer]) -> tuple[Score[Answer], Recorded]:
    """`score`, recording each call in the returned `Recorded`."""
    record = Recorded()

    def recording(user_ids: Sequence[str]) -> Sequence[Answer]:
        record.batches.append(list(user_ids))
        record.on_loop.append(threading.current_thread() is threading.main_thread())
        if record.failing:
            raise ModelNotLoaded("models:/streamflow_churn/Production")
        return score(user_ids)

    return recording, record


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
    embedded_server: PredictionServer, pool: ThreadPoolExecutor
) -> None:
    predictor = embedded_server.predictor
    settings = embedded_server.settings
    stale = departed_users(settings)[0]
    users = [*current_users(settings, 20), UNKNOWN_USER, stale, "bad id!"]
    score, record = recorded(predictor.score)
    batcher = PredictBatcher(score, pool, max_batch_size=1000)

    results = asyncio.run(outcomes(batcher, users))

    # The malformed id failed on its own; every other call went into the one batch.
    assert record.batches == [users[:-1]]
    assert isinstance(results[-1], InvalidUserId)
    alone = [predictor.score([u])[0] for u in users[:-1]]
    assert results[:20] == alone[:20]  # the predictions, features and model version included
    assert isinstance(results[20], EntityNotFound) and results[20].user_id == UNKNOWN_USER
    assert isinstance(results[21], FeaturesStale) and results[21].user_id == stale
    assert [str(r) for r in results[20:22]] == [str(r) for r in alone[20:22]]


def test_batches_never_exceed_the_maximum_and_keep_arrival_order(
    embedded_server: PredictionServer, pool: ThreadPoolExecutor
) -> None:
    users = current_users(embedded_server.settings, 7)
    score, record = recorded(embedded_server.predictor.score)
    batcher = PredictBatcher(score, pool, max_batch_size=3)

    results = asyncio.run(outcomes(batcher, users))

    assert record.batches == [users[:3], users[3:6], users[6:]]
    assert [r.user_id for r in results if isinstance(r, Prediction)] == users


def test_a_failure_of_the_whole_read_reaches_every_call_of_the_batch(
    embedded_settings: Settings, pool: ThreadPoolExecutor
) -> None:
    never_started = Predictor(embedded_settings, ModelWatcher(embedded_settings))  # no model loaded
    score, record = recorded(never_started.score)
    batcher = PredictBatcher(score, pool, max_batch_size=1000)
    users = current_users(embedded_settings, 3)

    results = asyncio.run(outcomes(batcher, users))

    assert record.batches == [users]
    assert all(isinstance(r, ModelNotLoaded) for r in results)


def test_batches_are_scored_on_the_loop_until_a_failure_sends_them_to_the_thread(
    embedded_server: PredictionServer, pool: ThreadPoolExecutor
) -> None:
    users = current_users(embedded_server.settings, 3)
    score, record = recorded(embedded_server.predictor.score)
    # Every scoring counts as fast: what sends calls to the thread here is a failure.
    batcher: PredictBatcher[Prediction] = PredictBatcher(score, pool, max_batch_size=1000, inline_budget_s=60)

    async def scenario() -> list[Prediction | BaseException]:
        answers: list[Prediction | BaseException] = [await batcher.predict(users[0])]  # alone: on the loop
        answers += await outcomes(batcher, users[:2])  # a batch of two: on the loop too
        record.failing = True
        answers += await outcomes(batcher, users[:1])  # on the loop, and it fails
        record.failing = False
        answers += await outcomes(batcher, users[1:])  # after a failure: on the thread
        answers.append(await batcher.predict(users[2]))  # that scoring succeeded: on the loop again
        return answers

    answers = asyncio.run(scenario())

    assert record.batches == [users[:1], users[:2], users[:1], users[1:], users[2:]]
    assert record.on_loop == [True, True, True, False, True]
    assert isinstance(answers[3], ModelNotLoaded)
    expected = [users[0], *users[:2], None, *users[1:], users[2]]
    assert [a.user_id if isinstance(a, Prediction) else None for a in answers] == expected


def test_a_scoring_over_the_budget_sends_the_next_batches_to_the_thread(
    embedded_server: PredictionServer, pool: ThreadPoolExecutor
) -> None:
    users = current_users(embedded_server.settings, 3)
    score, record = recorded(embedded_server.predictor.score)
    batcher = PredictBatcher(score, pool, max_batch_size=1000, inline_budget_s=0)  # every scoring is slow

    async def one_by_one() -> list[Prediction | FeatureError]:
        return [await batcher.predict(user_id) for user_id in users]

    answers = asyncio.run(one_by_one())

    assert record.on_loop == [True, False, False]  # a slow store is waited for off the loop
    assert [a.user_id for a in answers if isinstance(a, Prediction)] == users


def test_a_call_given_up_on_leaves_the_others_and_later_calls_answered(
    embedded_server: PredictionServer, pool: ThreadPoolExecutor
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


def test_a_batch_that_fails_as_a_whole_still_answers_every_caller(pool: ThreadPoolExecutor) -> None:
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
