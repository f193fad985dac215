"""Token authentication, caller identity and per-caller quotas, over real servers and default channels.

Tokens come from `streamflow add-token`'s own code into a file of hashes; every check is what a caller
receives: the status code, the decoded ErrorInfo / QuotaFailure / RetryInfo, and the typed client error.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from streamflow.client import ChurnClient, RateLimitedError, UnauthenticatedError
from streamflow.errors import StreamflowError
from streamflow.server.app import PredictionServer
from streamflow.server.auth import TokenTable, add_token, token_hash
from streamflow.server.errors import trailer_bytes
from streamflow.server.quotas import SharedBuckets
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.metrics import free_port, metrics_server
from tests.fixtures.processes import STREAMFLOW, serve_env
from tests.fixtures.serving import start_server, wire_error

GRPCURL = STREAMFLOW.parent / "grpcurl"
RELOAD_WAIT_S = 10.0
"""Upper bound on a tokens-file change reaching calls (the server looks once a second); liveness only."""

Credentials = tuple[tuple[str, str], ...]


def bearer(token: str) -> Credentials:
    return (("authorization", f"Bearer {token}"),)


def calls(channel: grpc.Channel) -> dict[str, Callable[[Credentials], object]]:
    """Every RPC a token guards, each made with the given metadata."""
    stub = pb_grpc.PredictionServiceStub(channel)
    reflection_v1alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    reflection_v1 = channel.stream_stream(  # the same messages as v1alpha on the wire
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    def reflect(method: grpc.StreamStreamMultiCallable) -> Callable[[Credentials], object]:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return lambda metadata: list(method(iter([request]), metadata=metadata, timeout=30))

    return {
        "Predict": lambda m: stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=m, timeout=30),
        "BatchPredict": lambda m: stub.BatchPredict(
            pb.BatchPredictRequest(user_ids=[FIRST_USER_ID]), metadata=m, timeout=30
        ),
        "ModelInfo": lambda m: stub.ModelInfo(pb.ModelInfoRequest(), metadata=m, timeout=30),
        "ServerReflectionInfo": reflect(reflection_v1alpha),
        "ServerReflectionInfo (v1)": reflect(reflection_v1),
    }


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


@pytest.fixture
def tokens_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tokens file with callers alice and bob, and their tokens."""
    path = tmp_path / "tokens"
    return path, {name: add_token(path, name) for name in ("alice", "bob")}


@pytest.fixture
def secured(
    embedded_settings: Settings, tokens_file: tuple[Path, dict[str, str]]
) -> Iterator[PredictionServer]:
    with start_server(embedded_settings, auth_tokens_file=tokens_file[0], reflection=True) as running:
        yield running


