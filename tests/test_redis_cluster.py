"""The production profile on a Redis Cluster (issue 13): three masters of the test's own `redis-server`s.

The production stack's features are materialized into the cluster through Feast (`redis_type:
redis_cluster`). The server's bulk reader then returns exactly what Feast's `get_online_features` returns for
users whose hashes sit on all three masters, in one round trip per master; served calls over real channels
answer as a server on one Redis does, an unknown user is NOT_FOUND; a master killed is the store's
UNAVAILABLE path (FEATURE_STORE_UNAVAILABLE), before and after the cluster declares itself down, and a frozen
one costs a read one timeout. A read also follows slots moved since its client read the slot table.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.cluster
import redis.connection
from feast import FeatureStore
from feast.infra.online_stores.helpers import _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from redis.crc import key_slot

from streamflow.errors import StreamflowError
from streamflow.feature_repo import store
from streamflow.feature_repo.definitions import FEATURE_SERVICE_NAME, JOIN_KEY
from streamflow.feature_repo.production import redis_connection_string
from streamflow.server.app import PredictionServer
from streamflow.server.feature_layout import feature_layout
from streamflow.server.online_rows import online_rows
from streamflow.server.redis_client import HashReader
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.settings import Settings
from streamflow.training import demo_data
from tests.fixtures.production import ProductionStack
from tests.fixtures.redis_cluster import LocalRedisCluster, start_redis_cluster
from tests.fixtures.serving import prediction_stub, start_server, wire_error

UNKNOWN_USER = "9999-99999"
USERS = 60
"""Users read at once: enough that each master holds several of their hashes."""
CALL_TIMEOUT_S = 30.0
"""Each call's deadline: generous, so DEADLINE_EXCEEDED would mean the server hung on the dead master."""
RECOVERY_S = 60.0
"""Upper bound on calls answering again once the cluster is whole (liveness only, not a measured budget)."""
PROBE_INTERVAL_S = 0.05
"""The breaker's probe interval in the outage test: a call made after a pause longer than this is a probe,
which reads the cluster instead of failing fast."""


# --- the setting: which URLs make a cluster's connection string -------------------------------------------


def test_a_cluster_url_lists_its_nodes_with_the_timeouts_and_no_retries() -> None:
    url = "rediss://reader:s%40cret@node1:7000,node2,10.0.0.3:7002/0"

    assert redis_connection_string(url, 0.25, cluster=True) == (
        "node1:7000,node2:6379,10.0.0.3:7002,username=reader,password=s@cret,ssl=true,"
        "socket_timeout=0.25,socket_connect_timeout=0.25,cluster_error_retry_attempts=0"
    )


@pytest.mark.parametrize(
    ("url", "cluster", "message"),
    [
        (
            "redis://node1:7000,node2:7001/0",
            False,
            "STREAMFLOW_REDIS_URL names 2 Redis nodes; a Redis Cluster also needs "
            "STREAMFLOW_REDIS_CLUSTER=true, a single server has one address.",
        ),
        (
            "redis://node1:7000,node2:7001/3",
            True,
            "STREAMFLOW_REDIS_URL names database 3; a Redis Cluster has only database 0.",
        ),
        (
            "redis://node1:7000,,node2:7001",
            True,
            "STREAMFLOW_REDIS_URL has '' where a host or host:port belongs.",
        ),
        (
            "redis://node1:7000,node2:port",
            True,
            "STREAMFLOW_REDIS_URL has 'node2:port' where a host or host:port belongs.",
        ),
    ],
)
def test_a_redis_url_that_cannot_work_is_refused_in_one_sentence(
    url: str, cluster: bool, message: str
) -> None:
    with pytest.raises(StreamflowError) as refused:
        redis_connection_string(url, cluster=cluster)

    assert str(refused.value) == message


# --- the production stack served from a cluster -----------------------------------------------------------


@dataclass(frozen=True)
class ClusterServed:
    cluster: LocalRedisCluster
    settings: Settings
    server: PredictionServer


