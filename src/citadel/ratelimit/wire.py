"""The rate-limiting API's JSON: reading request bodies, writing records, and their schemas.

Bodies are checked by hand, field by field; a bad one is a 400 whose message and ``param`` name
the field (``overrides.tokens_per_day``, ``reservation.lease_id``). Times are written as RFC 3339
UTC strings (``2026-11-24T08:00:00Z``); money as US dollars; the schemas below describe exactly
what the writers produce, and the OpenAPI document serves them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import orjson

from citadel.accounts.store import OVERRIDABLE, ApiKey, Team, User
from citadel.errors import ApiError, BadRequest
from citadel.http.server import Request
from citadel.limits.decision import LimitDecision, Limits, Reservation, UsageSnapshot
from citadel.settings import Tier

__all__ = ["Conflict", "Fields", "query"]

MAX_TOKENS = 1_000_000_000  # per request: far beyond any context window, well inside exact maths
MAX_TEXT = 256
MAX_DAYS = 36_500
DEFAULT = "default"  # an override value: back to the tier's own limit
FRACTIONAL = ("cost_per_month_usd",)  # every other limit counts whole things
_RESERVATION_FIELDS = (
    "principal",
    "lease_id",
    "tokens",
    "cost_micros",
    "admitted_at",
    "day",
    "month",
)


_T = TypeVar("_T")


class Conflict(ApiError):
    """409: the request conflicts with what exists (an email or team name taken)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


# -- reading ----------------------------------------------------------------------------------


