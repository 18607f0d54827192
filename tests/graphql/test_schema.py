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


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@pytest.mark.parametrize(
    ("graphql_type", "reply"),
    [
        ("Evaluation", "citadel.alerting.bodies:EvaluationReply"),
        ("Finding", "citadel.alerting.bodies:FindingReply"),
        ("ForecastPoint", "citadel.alerting.bodies:ForecastReply"),
        ("Limits", "citadel.limits.bodies:LimitsReply"),
        ("Budget", "citadel.metering.bodies:BudgetRow"),
        ("DeploymentCostItem", "citadel.metering.bodies:CostRow"),
        ("SavingsItem", "citadel.metering.bodies:SavingsRow"),
    ],
)
def test_graphql_types_have_the_fields_of_the_rest_reply_they_are_made_from(
    graphql_type: str, reply: str
) -> None:
    """A field added to a REST reply is in the graph too (no copy of its fields to drift)."""
    import importlib

    import msgspec

    module, _, name = reply.partition(":")
    struct = getattr(importlib.import_module(module), name)
    wanted = [
        _camel(f.name)
        for f in msgspec.structs.fields(struct)
        if f.name != "object" and not f.name.endswith("_micros")
    ]
    served = build_schema()._schema.type_map[graphql_type]
    assert wanted == list(served.fields)  # type: ignore[attr-defined]


def test_a_reply_type_converts_times_ids_nested_replies_and_unset() -> None:
    from citadel.alerting.bodies import EvaluationReply, FindingReply, ForecastReply
    from citadel.graphql.alerting import Evaluation

    reply = EvaluationReply(
        rule="r", kind="forecast", source="up", threshold=1.0, direction="above",
        severity="warning", at="2026-12-02T08:00:00Z", outcome="firing", error=None,
        duration_seconds=0.5,
        findings=[FindingReply(series={"job": "x"}, outcome="firing", detail="d", points=3,
                               value=2.0, model="linear", crossing_at=None,
                               forecast=ForecastReply(at=None, mean=1.5, lower=None, upper=None),
                               score=None, warming_up=True)],
    )  # fmt: skip
    built = Evaluation.of_reply(reply)
    assert "2026-12-02T08:00:00+00:00" == built.at.isoformat()
    assert {"job": "x"} == built.findings[0].series
    assert 1.5 == built.findings[0].forecast.mean
    assert built.findings[0].forecast.at is None
    assert built.findings[0].warming_up is True
