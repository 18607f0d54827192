"""The schema as checked in (docs/graphql.schema.graphql), the documented queries, and the cost
model and pagination as pure functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from graphql import parse, validate

from citadel.errors import BadRequest
from citadel.graphql.pagination import Window, paginate
from citadel.graphql.protect import actual_cost, requested_cost
from citadel.graphql.schema import build_schema

DOCS = Path(__file__).parents[2] / "docs"


def test_the_checked_in_sdl_is_the_schema_served() -> None:
    served = build_schema().as_str() + "\n"
    checked_in = (DOCS / "graphql.schema.graphql").read_text()
    assert checked_in == served, (
        "docs/graphql.schema.graphql is stale: "
        "regenerate it with `citadel graphql schema > docs/graphql.schema.graphql`"
    )


def test_every_documented_query_is_valid() -> None:
    schema = build_schema()._schema
    blocks = re.findall(r"```graphql\n(.*?)```", (DOCS / "graphql.md").read_text(), re.DOTALL)
    assert len(blocks) >= 6  # five queries and a mutation
    for block in blocks:
        errors = validate(schema, parse(block))
        assert [] == errors, block


@pytest.mark.parametrize(
    ("query", "variables", "cost"),
    [
        ("{ viewer { admin } }", {}, 1),
        ("{ teams(first: 10) { nodes { users(first: 10) { nodes { name } } } } }", {}, 121),
        ("query ($n: Int) { teams(first: $n) { nodes { id } } }", {"n": 7}, 8),
        ("{ teams { edges { cursor node { id } } } }", {}, 1 + 20 * 2),  # default page: 20
        ("{ teams(first: 5) { ...T } } fragment T on TeamConnection { nodes { id } }", {}, 6),
        ("{ models(first: 2) { nodes { deployments(last: 3) { nodes { name } } } } }", {}, 11),
    ],
)
def test_requested_cost(query: str, variables: dict[str, int], cost: int) -> None:
    schema = build_schema()._schema
    assert cost == requested_cost(schema, parse(query), variables, None)


def test_actual_cost_counts_the_objects_of_an_answer() -> None:
    data = {"teams": {"nodes": [{"id": "a", "users": {"nodes": [{"name": "x"}]}}, {"id": "b"}]}}
    assert 5 == actual_cost(data)
    assert 0 == actual_cost(None)


def test_pages_forwards_and_backwards_by_cursor() -> None:
    items = list(range(7))
    first = paginate(items, Window(first=3))
    assert [0, 1, 2] == first.nodes
    assert first.page_info.has_next_page
    assert not first.page_info.has_previous_page
    second = paginate(items, Window(first=3, after=first.page_info.end_cursor))
    assert [3, 4, 5] == second.nodes
    last = paginate(items, Window(last=2))
    assert [5, 6] == last.nodes
    assert last.page_info.has_previous_page
    before = paginate(items, Window(last=2, before=last.page_info.start_cursor))
    assert [3, 4] == before.nodes
    assert 7 == before.total_count


@pytest.mark.parametrize(
    ("window", "param"),
    [
        (Window(first=0), "first"),
        (Window(last=101), "last"),
        (Window(first=1, last=1), "last"),
        (Window(after="not-a-cursor"), "after"),
        (Window(before="Y3Vyc29yOng="), "before"),  # cursor:x
    ],
)
def test_bad_page_arguments_name_themselves(window: Window, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        paginate([1, 2, 3], window)
    assert param == caught.value.param
