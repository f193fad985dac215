"""Per-caller quotas: a token bucket per caller, counted in users scored, shared by all workers of a server.

The kernel spreads a caller's connections over the workers, so buckets kept per process would let a caller
score `workers` times its quota. The buckets live instead in one shared memory map of a file the supervisor
makes before it starts the workers, which inherit its descriptor; a POSIX record lock on the file guards each
update. The kernel releases that lock when its holder dies, so a worker killed mid-update cannot wedge the
others (a semaphore would stay taken). Only the event-loop thread of each process takes quotas, so the lock
need not exclude threads.

A bucket holds `burst` users and refills at `rate` per second. A call passes when the bucket holds its cost,
or is full; it then takes its whole cost, possibly going into debt, so a batch larger than the bucket passes
when the bucket is full and the caller then waits for the debt to be paid off. Over the long run a caller
scores `rate` users per second at most, whatever the size of its calls.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import struct
import tempfile
import time
from collections.abc import Callable
from typing import IO

from streamflow.server.errors import RateLimited

SLOTS = 4096
"""Callers the table keeps apart; past that many, callers whose slot is taken share a bucket (never a
looser limit, only a stricter one)."""
_SLOT = struct.Struct("=Qdd")  # caller key (0 = free), tokens, last refill (CLOCK_MONOTONIC, system-wide)


class SharedBuckets:
    """The token buckets of every caller, in a file mapped by every process that holds its descriptor: the
    workers, forked after it is made or started with `fileno()` inherited (`attach`)."""

    def __init__(self, fd: int | None = None) -> None:
        # Open as long as the buckets live (the workers inherit it): no `with`.
        self._file: IO[bytes]
        if fd is None:
            self._file = tempfile.TemporaryFile(prefix="streamflow-quotas-")  # noqa: SIM115
            self._file.truncate(SLOTS * _SLOT.size)
        else:
            self._file = open(fd, "r+b", buffering=0)  # noqa: SIM115
        self._map = mmap.mmap(self._file.fileno(), SLOTS * _SLOT.size, mmap.MAP_SHARED)
        self._keys: dict[str, int] = {}

    def fileno(self) -> int:
        """The descriptor a worker started from a fresh interpreter maps (`SharedBuckets(fd)`)."""
        return self._file.fileno()

    def take(self, caller: str, cost: int, rate: float, burst: float, now: float) -> float:
        """Take `cost` users from `caller`'s bucket if the call may pass: 0.0 when it passed, else the
        seconds until it would."""
        key = self._key(caller)
        fd = self._file.fileno()
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            offset = self._slot(key)
            stored, tokens, stamp = _SLOT.unpack_from(self._map, offset)
            if stored == 0:  # a new caller: its bucket starts full
                stored, tokens, stamp = key, burst, now
            tokens = min(burst, tokens + max(0.0, now - stamp) * rate)
            needed = min(float(cost), burst)
            wait = 0.0 if tokens >= needed else (needed - tokens) / rate
            if wait == 0.0:
                tokens -= cost
            _SLOT.pack_into(self._map, offset, stored, tokens, now)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        return wait

    def _key(self, caller: str) -> int:
        key = self._keys.get(caller)
        if key is None:
            # Stable across processes (unlike hash()); 0 marks a free slot.
            key = int.from_bytes(hashlib.blake2b(caller.encode(), digest_size=8).digest(), "little") or 1
            if len(self._keys) < SLOTS:
                self._keys[caller] = key
        return key

    def _slot(self, key: int) -> int:
        """The byte offset of `key`'s slot: its own, a free one (linear probing), or, when the table is
        full, the slot of its hash, whose bucket it then shares."""
        start = key % SLOTS
        for probe in range(SLOTS):
            offset = ((start + probe) % SLOTS) * _SLOT.size
            stored = struct.unpack_from("=Q", self._map, offset)[0]
            if stored in (key, 0):
                return offset
        return start * _SLOT.size


class RateLimiter:
    """Refuses calls over a caller's quota with `RateLimited`."""

    def __init__(
        self,
        rate: float,
        burst: float,
        buckets: SharedBuckets,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.burst = burst or rate
        self._buckets = buckets
        self._clock = clock

    def take(self, caller: str, cost: int) -> None:
        """Count `cost` users scored for `caller`; raises `RateLimited` (with the wait) over its quota."""
        wait = self._buckets.take(caller, cost, self.rate, self.burst, self._clock())
        if wait:
            raise RateLimited(caller, self.rate, cost, wait)
