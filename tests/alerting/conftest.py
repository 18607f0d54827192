"""The ``stack`` fixture: one real Prometheus + Alertmanager + gateway for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from promstack import Stack, start_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("alerting")) as found:
        yield found
