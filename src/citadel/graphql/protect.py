"""What stands between a query and the stores: the cost model, and errors a client can act on.

**Cost** (``CostLimiter``), in the manner of GitHub's GraphQL API: the unit is one object
resolved. A field of an object type costs 1 and what its selection costs; a list of objects
costs that for each item it may hold, which for a connection's ``edges`` and ``nodes`` is the
connection's page size (``first``/``last``, from literals or variables; 20 by default). So
``teams(first: 10) { nodes { users(first: 10) { nodes { name } } } }`` costs
1 + 10 * (1 + 1 + 10 * 1) = 121. The cost is computed from the document and its variables during
validation, so a query over ``max_cost`` is refused before any resolver runs, with the computed
cost in the error's ``extensions``. Every answer carries ``extensions.cost``:
``requestedQueryCost`` (the bound computed beforehand) and ``actualQueryCost`` (the objects the
answer holds), as Shopify reports them.

**Errors** (``Translate``): every error becomes a GraphQL error with ``extensions.code``:
``GRAPHQL_PARSE_FAILED`` and ``GRAPHQL_VALIDATION_FAILED`` for a document that does not parse or
fit the schema; for a resolver's refusal (``citadel.errors.ApiError``) a code by its HTTP status
(``BAD_USER_INPUT``, ``UNAUTHENTICATED``, ``FORBIDDEN``, ``NOT_FOUND``, ``CONFLICT``,
``RATE_LIMITED``, ``UNAVAILABLE``) with ``reason`` and ``param`` as the REST bodies name them;
anything unexpected is logged and answered ``INTERNAL_SERVER_ERROR`` with no internals named.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLObjectType,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    ValidationRule,
    VariableNode,
    get_named_type,
    get_nullable_type,
    is_composite_type,
    is_list_type,
)
from graphql.language import DocumentNode
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType as StrawberryOperation

from citadel.accounts.store import ConflictError, NotFoundError
from citadel.errors import ApiError, StoreUnavailable
from citadel.graphql.observe import GraphQLMetrics
from citadel.graphql.pagination import DEFAULT_PAGE
from citadel.limits.decision import Limiter, Limits, Reservation
from citadel.limits.policy import format_duration
from citadel.metering.ranges import QueryError

__all__ = ["CostBudget", "CostLimiter", "Translate", "actual_cost", "requested_cost"]

_log = logging.getLogger("citadel.graphql")

_BY_STATUS: Final = {
    400: "BAD_USER_INPUT",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    429: "RATE_LIMITED",
    503: "UNAVAILABLE",
}
_MAX_FRAGMENT_DEPTH: Final = 50


# -- cost -------------------------------------------------------------------------------------


def _page(node: FieldNode, variables: Mapping[str, Any]) -> int | None:
    """The page size a field asks for (``first`` or ``last``), None if it takes none."""
    size: int | None = None
    for argument in node.arguments or ():
        if argument.name.value not in ("first", "last"):
            continue
        value = argument.value
        if isinstance(value, IntValueNode):
            size = int(value.value)
        elif isinstance(value, VariableNode):
            given = variables.get(value.name.value)
            if isinstance(given, int) and not isinstance(given, bool):
                size = given
    return size


class _Costing:
    def __init__(
        self,
        fragments: Mapping[str, FragmentDefinitionNode],
        variables: Mapping[str, Any],
        schema: Any,
    ) -> None:
        self.fragments = fragments
        self.variables = variables
        self.schema = schema

    def selection(
        self, selection_set: SelectionSetNode | None, parent: Any, page: int | None, depth: int
    ) -> int:
        if selection_set is None or depth > _MAX_FRAGMENT_DEPTH:
            return 0
        total = 0
        for node in selection_set.selections:
            if isinstance(node, FieldNode):
                total += self.field(node, parent, page)
            elif isinstance(node, InlineFragmentNode):
                target = parent
                if node.type_condition is not None:
                    target = self.schema.get_type(node.type_condition.name.value) or parent
                total += self.selection(node.selection_set, target, page, depth + 1)
            elif isinstance(node, FragmentSpreadNode):
                fragment = self.fragments.get(node.name.value)
                if fragment is not None:
                    target = self.schema.get_type(fragment.type_condition.name.value) or parent
                    total += self.selection(fragment.selection_set, target, page, depth + 1)
        return total

    def field(self, node: FieldNode, parent: Any, page: int | None = None) -> int:
        name = node.name.value
        fields = getattr(parent, "fields", None)
        if name == "__schema":
            definition_type = self.schema.get_type("__Schema")
            is_list = False
        elif name == "__type":
            definition_type = self.schema.get_type("__Type")
            is_list = False
        else:
            definition = None if fields is None else fields.get(name)
            if definition is None:
                return 0  # __typename, or a field validation refuses anyway
            definition_type = get_named_type(definition.type)
            is_list = is_list_type(get_nullable_type(definition.type))
        if not is_composite_type(definition_type):
            return 0
        own = _page(node, self.variables)
        takes_page = name not in ("__schema", "__type") and _takes_page(parent, name)
        child_page = (own or DEFAULT_PAGE) if takes_page else None
        children = self.selection(node.selection_set, definition_type, child_page, 0)
        return (page or 1) * (1 + children) if is_list else 1 + children


def _takes_page(parent: Any, name: str) -> bool:
    definition = getattr(parent, "fields", {}).get(name)
    return definition is not None and "first" in definition.args


def requested_cost(
    schema: Any,
    document: DocumentNode,
    variables: Mapping[str, Any] | None,
    operation_name: str | None,
) -> int:
    """The most objects the operation's answer can hold (see the module docstring)."""
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    costing = _Costing(fragments, variables or {}, schema)
    costs = []
    for definition in document.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        if operation_name is not None and (
            definition.name is None or definition.name.value != operation_name
        ):
            continue
        root = {
            OperationType.QUERY: schema.query_type,
            OperationType.MUTATION: schema.mutation_type,
            OperationType.SUBSCRIPTION: schema.subscription_type,
        }[definition.operation]
        if isinstance(root, GraphQLObjectType):
            costs.append(costing.selection(definition.selection_set, root, None, 0))
    return max(costs, default=0)