def on_cluster(settings: Settings, cluster: LocalRedisCluster, **overrides: Any) -> Settings:
    """`settings` with the cluster as online store, its features materialized into it through Feast."""
    clustered = settings.model_copy(update={"redis_url": cluster.url, "redis_cluster": True, **overrides})
    with store.opened_store(clustered) as feast:
        feast.materialize(*store.materialization_window())
    return clustered


@pytest.fixture(scope="module")
def cluster_served(
    production_stack: ProductionStack, redis_cluster: LocalRedisCluster
) -> Iterator[ClusterServed]:
    settings = on_cluster(production_stack.settings, redis_cluster)
    with start_server(settings) as running:
        yield ClusterServed(redis_cluster, settings, running)


def demo_users(settings: Settings) -> list[str]:
    """The first `USERS` demo users, in id order."""
    tables = demo_data.generate_tables(settings.users, settings.seed)
    return sorted(set().union(*(set(frame[JOIN_KEY]) for frame in tables.values())))[:USERS]


def redis_key(feast: FeatureStore, user_id: str) -> bytes:
    """Feast's own key of a user's hash."""
    entity = EntityKey(join_keys=[JOIN_KEY], entity_values=[Value(string_val=user_id)])
    key: bytes = _redis_key(feast.project, entity, feast.config.entity_key_serialization_version)
    return key


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The (host, port) of every write of packed commands to a Redis socket while the test runs: one per
    round trip (redis-py writes a whole pipeline to a node at once)."""
    seen: list[tuple[str, int]] = []
    send: Callable[..., None] = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        seen.append((self.host, int(self.port)))
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return seen


def test_the_bulk_reader_reads_what_feast_reads_from_every_master_in_one_round_trip_each(
    cluster_served: ClusterServed, sends: list[tuple[str, int]]
) -> None:
    cluster = cluster_served.cluster
    with store.opened_store(cluster_served.settings) as feast:
        users = [*demo_users(cluster_served.settings), UNKNOWN_USER, demo_users(cluster_served.settings)[0]]
        keys = {user_id: redis_key(feast, user_id) for user_id in users}
        masters = {user_id: cluster.port_of(key) for user_id, key in keys.items()}
        # The hashes really are spread over the three masters, each on the master its slot says.
        assert set(masters.values()) == set(cluster.ports)
        assert all(cluster.node(masters[u]).exists(keys[u]) for u in users if u != UNKNOWN_USER)
        layout = feature_layout(feast, FEATURE_SERVICE_NAME)
        rows = online_rows(layout.store, layout.views)
        rows.read(users)  # connects to each master (slot table, handshake): once per client, not per read
        sends.clear()

        cells = rows.read(users)

        assert sorted(sends) == sorted(("127.0.0.1", port) for port in cluster.ports)
        sdk = feast.get_online_features(
            features=feast.get_feature_service(FEATURE_SERVICE_NAME), entity_rows={JOIN_KEY: users}
        ).proto
        column = {name: i for i, name in enumerate(sdk.metadata.feature_names.val)}
        assert len(cells) == len(users)
        for row, (user_id, user_cells) in enumerate(zip(users, cells, strict=True)):
            assert len(user_cells) == len(layout.schema)
            for feature, (value, event_time) in zip(layout.schema, user_cells, strict=True):
                vector = sdk.results[column[feature.name]]
                assert value.SerializeToString() == vector.values[row].SerializeToString(), (user_id, feature)
                assert event_time == vector.event_timestamps[row].ToDatetime(tzinfo=UTC), (user_id, feature)
        # Not a comparison of nulls: every known user has values, the unknown one none.
        assert all(
            any(value.WhichOneof("val") for value, _ in user_cells) == (user_id != UNKNOWN_USER)
            for user_id, user_cells in zip(users, cells, strict=True)
        )


def test_feast_and_the_server_reach_the_cluster_with_the_timeout_and_no_retries(
    cluster_served: ClusterServed,
) -> None:
    settings = cluster_served.settings.model_copy(update={"online_store_timeout_s": 0.25})
    with store.opened_store(settings) as feast:
        online = feast._get_provider().online_store
        assert isinstance(online, RedisOnlineStore)
        feast_client = online._get_client(feast.config.online_store)
        layout = feature_layout(feast, FEATURE_SERVICE_NAME).store
        server_client = HashReader(
            layout.redis_nodes, cluster=layout.redis_cluster, options=dict(layout.redis_options)
        ).client()

        for client in (feast_client, server_client):
            assert isinstance(client, redis.cluster.RedisCluster)
            assert client.retry.get_retries() == 0
            masters = client.get_primaries()
            assert sorted(int(node.port) for node in masters) == sorted(cluster_served.cluster.ports)
            for node in masters:
                kwargs = client.get_redis_connection(node).connection_pool.connection_kwargs
                assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
                assert kwargs["retry"].get_retries() == 0


def test_served_calls_over_the_cluster_answer_as_over_one_redis(
    cluster_served: ClusterServed, production_stack: ProductionStack
) -> None:
    users = [*demo_users(cluster_served.settings), UNKNOWN_USER]
    request = pb.BatchPredictRequest(user_ids=users)
    with (
        start_server(production_stack.settings) as one_redis,
        prediction_stub(one_redis.local_address) as stub,
    ):
        expected = stub.BatchPredict(request, timeout=CALL_TIMEOUT_S)
        expected_single = stub.Predict(pb.PredictRequest(user_id=users[0]), timeout=CALL_TIMEOUT_S)

    with prediction_stub(cluster_served.server.local_address) as stub:
        batch = stub.BatchPredict(request, timeout=CALL_TIMEOUT_S)
        single = stub.Predict(pb.PredictRequest(user_id=users[0]), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Predict(pb.PredictRequest(user_id=UNKNOWN_USER), timeout=CALL_TIMEOUT_S)

    assert batch.results == expected.results
    assert [r.user_id for r in batch.results] == users
    assert sum(r.HasField("prediction") for r in batch.results) > USERS // 2  # most demo users are scorable
    assert single == expected_single
    assert single.prediction.user_id == users[0]
    error = wire_error(unknown.value)
    assert (error.code, error.info.reason) == (grpc.StatusCode.NOT_FOUND, "ENTITY_NOT_FOUND")
    assert batch.results[-1].error.code == grpc.StatusCode.NOT_FOUND.value[0]


# --- a master killed ----------------------------------------------------------------------------------------


def assert_unavailable(call: Callable[[], object]) -> None:
    """`call` fails with the store-unavailable status (never a hang, an INTERNAL or a dropped channel)."""
    with pytest.raises(grpc.RpcError) as failed:
        call()
    error = wire_error(failed.value)
    assert (error.code, error.info.reason, dict(error.info.metadata)) == (
        grpc.StatusCode.UNAVAILABLE,
        "FEATURE_STORE_UNAVAILABLE",
        {"onlineStore": "redis"},
    )


@dataclass(frozen=True)
class OwnCluster:
    """A server on a cluster of the test's own, which the test may break; where each user's hash is."""

    cluster: LocalRedisCluster
    server: PredictionServer
    masters: dict[str, int]
    """Each of the first `USERS` demo users -> the port of the master holding its hash."""

    def users_on(self, port: int) -> list[str]:
        return [user_id for user_id, master in self.masters.items() if master == port]


@pytest.fixture
def own_cluster(production_stack: ProductionStack, tmp_path: Path) -> Iterator[OwnCluster]:
    with start_redis_cluster(tmp_path / "cluster") as cluster:
        settings = on_cluster(
            production_stack.settings, cluster, online_store_probe_interval_s=PROBE_INTERVAL_S
        )
        with store.opened_store(settings) as feast:
            masters = {
                user_id: cluster.port_of(redis_key(feast, user_id)) for user_id in demo_users(settings)
            }
            with start_server(settings) as running:
                yield OwnCluster(cluster, running, masters)


def test_a_killed_master_makes_reads_unavailable_not_a_crash_or_a_hang(own_cluster: OwnCluster) -> None:
    cluster = own_cluster.cluster
    victim = cluster.ports[0]
    on_victim = own_cluster.users_on(victim)[0]
    elsewhere = own_cluster.users_on(cluster.ports[1])[0]
    with prediction_stub(own_cluster.server.local_address) as stub:

        def predict(user_id: str) -> pb.PredictResponse:
            response: pb.PredictResponse = stub.Predict(
                pb.PredictRequest(user_id=user_id), timeout=CALL_TIMEOUT_S
            )
            return response

        assert predict(on_victim).prediction.user_id == on_victim

        cluster.kill(victim)

        assert_unavailable(lambda: predict(on_victim))  # its master refuses connections
        # Once the other masters agree it is gone, they refuse every slot (CLUSTERDOWN): each call after a
        # pause longer than the probe interval is a probe that reads the cluster and meets that refusal.
        cluster.wait_for_state("fail", cluster.ports[1:])
        for user_id in (elsewhere, on_victim, elsewhere):
            time.sleep(PROBE_INTERVAL_S * 4)
            assert_unavailable(functools.partial(predict, user_id))
        assert_unavailable(
            lambda: stub.BatchPredict(
                pb.BatchPredictRequest(user_ids=[elsewhere, on_victim]), timeout=CALL_TIMEOUT_S
            )
        )
        # The server itself is unharmed: calls that need no features still answer.
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=CALL_TIMEOUT_S).feature_service


def test_a_frozen_master_costs_a_batch_one_read_of_it_not_one_per_user(
    own_cluster: OwnCluster, sends: list[tuple[str, int]]
) -> None:
    cluster = own_cluster.cluster
    victim = cluster.ports[0]
    assert len(own_cluster.users_on(victim)) > 1
    batch = pb.BatchPredictRequest(user_ids=list(own_cluster.masters))
    with prediction_stub(own_cluster.server.local_address) as stub:
        stub.BatchPredict(batch, timeout=CALL_TIMEOUT_S)  # connected to every master
        frozen = cluster.processes[victim]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            sends.clear()
            assert_unavailable(lambda: stub.BatchPredict(batch, timeout=CALL_TIMEOUT_S))
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # One write to the frozen master, one timeout: redis-py's ClusterPipeline sends each of its users'
        # HMGETs again alone, a timeout each, after the pipeline's.
        assert sends.count(("127.0.0.1", victim)) == 1, sends

        cluster.wait_for_state("ok")
        deadline = time.monotonic() + RECOVERY_S
        while True:  # the next probe after the thaw closes the breaker
            try:
                answered = stub.BatchPredict(batch, timeout=CALL_TIMEOUT_S)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "calls kept failing after the master thawed"
                time.sleep(PROBE_INTERVAL_S)
        assert [r.user_id for r in answered.results] == list(own_cluster.masters)


def test_a_read_follows_slots_the_cluster_moved_since_the_client_read_its_slot_table(tmp_path: Path) -> None:
    with start_redis_cluster(tmp_path / "cluster") as cluster:
        first, second = cluster.ports[:2]
        reader = HashReader([("127.0.0.1", first)], cluster=True, options={"socket_timeout": 5})
        client = reader.client()
        assert isinstance(client, redis.cluster.RedisCluster)
        keys = [f"user-{i}".encode() for i in range(300)]
        for i, key in enumerate(keys):
            client.hset(key, b"value", i)  # type: ignore[arg-type]  # redis-py annotates keys as str
        before = {key: cluster.port_of(key) for key in keys}
        ids = {port: cluster.node(port).execute_command("CLUSTER MYID").decode() for port in (first, second)}
        subprocess.run(
            [
                *("redis-cli", "--cluster", "reshard", f"127.0.0.1:{first}"),
                *("--cluster-from", ids[first], "--cluster-to", ids[second]),
                *("--cluster-slots", "2000", "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.wait_for_state("ok")
        moved = [key for key in keys if before[key] == first and cluster.port_of(key) == second]
        stale = client.nodes_manager.get_node_from_slot(key_slot(moved[0]))
        assert moved and int(stale.port) == first  # the client still sends them to their old master

        assert reader.hmget(keys, [b"value", b"none"]) == [[str(i).encode(), None] for i in range(len(keys))]
        assert int(client.nodes_manager.get_node_from_slot(key_slot(moved[0])).port) == second
