"""Limits policy: what a user's limits are, what a request costs, and how a decision is told.

Pure functions shared by the gateway and the rate-limiting service, so that both compute the same
limits and answer with the same headers and words:

- ``effective_limits``: a tier with a user's overrides applied, as the limiter's ``Limits``;
- ``cost_micros``: the price of a request in integer micro-USD;
- ``ratelimit_headers``: OpenAI's ``x-ratelimit-*`` headers, and ``retry-after`` on a refusal;
- ``refusal_message``: one sentence naming the limit that refused, its value, and when to retry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal

from citadel.limits.decision import LimitDecision, LimitName, Limits
from citadel.settings import Price, Tier

__all__ = [
    "cost_micros",
    "effective_limits",
    "format_duration",
    "ratelimit_headers",
    "refusal_message",
    "usd_to_micros",
]

# The tier fields that count whole things, by the name ``Limits`` gives them.
_COUNTS = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
)
_COST = "cost_per_month_usd"

_WORDS: Mapping[LimitName, str] = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "concurrent_requests": "concurrent requests",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
    "cost_per_month": "cost per month",
}


def usd_to_micros(usd: float) -> int:
    """US dollars as integer micro-USD, to the nearest micro-dollar."""
    return round(usd * 1e6)


def effective_limits(tier: Tier, overrides: Mapping[str, float | None]) -> Limits:
    """The tier's limits with the user's ``overrides`` in their place (None = unlimited).

    Override names are the tier's field names (``cost_per_month_usd`` in dollars); a name that is
    not a limit raises ValueError, since a misspelt override silently ignored is a limit lost.
    """
    unknown = sorted(set(overrides) - {*_COUNTS, _COST})
    if unknown:
        raise ValueError(f"override {unknown[0]!r}: expected one of {', '.join((*_COUNTS, _COST))}")
    counts: dict[str, int | None] = {}
    for name in _COUNTS:
        value = overrides.get(name, getattr(tier, name))
        counts[name] = None if value is None else int(value)
    cost = overrides.get(_COST, tier.cost_per_month_usd)
    return Limits(
        requests_per_minute=counts["requests_per_minute"],
        tokens_per_minute=counts["tokens_per_minute"],
        concurrent_requests=counts["concurrent_requests"],
        tokens_per_day=counts["tokens_per_day"],
        tokens_per_month=counts["tokens_per_month"],
        cost_per_month_micros=None if cost is None else usd_to_micros(cost),
    )


def _exact(value: float) -> Decimal:
    # The decimal the settings file spelt (0.0005), not the binary float nearest to it.
    return Decimal(repr(value))


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What a request costs in micro-USD, rounded up: a fraction of a micro-dollar is charged
    whole, so that a stream of tiny requests is never free. Prices are USD per 1000 tokens."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError(
            f"token counts {prompt_tokens}, {completion_tokens}: expected numbers >= 0"
        )
    usd_per_1k = prompt_tokens * _exact(price.input_per_1k) + completion_tokens * _exact(
        price.output_per_1k
    )
    # USD per 1000 tokens times tokens is thousandths of a dollar: 1000 micro-USD each.
    return math.ceil(usd_per_1k * 1000)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``250ms``, ``1s``, ``6m0s``,
    ``1.5s``, ``2h0m0s`` (Go's notation, to the millisecond)."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def retry_after_seconds(decision: LimitDecision) -> int:
    """The ``retry-after`` value: whole seconds, rounded up, at least 1."""
    ms = round(decision.retry_after * 1000)
    return max(1, -(-ms // 1000))


def ratelimit_headers(decision: LimitDecision) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits that are set, and ``retry-after`` when
    the request was refused."""
    headers: list[tuple[bytes, bytes]] = []
    for kind, limit, remaining, reset in (
        ("requests", decision.requests_limit, decision.requests_remaining, decision.requests_reset),
        ("tokens", decision.tokens_limit, decision.tokens_remaining, decision.tokens_reset),
    ):
        if limit is None:
            continue
        headers.append((b"x-ratelimit-limit-" + kind.encode(), str(limit).encode()))
        headers.append((b"x-ratelimit-remaining-" + kind.encode(), str(remaining or 0).encode()))
        headers.append(
            (b"x-ratelimit-reset-" + kind.encode(), format_duration(reset or 0.0).encode())
        )
    if not decision.allowed:
        headers.append((b"retry-after", str(retry_after_seconds(decision)).encode()))
    return headers


def _limit_value(name: LimitName, decision: LimitDecision, limits: Limits | None) -> str | None:
    value: int | None
    if name == "requests_per_minute" and limits is None:
        value = decision.requests_limit
    elif name == "tokens_per_minute" and limits is None:
        value = decision.tokens_limit
    elif limits is None:
        return None
    elif name == "cost_per_month":
        micros = limits.cost_per_month_micros
        return None if micros is None else _usd(micros)
    else:
        value = getattr(limits, name)
    return None if value is None else str(value)


def _usd(micros: int) -> str:
    """$5.00, $0.0025: cents always, smaller fractions only when they are there."""
    dollars, rest = divmod(micros, 1_000_000)
    digits = f"{rest:06d}"
    return f"${dollars}.{digits[:2]}{digits[2:].rstrip('0')}"


def refusal_message(decision: LimitDecision, *, limits: Limits | None = None) -> str:
    """Why a request was refused: the limit, its value, and when to try again.

    The per-minute limits' values are in the decision; the others' are named when ``limits``
    (the ones of the scope that refused: the user's, the key's or the team's) is given. A refusal
    by a key's or a team's limit says so. A decision that admitted raises ValueError.
    """
    name = decision.refused_by
    if decision.allowed or name is None:
        raise ValueError("refusal_message: the decision admitted the request; nothing refused it")
    value = _limit_value(name, decision, limits)
    limit = f" (limit {value})" if value is not None else ""
    wait = decision.retry_after
    if wait >= 60:  # past a minute, milliseconds are noise: whole seconds, rounded up
        wait = retry_after_seconds(decision)
    when = format_duration(wait) if wait > 0 else "a moment"
    if decision.refused_scope == "team":
        return (
            f"Team budget reached: this request would take your team past its {_WORDS[name]}"
            f"{limit}, which every member's requests share. Please try again in {when} (when "
            "the month renews), or ask an administrator to raise the team's budget."
        )
    if decision.refused_scope == "key":
        return (
            f"Rate limit reached for this API key's own {_WORDS[name]}{limit}. Please try "
            f"again in {when}."
        )
    if name == "tokens_per_minute" and decision.tokens_remaining == decision.tokens_limit:
        # Refused with the whole budget free: this request alone is over the limit, and waiting
        # will not help.
        return (
            f"Rate limit reached for {_WORDS[name]}{limit}: this request asks for more tokens "
            "than the limit allows in a minute. Ask for fewer (lower max_tokens or shorten the "
            "prompt)."
        )
    return f"Rate limit reached for {_WORDS[name]}{limit}. Please try again in {when}."
