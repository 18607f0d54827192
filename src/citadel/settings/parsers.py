"""Parsers of settings values: each takes a raw value and its key, and returns it typed or raises.

A parser is ``(value, key) -> typed value``; a bad value raises ``ConfigError(key, value,
expected)``, where ``key`` is the dotted YAML path (``models[0].deployments[1].weight``) or the
environment variable's name. Types are strict: a bool is not a number, a string is not a list;
an int is accepted where a float is expected.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from citadel.errors import ConfigError

__all__ = [
    "Parser",
    "at_most",
    "base_url",
    "boolean",
    "choice",
    "fraction",
    "http_url",
    "integer",
    "mapping",
    "names",
    "networks",
    "non_negative",
    "optional",
    "parse_keys",
    "parse_section",
    "port",
    "positive",
    "raw_section",
    "store",
    "text",
    "timezone",
    "uri",
]

Parser = Callable[[object, str], Any]


def _key(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def mapping(value: object, key: str, known: tuple[str, ...]) -> dict[str, object]:
    """A YAML mapping with only known keys; a missing or empty section is an empty mapping."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a mapping")
    for name, item in value.items():
        if name not in known:
            raise ConfigError(_key(key, name), item, f"one of the known keys: {', '.join(known)}")
    return value


def parse_keys(
    doc: Mapping[str, object], key: str, parsers: Mapping[str, Parser]
) -> dict[str, Any]:
    """Parse the keys set in `doc`; absent and null ones are left to the dataclass defaults."""
    return {
        name: parse(value, _key(key, name))
        for name, parse in parsers.items()
        if (value := doc.get(name)) is not None
    }


def parse_section(value: object, key: str, parsers: Mapping[str, Parser]) -> dict[str, Any]:
    return parse_keys(mapping(value, key, tuple(parsers)), key, parsers)


def text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "a non-empty string")
    return value.strip()


def choice(choices: tuple[str, ...]) -> Parser:
    """One of `choices`, in any letter case, returned as spelt in `choices`."""
    by_folded = {choice.casefold(): choice for choice in choices}

    def parse(value: object, key: str) -> str:
        if not isinstance(value, str) or value.strip().casefold() not in by_folded:
            raise ConfigError(key, value, f"one of {', '.join(choices)}")
        return by_folded[value.strip().casefold()]

    return parse


def boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _number(positive: bool) -> Parser:
    expected = "a number > 0" if positive else "a number >= 0"

    def parse(value: object, key: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (positive and value == 0)
        ):
            raise ConfigError(key, value, expected)
        return float(value)

    return parse


positive, non_negative = _number(positive=True), _number(positive=False)


def fraction(value: object, key: str) -> float:
    number: float = non_negative(value, key)
    if number > 1:
        raise ConfigError(key, value, "a number from 0 to 1")
    return number


def integer(minimum: int, maximum: int | None = None, why: str = "") -> Parser:
    """An int of at least ``minimum`` (and at most ``maximum``, ``why`` saying what sets it)."""
    expected = f"an integer >= {minimum}"
    if maximum is not None:
        expected = f"an integer from {minimum} to {maximum}" + (f" ({why})" if why else "")

    def parse(value: object, key: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise ConfigError(key, value, expected)
        return value

    return parse


def at_most(parse: Parser, maximum: float, why: str) -> Parser:
    """``parse``, then refuse a number above ``maximum`` (``why`` says what sets it)."""

    def bounded(value: object, key: str) -> Any:
        number = parse(value, key)
        if number > maximum:
            raise ConfigError(key, value, f"a number up to {maximum} ({why})")
        return number

    return bounded


def port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(key, value, "an integer port 1-65535")
    return value


def http_url(value: object, key: str) -> str:
    """An http(s) URL with a host, without trailing slashes."""
    url = value.strip().rstrip("/") if isinstance(value, str) else ""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok:
        raise ConfigError(key, value, "an http:// or https:// URL")
    return url


def base_url(value: object, key: str) -> str:
    """A deployment's base URL: the client adds "/v1/...", so a trailing "/v1" is dropped."""
    return http_url(value, key).removesuffix("/v1")


_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S*", re.IGNORECASE)


def uri(value: object, key: str) -> str:
    if not isinstance(value, str) or not _URI.fullmatch(value.strip()):
        raise ConfigError(key, value, "a URI such as scheme://host:port/path")
    return value.strip()


_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


def store(value: object, key: str) -> str:
    """A store's URI, or just its host:port."""
    if isinstance(value, str) and _HOST_PORT.fullmatch(value.strip()):
        return value.strip()
    return uri(value, key)


def names(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, value, "a list of strings")
    return tuple(text(item, f"{key}[{i}]") for i, item in enumerate(value))


def networks(value: object, key: str) -> tuple[str, ...]:
    """A list of IP addresses or networks (``10.0.0.0/8``, ``::1``)."""
    entries = names(value, key)
    for i, entry in enumerate(entries):
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"{key}[{i}]", entry, "an IP address or network") from None
    return entries


def optional(parse: Parser) -> Parser:
    """``parse``, letting an explicit null through as None (a limit switched off)."""

    def parse_optional(value: object, key: str) -> Any:
        return None if value is None else parse(value, key)

    return parse_optional


def timezone(name: str, key: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(key, name, "an IANA time zone such as UTC or Europe/Paris") from None
    return name


def raw_section(value: object, key: str) -> Mapping[str, Any]:
    """A section another module validates; here only: a mapping (frozen) or nothing."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a mapping")
    return MappingProxyType(dict(value))
