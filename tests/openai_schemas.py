"""Validate documents against OpenAI's published schemas (``tests/openai/spec/schemas.json``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

_SPEC = Path(__file__).parent / "openai" / "spec" / "schemas.json"


@functools.cache
def _document() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(_SPEC.read_bytes())
    return doc


@functools.cache
def _validator(schema: str) -> Draft202012Validator:
    root = {**_document(), "$ref": f"#/components/schemas/{schema}"}
    return Draft202012Validator(root)


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Each Responses stream event's ``type`` and the schema of that event."""
    schemas = _document()["components"]["schemas"]
    names = {}
    for option in schemas["ResponseStreamEvent"]["anyOf"]:
        name = option["$ref"].rsplit("/", 1)[-1]
        for kind in schemas[name]["properties"]["type"].get("enum", ()):
            names[kind] = name
    return names


def assert_event_conforms(event: dict[str, Any]) -> None:
    """Check a Responses stream event against the schema of its own ``type``."""
    assert event["type"] in _event_schemas(), event["type"]
    assert_conforms(_event_schemas()[event["type"]], event)


def conformance_errors(schema: str, document: object) -> list[str]:
    """The ways ``document`` breaks OpenAI's schema ``schema`` (empty when it conforms)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
        for e in _validator(schema).iter_errors(document)
    ]


def assert_conforms(schema: str, document: object) -> None:
    """Fail with every violation listed when ``document`` does not match ``schema``."""
    errors = conformance_errors(schema, document)
    assert [] == errors, f"{schema}: " + "; ".join(errors)
