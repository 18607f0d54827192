"""Active health checks: probe every deployment on an interval and tell the router.

A deployment turns unhealthy after ``unhealthy_after`` consecutive failed probes and healthy
again after ``healthy_after`` good ones, so one lost probe does not flap it. A probe is a GET of
``path`` (``/v1/models`` by default: every OpenAI-compatible server answers it) that must answer
2xx within ``timeout_seconds``. The verdicts are plain data (``ProbeTracker``); the loop is the
adapter that does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from citadel.http.client import ConnectError, HttpClient, Origin, ProtocolError, ReadTimeout
from citadel.settings import HealthSettings, Settings

_log = logging.getLogger("citadel.routing.health")


@dataclass(slots=True)
class ProbeTracker:
    """Consecutive probe results of one deployment, and the verdict they add up to."""

    unhealthy_after: int
    healthy_after: int
    healthy: bool = True
    failures: int = 0
    successes: int = 0

    def observe(self, ok: bool) -> bool | None:
        """Record a probe; return the new verdict when it changed, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.healthy_after:
                self.healthy = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= self.unhealthy_after:
                self.healthy = False
                return False
        return None


Report = Callable[[str, bool, str], None]  # deployment name, healthy, detail


class HealthProber:
    """Probes every deployment of the settings each interval, reporting verdicts to ``report``."""

    def __init__(self, settings: Settings, client: HttpClient, report: Report) -> None:
        self._config: HealthSettings = settings.routing.health
        self._client = client
        self._report = report
        self._targets = [
            (d.name, Origin.parse(d.url), d.api_key) for m in settings.models for d in m.deployments
        ]
        self._trackers = {
            name: ProbeTracker(self._config.unhealthy_after, self._config.healthy_after)
            for name, _, _ in self._targets
        }
        self._task: asyncio.Task[None] | None = None

    async def probe_all(self) -> None:
        """One round of probes, concurrently."""
        await asyncio.gather(*(self._probe(*target) for target in self._targets))

    async def _probe(self, name: str, origin: Origin, api_key: str | None) -> None:
        timeout = self._config.timeout_seconds
        headers = [(b"authorization", b"Bearer " + api_key.encode())] if api_key else []
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.request(
                    "GET",
                    origin,
                    self._config.path,
                    headers,
                    b"",
                    connect_timeout=timeout,
                    first_byte_timeout=timeout,
                )
                await response.read()
            ok, detail = 200 <= response.status < 300, f"probe answered {response.status}"
        except (ConnectError, ReadTimeout, ProtocolError, TimeoutError) as exc:
            ok, detail = False, f"probe failed: {type(exc).__name__}: {exc}"
        verdict = self._trackers[name].observe(ok)
        if verdict is not None:
            _log.info("deployment health changed", extra={"deployment": name, "healthy": verdict})
        self._report(name, self._trackers[name].healthy, detail)

    async def run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a bug here must not stop health checking
                _log.exception("health probe round failed")
            await asyncio.sleep(self._config.interval_seconds)

    async def start(self) -> None:
        if self._config.enabled and self._targets:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
