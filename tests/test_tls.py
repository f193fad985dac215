"""TLS and mTLS on the gRPC port, certificates rotated on disk while serving, the plaintext health port.

Throwaway CAs from `trustme`; every call crosses a real channel to a real server. The certificate files sit
in a Kubernetes secret volume's layout: `tls.crt` is a symlink to `..data/tls.crt`, and a rotation writes a
new version folder and swaps the `..data` symlink, as the kubelet does.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamflow.client import ChurnClient, Prediction, cli
from streamflow.errors import StreamflowError
from streamflow.healthcheck import check
from streamflow.server.app import SERVICE_NAME, PredictionServer
from streamflow.server.auth import add_token
from streamflow.server.tls import certificates
from streamflow.serving.v1 import prediction_service_pb2 as pb
from streamflow.serving.v1 import prediction_service_pb2_grpc as pb_grpc
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.processes import START_TIMEOUT_S, serve_env, serving_process
from tests.fixtures.production import free_port
from tests.fixtures.serving import start_server

GRPCURL = Path(sys.executable).parent / "grpcurl"
PREDICT = f"{SERVICE_NAME}/Predict"
HOSTS = ("localhost", "127.0.0.1")
"""Names the server certificates carry: clients dial `127.0.0.1:PORT`."""


class SecretVolume:
    """`tls.crt`, `tls.key` and `ca.crt` (the client CA) as a Kubernetes secret volume lays them out."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._versions = 0
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (folder / name).symlink_to(Path("..data") / name)

    @property
    def cert(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key(self) -> Path:
        return self.folder / "tls.key"

    @property
    def client_ca(self) -> Path:
        return self.folder / "ca.crt"

    def publish(self, chain: bytes, key: bytes, client_ca: bytes = b"") -> None:
        """Swap in a new version of all three files at once."""
        self._versions += 1
        version = self.folder / f"..v{self._versions}"
        version.mkdir()
        for name, data in (("tls.crt", chain), ("tls.key", key), ("ca.crt", client_ca)):
            (version / name).write_bytes(data)
        staged = self.folder / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.folder / "..data")

    def publish_leaf(self, leaf: trustme.LeafCert, client_ca: trustme.CA | None = None) -> None:
        self.publish(
            chain_of(leaf), leaf.private_key_pem.bytes(), b"" if client_ca is None else pem(client_ca)
        )