def _describe(value: object) -> str:
    text = orjson.dumps(value).decode() if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """A JSON object's fields, read one by one; ``prefix`` names where it sits in the body."""

    def __init__(self, doc: Mapping[str, object], known: tuple[str, ...], prefix: str = "") -> None:
        for name in doc:
            if name not in known:
                where = f"{prefix}{name}"
                raise BadRequest(
                    f"Unknown field '{where}'; expected one of: {', '.join(known)}.", param=where
                )
        self._doc = doc
        self._prefix = prefix

    @classmethod
    def body(cls, request: Request, known: tuple[str, ...], *, optional: bool = False) -> Fields:
        """The request's JSON object body; an empty body is ``{}`` when ``optional``."""
        if not request.body.strip():
            if optional:
                return cls({}, known)
            raise BadRequest("The request body must be a JSON object; it is empty.")
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(
                f"The request body is not valid JSON: {exc}.", code="invalid_json"
            ) from exc
        if not isinstance(doc, dict):
            raise BadRequest(f"The request body must be a JSON object, not {_describe(doc)}.")
        return cls(doc, known)

    def __contains__(self, name: str) -> bool:
        return name in self._doc

    def _bad(self, name: str, expected: str) -> BadRequest:
        where = f"{self._prefix}{name}"
        value = self._doc.get(name)
        return BadRequest(f"'{where}' must be {expected}; got {_describe(value)}.", param=where)

    def _missing(self, name: str, expected: str) -> BadRequest:
        where = f"{self._prefix}{name}"
        return BadRequest(f"'{where}' is required: {expected}.", param=where)

    def text(self, name: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
        expected = f"a non-empty string of at most {limit} characters"
        if self._doc.get(name) is None:
            if required:
                raise self._missing(name, expected)
            return None
        value = self._doc[name]
        if not isinstance(value, str) or not value.strip() or len(value) > limit:
            raise self._bad(name, expected)
        return value.strip()

    def required_text(self, name: str, *, limit: int = MAX_TEXT) -> str:
        return _required(self.text(name, required=True, limit=limit))

    def required_email(self, name: str) -> str:
        return _required(self.email(name, required=True))

    def required_whole(self, name: str, *, minimum: int, maximum: int) -> int:
        return _required(self.whole(name, minimum=minimum, maximum=maximum, required=True))

    def email(self, name: str, *, required: bool = False) -> str | None:
        value = self.text(name, required=required)
        if value is not None:
            local, at, domain = value.rpartition("@")
            if not (at and local and domain) or any(c.isspace() for c in value):
                raise self._bad(name, "an email address such as name@example.com")
        return value

    def whole(self, name: str, *, minimum: int, maximum: int, required: bool = False) -> int | None:
        expected = f"an integer from {minimum} to {maximum}"
        if self._doc.get(name) is None:
            if required:
                raise self._missing(name, expected)
            return None
        value = self._doc[name]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self._bad(name, expected)
        return value

    def amount(self, name: str) -> float | None:
        """A number >= 0 (US dollars), or None when absent."""
        if self._doc.get(name) is None:
            return None
        value = self._doc[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise self._bad(name, "a number >= 0")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        if self._doc.get(name) is None:
            return None
        value = self._doc[name]
        if value not in choices:
            raise self._bad(name, f"one of {', '.join(choices)}")
        return str(value)

    def fields(self, name: str, known: tuple[str, ...], *, required: bool = False) -> Fields | None:
        """A nested object's fields."""
        if self._doc.get(name) is None:
            if required:
                raise self._missing(name, "an object")
            return None
        value = self._doc[name]
        if not isinstance(value, dict):
            raise self._bad(name, "an object")
        return Fields(value, known, f"{self._prefix}{name}.")

    def overrides(self, name: str) -> dict[str, float | str | None] | None:
        """Limit overrides: a number >= 0 (whole, but for a cost), null for no limit, or
        "default" for the tier's limit again."""
        nested = self.fields(name, OVERRIDABLE)
        if nested is None:
            return None
        changes: dict[str, float | str | None] = {}
        for limit in OVERRIDABLE:
            if limit not in nested:
                continue
            value = nested._doc[limit]
            if value is None or value == DEFAULT:
                changes[limit] = value
                continue
            whole = limit not in FRACTIONAL
            ok = (
                not isinstance(value, bool)
                and isinstance(value, int | float)
                and math.isfinite(value)
                and value >= 0
                and (not whole or float(value).is_integer())
            )
            if not ok:
                number = "a whole number >= 0" if whole else "a number >= 0"
                raise nested._bad(limit, f'{number}, null (no limit) or "default" (the tier\'s)')
            changes[limit] = float(value)  # type: ignore[arg-type]  # checked just above
        return changes

    def reservation(self, name: str) -> Reservation:
        """A reservation as ``/v1/check`` wrote it."""
        nested = self.fields(name, _RESERVATION_FIELDS, required=True)
        assert nested is not None  # required
        principal = nested.required_text("principal")
        lease_id = nested.required_text("lease_id")
        tokens = nested.required_whole("tokens", minimum=0, maximum=MAX_TOKENS)
        cost_micros = nested.required_whole("cost_micros", minimum=0, maximum=2**53)
        admitted_at = nested._doc.get("admitted_at")
        if admitted_at is None:
            raise nested._missing("admitted_at", "a number (Unix seconds)")
        if (
            isinstance(admitted_at, bool)
            or not isinstance(admitted_at, int | float)
            or not math.isfinite(admitted_at)
        ):
            raise nested._bad("admitted_at", "a number (Unix seconds)")
        return Reservation(
            principal=principal,
            lease_id=lease_id,
            tokens=tokens,
            cost_micros=cost_micros,
            admitted_at=float(admitted_at),
            day=nested.required_text("day", limit=10),
            month=nested.required_text("month", limit=7),
        )


def _required(value: _T | None) -> _T:
    assert value is not None  # read with required=True
    return value


def query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters; an unknown or repeated one is a 400 naming it."""
    found: dict[str, str] = {}
    for name, value in parse_qsl(request.query, keep_blank_values=True):
        if name not in known:
            expected = ", ".join(known) if known else "none"
            raise BadRequest(f"Unknown query parameter '{name}'; expected: {expected}.", param=name)
        if name in found:
            raise BadRequest(f"Query parameter '{name}' is given twice.", param=name)
        if not value:
            raise BadRequest(f"Query parameter '{name}' is empty.", param=name)
        found[name] = value
    return found


# -- writing ----------------------------------------------------------------------------------


def timestamp(value: datetime | float | None) -> str | None:
    """RFC 3339 in UTC, to the millisecond: ``2026-11-24T08:00:00.250Z``."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z").replace(".000Z", "Z")


def micros_to_usd(micros: int) -> float:
    return micros / 1_000_000


def team_json(team: Team) -> dict[str, Any]:
    return {
        "id": team.id,
        "object": "team",
        "name": team.name,
        "created_at": timestamp(team.created_at),
    }


def limits_json(limits: Limits) -> dict[str, Any]:
    cost = limits.cost_per_month_micros
    return {
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "concurrent_requests": limits.concurrent_requests,
        "tokens_per_day": limits.tokens_per_day,
        "tokens_per_month": limits.tokens_per_month,
        "cost_per_month_usd": None if cost is None else micros_to_usd(cost),
    }


def user_json(user: User, limits: Limits | None) -> dict[str, Any]:
    return {
        "id": user.id,
        "object": "user",
        "name": user.name,
        "email": user.email,
        "team_id": user.team_id,
        "tier": user.tier,
        "status": user.status,
        "overrides": dict(user.overrides),
        "limits": None if limits is None else limits_json(limits),
        "created_at": timestamp(user.created_at),
    }


def key_status(key: ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def key_json(key: ApiKey, now: datetime) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "user_id": key.user_id,
        "name": key.name,
        "prefix": key.prefix,
        "status": key_status(key, now),
        "created_at": timestamp(key.created_at),
        "last_used_at": timestamp(key.last_used_at),
        "expires_at": timestamp(key.expires_at),
        "revoked_at": timestamp(key.revoked_at),
    }


def tier_json(tier: Tier, limits: Limits, *, default: bool) -> dict[str, Any]:
    return {
        "name": tier.name,
        "object": "tier",
        "default": default,
        "limits": limits_json(limits),
        "models": list(tier.models),
    }


def usage_json(user: User, snapshot: UsageSnapshot, now: float) -> dict[str, Any]:
    limits = []
    for usage in snapshot.limits:
        cost = usage.name == "cost_per_month"
        figure = micros_to_usd if cost else int
        limits.append(
            {
                "name": usage.name,
                "unit": "usd" if cost else "tokens" if "tokens" in usage.name else "requests",
                "limit": figure(usage.limit),
                "used": figure(usage.used),
                "remaining": figure(usage.remaining),
                "reset_at": timestamp(usage.reset_at),
                "resets_in": round(max(0.0, usage.reset_at - now), 3),
            }
        )
    return {"object": "usage", "user_id": user.id, "tier": user.tier, "limits": limits}


def reservation_json(reservation: Reservation) -> dict[str, Any]:
    return {
        "principal": reservation.principal,
        "lease_id": reservation.lease_id,
        "tokens": reservation.tokens,
        "cost_micros": reservation.cost_micros,
        "admitted_at": reservation.admitted_at,
        "day": reservation.day,
        "month": reservation.month,
    }


def decision_json(decision: LimitDecision) -> dict[str, Any]:
    def rate(limit: int | None, remaining: int | None, reset: float | None) -> object:
        if limit is None:
            return None
        return {"limit": limit, "remaining": remaining, "reset_seconds": reset}

    reservation = decision.reservation
    return {
        "object": "limit_decision",
        "allowed": decision.allowed,
        "refused_by": decision.refused_by,
        "retry_after": decision.retry_after,
        "requests": rate(
            decision.requests_limit, decision.requests_remaining, decision.requests_reset
        ),
        "tokens": rate(decision.tokens_limit, decision.tokens_remaining, decision.tokens_reset),
        "reservation": None if reservation is None else reservation_json(reservation),
    }
