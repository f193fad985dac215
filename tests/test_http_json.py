"""The PredictionService over HTTP (server/http_gateway.py): real servers on free ports, real HTTP clients.

Answers over Connect JSON, Connect binary and gRPC-Web equal the gRPC answers of the same server; every
error path reachable over HTTP has the Connect code and the same decoded details as over gRPC.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import logging
import os
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
import trustme
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.server.app import PredictionServer
from streamflow.server.auth import add_token
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.metrics import eventually, free_port
from tests.fixtures.processes import serve_env, serving_process
from tests.fixtures.serving import WireError, prediction_stub, start_server, wire_error

SERVICE = "streamflow.serving.v1.PredictionService"
UNKNOWN_USER = "9999-NOSUCH"
CONNECT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: ("invalid_argument", 400),
    grpc.StatusCode.NOT_FOUND: ("not_found", 404),
    grpc.StatusCode.UNAUTHENTICATED: ("unauthenticated", 401),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("resource_exhausted", 429),
}
"""The gRPC code of each error path below, its Connect code and the HTTP status the protocol gives it."""


@pytest.fixture(scope="module")
def http_server(embedded_settings: Settings) -> Iterator[PredictionServer]:
    with start_server(embedded_settings, http_port=free_port()) as running:
        yield running


def url(running: PredictionServer, method: str, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{running.settings.http_port}/{SERVICE}/{method}"


def post_json(running: PredictionServer, method: str, body: str, **headers: str) -> httpx.Response:
    return httpx.post(
        url(running, method), content=body, headers={"content-type": "application/json", **headers}
    )


def grpc_call(running: PredictionServer, method: str, request: Message) -> Message:
    with prediction_stub(running.local_address) as stub:
        return getattr(stub, method)(request)


def connect_error(response: httpx.Response) -> WireError:
    """The Connect error JSON of `response` decoded as a gRPC client decodes a status, after checking that
    the code and HTTP status agree and that every detail carries its readable `debug` copy."""
    body = response.json()
    code = next(c for c, (name, _) in CONNECT_CODES.items() if name == body["code"])
    assert response.status_code == CONNECT_CODES[code][1]
    details = []
    for detail in body["details"]:
        value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        details.append(any_pb2.Any(type_url=f"type.googleapis.com/{detail['type']}", value=value))
        assert detail["debug"], detail
    return WireError.of(status_pb2.Status(code=code.value[0], message=body["message"], details=details))


def same_error(over_http: WireError, over_grpc: WireError) -> None:
    assert over_http.code == over_grpc.code
    assert over_http.status.message == over_grpc.status.message
    assert over_http.info == over_grpc.info
    assert over_http.bad_request == over_grpc.bad_request
    assert over_http.precondition == over_grpc.precondition


@pytest.mark.parametrize(
    ("method", "body", "request_message"),
    [
        ("Predict", f'{{"userId": "{FIRST_USER_ID}"}}', pb.PredictRequest(user_id=FIRST_USER_ID)),
        ("Predict", f'{{"user_id": "{FIRST_USER_ID}"}}', pb.PredictRequest(user_id=FIRST_USER_ID)),
        (
            "BatchPredict",
            json.dumps({"userIds": [FIRST_USER_ID, UNKNOWN_USER]}),
            pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, UNKNOWN_USER]),
        ),
        ("ModelInfo", "{}", pb.ModelInfoRequest()),
    ],
    ids=["predict", "predict-snake-case", "batch-with-failures", "model-info"],
)
def test_json_answers_equal_the_grpc_answers(
    http_server: PredictionServer, method: str, body: str, request_message: Message
) -> None:
    response = post_json(http_server, method, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "content-length" in response.headers  # not chunked, for HTTP/1.1 clients that cannot read it
    # As JSON: a result's error details are Any, whose bytes hold a map in no fixed order.
    assert response.json() == json_format.MessageToDict(grpc_call(http_server, method, request_message))


def test_binary_connect_over_http2_without_tls_equals_grpc(http_server: PredictionServer) -> None:
    request = pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, UNKNOWN_USER])
    with httpx.Client(http1=False, http2=True) as client:  # h2c with prior knowledge
        response = client.post(
            url(http_server, "BatchPredict"),
            content=request.SerializeToString(),
            headers={"content-type": "application/proto"},
        )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    answer = pb.BatchPredictResponse.FromString(response.content)
    expected = grpc_call(http_server, "BatchPredict", request)
    assert json_format.MessageToDict(answer) == json_format.MessageToDict(expected)


@pytest.mark.parametrize(
    ("method", "body", "request_message"),
    [
        ("Predict", f'{{"userId": "{UNKNOWN_USER}"}}', pb.PredictRequest(user_id=UNKNOWN_USER)),
        ("Predict", '{"userId": "bad id!"}', pb.PredictRequest(user_id="bad id!")),
        ("Predict", json.dumps({"userId": "x" * 200}), pb.PredictRequest(user_id="x" * 200)),
        ("BatchPredict", '{"userIds": []}', pb.BatchPredictRequest()),
        (
            "BatchPredict",
            json.dumps({"userIds": [FIRST_USER_ID, "no good", ""]}),
            pb.BatchPredictRequest(user_ids=[FIRST_USER_ID, "no good", ""]),
        ),
    ],
    ids=["unknown-user", "invalid-id", "long-id", "empty-batch", "invalid-ids-in-batch"],
)
def test_errors_carry_the_grpc_code_and_details(
    http_server: PredictionServer, method: str, body: str, request_message: Message
) -> None:
    response = post_json(http_server, method, body)
    with pytest.raises(grpc.RpcError) as over_grpc:
        grpc_call(http_server, method, request_message)
    same_error(connect_error(response), wire_error(over_grpc.value))
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "body",
    [b'{"userId": ', b'{"userid": "7590-VHVEG"}', b'{"userId": 7}', b'{"userId": "\xff"}', b"", b"[]"],
    ids=["truncated", "unknown-field", "wrong-type", "not-utf8", "empty", "not-an-object"],
)
def test_a_body_that_is_not_the_request_json_is_malformed_request(
    http_server: PredictionServer, body: bytes
) -> None:
    response = httpx.post(
        url(http_server, "Predict"), content=body, headers={"content-type": "application/json"}
    )
    error = connect_error(response)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.info.reason == "MALFORMED_REQUEST"
    assert error.info.metadata == {"method": f"/{SERVICE}/Predict", "requestBytes": str(len(body))}


def test_undecodable_binary_body_is_malformed_request_as_over_grpc(http_server: PredictionServer) -> None:
    body = b"\x0a\x02\xff\xfe"  # field 1, two bytes that are not UTF-8
    response = httpx.post(
        url(http_server, "Predict"), content=body, headers={"content-type": "application/proto"}
    )
    with grpc.insecure_channel(http_server.local_address) as channel:
        raw = channel.unary_unary(f"/{SERVICE}/Predict", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as over_grpc:
            raw(body)
    same_error(connect_error(response), wire_error(over_grpc.value))


def grpc_web_frames(body: bytes) -> Iterator[tuple[int, bytes]]:
    """The (flags, payload) frames of a gRPC-Web response body."""
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        yield flags, body[5 : 5 + size]
        body = body[5 + size :]


def grpc_web_call(
    running: PredictionServer, method: str, request: Message
) -> tuple[list[bytes], dict[str, str]]:
    """A gRPC-Web call as a browser makes it: its response messages and its trailers."""
    response = httpx.post(
        url(running, method),
        content=struct.pack(">BI", 0, request.ByteSize()) + request.SerializeToString(),
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    messages, trailers = [], {}
    for flags, payload in grpc_web_frames(response.content):
        if flags & 0x80:
            for line in payload.decode().strip().split("\r\n"):
                key, _, value = line.partition(":")
                trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def test_grpc_web_answers_and_errors_equal_grpc(http_server: PredictionServer) -> None:
    request = pb.PredictRequest(user_id=FIRST_USER_ID)
    messages, trailers = grpc_web_call(http_server, "Predict", request)
    assert trailers["grpc-status"] == "0"
    assert [pb.PredictResponse.FromString(m) for m in messages] == [
        grpc_call(http_server, "Predict", request)
    ]

    unknown = pb.PredictRequest(user_id=UNKNOWN_USER)
    messages, trailers = grpc_web_call(http_server, "Predict", unknown)
    with pytest.raises(grpc.RpcError) as over_grpc:
        grpc_call(http_server, "Predict", unknown)
    assert messages == []
    details = base64.b64decode(trailers["grpc-status-details-bin"] + "==")
    same_error(WireError.of(status_pb2.Status.FromString(details)), wire_error(over_grpc.value))
    assert trailers["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])


@pytest.fixture(scope="module")
def guarded_server(embedded_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server asking for tokens, with a quota of 5 users per second per caller; and a caller's token."""
    tokens = tmp_path_factory.mktemp("http-tokens") / "tokens"
    token = add_token(tokens, "web")
    with start_server(
        embedded_settings,
        http_port=free_port(),
        auth_tokens_file=tokens,
        rate_limit_rps=5,
        rate_limit_burst=5,
    ) as running:
        yield running, token


