"""Health of a service's dependencies, shared by both HTTP stacks (``citadel.service`` and
``citadel.web``): each dependency has a check, bounded in time, and ``/health`` combines them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["DependencyHealth", "HealthCheck", "Status", "check_all", "store_scheme"]

Status = Literal["ok", "degraded", "down", "disabled"]


@dataclass(frozen=True, slots=True)
class DependencyHealth:
    """The state of one dependency: ``critical`` ones take the whole service down with them."""

    status: Status
    detail: str = ""
    critical: bool = False


HealthCheck = Callable[[], Awaitable[DependencyHealth]]

_HEALTH_TIMEOUT = 2.0


async def check_all(
    checks: Mapping[str, HealthCheck],
) -> tuple[Status, dict[str, dict[str, str]]]:
    """Run every dependency check (each bounded in time) and combine them: a critical dependency
    that is down takes the service down; any other one down or degraded makes it degraded."""
    names = list(checks)
    results = await asyncio.gather(*(_run_check(checks[name]) for name in names))
    overall: Status = "ok"
    deps: dict[str, dict[str, str]] = {}
    for name, result in zip(names, results, strict=True):
        deps[name] = {"status": result.status, "detail": result.detail}
        if result.status == "down" and result.critical:
            overall = "down"
        elif result.status in ("down", "degraded") and overall == "ok":
            overall = "degraded"
    return overall, deps


async def _run_check(check: HealthCheck) -> DependencyHealth:
    try:
        return await asyncio.wait_for(check(), _HEALTH_TIMEOUT)
    except TimeoutError:
        return DependencyHealth("down", f"no answer within {_HEALTH_TIMEOUT} s")
    except Exception as exc:
        return DependencyHealth("down", f"{type(exc).__name__}: {exc}")


def store_scheme(uri: str) -> str:
    """What kind of store a URI names (``postgresql``, ``sqlite``, ``redis``), nothing secret."""
    return uri.partition(":")[0].partition("+")[0]
