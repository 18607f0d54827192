"""The ``BadRequest`` errors of request validation, worded as OpenAI words them.

Each names the offending field as a path in ``param`` (``tools[0].function.name``) and carries
OpenAI's ``code`` for the kind of mistake (``invalid_type``, ``invalid_value``,
``integer_above_max_value`` ...), so clients that key on those fields behave as they do against
OpenAI.
"""

from __future__ import annotations

from collections.abc import Iterable

from citadel.errors import BadRequest

__all__ = [
    "above_max",
    "below_min",
    "empty_array",
    "empty_string",
    "invalid_value",
    "missing",
    "type_name",
    "wrong_type",
]


def type_name(value: object) -> str:
    """How OpenAI names a JSON value's type in its error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other types


def missing(param: str) -> BadRequest:
    return BadRequest(
        f"'{param}' is a required property", param=param, code="missing_required_parameter"
    )


def wrong_type(param: str, expected: str, value: object) -> BadRequest:
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def invalid_value(param: str, value: object, allowed: Iterable[str]) -> BadRequest:
    listed = ", ".join(f"'{a}'" for a in allowed)
    return BadRequest(
        f"Invalid value for '{param}': {value!r}. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def below_min(param: str, value: float, minimum: float) -> BadRequest:
    kind = "integer" if type(value) is int else "decimal"
    return BadRequest(
        f"Invalid '{param}': {kind} below minimum value. "
        f"Expected a value >= {minimum}, but got {value} instead.",
        param=param,
        code=f"{kind}_below_min_value",
    )


def above_max(param: str, value: float, maximum: float) -> BadRequest:
    kind = "integer" if type(value) is int else "decimal"
    return BadRequest(
        f"Invalid '{param}': {kind} above maximum value. "
        f"Expected a value <= {maximum}, but got {value} instead.",
        param=param,
        code=f"{kind}_above_max_value",
    )


def empty_array(param: str) -> BadRequest:
    return BadRequest(
        f"Invalid '{param}': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        param=param,
        code="empty_array",
    )


def empty_string(param: str) -> BadRequest:
    return BadRequest(
        f"Invalid '{param}': empty string. Expected a string with minimum length 1, "
        "but got an empty string instead.",
        param=param,
        code="empty_string",
    )
