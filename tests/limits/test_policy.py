"""The limits policy: effective limits, request cost, x-ratelimit headers and refusal messages."""

from __future__ import annotations

import pytest

from citadel.limits.decision import LimitDecision, Limits, Reservation
from citadel.limits.policy import (
    cost_micros,
    effective_limits,
    format_duration,
    ratelimit_headers,
    refusal_message,
    usd_to_micros,
)
from citadel.settings import DEFAULT_TIERS, Price, Tier

FREE = Tier(
    name="free",
    requests_per_minute=20,
    tokens_per_minute=20_000,
    concurrent_requests=2,
    tokens_per_day=200_000,
    tokens_per_month=2_000_000,
    cost_per_month_usd=5.0,
)
RESERVATION = Reservation(
    principal="usr_1",
    lease_id="lease",
    tokens=10,
    cost_micros=0,
    admitted_at=0.0,
    day="2026-01-01",
    month="2026-01",
)


def test_a_tier_without_overrides_gives_its_own_limits() -> None:
    """Every tier field maps to the limit of the same name; dollars become micro-dollars."""
    expected = Limits(
        requests_per_minute=20,
        tokens_per_minute=20_000,
        concurrent_requests=2,
        tokens_per_day=200_000,
        tokens_per_month=2_000_000,
        cost_per_month_micros=5_000_000,
    )
    assert expected == effective_limits(FREE, {})


def test_overrides_replace_tier_fields_and_none_removes_a_limit() -> None:
    """An override's number replaces the tier's (as an int), and None makes it unlimited."""
    limits = effective_limits(
        FREE,
        {"requests_per_minute": 100.0, "tokens_per_day": None, "cost_per_month_usd": 0.0125},
    )
    assert 100 == limits.requests_per_minute
    assert isinstance(limits.requests_per_minute, int)
    assert limits.tokens_per_day is None
    assert 12_500 == limits.cost_per_month_micros
    assert 20_000 == limits.tokens_per_minute  # not overridden


def test_an_override_can_set_a_limit_the_tier_leaves_unset() -> None:
    """The enterprise tier has no token limit; an override gives one user one."""
    enterprise = DEFAULT_TIERS[-1]
    limits = effective_limits(enterprise, {"tokens_per_minute": 5000.0})
    assert (5000, None) == (limits.tokens_per_minute, limits.cost_per_month_micros)


def test_an_unknown_override_is_refused_by_name() -> None:
    """A misspelt override raises ValueError naming it instead of being ignored."""
    with pytest.raises(ValueError, match="'request_per_minute'"):
        effective_limits(FREE, {"request_per_minute": 1.0})


def test_a_tier_with_no_limits_is_unlimited() -> None:
    """A tier that sets nothing gives limits that are all unset."""
    assert effective_limits(Tier(name="open"), {}).unlimited


@pytest.mark.parametrize(
    ("usd", "micros"),
    [(0.0, 0), (5.0, 5_000_000), (0.1, 100_000), (1e-6, 1), (2.0000004, 2_000_000)],
)
def test_dollars_become_micro_dollars_to_the_nearest(usd: float, micros: int) -> None:
    """USD to micro-USD rounds to the nearest micro-dollar."""
    assert micros == usd_to_micros(usd)


def test_cost_is_exact_for_prices_as_written() -> None:
    """0.0005 USD per 1k prompt tokens and 0.0015 per 1k completion: 1000 + 2000 tokens cost
    0.0005 + 0.003 USD = 3500 micro-USD exactly, with no binary-float drift."""
    price = Price(input_per_1k=0.0005, output_per_1k=0.0015)
    assert 3500 == cost_micros(price, 1000, 2000)
    assert 1_500_000 == cost_micros(Price(input_per_1k=0.1, output_per_1k=0.2), 5000, 5000)


def test_a_fraction_of_a_micro_dollar_is_charged_whole() -> None:
    """Four tokens at 0.0001 USD per 1k cost 0.4 micro-USD, charged as 1: never free."""
    assert 1 == cost_micros(Price(input_per_1k=0.0001), 4, 0)
    assert 0 == cost_micros(Price(input_per_1k=0.0001), 0, 0)
    assert 0 == cost_micros(Price(), 1000, 1000)


