"""A new API key's terms (expiry and own limits) from its request, one rule for every API.

    expires, limits = key_terms(data, now=now, settings=settings)

The REST ``POST /v1/keys`` and GraphQL's ``createKey`` both take a ``NewKey`` (its field
constraints checked by msgspec) and ask here for the rest: one expiry at most (``expires_at``
with a UTC offset and in the future, or ``expires_in_days``), and a model list of configured
models or aliases. ``BadRequest`` names the field, through ``param`` (GraphQL's are camelCase).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from citadel.accounts.store import KeyLimits
from citadel.errors import BadRequest
from citadel.limits.bodies import NewKey
from citadel.limits.policy import usd_to_micros
from citadel.settings import Settings

__all__ = ["key_terms", "model_names"]


def _same(name: str) -> str:
    return name


def model_names(
    settings: Settings, names: Sequence[str], param: Callable[[str], str] = _same
) -> tuple[str, ...]:
    """``names`` stripped, if each is a configured model or alias; else a 400 naming it."""
    out = tuple(name.strip() for name in names)
    for index, name in enumerate(out):
        if settings.model(name) is None:
            known = ", ".join(m.name for m in settings.models)
            where = f"{param('models')}[{index}]"
            raise BadRequest(
                f"{where}: {name!r} is not a configured model or alias (models: {known}).",
                param=where,
            )
    return out


def key_terms(
    data: NewKey, *, now: datetime, settings: Settings, param: Callable[[str], str] = _same
) -> tuple[datetime | None, KeyLimits]:
    """The key's expiry (None: never) and its own limits; BadRequest names a bad field."""
    days = data.expires_in_days
    expires = None if days is None else now + timedelta(days=days)
    if data.expires_at is not None:
        where = param("expires_at")
        if days is not None:
            raise BadRequest(f"Give {where} or {param('expires_in_days')}, not both.", param=where)
        if data.expires_at.tzinfo is None:
            raise BadRequest(f"{where} needs a UTC offset (2027-01-31T00:00:00Z).", param=where)
        if data.expires_at <= now:
            raise BadRequest(
                f"{where} {data.expires_at.isoformat()} is not in the future.", param=where
            )
        expires = data.expires_at
    limits = KeyLimits(
        budget_micros=None if data.budget_usd is None else usd_to_micros(data.budget_usd),
        models=None if data.models is None else model_names(settings, data.models, param),
        requests_per_minute=data.requests_per_minute,
        tokens_per_minute=data.tokens_per_minute,
    )
    return expires, limits
