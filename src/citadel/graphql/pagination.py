"""Relay-style cursor pagination over a list already in memory (the stores answer whole lists,
bounded by the accounts and the analytics' ``MAX_ROWS``).

A cursor is the opaque, base64 form of the item's offset in the list (``cursor:<n>``). Every list
takes ``first``/``after`` (forwards) or ``last``/``before`` (backwards), ``first`` and ``last``
between 1 and ``MAX_PAGE`` (GitHub's node limit); with neither, the first ``DEFAULT_PAGE`` items.

A list field is written once, as the source of its items: ``connection`` adds the page arguments
and the paging, so no resolver repeats them.

    @connection("The user's API keys.")
    async def keys(self, info: Info) -> list[ApiKey]:
        return [ApiKey.of(k) for k in await context(info).loaders.keys.load(self.record.id)]
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import strawberry

from citadel.errors import BadRequest

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "Connection",
    "Edge",
    "Items",
    "PageInfo",
    "Window",
    "connection",
    "paginate",
]

MAX_PAGE: Final = 100
DEFAULT_PAGE: Final = 20
_PREFIX: Final = "cursor:"

T = TypeVar("T")


@strawberry.type(description="Where a page sits in its list.")
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type(description="One item of a page and its cursor.")
class Edge(Generic[T]):
    cursor: str
    node: T


@strawberry.type(description="A page of a list (Relay cursor connection).")
class Connection(Generic[T]):
    edges: list[Edge[T]]
    nodes: list[T]
    page_info: PageInfo
    total_count: int = strawberry.field(description="Items in the whole list, not the page.")


@dataclass(frozen=True, slots=True)
class Window:
    """The page arguments of one list field."""

    first: int | None = None
    after: str | None = None
    last: int | None = None
    before: str | None = None

    def size(self) -> int:
        """The page size asked for (what the cost model charges)."""
        return self.first or self.last or DEFAULT_PAGE


def encode_cursor(offset: int) -> str:
    return base64.b64encode(f"{_PREFIX}{offset}".encode()).decode()


def decode_cursor(cursor: str, param: str) -> int:
    try:
        text = base64.b64decode(cursor.encode(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(_PREFIX) or not text[len(_PREFIX) :].isdigit():
        raise BadRequest(
            f"'{param}' is not a cursor of this list: {cursor[:40]!r}.",
            param=param,
            code="invalid_cursor",
        )
    return int(text[len(_PREFIX) :])


def _check_count(name: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_PAGE:
        raise BadRequest(
            f"'{name}' must be between 1 and {MAX_PAGE}; got {value}.",
            param=name,
            code="invalid_page_size",
        )


def paginate(items: Sequence[T], window: Window) -> Connection[T]:
    """The page of ``items`` that ``window`` asks for."""
    _check_count("first", window.first)
    _check_count("last", window.last)
    if window.first is not None and window.last is not None:
        raise BadRequest(
            "Pass 'first' or 'last', not both.", param="last", code="invalid_page_size"
        )
    start, end = 0, len(items)
    if window.after is not None:
        start = max(start, decode_cursor(window.after, "after") + 1)
    if window.before is not None:
        end = min(end, decode_cursor(window.before, "before"))
    end = max(start, end)
    if window.last is not None:
        lo, hi = max(start, end - window.last), end
    else:
        lo, hi = start, min(end, start + (window.first or DEFAULT_PAGE))
    edges = [Edge(cursor=encode_cursor(i), node=items[i]) for i in range(lo, hi)]
    return Connection(
        edges=edges,
        nodes=[edge.node for edge in edges],
        page_info=PageInfo(
            has_next_page=hi < len(items),
            has_previous_page=lo > 0,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        ),
        total_count=len(items),
    )


Items = list[T] | Awaitable[list[T]]  # what a connection's source returns (sync when it can)


async def _paged(items: Awaitable[Sequence[T]], window: Window) -> Connection[T]:
    return paginate(await items, window)


_PAGE_ARGUMENTS: Final = (("first", int | None), ("after", str | None), ("last", int | None),
                          ("before", str | None))  # fmt: skip


def connection(description: str) -> Callable[[Callable[..., Any]], Any]:
    """A Relay connection field over the items its ``source`` returns (``-> list[T]``, sync or
    async, with arguments of its own): the field takes those arguments and ``first``, ``after``,
    ``last``, ``before``, and answers ``Connection[T]``, the page ``paginate`` cuts."""

    def field(source: Callable[..., Any]) -> Any:
        hints = typing.get_type_hints(source)
        returned = hints["return"]
        if typing.get_origin(returned) is not list:  # Items[T]: the list, or an awaitable of it
            returned = next(a for a in typing.get_args(returned) if typing.get_origin(a) is list)
        (node,) = typing.get_args(returned)
        signature = inspect.signature(source)
        parameters = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
        ]
        parameters += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
            for name, kind in _PAGE_ARGUMENTS
        ]

        @functools.wraps(source)
        def resolve(
            *args: Any,
            first: int | None = None,
            after: str | None = None,
            last: int | None = None,
            before: str | None = None,
            **kwargs: Any,
        ) -> Connection[Any] | Awaitable[Connection[Any]]:
            window = Window(first=first, after=after, last=last, before=before)
            items = source(*args, **kwargs)
            if inspect.isawaitable(items):  # graphql-core awaits what a resolver returns
                return _paged(items, window)
            return paginate(items, window)

        resolve.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=parameters,
            return_annotation=Connection[node],  # type: ignore[valid-type]
        )
        return strawberry.field(resolver=resolve, description=description)

    return field
