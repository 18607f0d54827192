"""The gateway serves an OpenAPI document of its endpoints, and its answers fit it."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson

from gateway_helpers import Stack, chat, post_json, request


def _document(stack: Stack) -> dict[str, Any]:
    status, headers, body = request(stack.gateway, "GET", "/openapi.json", auth=False)
    assert 200 == status
    assert headers["content-type"].startswith("application/json")
    doc: dict[str, Any] = orjson.loads(body)
    return doc


def _schema(doc: dict[str, Any], path: str, method: str, status: str) -> dict[str, Any]:
    content = doc["paths"][path][method]["responses"][status]["content"]["application/json"]
    schema: dict[str, Any] = {**content["schema"], "components": doc["components"]}
    return schema


def test_the_document_lists_every_endpoint(stack: Stack) -> None:
    doc = _document(stack)
    assert "3.1.0" == doc["openapi"]
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/health",
        "/metrics",
    } == set(doc["paths"])
    jsonschema.Draft202012Validator.check_schema(
        doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ]
    )


def test_answers_fit_the_document(stack: Stack) -> None:
    """A served request, a refused one and the model list each match their response schema."""
    doc = _document(stack)
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    jsonschema.validate(chat(), body["application/json"]["schema"])
    status, _, ok = post_json(stack.gateway, "/v1/chat/completions", chat())
    assert 200 == status
    jsonschema.validate(orjson.loads(ok), _schema(doc, "/v1/chat/completions", "post", "200"))
    status, _, bad = post_json(stack.gateway, "/v1/chat/completions", {"model": "sim-chat"})
    assert 400 == status
    jsonschema.validate(orjson.loads(bad), _schema(doc, "/v1/chat/completions", "post", "400"))
    status, _, models = request(stack.gateway, "GET", "/v1/models")
    assert 200 == status
    jsonschema.validate(orjson.loads(models), _schema(doc, "/v1/models", "get", "200"))
