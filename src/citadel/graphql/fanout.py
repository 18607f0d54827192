"""One execution per subscription event for all the subscribers that asked the same thing.

graphql-core executes a subscription's selection once per event for each subscriber; with a
thousand subscribers to ``usageEvents`` that is a thousand identical executions of every event.
``SharedEventExecutor`` (the schema's executor class) remembers, for a few recent events, the
result of each distinct (document text, operation, variables, tenant scope) and hands it to
every subscriber with the same key: the event object is the same for all of them (the feed
entry is decoded once, ``live.usage_event``), and scoping and filtering happen in the
subscription's resolver before the event is yielded, so subscribers with equal keys are owed
equal answers. Queries and mutations are executed as always.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable
from typing import Any, Final

import orjson
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

__all__ = ["SharedEventExecutor", "shareable"]

_KEPT: Final = 4096  # results remembered (events x distinct subscriptions)
_SHAREABLE: set[type] = set()


def shareable(cls: type) -> type:
    """Mark a subscription's event type as one whose executions may be shared."""
    _SHAREABLE.add(cls)
    return cls


# (event id, document, operation, variables, scope) -> (the event, its result or its future)
_RESULTS: collections.OrderedDict[tuple[Any, ...], tuple[Any, Any]] = collections.OrderedDict()


class SharedEventExecutor(StrawberryGraphQLCoreExecutionContext):
    def _key(self) -> tuple[Any, ...] | None:
        root = self.root_value
        if type(root) not in _SHAREABLE:
            return None
        location = self.operation.loc
        if location is None:
            return None
        context = self.context_value
        found = context.get("citadel") if isinstance(context, dict) else None
        viewer = getattr(found, "viewer", None)
        if viewer is None:
            return None
        scope = "admin" if viewer.admin else f"user:{viewer.principal.user}"
        try:
            variables = orjson.dumps(self.variable_values.coerced, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            return None
        name = None if self.operation.name is None else self.operation.name.value
        return (id(root), location.source.body, name, variables, scope)

    def execute_operation(self, serially: bool | None = None) -> Any:
        key = self._key()
        if key is None:
            return super().execute_operation(serially)
        results = _RESULTS
        kept = results.get(key)
        if kept is not None and kept[0] is self.root_value:
            found = kept[1]
        else:
            result = super().execute_operation(serially)
            found = asyncio.ensure_future(result) if self.is_awaitable(result) else result
            # the event is kept with its result, so its id is not reused while remembered
            results[key] = (self.root_value, found)
            while len(results) > _KEPT:
                results.popitem(last=False)
        if isinstance(found, asyncio.Future):
            return _wait(found)
        return found


async def _wait(future: Awaitable[Any]) -> Any:
    return await future
