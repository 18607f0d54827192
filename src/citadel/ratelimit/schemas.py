"""The JSON Schemas of the rate-limiting API's bodies, for its OpenAPI document.

They describe exactly what ``citadel.ratelimit.wire`` reads and writes; keep the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from citadel.accounts.store import OVERRIDABLE
from citadel.openapi import Schema
from citadel.ratelimit.wire import DEFAULT, FRACTIONAL, MAX_DAYS, MAX_TOKENS


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


_TIME: Schema = {"type": "string", "format": "date-time"}
_TIME_OR_NULL: Schema = {"type": ["string", "null"], "format": "date-time"}


def _object(properties: Mapping[str, Schema], required: tuple[str, ...] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }


def list_of(item: Schema) -> Schema:
    return _object(
        {"object": {"const": "list"}, "data": {"type": "array", "items": item}},
    )


LIMITS: Schema = _object(
    {
        **{
            name: _nullable("integer", minimum=0, description="null: no limit")
            for name in OVERRIDABLE
            if name not in FRACTIONAL
        },
        "cost_per_month_usd": _nullable("number", minimum=0, description="null: no limit"),
    }
)
TEAM: Schema = _object(
    {"id": {"type": "string"}, "object": {"const": "team"}, "name": {"type": "string"}}
    | {"created_at": _TIME}
)
USER: Schema = _object(
    {
        "id": {"type": "string"},
        "object": {"const": "user"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "team_id": _nullable("string"),
        "tier": {"type": "string"},
        "status": {"enum": ["active", "disabled"]},
        "overrides": {
            "type": "object",
            "description": "limits set for this user alone, replacing the tier's",
            "additionalProperties": _nullable("number"),
        },
        "limits": {
            "description": "the effective limits; null when the tier is not configured",
            "anyOf": [LIMITS, {"type": "null"}],
        },
        "created_at": _TIME,
    }
)
KEY: Schema = _object(
    {
        "id": {"type": "string"},
        "object": {"const": "api_key"},
        "user_id": {"type": "string"},
        "name": {"type": "string"},
        "prefix": {"type": "string", "description": "the secret's first characters"},
        "status": {"enum": ["active", "revoked", "expired"]},
        "created_at": _TIME,
        "last_used_at": _TIME_OR_NULL,
        "expires_at": _TIME_OR_NULL,
        "revoked_at": _TIME_OR_NULL,
    }
)
NEW_KEY: Schema = {
    **KEY,
    "properties": {
        **KEY["properties"],
        "secret": {"type": "string", "description": "shown this once; it cannot be shown again"},
        "warning": {"type": "string"},
    },
    "required": [*KEY["required"], "secret", "warning"],
}
TIER: Schema = _object(
    {
        "name": {"type": "string"},
        "object": {"const": "tier"},
        "default": {"type": "boolean", "description": "the tier of users created without one"},
        "limits": LIMITS,
        "models": {"type": "array", "items": {"type": "string"}, "description": '"*": all'},
    }
)
USAGE: Schema = _object(
    {
        "object": {"const": "usage"},
        "user_id": {"type": "string"},
        "tier": {"type": "string"},
        "limits": {
            "type": "array",
            "description": "one entry per limit that is set; used counts reservations not yet "
            "reconciled",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "unit": {"enum": ["requests", "tokens", "usd"]},
                    "limit": {"type": "number"},
                    "used": {"type": "number"},
                    "remaining": {"type": "number"},
                    "reset_at": _TIME,
                    "resets_in": {"type": "number", "description": "seconds"},
                }
            ),
        },
    }
)
RESERVATION: Schema = _object(
    {
        "principal": {"type": "string", "description": "the user id"},
        "lease_id": {"type": "string"},
        "tokens": {"type": "integer", "minimum": 0},
        "cost_micros": {"type": "integer", "minimum": 0},
        "admitted_at": {"type": "number", "description": "Unix seconds"},
        "day": {"type": "string"},
        "month": {"type": "string"},
    }
)
_RATE: Schema = {
    "anyOf": [
        _object(
            {
                "limit": {"type": "integer"},
                "remaining": {"type": "integer"},
                "reset_seconds": {"type": "number"},
            }
        ),
        {"type": "null"},
    ]
}
DECISION: Schema = _object(
    {
        "object": {"const": "limit_decision"},
        "allowed": {"type": "boolean"},
        "refused_by": _nullable("string"),
        "retry_after": {"type": "number", "description": "seconds"},
        "requests": _RATE,
        "tokens": _RATE,
        "reservation": {
            "description": "send it back to /v1/reconcile when the request is done",
            "anyOf": [RESERVATION, {"type": "null"}],
        },
        "error": {
            "description": "present when refused: which limit, its value, when to retry",
            "type": "object",
        },
    },
    required=("object", "allowed", "refused_by", "retry_after", "requests", "tokens"),
)

CREATE_TEAM: Schema = _object({"name": {"type": "string"}})
CREATE_USER: Schema = _object(
    {
        "name": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "tier": {"type": "string", "description": "default: accounts.default_tier"},
        "team_id": {"type": "string"},
    },
    required=("name", "email"),
)
UPDATE_USER: Schema = _object(
    {
        "name": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "tier": {"type": "string"},
        "team_id": {"type": "string"},
        "status": {"enum": ["active", "disabled"]},
        "overrides": {
            "type": "object",
            "description": "merged into the user's overrides: a number, null (no limit) or "
            '"default" (remove the override)',
            "propertyNames": {"enum": list(OVERRIDABLE)},
            "additionalProperties": {"anyOf": [_nullable("number", minimum=0), {"const": DEFAULT}]},
        },
    },
    required=(),
)
CREATE_KEY: Schema = _object(
    {
        "user_id": {"type": "string"},
        "name": {"type": "string", "description": 'a label; default "default"'},
        "expires_in_days": {"type": "integer", "minimum": 1, "maximum": MAX_DAYS},
    },
    required=("user_id",),
)
CHECK: Schema = _object(
    {
        "user_id": {"type": "string"},
        "tokens": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_TOKENS,
            "description": "tokens to reserve: the prompt's estimate plus max_tokens",
        },
        "cost_usd": {"type": "number", "minimum": 0, "description": "cost to reserve; default 0"},
        "lease_id": {"type": "string", "description": "a concurrency lease id; default: a new one"},
    },
    required=("user_id", "tokens"),
)
RECONCILE: Schema = _object(
    {
        "reservation": RESERVATION,
        "tokens": {"type": "integer", "minimum": 0, "description": "tokens actually used"},
        "cost_usd": {
            "type": "number",
            "minimum": 0,
            "description": "actual cost; default: the cost reserved",
        },
    },
    required=("reservation", "tokens"),
)
