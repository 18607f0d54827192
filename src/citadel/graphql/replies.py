"""GraphQL object types made from the REST services' msgspec replies, so the two cannot drift.

The REST services define each reply once, as a ``msgspec.Struct`` (its OpenAPI schema and its
encoding). Where the graph shows the same object, its type is generated from that Struct: the
same fields (snake_case, camelCased by Strawberry), the same descriptions (``msgspec.Meta``),
and its values are the reply's, converted field by field:

    @from_reply(EvaluationReply, nested={FindingReply: Finding})
    class Evaluation(FromReply):
        '''The latest evaluation of one alert rule.'''

    Evaluation.of_reply(EvaluationReply.of(record))

A field added to the reply is in the graph too (``citadel graphql schema`` shows it, and the SDL
test asks for the checked-in file to follow). The mapping: ``int``, ``float``, ``str``, ``bool``
as they are; an RFC 3339 string (the bodies' ``Time``) as ``DateTime``; ``Literal`` as ``String``;
``dict`` as ``JSON``; ``X | None`` (or unset) as a nullable ``X``; ``list[X]`` as a list; a nested
Struct as the type given for it in ``nested``; ``id`` and ``*_id`` strings as ``ID``. The
replies' ``object`` tag is left out, and so are their ``*_micros`` twins of the dollar amounts:
micro-dollars pass GraphQL's 32-bit ``Int`` at 2,147 USD, and the graph shows dollars.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import msgspec
import strawberry
from strawberry.scalars import JSON

__all__ = ["FromReply", "from_reply"]

_Convert = Callable[[Any], Any]
C = TypeVar("C", bound=type)


class FromReply:
    """The base of a generated type: ``of_reply`` builds one from the reply's values."""

    __reply_fields__: ClassVar[tuple[tuple[str, _Convert], ...]] = ()

    @classmethod
    def of_reply(cls, reply: msgspec.Struct) -> Any:
        values = {name: convert(getattr(reply, name)) for name, convert in cls.__reply_fields__}
        return cls(**values)


def _same(value: Any) -> Any:
    return value


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _optional(convert: _Convert) -> _Convert:
    def optional(value: Any) -> Any:
        return None if value is None or value is msgspec.UNSET else convert(value)

    return optional


def _items(convert: _Convert) -> _Convert:
    def items(value: Any) -> Any:
        return [convert(v) for v in value]

    return items


def _field(hint: Any, nested: Mapping[type, type]) -> tuple[Any, str | None, _Convert]:
    """The GraphQL annotation, description and value conversion of one reply field."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *metadata = typing.get_args(hint)
        description = next(
            (m.description for m in metadata if isinstance(m, msgspec.Meta) and m.description),
            None,
        )
        if base is str and description is not None and description.startswith("RFC 3339"):
            return datetime, None, _time
        annotation, inner, convert = _field(base, nested)
        return annotation, description or inner, convert
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a not in (type(None), msgspec.UnsetType)]
        if len(rest) != 1:
            raise TypeError(f"no GraphQL type for the union {hint!r}")
        annotation, description, convert = _field(rest[0], nested)
        return annotation | None, description, _optional(convert)
    if origin is Literal:
        return str, None, _same
    if origin is list:
        annotation, description, convert = _field(typing.get_args(hint)[0], nested)
        return list[annotation], description, _items(convert)  # type: ignore[valid-type]
    if origin is dict or hint is dict:
        return JSON, None, lambda value: JSON(dict(value))
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        target = nested.get(hint)
        if target is None or not issubclass(target, FromReply):
            raise TypeError(f"no GraphQL type given for the nested reply {hint.__name__}")
        return target, None, target.of_reply
    if hint in (int, float, str, bool):
        return hint, None, _same
    raise TypeError(f"no GraphQL type for {hint!r}")


def _identifier(annotation: Any, convert: _Convert) -> tuple[Any, _Convert]:
    """A string field as ``ID`` (nullable if it was)."""
    if annotation is str:
        return strawberry.ID, lambda value: strawberry.ID(convert(value))
    if annotation == (str | None):
        return (
            strawberry.ID | None,
            lambda value: None if value is None else strawberry.ID(convert(value)),
        )
    return annotation, convert


def from_reply(
    reply: type[msgspec.Struct], *, nested: Mapping[type, type] | None = None
) -> Callable[[C], C]:
    """Make the decorated ``FromReply`` subclass the GraphQL type of ``reply``'s fields (its
    docstring: the type's description)."""

    def make(cls: C) -> C:
        if not issubclass(cls, FromReply):
            raise TypeError(f"{cls.__name__} must subclass FromReply")
        hints = typing.get_type_hints(reply, include_extras=True)
        annotations: dict[str, Any] = {}
        plan: list[tuple[str, _Convert]] = []
        for field in msgspec.structs.fields(reply):
            if field.name == "object" or field.name.endswith("_micros"):
                continue
            annotation, description, convert = _field(hints[field.name], nested or {})
            if field.name == "id" or field.name.endswith("_id"):
                annotation, convert = _identifier(annotation, convert)
            annotations[field.name] = annotation
            setattr(cls, field.name, strawberry.field(description=description))
            plan.append((field.name, convert))
        cls.__annotations__ = annotations
        cls.__reply_fields__ = tuple(plan)
        return strawberry.type(cls, description=(cls.__doc__ or "").strip() or None)

    return make
