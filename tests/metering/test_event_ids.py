"""Event ids: 32 hex digits, unique, in time order (the ledger's primary key appends)."""

from __future__ import annotations

import pytest

from citadel.metering.events import new_event_id
from citadel.metering.ledger import decode_row, encode_event

from support import usage_event


def test_ids_sort_by_time_and_are_unique_within_a_millisecond() -> None:
    """Later ids sort after earlier ones; ids of the same millisecond differ (random tail)."""
    times = [1_717_200_000.0 + i * 0.0007 for i in range(2000)]
    ids = [new_event_id(t) for t in times]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    prefixes = [i[:12] for i in ids]
    assert prefixes == sorted(prefixes)
    assert int(ids[0][:12], 16) == 1_717_200_000_000


def test_the_random_part_can_be_given_for_reproducible_ids() -> None:
    """A seeded caller (the benchmark) gets the same id for the same time and bytes."""
    assert "018fd1189400" + "00" * 10 == new_event_id(1_717_200_000.0, bytes(10))
    with pytest.raises(ValueError, match="10 bytes"):
        new_event_id(0.0, b"short")


def test_the_ledger_accepts_the_ids() -> None:
    """An event with such an id survives the stream encoding and the ledger's checks."""
    event_id = new_event_id(1_717_200_000.5)
    event = usage_event(event_id=event_id, time=1_717_200_000.5)
    assert event_id == decode_row(encode_event(event))[0]
