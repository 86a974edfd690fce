"""The token bucket, exactly, with a fake clock; and its trio shell on trio's mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dfz.peer.ratelimit import RateLimiter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_starts_full_then_charges_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 500, clock=clock)
    assert bucket.reserve(500) == 0  # the burst is there at once
    assert bucket.reserve(250) == pytest.approx(0.25)  # then 1000 bytes a second
    assert bucket.reserve(250) == pytest.approx(0.5)  # first come, first served: behind the earlier debt
    clock.advance(0.5)
    assert bucket.tokens() == pytest.approx(0)
    assert bucket.reserve(100) == pytest.approx(0.1)


def test_a_reservation_larger_than_the_burst_passes_after_its_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 100, clock=clock)
    assert bucket.reserve(1100) == pytest.approx(1.0)
    clock.advance(1.0)
    assert bucket.reserve(0) == 0


def test_idle_time_earns_at_most_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 300, clock=clock)
    bucket.reserve(300)
    clock.advance(60)
    assert bucket.tokens() == pytest.approx(300)
    assert bucket.reserve(600) == pytest.approx(0.3)


def test_the_long_run_rate_is_exact() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4096, 1024, clock=clock)
    sent = 0
    for _ in range(1000):
        clock.advance(bucket.reserve(512))  # a sender that waits exactly as told
        sent += 512
    # 1024 bytes of burst for free, the rest at 4096 bytes/s.
    assert clock.now - 100.0 == pytest.approx((sent - 1024) / 4096)


def test_refund_gives_back_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 500, clock=clock)
    assert bucket.reserve(1000) == pytest.approx(0.5)
    bucket.refund(1000)
    assert bucket.tokens() == pytest.approx(500)
    bucket.refund(1000)
    assert bucket.tokens() == pytest.approx(500)


def test_zero_is_unlimited() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0, clock=clock)
    assert bucket.unlimited
    assert bucket.reserve(10**12) == 0
    assert bucket.tokens() == float("inf")


def test_the_clock_is_first_read_at_the_first_reservation() -> None:
    def no_clock() -> float:
        raise AssertionError("read too early")

    bucket = TokenBucket(1000, clock=no_clock)
    assert bucket.burst == 64 * 1024  # the default burst: a tenth of a second, at least 64 KiB
    bucket.refund(10)  # nothing reserved yet: nothing to give back, and no clock read


def test_reconfigure_keeps_what_was_earned_up_to_the_new_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 1000, clock=clock)
    bucket.reserve(0)
    bucket.configure(2000, 200)
    assert bucket.tokens() == pytest.approx(200)
    assert bucket.reserve(400) == pytest.approx(0.1)


@pytest.mark.parametrize(("rate", "burst"), [(-1, None), (10, 0), (10, -5)])
def test_bad_settings_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, clock=FakeClock())


def test_negative_amounts_are_refused() -> None:
    bucket = TokenBucket(10, clock=FakeClock())
    with pytest.raises(ValueError):
        bucket.reserve(-1)
    with pytest.raises(ValueError):
        bucket.refund(-1)


async def test_the_limiter_sleeps_on_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1000, 100)
    start = trio.current_time()
    for _ in range(10):
        await limiter.acquire(100)
    assert trio.current_time() - start == pytest.approx(0.9)


async def test_a_cancelled_wait_is_refunded(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1000, 100)
    await limiter.acquire(100)
    with trio.move_on_after(0.05):
        await limiter.acquire(1000)  # would wait a second
    assert limiter.bucket.tokens() == pytest.approx(50)  # 0.05 s earned, the 1000 given back
    start = trio.current_time()
    await limiter.acquire(100)
    assert trio.current_time() - start == pytest.approx(0.05)
