"""Byte rate limits: a sans-I/O token bucket and the trio shell around it.

Rules of this file:

* :class:`TokenBucket` does no I/O and never sleeps: it is told the time by an injected clock and answers
  how long the caller must wait. That makes it exact to test with a fake clock.
* A rate of 0 means unlimited: every reservation is granted at once and the bucket keeps no state.
* :class:`RateLimiter` is the thin trio shell: it reserves, then sleeps the answer.

Theory of operation (a token bucket that may go into debt):

* The bucket holds up to ``burst`` tokens (bytes) and gains ``rate`` tokens per second.
* :meth:`TokenBucket.reserve` takes ``n`` tokens at once, even when fewer are there: the balance may go
  negative, and the caller waits until it would be back at zero (``-balance / rate`` seconds). So one
  piece larger than the burst still passes (after its wait), the long-run rate is exactly ``rate``,
  and concurrent callers are served first come, first served: each reservation waits behind the debt of
  the earlier ones.
* :meth:`TokenBucket.refund` gives tokens back (a cancelled wait, a piece shorter than reserved), never
  above ``burst``.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class TokenBucket:
    """A token bucket of ``rate`` bytes per second holding at most ``burst`` bytes; 0 = unlimited.

    ``burst`` defaults to a tenth of a second of ``rate`` (at least 64 KiB): a little slack for an
    idle link, while a longer average stays at the rate. ``clock`` returns seconds (monotonic); it is
    first read at the first reservation, so a bucket may be made outside the event loop whose clock it
    reads. The bucket starts full.
    """

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None
        self._tokens = 0.0
        self.rate = 0.0
        self.burst = 0.0
        self.configure(rate, burst)

    def configure(self, rate: float, burst: float | None = None) -> None:
        """Change the rate (and burst) from now on; tokens above the new burst are dropped."""
        if rate < 0 or (burst is not None and burst <= 0):
            raise ValueError(f"a rate limit needs rate >= 0 (0 = unlimited) and burst > 0, got {rate}, {burst}")
        self._settle()
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate / 10, 64 * 1024.0)
        self._tokens = min(self._tokens, self.burst)

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _settle(self) -> None:
        """Add the tokens earned since the last look."""
        if self._last is None or self.rate == 0:
            return
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def tokens(self) -> float:
        """The balance now (negative while earlier reservations are still being paid for)."""
        if self.unlimited:
            return float("inf")
        if self._last is None:
            return self.burst
        self._settle()
        return self._tokens

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens; return the seconds to wait before using them (0 when they were there)."""
        if n < 0:
            raise ValueError(f"cannot reserve {n} tokens")
        if self.unlimited:
            return 0.0
        if self._last is None:
            self._last = self._clock()
            self._tokens = self.burst
        self._settle()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def refund(self, n: int) -> None:
        """Give back ``n`` tokens that were reserved and not used (never above ``burst``)."""
        if n < 0:
            raise ValueError(f"cannot refund {n} tokens")
        if self.unlimited or self._last is None:
            return
        self._settle()
        self._tokens = min(self.burst, self._tokens + n)


class RateLimiter:
    """The trio shell of a :class:`TokenBucket` on trio's clock: ``await limiter.acquire(n)``.

    One limiter may be shared by many tasks (all pieces a piece server sends, or every download of a
    daemon). Cancellation while waiting refunds the reservation, so a cancelled request costs nothing.
    """

    def __init__(self, rate: float = 0, burst: float | None = None) -> None:
        self.bucket = TokenBucket(rate, burst, clock=trio.current_time)

    @property
    def unlimited(self) -> bool:
        return self.bucket.unlimited

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes may pass. Raises ``trio.Cancelled`` (with a refund) when cancelled."""
        delay = self.bucket.reserve(n)
        try:
            await trio.sleep(delay)
        except trio.Cancelled:
            self.bucket.refund(n)
            raise

    def refund(self, n: int) -> None:
        """Give back bytes reserved but not sent (a short last piece, a failed read)."""
        self.bucket.refund(n)
