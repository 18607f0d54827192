"""The GraphQL service's operation metrics (the catalogue's ``citadel_graphql_*``).

``OperationMetrics`` (a schema extension) counts each operation by name, type and outcome and
times it; ``GraphQLMetrics.cost`` is told each operation's requested and actual cost by the
cost limiter; refusals (depth, aliases, tokens, cost, budget) are counted by reason. Operation
names come from clients, so they are bounded: a name is kept as it is if it is a GraphQL name
of at most 64 characters, and only the first ``MAX_NAMES`` distinct names get series of their
own (the rest count as ``other``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, Final

from graphql import GraphQLError, OperationDefinitionNode
from strawberry.extensions import SchemaExtension

from citadel.metrics import (
    GRAPHQL_OPERATION_COST,
    GRAPHQL_OPERATION_DURATION,
    GRAPHQL_OPERATIONS,
    GRAPHQL_REFUSALS,
    Registry,
)

__all__ = ["MAX_NAMES", "GraphQLMetrics", "OperationMetrics", "refusal_reason"]

MAX_NAMES: Final = 200
_NAME: Final = re.compile(r"^[_A-Za-z][_0-9A-Za-z]{0,63}$")


def refusal_reason(error: GraphQLError) -> str | None:
    """Why an error refused its operation before it ran, None if it is not a refusal."""
    extensions = error.extensions or {}
    code = extensions.get("code")
    if code == "QUERY_TOO_COSTLY":
        return "cost"
    if extensions.get("reason") == "query_cost_budget_exceeded":
        return "budget"
    message = error.message
    if "exceeds maximum operation depth" in message:
        return "depth"
    if "aliases found. Allowed:" in message:
        return "aliases"
    if "Document contains more than" in message and "tokens" in message:
        return "tokens"
    return None


class GraphQLMetrics:
    """The instruments, on the service's registry."""

    def __init__(self, registry: Registry) -> None:
        self._operations = registry.counter(GRAPHQL_OPERATIONS)
        self._duration = registry.histogram(GRAPHQL_OPERATION_DURATION)
        self._cost = registry.histogram(GRAPHQL_OPERATION_COST)
        self._refusals = registry.counter(GRAPHQL_REFUSALS)
        self._names: set[str] = set()

    def name(self, given: str | None) -> str:
        if not given:
            return "anonymous"
        if not _NAME.match(given):
            return "other"
        if given not in self._names:
            if len(self._names) >= MAX_NAMES:
                return "other"
            self._names.add(given)
        return given

    def cost(self, requested: int, actual: int) -> None:
        self._cost.observe(("requested",), float(requested))
        self._cost.observe(("actual",), float(actual))

    def operation(
        self, name: str | None, kind: str, errors: Iterable[GraphQLError], seconds: float
    ) -> None:
        outcome = "ok"
        for error in errors:
            reason = refusal_reason(error)
            if reason is not None:
                self._refusals.inc((reason,))
                outcome = "refused"
                break
            code = (error.extensions or {}).get("code")
            if code in ("GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED"):
                outcome = "invalid"
            elif outcome == "ok":
                outcome = "error"
        label = self.name(name)
        self._operations.inc((label, kind, outcome))
        self._duration.observe((label, kind), seconds)


def _operation(execution: Any) -> tuple[str | None, str]:
    """The operation's name and type, as far as the document tells (``unknown`` if unparsed)."""
    name = execution.operation_name
    document = execution.graphql_document
    if document is None:
        return name, "unknown"
    for definition in document.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        own = None if definition.name is None else definition.name.value
        if name is None or own == name:
            return own, definition.operation.value
    return name, "unknown"


class OperationMetrics(SchemaExtension):
    """Count and time every operation (first of the extensions: it sees the errors last)."""

    def __init__(self, *, metrics: GraphQLMetrics) -> None:
        self.metrics = metrics

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        execution = self.execution_context
        try:
            yield
        except GraphQLError as exc:  # a persisted query not found, and the like
            name, kind = _operation(execution)
            self.metrics.operation(name, kind, [exc], time.perf_counter() - started)
            raise
        result = execution.result
        errors = list(getattr(result, "errors", None) or [])
        name, kind = _operation(execution)
        self.metrics.operation(name, kind, errors, time.perf_counter() - started)
