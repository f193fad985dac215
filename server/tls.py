"""TLS and mTLS credentials of the gRPC port, re-read from disk when the files change, without a restart.

grpc's dynamic server credentials (which the asyncio server takes like the sync one) ask a fetcher for a
new certificate configuration on every new handshake, on one of grpc's own threads; connections already open
keep the configuration they were made with, so calls in flight never notice a rotation. The fetcher here is
cheap: it compares an `os.stat` signature of the files (inode, device, mtime, size: cert-manager and
Kubernetes secret volumes swap a symlink, Vault agents rewrite in place) with the set it serves, and only
reads them when that changed.

A changed set is validated before it is served: the certificate chain parses, the private key matches the
leaf certificate's public key, the client CA bundle parses. A set that fails (a rotation written half-way,
a key from another certificate) keeps the previous set served; the failure is logged once per episode and
the files are tried again on the next handshake, so a completed rotation is taken without a restart. At
start the same checks are a `StreamflowError` naming the file and the problem (never any key material).

What it cannot see: a chain cut exactly between two certificates parses, and is served without its
intermediates; a rewrite within one file-system timestamp tick that keeps the inode and the size.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from streamflow.errors import StreamflowError
from streamflow.server.logs import event
from streamflow.settings import Settings

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int, int], ...]
"""Per file (certificate, key, client CA): inode, device, mtime in ns, size."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mTLS) the client CA bundle are."""

    cert: Path
    key: Path
    client_ca: Path | None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    def signature(self) -> Signature:
        """Raises OSError when a file is missing (a rotation may be mid-way)."""
        stats = [path.stat() for path in self.paths]  # follows symlinks: a swapped target changes the inode
        return tuple((s.st_ino, s.st_dev, s.st_mtime_ns, s.st_size) for s in stats)


@dataclass(frozen=True)
class CertificateSet:
    """A validated set, ready to serve."""

    chain_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    leaf: x509.Certificate

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.chain_pem)], root_certificates=self.client_ca_pem
        )

    def describe(self) -> dict[str, str]:
        """What identifies the served certificate in a log line."""
        return {
            "subject": self.leaf.subject.rfc4514_string(),
            "serial": f"{self.leaf.serial_number:x}",
            "not_after": self.leaf.not_valid_after_utc.isoformat(),
        }


def tls_files(settings: Settings) -> TlsFiles | None:
    """The files of `settings`, or None when TLS is off."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StreamflowError(f"TLS {what} {path}: cannot read it ({exc.strerror})") from None


def _certificates(path: Path, what: str, data: bytes) -> list[x509.Certificate]:
    from cryptography import x509  # only where TLS is on: a worker without it stays 10 MB smaller

    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise StreamflowError(f"TLS {what} {path}: not a complete PEM certificate list") from None


def load(files: TlsFiles) -> CertificateSet:
    """Read and validate the set; raises StreamflowError naming the file and the problem."""
    from cryptography.hazmat.primitives import serialization  # only where TLS is on, as above

    chain_pem = _read(files.cert, "certificate file")
    key_pem = _read(files.key, "key file")
    leaf = _certificates(files.cert, "certificate file", chain_pem)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise StreamflowError(f"TLS key file {files.key}: not an unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise StreamflowError(
            f"TLS key file {files.key} does not match the first certificate of {files.cert}"
        )
    client_ca_pem = None
    if files.client_ca is not None:
        client_ca_pem = _read(files.client_ca, "client CA file")
        _certificates(files.client_ca, "client CA file", client_ca_pem)
    return CertificateSet(chain_pem, key_pem, client_ca_pem, leaf)


def check(settings: Settings) -> None:
    """Raise StreamflowError when TLS is on and its files cannot be served."""
    files = tls_files(settings)
    if files is not None:
        load(files)


class CertificateReloader:
    """The process's one view of the TLS files: `current()` is the validated set in force, after a look at
    the files (cheap: an `os.stat` signature) that takes a changed, valid set and keeps the served one
    otherwise. Both ports ask it on every new handshake (grpc's threads, the HTTP port's loop), so a
    rotation is read, validated and logged once per process; it never raises after construction."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        try:
            self._signature = files.signature()  # before the read: a change in between shows on a handshake
        except OSError:
            self._signature = ()  # `load` names the missing file
        self.served = load(files)
        self._refusing = False
        log.info(
            "TLS certificate served: %s",
            _summary(self.served),
            extra=event("tls_certificate_served", **self.served.describe()),
        )

    def current(self) -> CertificateSet:
        with self._lock:
            try:
                self._check()
            except Exception:  # a handshake would fail; the set in force keeps serving instead
                self._refuse("unexpected error", exc_info=True)
            return self.served

    def _check(self) -> None:
        try:
            signature = self._files.signature()
        except OSError as exc:
            self._refuse(f"{exc.filename}: {exc.strerror}")
            return
        if signature == self._signature:
            self._refusing = False  # the files are back to the served set: whatever was wrong is over
            return
        try:
            candidate = load(self._files)
        except StreamflowError as exc:
            self._refuse(str(exc))
            return
        self._signature, self.served, self._refusing = signature, candidate, False
        log.info(
            "TLS certificate rotated, new connections get %s",
            _summary(candidate),
            extra=event("tls_certificate_served", **candidate.describe()),
        )

    def _refuse(self, why: str, exc_info: bool = False) -> None:
        """Warn once per episode: every handshake meanwhile would repeat it."""
        if self._refusing:
            return
        self._refusing = True
        log.warning(
            "TLS files changed but cannot be served (%s); the previous certificate stays in force and the "
            "files are tried again on each new connection",
            why,
            exc_info=exc_info,
            extra=event("tls_rotation_refused", reason=why),
        )


def certificates(settings: Settings) -> CertificateReloader | None:
    """The process's certificate reloader, None when TLS is off. Raises StreamflowError when the files are
    missing or invalid."""
    files = tls_files(settings)
    return None if files is None else CertificateReloader(files)


class _GrpcFetcher:
    """grpc's certificate-configuration fetcher: a new configuration when the set in force is not the one
    grpc has, None (keep serving) otherwise."""

    def __init__(self, reloader: CertificateReloader) -> None:
        self._reloader = reloader
        self._applied = reloader.served

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        served = self._reloader.current()
        if served is self._applied:
            return None
        self._applied = served
        return served.configuration()


def _summary(served: CertificateSet) -> str:
    return ", ".join(f"{name} {value}" for name, value in served.describe().items())


def server_credentials(reloader: CertificateReloader | None) -> grpc.ServerCredentials | None:
    """Dynamic TLS credentials for the gRPC port (client certificates required when a client CA is set);
    None when TLS is off."""
    if reloader is None:
        return None
    return grpc.dynamic_ssl_server_credentials(
        reloader.served.configuration(),
        _GrpcFetcher(reloader),  # type: ignore[arg-type]  # grpc documents None as "no change"; its stub omits it
        require_client_authentication=reloader.served.client_ca_pem is not None,
    )
