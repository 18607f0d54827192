"""Extract the schemas the conformance tests use from OpenAI's published OpenAPI description.

Run it against a checkout of openai/openai-openapi (or its published ``openapi.json``):

    python tests/openai/spec/extract.py path/to/openapi.json

It writes ``schemas.json`` beside itself: the named schemas and every schema they reference,
with descriptions and examples dropped (they are most of the file's 3 MB) and OpenAPI 3.0's
``nullable: true`` rewritten as the JSON Schema ``null`` type it means. The description is
OpenAI's, under the MIT licence in ``LICENSE-openai-openapi.txt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "Response",
    "ResponseStreamEvent",
)
_DROP = frozenset({"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "title"})


def _clean(node: Any, refs: set[str]) -> Any:
    if isinstance(node, list):
        return [_clean(n, refs) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _clean(v, refs) for k, v in node.items() if k not in _DROP and k != "nullable"}
    ref = node.get("$ref")
    if isinstance(ref, str):
        refs.add(ref.rsplit("/", 1)[-1])
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    done: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in done:
            continue
        refs: set[str] = set()
        done[name] = _clean(schemas[name], refs)
        todo.extend(refs - done.keys())
    return {
        "info": {"source": "openai/openai-openapi", "version": spec["info"]["version"]},
        "components": {"schemas": dict(sorted(done.items()))},
    }


if __name__ == "__main__":
    source = json.loads(Path(sys.argv[1]).read_text())
    target = Path(__file__).with_name("schemas.json")
    target.write_text(json.dumps(extract(source), indent=1, sort_keys=True) + "\n")