def actual_cost(data: object) -> int:
    """The objects an answer holds (every mapping below the root)."""
    count = 0
    stack: list[object] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            count += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return max(0, count - 1) if isinstance(data, Mapping) else 0


@dataclass(frozen=True, slots=True)
class CostBudget:
    """A cost budget per key and minute, kept by the gateway's limiter (``limits.*``): the
    minute's cost is the limiter's ``tokens_per_minute`` of the principal ``graphql:<key id>``,
    so every replica on a shared limiter (Redis) spends from one budget. The admin key has
    none, as it has no gateway limits."""

    limiter: Limiter
    per_minute: int
    fail_closed: bool = False
    clock: Callable[[], float] = time.time

    def limits(self) -> Limits:
        return Limits(tokens_per_minute=self.per_minute)


def _viewer_key(execution: Any) -> str | None:
    """The caller's key id, None for the admin (or no caller: not budgeted)."""
    context = execution.context
    found = context.get("citadel") if isinstance(context, Mapping) else None
    viewer = getattr(found, "viewer", None)
    if viewer is None or viewer.admin:
        return None
    key_id: str = viewer.principal.key_id
    return key_id


class CostLimiter(SchemaExtension):
    """Refuse an operation whose cost is over ``max_cost`` before it runs, or over what its key
    has left of ``budget`` this minute; report the cost."""

    def __init__(
        self,
        *,
        max_cost: int,
        budget: CostBudget | None = None,
        metrics: GraphQLMetrics | None = None,
    ) -> None:
        self.max_cost = max_cost
        self.budget = budget
        self.metrics = metrics
        self.requested: int | None = None
        self.remaining: int | None = None
        self.refused: str | None = None  # why it did not run: "cost", "budget"

    def on_operation(self) -> Iterator[None]:
        extension = self
        execution = self.execution_context

        class CostRule(ValidationRule):
            def leave_document(self, node: DocumentNode, *_args: object) -> None:
                cost = requested_cost(
                    self.context.schema, node, execution.variables, execution.operation_name
                )
                extension.requested = cost
                if cost > extension.max_cost:
                    extension.refused = "cost"
                    self.report_error(
                        GraphQLError(
                            f"The query's cost is {cost}, over the limit of "
                            f"{extension.max_cost}: ask for smaller pages (first/last) or "
                            "fewer nested lists.",
                            extensions={
                                "code": "QUERY_TOO_COSTLY",
                                "requestedQueryCost": cost,
                                "maximumQueryCost": extension.max_cost,
                            },
                        )
                    )

        execution.validation_rules = (*execution.validation_rules, CostRule)
        yield

    async def on_execute(self) -> AsyncIterator[None]:
        budget, cost, execution = self.budget, self.requested, self.execution_context
        key = None if budget is None or cost is None else _viewer_key(execution)
        reservation = None
        if budget is not None and cost is not None and key is not None:
            reservation, refusal = await self._admit(budget, key, cost)
            if refusal is not None:
                self.refused = "budget"
                if execution.operation_type is StrawberryOperation.SUBSCRIPTION:
                    raise refusal  # a subscription's execution does not look at the result
                execution.result = GraphQLExecutionResult(data=None, errors=[refusal])
        yield
        if budget is not None and reservation is not None:
            result = execution.result
            actual = actual_cost(getattr(result, "data", None))
            with contextlib.suppress(StoreUnavailable):  # the minute's window settles it anyway
                await budget.limiter.reconcile(
                    reservation, budget.limits(), tokens=actual, cost_micros=0, now=budget.clock()
                )

    def _subscription(self) -> bool:
        try:
            return self.execution_context.operation_type is StrawberryOperation.SUBSCRIPTION
        except RuntimeError:  # no document
            return False

    async def _admit(
        self, budget: CostBudget, key: str, cost: int
    ) -> tuple[Reservation | None, GraphQLError | None]:
        limits = budget.limits()
        try:
            decision = await budget.limiter.admit(
                f"graphql:{key}",
                limits,
                lease_id=os.urandom(8).hex(),
                tokens=cost,
                cost_micros=0,
                now=budget.clock(),
            )
        except StoreUnavailable as exc:
            if not budget.fail_closed:
                return None, None
            return None, GraphQLError(
                f"The cost budget's store is unavailable ({exc.detail}); try again later.",
                extensions={"code": "UNAVAILABLE", "status": 503, "requestedQueryCost": cost},
            )
        if decision.allowed:
            self.remaining = decision.tokens_remaining
            return decision.reservation, None
        self.remaining = decision.tokens_remaining
        retry = max(0.0, decision.retry_after)
        alone = cost > budget.per_minute
        message = (
            f"The query's cost is {cost}, over this key's budget of {budget.per_minute} a "
            "minute by itself: ask for smaller pages (first/last) or fewer nested lists."
            if alone
            else f"The query's cost is {cost} and this key has "
            f"{decision.tokens_remaining or 0} of its {budget.per_minute} a minute left; "
            f"try again in {format_duration(retry) if retry > 0 else 'a moment'}."
        )
        return None, GraphQLError(
            message,
            extensions={
                "code": "RATE_LIMITED",
                "status": 429,
                "reason": "query_cost_budget_exceeded",
                "requestedQueryCost": cost,
                "budgetPerMinute": budget.per_minute,
                "remaining": decision.tokens_remaining,
                "retryAfterSeconds": None if alone else round(retry, 3),
            },
        )

    def get_results(self) -> dict[str, Any]:
        if self.requested is None:
            return {}
        if self.refused is None and self._subscription():
            return {}  # charged once when it started; its events carry no cost of their own
        result = self.execution_context.result
        data = None if result is None else getattr(result, "data", None)
        actual = actual_cost(data)
        if self.metrics is not None and self.refused is None:
            self.metrics.cost(self.requested, actual)
        cost: dict[str, Any] = {
            "requestedQueryCost": self.requested,
            "actualQueryCost": actual,
            "maximumQueryCost": self.max_cost,
        }
        if self.budget is not None and _viewer_key(self.execution_context) is not None:
            cost["budgetPerMinute"] = self.budget.per_minute
            cost["budgetRemaining"] = self.remaining
        return {"cost": cost}