def chain_of(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def pem(ca: trustme.CA) -> bytes:
    return ca.cert_pem.bytes()


def tls_settings(volume: SecretVolume, mtls: bool = False, **overrides: Any) -> dict[str, Any]:
    """The `start_server` overrides that serve TLS from `volume` (mTLS with its `ca.crt`)."""
    files: dict[str, Any] = {"tls_cert_file": volume.cert, "tls_key_file": volume.key}
    if mtls:
        files["tls_client_ca_file"] = volume.client_ca
    return {**files, **overrides}


def tls_channel(
    address: str, ca: trustme.CA, client: trustme.LeafCert | None = None, server_name: str | None = None
) -> grpc.Channel:
    """A fresh connection (not shared with other channels) trusting only `ca`, expecting `server_name`
    (default: the address's host) in the server's certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem(ca),
        private_key=None if client is None else client.private_key_pem.bytes(),
        certificate_chain=None if client is None else chain_of(client),
    )
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, credentials, options=options)


def predict_code(channel: grpc.Channel) -> grpc.StatusCode:
    """The code of one Predict on `channel` (OK when it answered)."""
    try:
        pb_grpc.PredictionServiceStub(channel).Predict(pb.PredictRequest(user_id=FIRST_USER_ID), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def code_with(
    address: str, ca: trustme.CA, client: trustme.LeafCert | None = None, server_name: str | None = None
) -> grpc.StatusCode:
    with tls_channel(address, ca, client, server_name) as channel:
        return predict_code(channel)


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    folder = tmp_path / "tls"
    folder.mkdir()
    return SecretVolume(folder)


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(
    embedded_settings: Settings, server_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PredictionServer]:
    """TLS on the gRPC port, health alone on a plaintext port."""
    volume = SecretVolume(tmp_path_factory.mktemp("tls"))
    volume.publish_leaf(server_ca.issue_cert(*HOSTS))
    with start_server(embedded_settings, **tls_settings(volume, health_port=free_port())) as running:
        yield running


def test_tls_port_refuses_plaintext_and_answers_a_client_trusting_its_ca(
    tls_server: PredictionServer, server_ca: trustme.CA
) -> None:
    with grpc.insecure_channel(tls_server.local_address) as plaintext:
        plaintext_code = predict_code(plaintext)
    with ChurnClient(tls_server.local_address, ca=pem(server_ca)) as client:
        prediction = client.predict(FIRST_USER_ID)
        (batch,) = client.batch_predict([FIRST_USER_ID])
        info = client.model_info()

    assert plaintext_code is grpc.StatusCode.UNAVAILABLE
    assert isinstance(prediction, Prediction) and prediction.user_id == FIRST_USER_ID
    assert batch.outcome == prediction
    assert info.model == prediction.model
    assert code_with(tls_server.local_address, trustme.CA()) is grpc.StatusCode.UNAVAILABLE, "an unknown CA"


def test_health_port_is_plaintext_health_alone(tls_server: PredictionServer, tmp_path: Path) -> None:
    health_address = f"127.0.0.1:{tls_server.settings.health_port}"
    with grpc.insecure_channel(health_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = {
            name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            for name in ("", SERVICE_NAME)
        }
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.PredictionServiceStub(channel).Predict(
                pb.PredictRequest(user_id=FIRST_USER_ID), timeout=10
            )
    probe = subprocess.run(
        [sys.executable, "-m", "streamflow.healthcheck"],
        env=serve_env(
            STREAMFLOW_PORT=str(tls_server.port), STREAMFLOW_HEALTH_PORT=str(tls_server.settings.health_port)
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert statuses == {name: health_pb2.HealthCheckResponse.SERVING for name in ("", SERVICE_NAME)}
    assert exc.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert (probe.returncode, probe.stdout.strip()) == (0, f"{health_address} (server): SERVING")


def test_mtls_requires_a_client_certificate_from_the_client_ca(
    embedded_settings: Settings, volume: SecretVolume
) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    # Named as a service inside a cluster, not as the address dialled: clients override the name to check.
    volume.publish_leaf(server_ca.issue_cert("serving.internal"), client_ca=client_ca)
    client = client_ca.issue_cert("scoring-job.example")
    with start_server(embedded_settings, **tls_settings(volume, mtls=True)) as running:
        address = running.local_address
        without_certificate = code_with(address, server_ca, server_name="serving.internal")
        from_another_ca = code_with(
            address, server_ca, trustme.CA().issue_cert("scoring-job.example"), "serving.internal"
        )
        valid = code_with(address, server_ca, client, "serving.internal")
        wrong_name = code_with(address, server_ca, client)
        with ChurnClient(
            address,
            ca=pem(server_ca),
            certificate=chain_of(client),
            key=client.private_key_pem.bytes(),
            server_name="serving.internal",
        ) as churn:
            prediction = churn.predict(FIRST_USER_ID)

    assert without_certificate is grpc.StatusCode.UNAVAILABLE
    assert from_another_ca is grpc.StatusCode.UNAVAILABLE
    assert valid is grpc.StatusCode.OK
    assert wrong_name is grpc.StatusCode.UNAVAILABLE, "the server's certificate names serving.internal only"
    assert prediction.user_id == FIRST_USER_ID


class CallLoop:
    """Predict in a loop on one channel (one connection) until stopped, counting the outcomes."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._stop = threading.Event()
        self.codes: list[grpc.StatusCode] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.codes.append(predict_code(self._channel))

    def stop(self) -> list[grpc.StatusCode]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.codes


def tls_events(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "streamflow.server.tls" and r.levelno == level
    ]


def test_a_rotated_certificate_reaches_new_connections_while_open_ones_keep_calling(
    embedded_settings: Settings, volume: SecretVolume, caplog: pytest.LogCaptureFixture
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    volume.publish_leaf(old_ca.issue_cert(*HOSTS))
    new_leaf = new_ca.issue_cert(*HOSTS)
    caplog.set_level(logging.INFO, logger="streamflow.server.tls")
    with start_server(embedded_settings, **tls_settings(volume)) as running:
        address = running.local_address
        with tls_channel(address, old_ca) as opened_before:
            assert predict_code(opened_before) is grpc.StatusCode.OK
            loop = CallLoop(opened_before)
            volume.publish_leaf(new_leaf)
            trusting_new = code_with(address, new_ca)
            trusting_old = code_with(address, old_ca)
            during = len(loop.codes)
            while len(loop.codes) < during + 20:  # keeps calling on the old connection after the rotation
                assert predict_code(opened_before) is grpc.StatusCode.OK
            codes = loop.stop()

    assert (trusting_new, trusting_old) == (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
    assert len(codes) >= 20 and set(codes) == {grpc.StatusCode.OK}
    (rotated,) = [line for line in tls_events(caplog, logging.INFO) if "rotated" in line]
    serial = x509.load_pem_x509_certificate(new_leaf.cert_chain_pems[0].bytes()).serial_number
    assert f"serial {serial:x}," in rotated
    assert tls_events(caplog, logging.WARNING) == []


def test_a_broken_rotation_keeps_the_served_certificate_and_warns_once_until_fixed(
    embedded_settings: Settings, volume: SecretVolume, caplog: pytest.LogCaptureFixture
) -> None:
    served_ca, next_ca = trustme.CA(), trustme.CA()
    volume.publish_leaf(served_ca.issue_cert(*HOSTS))
    caplog.set_level(logging.INFO, logger="streamflow.server.tls")
    with start_server(embedded_settings, **tls_settings(volume)) as running:
        address = running.local_address
        episodes = []
        for breakage in ("mismatched key", "truncated certificate"):
            leaf = next_ca.issue_cert(*HOSTS)
            chain, key = chain_of(leaf), leaf.private_key_pem.bytes()
            if breakage == "mismatched key":
                key = next_ca.issue_cert(*HOSTS).private_key_pem.bytes()
            else:
                chain = chain[: len(chain) // 2]
            volume.publish(chain, key)
            broken = [(code_with(address, served_ca), code_with(address, next_ca)) for _ in range(3)]
            warnings = tls_events(caplog, logging.WARNING)
            volume.publish_leaf(leaf)
            fixed = (code_with(address, next_ca), code_with(address, served_ca))
            episodes.append((breakage, broken, warnings, fixed))
            caplog.clear()
            served_ca, next_ca = next_ca, trustme.CA()

    for breakage, broken, warnings, fixed in episodes:
        assert broken == [(grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)] * 3, breakage
        assert len(warnings) == 1, (breakage, warnings)
        assert fixed == (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), breakage
        assert "PRIVATE KEY" not in warnings[0]
    assert "does not match" in episodes[0][2][0]
    assert "not a complete PEM certificate list" in episodes[1][2][0]


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("missing certificate", "TLS certificate file {cert}: cannot read it (No such file or directory)"),
        ("garbage certificate", "TLS certificate file {cert}: not a complete PEM certificate list"),
        ("mismatched key", "TLS key file {key} does not match the first certificate of {cert}"),
        ("certificate as key", "TLS key file {key}: not an unencrypted PEM private key"),
        ("garbage client CA", "TLS client CA file {ca}: not a complete PEM certificate list"),
    ],
)
def test_unusable_files_at_start_are_one_clear_error(
    embedded_settings: Settings, volume: SecretVolume, case: str, problem: str
) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert(*HOSTS)
    chain, key, client_ca = chain_of(leaf), leaf.private_key_pem.bytes(), pem(ca)
    if case == "garbage certificate":
        chain = b"not a certificate"
    elif case == "mismatched key":
        key = ca.issue_cert(*HOSTS).private_key_pem.bytes()
    elif case == "certificate as key":
        key = chain
    elif case == "garbage client CA":
        client_ca = b"-----BEGIN CERTIFICATE-----\ntruncated"
    volume.publish(chain, key, client_ca)
    if case == "missing certificate":
        (volume.folder / "..data" / "tls.crt").unlink()
    settings = embedded_settings.model_copy(update=tls_settings(volume, mtls=True))

    with pytest.raises(StreamflowError) as exc:
        certificates(settings)

    assert str(exc.value) == problem.format(cert=volume.cert, key=volume.key, ca=volume.client_ca)


# One worker fails in the server it builds; several are refused by the supervisor before it forks any.
@pytest.mark.parametrize(("case", "workers"), [("missing", 1), ("invalid", 2)])
def test_serve_with_an_unusable_certificate_exits_with_one_line(
    embedded_settings: Settings, volume: SecretVolume, case: str, workers: int
) -> None:
    leaf = trustme.CA().issue_cert(*HOSTS)
    volume.publish(b"" if case == "invalid" else chain_of(leaf), leaf.private_key_pem.bytes())
    if case == "missing":
        (volume.folder / "..data" / "tls.crt").unlink()
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        MLFLOW_TRACKING_URI=embedded_settings.tracking_uri,
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS=str(workers),
        STREAMFLOW_TLS_CERT_FILE=str(volume.cert),
        STREAMFLOW_TLS_KEY_FILE=str(volume.key),
    )
    serve = subprocess.run(
        [str(Path(sys.executable).parent / "streamflow"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    problem = "cannot read it (No such file or directory)" if case == "missing" else "not a complete PEM"
    errors = [line for line in serve.stderr.splitlines() if line.startswith("error:")]
    assert serve.returncode == 1
    assert errors == [serve.stderr.splitlines()[-1]], serve.stderr
    assert errors[0].startswith(f"error: TLS certificate file {volume.cert}: {problem}")
    assert "Traceback" not in serve.stderr and "PRIVATE KEY" not in serve.stderr


def test_two_workers_serve_tls_and_the_plaintext_health_port(
    embedded_settings: Settings, volume: SecretVolume, tmp_path: Path
) -> None:
    ca = trustme.CA()
    volume.publish_leaf(ca.issue_cert(*HOSTS))
    health_port = free_port()
    env = serve_env(
        STREAMFLOW_HOME=str(embedded_settings.home),
        MLFLOW_TRACKING_URI=embedded_settings.tracking_uri,
        STREAMFLOW_HOST="127.0.0.1",
        STREAMFLOW_PORT="0",
        STREAMFLOW_WORKERS="2",
        STREAMFLOW_HEALTH_PORT=str(health_port),
        STREAMFLOW_TLS_CERT_FILE=str(volume.cert),
        STREAMFLOW_TLS_KEY_FILE=str(volume.key),
    )
    health_address = f"127.0.0.1:{health_port}"
    with serving_process(env, tmp_path / "serve.log") as (_, address):
        with socket.socket() as intruder, pytest.raises(OSError) as claimed:
            intruder.bind(("127.0.0.1", health_port))
        statuses = [wait_for_serving(health_address) for _ in range(4)]
        with ChurnClient(address, ca=pem(ca)) as client:
            prediction = client.predict(FIRST_USER_ID)
        with grpc.insecure_channel(address) as plaintext:
            plaintext_code = predict_code(plaintext)  # a failed handshake, which any peer can cause

    assert claimed.value.errno == 98  # EADDRINUSE: the supervisor holds the health port
    assert statuses == ["SERVING"] * 4
    assert prediction.user_id == FIRST_USER_ID
    assert plaintext_code is grpc.StatusCode.UNAVAILABLE
    assert "Handshake failed" not in (tmp_path / "serve.log").read_text(), "not a log line per peer"
    assert check(health_address, timeout_s=1).startswith("UNAVAILABLE"), "stopped with the server"


def wait_for_serving(address: str) -> str:
    """Health of `address` over a fresh connection once it says SERVING (workers load their model first),
    or its last answer after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (status := check(address)) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def test_client_cli_speaks_tls_and_refuses_unusable_files_in_one_line(
    tls_server: PredictionServer,
    server_ca: trustme.CA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ca_file, not_pem = tmp_path / "ca.pem", tmp_path / "not.pem"
    ca_file.write_bytes(pem(server_ca))
    not_pem.write_text("hello")
    target = ("--target", tls_server.local_address)

    predicted = cli.main([*target, "--ca-file", str(ca_file), "predict", FIRST_USER_ID])
    printed = json.loads(capsys.readouterr().out)
    refusals = {}
    for name, flags in {
        "missing CA": ["--ca-file", str(tmp_path / "missing.pem")],
        "CA not PEM": ["--ca-file", str(not_pem)],
        "certificate without key": ["--ca-file", str(ca_file), "--cert-file", str(ca_file)],
    }.items():
        code = cli.main([*target, *flags, "predict", FIRST_USER_ID])
        captured = capsys.readouterr()
        refusals[name] = (code, captured.out, captured.err.splitlines())

    assert predicted == 0 and printed["user_id"] == FIRST_USER_ID
    error = "streamflow-client: error:"
    unpaired = "a client certificate needs its key, and a key its certificate"
    assert refusals == {
        "missing CA": (2, "", [f"{error} {tmp_path / 'missing.pem'}: No such file or directory"]),
        "CA not PEM": (2, "", [f"{error} CA certificate {not_pem} holds no PEM data"]),
        "certificate without key": (2, "", [f"{error} {unpaired}"]),
    }


def test_grpcurl_calls_over_mtls_with_a_token_as_the_readme_shows(
    embedded_settings: Settings, volume: SecretVolume, tmp_path: Path
) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    volume.publish_leaf(server_ca.issue_cert(*HOSTS), client_ca=client_ca)
    client = client_ca.issue_cert("billing.example")
    (tmp_path / "ca.crt").write_bytes(pem(server_ca))
    (tmp_path / "client.crt").write_bytes(chain_of(client))
    (tmp_path / "client.key").write_bytes(client.private_key_pem.bytes())
    token = add_token(tmp_path / "tokens", "billing")
    overrides = tls_settings(volume, mtls=True, auth_tokens_file=tmp_path / "tokens")
    with start_server(embedded_settings, **overrides) as running:

        def grpcurl(*headers: str) -> subprocess.CompletedProcess[str]:
            files = ("-cacert", "ca.crt", "-cert", "client.crt", "-key", "client.key")
            request = ("-d", json.dumps({"user_id": FIRST_USER_ID}), f"localhost:{running.port}", PREDICT)
            return subprocess.run(
                [str(GRPCURL), *files, *headers, *request],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        with_token = grpcurl("-H", f"authorization: Bearer {token}")
        without_token = grpcurl()

    assert with_token.returncode == 0, with_token.stderr
    assert json.loads(with_token.stdout)["prediction"]["userId"] == FIRST_USER_ID
    assert without_token.returncode != 0
    assert "code = Unauthenticated" in without_token.stderr  # reflection, behind the token, refused it
