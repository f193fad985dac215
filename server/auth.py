"""Who is calling: bearer tokens checked against a file of hashes, else the mTLS certificate's subject.

The tokens file (`settings.auth_tokens_file`) holds one `name:sha256-hex-of-token` line per caller, so no
secret rests on the server's disk; `#` starts a comment. It is re-read when it changes (looked at once a
second at most, on a call), so adding or revoking a caller needs no restart; a file that fails to parse
keeps the previous callers and is reported once, until it parses again.

A presented token is hashed and compared with every known hash in constant time, so how long the check
takes says nothing about how close a guess was. Nothing here logs or echoes a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from streamflow.errors import StreamflowError
from streamflow.server.errors import Unauthenticated, echo

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
"""The caller of a server that asks for neither tokens nor client certificates."""
UNAUTHENTICATED = "unauthenticated"
"""The caller a refused call is counted under."""
RELOAD_CHECK_S = 1.0
"""Seconds between two looks at the tokens file for a change."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_BEARER = "bearer "


def token_hash(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenTable:
    """The callers of one version of the tokens file: (SHA-256 digest, name) pairs."""

    entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def parse(cls, text: str, source: str) -> TokenTable:
        """The callers of a tokens file's text; StreamflowError naming `source` and the line of the first
        problem (the line itself is never repeated: it may hold a pasted token)."""
        entries: list[tuple[bytes, str]] = []
        names: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, digest = (part.strip() for part in line.partition(":"))
            where = f"{source}, line {number}"
            if not sep or not _NAME.fullmatch(name):
                raise StreamflowError(
                    f"{where}: expected `name:sha256-hex`, the name 1 to 64 characters of [A-Za-z0-9._@-]"
                )
            if not _HEX_DIGEST.fullmatch(digest.lower()):
                raise StreamflowError(
                    f"{where}: the part after `{name}:` must be the 64 hex digits of the token's SHA-256 "
                    "(`streamflow add-token` writes it), not the token"
                )
            if name in names:
                raise StreamflowError(f"{where}: caller {name} is listed twice")
            names.add(name)
            entries.append((bytes.fromhex(digest), name))
        return cls(tuple(entries))

    def name_of(self, token: str) -> str | None:
        """The caller `token` belongs to, or None; every entry is compared, in constant time each."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self.entries:
            if hmac.compare_digest(known, digest):
                found = name
        return found


class TokensFile:
    """The tokens file as it is now: re-read when its stat signature changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._signature = _signature(path)  # before reading: a change while reading is seen next time
        self.table = TokenTable.parse(_read(path), str(path))
        self._checked = clock()
        self._failing = False
        log.info("auth tokens: %d callers from %s", len(self.table.entries), path)

    def current(self) -> TokenTable:
        """The table in force, after a look at the file if the last one is over `RELOAD_CHECK_S` old."""
        now = self._clock()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            self._reload_if_changed()
        return self.table

    def _reload_if_changed(self) -> None:
        try:
            signature = _signature(self.path)
            if signature == self._signature:
                return
            table = TokenTable.parse(_read(self.path), str(self.path))
        except StreamflowError as exc:
            if not self._failing:
                self._failing = True
                log.warning("auth tokens: keeping the %d callers in force: %s", len(self.table.entries), exc)
            return
        self._signature = signature
        self.table = table
        self._failing = False
        log.info("auth tokens: %d callers from %s (file changed)", len(table.entries), self.path)


class Authenticator:
    """Names the caller of a call, or refuses it with `Unauthenticated`."""

    def __init__(self, tokens: TokensFile | None, client_certificates: bool) -> None:
        self._tokens = tokens
        self._client_certificates = client_certificates

    @classmethod
    def from_settings(cls, tokens_file: Path | None, client_certificates: bool) -> Authenticator | None:
        """The authenticator of a server, None when it asks for neither tokens nor client certificates.
        StreamflowError when the tokens file cannot be read or parsed."""
        if tokens_file is None and not client_certificates:
            return None
        return cls(TokensFile(tokens_file) if tokens_file else None, client_certificates)

    def caller(self, context: grpc.aio.ServicerContext) -> str:
        """The token's name when tokens are on (raising `Unauthenticated` without a valid one), else the
        client certificate's subject."""
        if self._tokens is None:
            return certificate_subject(context)
        header = _authorization(context)
        if header is None:
            raise Unauthenticated("missing")
        if header[: len(_BEARER)].lower() != _BEARER or not header[len(_BEARER) :].strip():
            raise Unauthenticated("malformed")
        name = self._tokens.current().name_of(header[len(_BEARER) :].strip())
        if name is None:
            raise Unauthenticated("unrecognized")
        return name


def certificate_subject(context: grpc.aio.ServicerContext) -> str:
    """The verified client certificate's subject (e.g. `CN=billing,O=StreamFlow`), else its common name."""
    auth = context.auth_context()
    for key in ("x509_subject", "x509_common_name"):
        for value in auth.get(key, ()):
            return value.decode(errors="replace")
    return ANONYMOUS


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _signature(path: Path) -> tuple[int, int, int, int]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise StreamflowError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    return (stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_size)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StreamflowError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise StreamflowError(f"the tokens file {path} is not UTF-8 text") from None


def add_token(path: Path, name: str) -> str:
    """A new random token for caller `name`, whose hash is added to the tokens file at `path` (created if
    missing) by an atomic replace, so a server re-reading it never sees half a file. Returns the token,
    which exists nowhere else: the caller must keep it."""
    if not _NAME.fullmatch(name):
        raise StreamflowError(
            f"caller name {echo(name, quoted=True)} is not usable: 1 to 64 characters of [A-Za-z0-9._@-], "
            "starting with a letter or a digit"
        )
    existing = _read(path) if path.exists() else ""
    token = secrets.token_urlsafe(32)
    line = f"{name}:{token_hash(token)}"
    text = existing if not existing or existing.endswith("\n") else existing + "\n"
    TokenTable.parse(text + line + "\n", str(path))  # refuses a bad name or a name already listed
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text + line + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return token