# -- errors -----------------------------------------------------------------------------------


def translate(error: GraphQLError) -> GraphQLError:
    """The error a client sees (see the module docstring)."""
    original = error.original_error
    extensions = dict(error.extensions or {})
    message = error.message
    if original is None:
        if "code" not in extensions:
            parse = message.startswith("Syntax Error")
            extensions["code"] = "GRAPHQL_PARSE_FAILED" if parse else "GRAPHQL_VALIDATION_FAILED"
    elif isinstance(original, GraphQLError):
        return translate(original)
    elif isinstance(original, NotFoundError):  # the store's, before ApiError (its base)
        message = _sentence(str(original))
        extensions |= {"code": "NOT_FOUND", "status": 404}
    elif isinstance(original, ConflictError):
        message = _sentence(str(original))
        extensions |= {"code": "CONFLICT", "status": 409}
    elif isinstance(original, ApiError):
        message = original.message
        extensions |= {
            "code": _BY_STATUS.get(original.status, "INTERNAL_SERVER_ERROR"),
            "status": original.status,
            "reason": original.code,
            "param": original.param,
        }
    elif isinstance(original, QueryError):
        message = original.message
        extensions |= {"code": "BAD_USER_INPUT", "status": 400, "param": original.param}
    elif isinstance(original, StoreUnavailable):
        message = f"A store is unavailable ({original.store}): {original.detail}. Try again later."
        extensions |= {"code": "UNAVAILABLE", "status": 503}
    elif isinstance(original, ValueError):
        message = _sentence(str(original))
        extensions |= {"code": "BAD_USER_INPUT", "status": 400}
    else:
        _log.error("resolver failed", exc_info=original)
        message = "Internal error; the service log has the details."
        extensions = {"code": "INTERNAL_SERVER_ERROR", "status": 500}
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions=extensions,
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


class Translate(SchemaExtension):
    """Every error of an answer through ``translate``."""

    def _apply(self, result: object) -> None:
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = [translate(e) for e in errors]  # type: ignore[attr-defined]

    def on_operation(self) -> Iterator[None]:
        yield
        self._apply(self.execution_context.result)

    def on_stream_result(self, result: Any) -> Iterator[None]:
        self._apply(result)
        yield None