def test_every_guarded_rpc_refuses_a_missing_malformed_or_unknown_token(
    secured: PredictionServer, tokens_file: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = tokens_file[1]["alice"]
    wrong = alice[:-4] + "AAAA"
    cases: dict[str, Credentials] = {
        "missing": (),
        "malformed": (("authorization", f"Basic {alice}"),),
        "unrecognized": bearer(wrong),
    }
    with grpc.insecure_channel(secured.local_address) as channel:
        for rpc, call in calls(channel).items():
            for problem, metadata in cases.items():
                error = refused(lambda: call(metadata))  # noqa: B023 - called at once
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED, (rpc, problem)
                decoded = wire_error(error)
                assert decoded.info.reason == "UNAUTHENTICATED"
                assert dict(decoded.info.metadata) == {"credential": problem}
                assert "authorization: Bearer <token>" in decoded.status.message
                assert wrong not in decoded.status.message and alice not in decoded.status.message
            call(bearer(alice))  # the same RPC with alice's token is served
    assert alice not in caplog.text and wrong not in caplog.text


def test_health_answers_without_a_token(secured: PredictionServer) -> None:
    with grpc.insecure_channel(secured.local_address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_the_typed_client_sends_its_token_and_raises_a_typed_error_without_one(
    secured: PredictionServer, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    with ChurnClient(secured.local_address, token=tokens_file[1]["bob"]) as churn:
        assert churn.predict(FIRST_USER_ID).user_id == FIRST_USER_ID
    with ChurnClient(secured.local_address) as churn, pytest.raises(UnauthenticatedError) as raised:
        churn.model_info()
    assert raised.value.reason == "UNAUTHENTICATED"
    assert raised.value.metadata == {"credential": "missing"}


def test_the_caller_is_named_in_the_access_log_and_the_metrics(
    secured: PredictionServer, tokens_file: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    def served(caller: str, code: str) -> float:
        labels = {"caller": caller, "grpc_method": "Predict", "grpc_code": code}
        return REGISTRY.get_sample_value("streamflow_caller_calls_total", labels) or 0.0

    before = served("alice", "OK"), served("unauthenticated", "UNAUTHENTICATED")
    users_before = REGISTRY.get_sample_value("streamflow_caller_users_total", {"caller": "alice"}) or 0.0
    caplog.set_level(logging.INFO, logger="streamflow.access")
    with grpc.insecure_channel(secured.local_address) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        for _ in range(3):
            stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID), metadata=bearer(tokens_file[1]["alice"]))
        refused(lambda: stub.Predict(pb.PredictRequest(user_id=FIRST_USER_ID)))

    assert (served("alice", "OK"), served("unauthenticated", "UNAUTHENTICATED")) == (
        before[0] + 3,
        before[1] + 1,
    )
    users = REGISTRY.get_sample_value("streamflow_caller_users_total", {"caller": "alice"})
    assert users == users_before + 3
    access = [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamflow.access" and "/Predict " in r.getMessage()
    ]
    assert sum("caller=alice " in line for line in access) == 3
    assert sum("caller=unauthenticated " in line and "UNAUTHENTICATED" in line for line in access) == 1


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RELOAD_WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {RELOAD_WAIT_S} s: {what}"
        time.sleep(0.1)


def answers(address: str, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.PredictionServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), metadata=bearer(token))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_revoked_and_added_callers_take_effect_without_a_restart(
    secured: PredictionServer, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    path, tokens = tokens_file
    address = secured.local_address
    assert answers(address, tokens["bob"]) is grpc.StatusCode.OK

    path.write_text(
        "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("alice:"))
    )
    eventually(lambda: answers(address, tokens["bob"]) is grpc.StatusCode.UNAUTHENTICATED, "bob is revoked")
    carol = add_token(path, "carol")
    eventually(lambda: answers(address, carol) is grpc.StatusCode.OK, "carol is accepted")
    assert answers(address, tokens["alice"]) is grpc.StatusCode.OK


def test_a_broken_tokens_file_keeps_the_callers_in_force_and_is_reported_once(
    secured: PredictionServer, tokens_file: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow.server.auth")
    path, tokens = tokens_file
    good = path.read_text()
    path.write_text(good + f"dave:{tokens['alice']}\n")  # a plaintext token where its hash belongs
    reports = lambda level: [  # noqa: E731
        r.getMessage() for r in caplog.records if r.name == "streamflow.server.auth" and r.levelno == level
    ]
    deadline = time.monotonic() + 3.0  # three looks at the file at least
    while time.monotonic() < deadline:
        assert answers(secured.local_address, tokens["bob"]) is grpc.StatusCode.OK
        time.sleep(0.05)
    warnings = reports(logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "keeping the 2 callers in force" in warnings[0] and "line 3" in warnings[0]
    assert tokens["alice"] not in caplog.text

    path.write_text(good)
    carol = add_token(path, "carol")
    eventually(lambda: answers(secured.local_address, carol) is grpc.StatusCode.OK, "the fixed file is read")
    assert any("3 callers" in line and "file changed" in line for line in reports(logging.INFO))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("alice:{hash}\nbob:{token}\n", "line 2: the part after `bob:` must be the 64 hex digits"),
        ("alice:{hash}\nalice:{hash}\n", "line 2: caller alice is listed twice"),
        ("# callers\n{token}\n", "line 2: expected `name:sha256-hex`"),
    ],
)
def test_a_bad_tokens_file_is_one_clear_line_that_never_echoes_it(content: str, expected: str) -> None:
    token = "s3cret-token-value-that-must-not-leak"
    with pytest.raises(StreamflowError) as raised:
        TokenTable.parse(content.format(hash=token_hash("x"), token=token), "/etc/streamflow/tokens")
    assert str(raised.value).startswith("/etc/streamflow/tokens, " + expected.split(":")[0])
    assert expected in str(raised.value)
    assert token not in str(raised.value)


def test_serve_refuses_to_start_without_its_tokens_file(tmp_path: Path) -> None:
    missing = tmp_path / "tokens"
    env = serve_env(
        STREAMFLOW_AUTH_TOKENS_FILE=str(missing), STREAMFLOW_PORT="0", STREAMFLOW_HOME=str(tmp_path)
    )
    result = subprocess.run(
        [str(STREAMFLOW), "serve"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot read the tokens file {missing}: No such file or directory"


def test_add_token_refuses_a_taken_name_and_writes_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    token = add_token(path, "alice")
    with pytest.raises(StreamflowError, match="alice is listed twice"):
        add_token(path, "alice")
    assert path.read_text() == f"alice:{token_hash(token)}\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert TokenTable.parse(path.read_text(), str(path)).name_of(token) == "alice"


# --- quotas -----------------------------------------------------------------------------------------------
def test_a_bucket_refills_at_its_rate_lends_to_a_large_batch_and_keeps_callers_apart() -> None:
    buckets = SharedBuckets()
    rate, burst = 2.0, 5.0
    assert [buckets.take("alice", 1, rate, burst, now=100.0) for _ in range(5)] == [0.0] * 5
    assert buckets.take("alice", 1, rate, burst, now=100.0) == pytest.approx(0.5)
    assert buckets.take("bob", 5, rate, burst, now=100.0) == 0.0  # bob's bucket is his own
    assert buckets.take("alice", 1, rate, burst, now=100.5) == 0.0  # refilled by one
    # A batch over the bucket's size passes on a full bucket and leaves a debt the caller waits out.
    assert buckets.take("carol", 20, rate, burst, now=100.0) == 0.0
    assert buckets.take("carol", 1, rate, burst, now=100.0) == pytest.approx((1 + 15) / rate)
    assert buckets.take("carol", 1, rate, burst, now=108.0) == 0.0


def test_buckets_are_shared_with_forked_workers() -> None:
    buckets = SharedBuckets()
    pid = os.fork()
    if pid == 0:  # a worker spends alice's whole bucket
        code = 0 if buckets.take("alice", 5, 1.0, 5.0, now=50.0) == 0.0 else 1
        os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert buckets.take("alice", 1, 1.0, 5.0, now=50.0) == pytest.approx(1.0)


def test_a_caller_over_its_quota_gets_quota_failure_and_retry_info(
    embedded_settings: Settings, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    tokens = tokens_file[1]
    # 0.5 users/s: a second of stall between two calls refills half a user, so the counts below hold.
    with (
        start_server(
            embedded_settings, auth_tokens_file=tokens_file[0], rate_limit_rps=0.5, rate_limit_burst=5
        ) as running,
        ChurnClient(running.local_address, token=tokens["alice"]) as alice,
        ChurnClient(running.local_address, token=tokens["bob"]) as bob,
    ):
        for _ in range(4):
            alice.predict(FIRST_USER_ID)
        alice.model_info()  # costs 1 too
        with grpc.insecure_channel(running.local_address) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            error = refused(
                lambda: stub.BatchPredict(
                    pb.BatchPredictRequest(user_ids=[FIRST_USER_ID] * 3), metadata=bearer(tokens["alice"])
                )
            )
        with pytest.raises(RateLimitedError) as raised:
            alice.predict(FIRST_USER_ID)
        assert len(bob.batch_predict([FIRST_USER_ID] * 5)) == 5  # bob's quota is his own

    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    decoded = wire_error(error)
    assert decoded.info.reason == "RATE_LIMITED"
    assert decoded.info.metadata["caller"] == "alice" and decoded.info.metadata["cost"] == "3"
    assert decoded.info.metadata["usersPerSecond"] == "0.5"
    assert decoded.quota is not None
    assert [v.subject for v in decoded.quota.violations] == ["caller:alice"]
    assert decoded.retry is not None
    assert 0 < decoded.retry.retry_delay.ToNanoseconds() / 1e9 <= 3 / 0.5
    assert raised.value.reason == "RATE_LIMITED"
    assert raised.value.retry_delay_s is not None and 0 < raised.value.retry_delay_s <= 1 / 0.5


def test_workers_share_each_callers_quota_and_report_it_per_caller(
    embedded_settings: Settings, tokens_file: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    path, tokens = tokens_file
    sent = 30
    with metrics_server(
        embedded_settings,
        tmp_path / "serve.log",
        workers=2,
        STREAMFLOW_AUTH_TOKENS_FILE=str(path),
        STREAMFLOW_RATE_LIMIT_RPS="0.2",
        STREAMFLOW_RATE_LIMIT_BURST="10",
    ) as served:
        codes = []
        started = time.monotonic()
        for _ in range(sent):  # a connection per call: the kernel spreads them over both workers
            with grpc.insecure_channel(served.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                try:
                    pb_grpc.PredictionServiceStub(ch).Predict(
                        pb.PredictRequest(user_id=FIRST_USER_ID), metadata=bearer(tokens["alice"]), timeout=30
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        refill = (time.monotonic() - started) * 0.2
        scraped = served.scrape()
        log = served.log.read_text()

    passed = codes.count(grpc.StatusCode.OK)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == sent - passed
    # One bucket of 10 for both workers (per-worker buckets would pass 20).
    assert 10 <= passed <= 10 + refill + 1, (passed, refill)
    per_code = {
        code: scraped.value(
            "streamflow_caller_calls_total", caller="alice", grpc_method="Predict", grpc_code=code
        )
        for code in ("OK", "RESOURCE_EXHAUSTED")
    }
    assert per_code == {"OK": passed, "RESOURCE_EXHAUSTED": sent - passed}
    assert tokens["alice"] not in log


def test_without_tokens_the_client_certificate_subject_names_the_caller(
    embedded_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost", "127.0.0.1")
    client_cert = ca.issue_cert("billing.streamflow.internal", common_name="billing")
    files = {"cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key", "ca": tmp_path / "ca.crt"}
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server_cert.cert_chain_pems))
    files["key"].write_bytes(server_cert.private_key_pem.bytes())
    files["ca"].write_bytes(ca.cert_pem.bytes())
    caplog.set_level(logging.INFO, logger="streamflow.access")
    with (
        start_server(
            embedded_settings,
            tls_cert_file=files["cert"],
            tls_key_file=files["key"],
            tls_client_ca_file=files["ca"],
        ) as running,
        ChurnClient(
            running.local_address,
            ca=ca.cert_pem.bytes(),
            certificate=b"".join(blob.bytes() for blob in client_cert.cert_chain_pems),
            key=client_cert.private_key_pem.bytes(),
        ) as churn,
    ):
        churn.predict(FIRST_USER_ID)

    access = [
        r.getMessage()
        for r in caplog.records
        if r.name == "streamflow.access" and "/Predict " in r.getMessage()
    ]
    assert len(access) == 1
    caller = access[0].split("caller=", 1)[1].split(" peer=", 1)[0]
    assert "CN=billing" in caller, caller


def test_the_readme_calls_with_tls_a_client_certificate_and_a_token(
    embedded_settings: Settings, tmp_path: Path, tokens_file: tuple[Path, dict[str, str]]
) -> None:
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("localhost", "127.0.0.1"), ca.issue_cert("billing")
    for name, blob in {
        "tls.crt": server_cert.cert_chain_pems[0].bytes(),
        "tls.key": server_cert.private_key_pem.bytes(),
        "ca.crt": ca.cert_pem.bytes(),
        "client.crt": client_cert.cert_chain_pems[0].bytes(),
        "client.key": client_cert.private_key_pem.bytes(),
    }.items():
        (tmp_path / name).write_bytes(blob)
    token = tokens_file[1]["alice"]
    health_port = free_port()
    with start_server(
        embedded_settings,
        tls_cert_file=tmp_path / "tls.crt",
        tls_key_file=tmp_path / "tls.key",
        tls_client_ca_file=tmp_path / "ca.crt",
        auth_tokens_file=tokens_file[0],
        health_port=health_port,
    ) as running:
        target = f"localhost:{running.port}"
        tls = ["-cacert", "ca.crt", "-cert", "client.crt", "-key", "client.key"]
        predict = [
            "-d",
            '{"user_id": "7590-VHVEG"}',
            target,
            "streamflow.serving.v1.PredictionService/Predict",
        ]
        run = lambda *args, **env: subprocess.run(  # noqa: E731
            args,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )
        served = run(str(GRPCURL), *tls, "-H", f"authorization: Bearer {token}", *predict)
        tokenless = run(str(GRPCURL), *tls, *predict)
        client = run(
            str(STREAMFLOW.parent / "streamflow-client"),
            "--target",
            target,
            "--ca-file",
            "ca.crt",
            "--cert-file",
            "client.crt",
            "--key-file",
            "client.key",
            "predict",
            "7590-VHVEG",
            STREAMFLOW_TOKEN=token,
        )
        health = run(sys.executable, "-m", "streamflow.healthcheck", "--address", f"localhost:{health_port}")

    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout)["prediction"]["userId"] == "7590-VHVEG"
    # Without the token grpcurl cannot even read the service's shape: reflection is behind the token too.
    assert tokenless.returncode == 1, tokenless.stderr
    assert "code = Unauthenticated" in tokenless.stderr
    assert "authorization: Bearer <token>" in tokenless.stderr
    assert client.returncode == 0, client.stderr
    assert json.loads(client.stdout)["user_id"] == "7590-VHVEG"
    assert health.returncode == 0 and health.stdout == f"localhost:{health_port} (server): SERVING\n"


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("Bearer " + "x" * 6000, "unrecognized"),
        ("Basic " + "x" * 6000, "malformed"),
        ("Bearer    ", "malformed"),
    ],
    ids=["6000-char-token", "6000-char-other-scheme", "blank-token"],
)
def test_a_credential_at_its_worst_is_a_small_unauthenticated(
    secured: PredictionServer, header: str, problem: str
) -> None:
    with grpc.insecure_channel(secured.local_address) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        request = pb.PredictRequest(user_id=FIRST_USER_ID)
        error = refused(lambda: stub.Predict(request, metadata=(("authorization", header),)))

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    decoded = wire_error(error)
    assert decoded.info.reason == "UNAUTHENTICATED"
    assert dict(decoded.info.metadata) == {"credential": problem}
    assert trailer_bytes(decoded.status) < 1024  # nothing of the credential is repeated
    assert "xxxx" not in decoded.status.message
