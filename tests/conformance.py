"""Responses checked against the OpenAPI document the service itself serves.

    document = Conformance.fetch("127.0.0.1", port)       # GET /openapi.json
    document.check("GET", "/v1/users/usr_1", 200, body, "application/json")

``check`` finds the operation whose path template matches, asserts that the status is one the
operation documents, and validates a JSON body against that response's schema (JSON Schema
2020-12, the dialect of OpenAPI 3.1), so a reply that drifts from its schema fails the test that
saw it.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson


def _matches(template: list[str], given: list[str]) -> bool:
    return len(template) == len(given) and all(
        t == g or (t.startswith("{") and t.endswith("}") and g != "")
        for t, g in zip(template, given, strict=True)
    )


@dataclass
class Conformance:
    document: dict[str, Any]
    checked: set[tuple[str, str, str]] = field(default_factory=set)

    @classmethod
    def fetch(cls, host: str, port: int) -> Conformance:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/openapi.json")
            response = conn.getresponse()
            assert 200 == response.status
            return cls(orjson.loads(response.read()))
        finally:
            conn.close()

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """The template and operation serving ``method path``, or None if none is documented.
        Literal templates win over templated ones, as routers match them."""
        given = path.split("?", 1)[0].split("/")
        found: list[tuple[int, str, dict[str, Any]]] = []
        for template, item in self.document["paths"].items():
            if method.lower() in item and _matches(template.split("/"), given):
                found.append((template.count("{"), template, item[method.lower()]))
        if not found:
            return None
        _, template, operation = min(found, key=lambda f: f[0])
        return template, operation

    def check(
        self, method: str, path: str, status: int, body: bytes, content_type: str = ""
    ) -> None:
        """Assert that the reply is one the document describes (undocumented paths pass: a 404
        for an unknown path or a 405 has no operation to check against)."""
        found = self.operation(method, path)
        if found is None:
            return
        template, operation = found
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method} {template} answered {status}, which the document does not list "
            f"({', '.join(responses)})"
        )
        self.checked.add((method, template, str(status)))
        if not body or not content_type.startswith("application/json"):
            return
        content = responses[str(status)].get("content", {})
        media = content.get("application/json")
        assert media is not None, f"{method} {template} {status}: JSON the document does not give"
        schema = dict(media.get("schema", {}))
        schema["components"] = self.document.get("components", {})
        try:
            jsonschema.validate(orjson.loads(body), schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as exc:
            raise AssertionError(
                f"{method} {template} {status}: the body does not match its schema: "
                f"{exc.message} at {list(exc.absolute_path)}"
            ) from exc


def fuzz(
    port: int,
    admin_key: str,
    *,
    examples: int = 30,
    seed: int = 1,
    exclude_paths: tuple[str, ...] = (),
) -> None:
    """Run schemathesis against the document the service on ``port`` serves: every phase
    (examples, coverage, fuzzing, stateful), ``examples`` cases per operation, with the admin key;
    fail on any 5xx, any status or content type the document does not list and any body outside
    its schema. ``exclude_paths``: operations that never end by design (a live event stream:
    each case would wait out the timeout), tested by their own tests instead."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
        "--header",
        f"Authorization: Bearer {admin_key}",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--checks",
        ",".join(_CHECKS),
        *(arg for path in exclude_paths for arg in ("--exclude-path", path)),
    ]
    with tempfile.TemporaryDirectory() as scratch:  # schemathesis writes a cache where it runs
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False, cwd=scratch
        )
    assert 0 == result.returncode, result.stdout[-6000:] + result.stderr[-2000:]


_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
