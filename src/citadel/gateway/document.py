"""The gateway's OpenAPI document (``GET /openapi.json``): its endpoints, for clients and fuzzers.

The gateway's request checks are hand-written for speed (``citadel.openai.requests``), so this
document describes them rather than generating them: the fields the gateway itself checks are
typed and required here; every other field is a vendor extension that passes through to the
upstream, so request objects allow additional properties. Responses: the OpenAI shapes the
gateway relays (loosely: the upstream writes them), the OpenAI-style error body for every 4xx
and 5xx the gateway answers itself, and ``text/event-stream`` for streams.
"""

from __future__ import annotations

from typing import Any

from citadel import __version__

# One server-sent event, as clients (and schemathesis) read a stream: each event's fields, its
# ``data`` a chunk object's JSON text or ``[DONE]``.
_SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_SAMPLING = {
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
    },
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "stop": {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            {"type": "null"},
        ]
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "enum": ["system", "user", "assistant", "tool", "developer", "function"],
        },
        "content": {"type": ["string", "array", "null"]},
    },
}
_PROMPT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
            "minItems": 1,
        },
    ]
}
_BODIES: dict[str, dict[str, Any]] = {
    "chat": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
            **_SAMPLING,
        },
    },
    "completion": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {"model": {"type": "string", "minLength": 1}, "prompt": _PROMPT, **_SAMPLING},
    },
    "embedding": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": {"type": "string", "minLength": 1}, "input": _PROMPT},
    },
}
_SUMMARIES = {
    "chat": ("/v1/chat/completions", "Create a chat completion (streamed with stream: true)."),
    "completion": ("/v1/completions", "Create a (legacy) text completion."),
    "embedding": ("/v1/embeddings", "Create embeddings."),
}
_FAILURES = {
    "400": "The request is invalid (the error names the field).",
    "401": "No API key, or an unusable one.",
    "403": "The caller's tier may not use the model.",
    "404": "Unknown model.",
    "413": "The body is larger than the limit.",
    "415": "The body is not application/json.",
    "429": "A rate limit or quota refused the request, or too many failed authentications.",
    "502": "The upstream failed.",
    "503": "No deployment can take the request, or a store is unavailable.",
    "504": "The upstream timed out.",
}


def _errors(*statuses: str) -> dict[str, Any]:
    return {
        s: {
            "description": _FAILURES[s],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def _post(endpoint: str, models: tuple[str, ...]) -> dict[str, Any]:
    summary = _SUMMARIES[endpoint][1]
    body = _BODIES[endpoint]
    if models:  # the configured names, as examples (a fuzzer then reaches past the 404)
        model = {**body["properties"]["model"], "examples": list(models)}
        body = {**body, "properties": {**body["properties"], "model": model}}
    responses: dict[str, Any] = {
        "200": {
            "description": "The upstream's answer (an SSE stream when stream is true).",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                **(
                    {} if endpoint == "embedding" else {"text/event-stream": {"schema": _SSE_EVENT}}
                ),
            },
        },
        **_errors(*_FAILURES),
    }
    return {
        "post": {
            "operationId": f"create_{endpoint}",
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body}},
            },
            "responses": responses,
        }
    }


def openapi_document(models: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's endpoints; ``models`` names the configured
    models each endpoint serves (by endpoint), as examples."""
    models = models or {}
    paths: dict[str, Any] = {_SUMMARIES[e][0]: _post(e, models.get(e, ())) for e in _SUMMARIES}
    paths["/v1/models"] = {
        "get": {
            "operationId": "list_models",
            "summary": "List the models (and aliases) this gateway serves.",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "The models.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["object", "data"],
                                "properties": {
                                    "object": {"const": "list"},
                                    "data": {"type": "array", "items": {"type": "object"}},
                                },
                            }
                        }
                    },
                },
                **_errors("401", "429", "503"),
            },
        }
    }
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "summary": "The gateway's state and its dependencies'.",
            "responses": {
                "200": {"description": "Up.", "content": {"application/json": {"schema": {}}}},
                "503": {"description": "Down.", "content": {"application/json": {"schema": {}}}},
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (a bearer token outside development: metrics.token).",
            "responses": {
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors("401"),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Citadel gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