@pytest.mark.parametrize(
    ("authorization", "problem"),
    [(None, "missing"), ("Basic d2ViOndlYg==", "malformed"), ("Bearer not-a-token", "unrecognized")],
)
def test_a_call_without_a_valid_token_is_unauthenticated(
    guarded_server: tuple[PredictionServer, str], authorization: str | None, problem: str
) -> None:
    running, _ = guarded_server
    headers = {} if authorization is None else {"authorization": authorization}
    error = connect_error(post_json(running, "ModelInfo", "{}", **headers))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.info.reason == "UNAUTHENTICATED"
    assert error.info.metadata == {"credential": problem}
    assert "not-a-token" not in error.status.message


def test_a_caller_over_its_quota_is_rate_limited_with_retry_info(
    guarded_server: tuple[PredictionServer, str],
) -> None:
    running, token = guarded_server
    ids = [FIRST_USER_ID] * 20  # passes on a full bucket, and leaves it in debt
    batch = post_json(running, "BatchPredict", json.dumps({"userIds": ids}), authorization=f"Bearer {token}")
    assert batch.status_code == 200, batch.text
    refused = post_json(
        running, "Predict", f'{{"userId": "{FIRST_USER_ID}"}}', authorization=f"Bearer {token}"
    )
    error = connect_error(refused)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.info.reason == "RATE_LIMITED"
    assert error.info.metadata["caller"] == "web"
    assert error.quota is not None and error.quota.violations[0].subject == "caller:web"
    assert error.retry is not None and error.retry.retry_delay.ToNanoseconds() > 0
    assert int(refused.headers["retry-after"]) >= 1


def listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }


def test_port_0_serves_no_http(embedded_settings: Settings) -> None:
    before = listening_ports(os.getpid())
    with start_server(embedded_settings, wait_for_model=False, http_port=0) as running:
        assert running.http is None
        assert listening_ports(os.getpid()) - before == {running.port}


def test_a_dead_http_task_is_logged_once_and_served_again(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with start_server(embedded_settings, http_port=free_port()) as running:
        assert running.http is not None
        caplog.set_level(logging.INFO, logger="streamflow.server.http_gateway")
        # What a crash of the serving task looks like to its supervisor: the task ends while not stopping.
        task = running.http._task
        assert task is not None
        running.event_loop.loop.call_soon_threadsafe(task.cancel)
        recovered = threading.Event()
        handler = _On("http_server_recovered", recovered)
        logging.getLogger("streamflow.server.http_gateway").addHandler(handler)
        try:
            assert recovered.wait(30), caplog.text
        finally:
            logging.getLogger("streamflow.server.http_gateway").removeHandler(handler)
        assert post_json(running, "ModelInfo", "{}").status_code == 200
        events = [getattr(r, "event", None) for r in caplog.records]
        assert events.count("http_server_failed") == 1
        assert events.count("http_server_recovered") == 1


class _On(logging.Handler):
    """Sets `flag` when a record of lifecycle event `name` is logged."""

    def __init__(self, name: str, flag: threading.Event) -> None:
        super().__init__()
        self._name, self._flag = name, flag

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == self._name:
            self._flag.set()


def test_a_call_in_flight_finishes_during_the_drain(embedded_settings: Settings) -> None:
    with start_server(embedded_settings, http_port=free_port()) as running:
        answers: list[httpx.Response] = []
        body = json.dumps({"userIds": [FIRST_USER_ID] * 1000})
        sender = threading.Thread(target=lambda: answers.append(post_json(running, "BatchPredict", body)))
        sender.start()
        while not running.guard.in_flight and sender.is_alive():  # until the server is running the call
            threading.Event().wait(0.005)
        running.stop(grace=30)
        sender.join()
    assert [a.status_code for a in answers] == [200]
    assert len(answers[0].json()["results"]) == 1000


def test_every_worker_answers_http(embedded_settings: Settings, tmp_path: Path) -> None:
    http_port = free_port()
    env = serve_env(
        MLFLOW_TRACKING_URI=embedded_settings.tracking_uri,
        STREAMFLOW_HOME=str(embedded_settings.home),
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_HTTP_PORT=str(http_port),
    )
    with serving_process(env, tmp_path / "serve.log") as (process, _):
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 2
        eventually(lambda: all(http_port in listening_ports(w.pid) for w in workers), "both workers listen")
        answered: dict[int, int] = {}  # worker pid -> calls it answered
        for _ in range(200):  # the kernel spreads new connections over the workers; stop once both had one
            connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            try:
                connection.connect()
                eventually(functools.partial(answers, connection), "the worker has loaded the model")
                # Answered, so accepted: the connection is now a socket of the worker that answered.
                client_port = connection.sock.getsockname()[1]
                worker = next(w.pid for w in workers if client_port in remote_ports(w.pid, http_port))
                answered[worker] = answered.get(worker, 0) + 1
            finally:
                connection.close()
            if len(answered) == 2:
                break
        assert sorted(answered) == sorted(w.pid for w in workers)


def remote_ports(pid: int, local_port: int) -> set[int]:
    """The client ports of the connections process `pid` accepted on `local_port`."""
    connections = psutil.Process(pid).net_connections("tcp")
    return {c.raddr.port for c in connections if c.laddr.port == local_port and c.raddr}


def answers(connection: http.client.HTTPConnection) -> bool:
    """Whether a ModelInfo call on `connection` succeeds (a worker without a model yet answers 503)."""
    connection.request(
        "POST", f"/{SERVICE}/ModelInfo", body=b"{}", headers={"content-type": "application/json"}
    )
    response = connection.getresponse()
    response.read()
    return response.status == 200


def test_https_serves_the_grpc_ports_certificate_and_takes_a_rotation(
    embedded_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow.server.tls")
    first, second = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    key.write_bytes(cert.read_bytes())  # trustme writes key and chain as one PEM, which both readers take
    with start_server(
        embedded_settings, wait_for_model=False, http_port=free_port(), tls_cert_file=cert, tls_key_file=key
    ) as running:
        https = url(running, "ModelInfo", scheme="https")

        def status_with(ca: trustme.CA) -> int:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            headers = {"content-type": "application/json"}
            return httpx.post(https, content="{}", headers=headers, verify=context).status_code

        assert status_with(first) in (200, 503)  # 503 until the model is loaded: either is an HTTP answer
        with pytest.raises(httpx.HTTPError):
            post_json(running, "ModelInfo", "{}")  # plaintext to the TLS port

        rotated = tmp_path / "rotated.pem"
        second.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(rotated))
        os.replace(rotated, cert)
        key.write_bytes(cert.read_bytes())
        assert status_with(second) in (200, 503)
        with pytest.raises(httpx.ConnectError):
            status_with(first)
        # The gRPC port takes the same rotation from the same reloader: read, checked and logged once.
        credentials = grpc.ssl_channel_credentials(second.cert_pem.bytes())
        with grpc.secure_channel(f"127.0.0.1:{running.port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    tls_lines = [r.getMessage() for r in caplog.records if r.name == "streamflow.server.tls"]
    assert sum(line.startswith("TLS certificate served") for line in tls_lines) == 1
    assert sum(line.startswith("TLS certificate rotated") for line in tls_lines) == 1


def test_grpc_clients_can_use_the_http_port_too(http_server: PredictionServer) -> None:
    request = pb.PredictRequest(user_id=UNKNOWN_USER)
    with grpc.insecure_channel(f"127.0.0.1:{http_server.settings.http_port}") as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        assert stub.ModelInfo(pb.ModelInfoRequest()) == grpc_call(
            http_server, "ModelInfo", pb.ModelInfoRequest()
        )
        with pytest.raises(grpc.RpcError) as over_http_port:
            stub.Predict(request)
    with pytest.raises(grpc.RpcError) as over_grpc_port:
        grpc_call(http_server, "Predict", request)
    same_error(wire_error(over_http_port.value), wire_error(over_grpc_port.value))