def test_negative_token_counts_are_refused() -> None:
    """A negative token count is a caller's bug, reported rather than priced."""
    with pytest.raises(ValueError, match="-1"):
        cost_micros(Price(input_per_1k=1.0), -1, 0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (0.001, "1ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (59.999, "59.999s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (90.5, "1m30.5s"),
        (3600.0, "1h0m0s"),
        (86_400.0, "24h0m0s"),
        (-3.0, "0s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    """Reset durations use Go's notation to the millisecond, as OpenAI's headers do."""
    assert text == format_duration(seconds)


def test_an_admission_carries_the_headers_of_the_limits_that_are_set() -> None:
    """Requests and tokens headers, with the limit, remaining budget and reset; no retry-after."""
    decision = LimitDecision(
        allowed=True,
        requests_limit=20,
        requests_remaining=19,
        requests_reset=3.0,
        tokens_limit=20_000,
        tokens_remaining=19_000,
        tokens_reset=3.0,
        reservation=RESERVATION,
    )
    assert [
        (b"x-ratelimit-limit-requests", b"20"),
        (b"x-ratelimit-remaining-requests", b"19"),
        (b"x-ratelimit-reset-requests", b"3s"),
        (b"x-ratelimit-limit-tokens", b"20000"),
        (b"x-ratelimit-remaining-tokens", b"19000"),
        (b"x-ratelimit-reset-tokens", b"3s"),
    ] == ratelimit_headers(decision)


def test_headers_of_an_unset_limit_are_left_out() -> None:
    """With no token limit there are no token headers; with no limits at all, no headers."""
    decision = LimitDecision(
        allowed=True, requests_limit=5, requests_remaining=0, requests_reset=0.25
    )
    assert [
        (b"x-ratelimit-limit-requests", b"5"),
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"250ms"),
    ] == ratelimit_headers(decision)
    assert [] == ratelimit_headers(LimitDecision(allowed=True))


@pytest.mark.parametrize(
    ("retry_after", "header"), [(0.0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.001, b"2"), (59.5, b"60")]
)
def test_a_refusal_adds_retry_after_in_whole_seconds_rounded_up(
    retry_after: float, header: bytes
) -> None:
    """retry-after is an integer number of seconds, rounded up, and at least 1."""
    decision = LimitDecision(
        allowed=False, refused_by="concurrent_requests", retry_after=retry_after
    )
    assert [(b"retry-after", header)] == ratelimit_headers(decision)


def test_a_refusal_message_names_a_per_minute_limit_its_value_and_the_wait() -> None:
    """The per-minute limits' values come from the decision itself."""
    decision = LimitDecision(
        allowed=False,
        refused_by="requests_per_minute",
        retry_after=3.0,
        requests_limit=20,
        requests_remaining=0,
        requests_reset=60.0,
    )
    assert (
        "Rate limit reached for requests per minute (limit 20). Please try again in 3s."
        == refusal_message(decision)
    )


def test_a_refusal_message_names_other_limits_given_the_limits() -> None:
    """Quotas and concurrency are named with their values when the limits are passed."""
    limits = effective_limits(FREE, {})
    day = LimitDecision(allowed=False, refused_by="tokens_per_day", retry_after=3600.0)
    assert (
        "Rate limit reached for tokens per day (limit 200000). Please try again in 1h0m0s."
        == refusal_message(day, limits=limits)
    )
    cost = LimitDecision(allowed=False, refused_by="cost_per_month", retry_after=0.25)
    assert (
        "Rate limit reached for cost per month (limit $5.00). Please try again in 250ms."
        == refusal_message(cost, limits=limits)
    )
    small = effective_limits(FREE, {"cost_per_month_usd": 0.0025})
    assert "(limit $0.0025)" in refusal_message(cost, limits=small)
    slots = LimitDecision(allowed=False, refused_by="concurrent_requests", retry_after=1.0)
    assert "concurrent requests (limit 2). Please try again in 1s." in refusal_message(
        slots, limits=limits
    )


def test_a_refusal_message_without_limits_still_names_the_limit() -> None:
    """Without the limits, a quota's value is left out but its name and the wait are given."""
    decision = LimitDecision(allowed=False, refused_by="tokens_per_month", retry_after=90.2)
    assert "Rate limit reached for tokens per month. Please try again in 1m31s." == refusal_message(
        decision
    )


def test_an_admission_has_no_refusal_message() -> None:
    """Asking why an admitted request was refused is a bug, reported as such."""
    with pytest.raises(ValueError, match="admitted"):
        refusal_message(LimitDecision(allowed=True))


def test_a_request_larger_than_the_token_rate_is_told_waiting_will_not_help() -> None:
    """Refused by tokens per minute with the whole budget free: the request alone is too big."""
    decision = LimitDecision(
        allowed=False,
        refused_by="tokens_per_minute",
        retry_after=60.0,
        tokens_limit=1000,
        tokens_remaining=1000,
        tokens_reset=0.0,
    )
    message = refusal_message(decision)
    assert message.startswith("Rate limit reached for tokens per minute (limit 1000): ")
    assert "more tokens than the limit allows in a minute" in message
    assert "try again" not in message
