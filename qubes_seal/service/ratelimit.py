"""Per-caller token buckets.

Each caller (the qube named by qrexec; for a malformed request, the peer's uid) has a bucket
of ``burst`` tokens that refills at ``rate`` tokens per second.  The daemon takes a token for
a refused or malformed request only, and answers ``rate-limited`` when the bucket is empty: a
valid request of an authorised caller is never limited (issue 14: qubesd and storage domains
open every volume at once at boot), while a compromised qube probing for others' keys gets
100 refusals at once, then 20 a second (the defaults).  At most :data:`MAX_CALLERS` buckets
are kept: full buckets are forgotten first (a full bucket and no bucket behave the same).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_CALLERS = 4096


class RateLimiter:
    """Thread-safe token buckets keyed on the caller's name."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, caller: str) -> bool:
        """Take one token from ``caller``'s bucket; False when it is empty."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(caller, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            if caller not in self._buckets and len(self._buckets) >= MAX_CALLERS:
                self._forget_full(now)
            self._buckets[caller] = (tokens, now)
            return allowed

    def _forget_full(self, now: float) -> None:
        for name, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.burst:
                del self._buckets[name]
        while len(self._buckets) >= MAX_CALLERS:  # all busy: drop the oldest entry
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
