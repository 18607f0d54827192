"""A client that leaves while its admission is under way strands no reservation."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from citadel.accounts.auth import Principal
from citadel.gateway.proxy import Gateway
from citadel.http.client import HttpClient
from citadel.http.server import Request
from citadel.limits.decision import LimitDecision
from citadel.limits.memory import MemoryLimiter
from citadel.limits.policy import effective_limits
from citadel.metering.events import MemorySink
from citadel.metrics import Registry
from citadel.settings import Deployment, GatewaySettings, Model, Settings, Tier

TIER = Tier(name="pair", concurrent_requests=2)
PRINCIPAL = Principal(
    user="usr_slow", key_id="key_slow", tier="pair", limits=effective_limits(TIER, {})
)


class _Caller:
    async def authenticate(self, authorization: bytes | None) -> Principal:
        return PRINCIPAL


class _SlowStore(MemoryLimiter):
    """The real memory limiter behind a store that answers slowly (a busy Redis)."""

    async def admit(self, *args: Any, **kwargs: Any) -> LimitDecision:
        await asyncio.sleep(0.2)
        return await super().admit(*args, **kwargs)


def test_a_client_gone_during_admission_gets_its_slot_back_and_a_499_event() -> None:
    settings = Settings(
        gateway=GatewaySettings(admin_key="sk-x"),
        models=(
            Model(
                name="m",
                deployments=(Deployment(name="d", url="http://127.0.0.1:9", upstream_model="m"),),
            ),
        ),
        tiers=(TIER,),
    )
    limiter = _SlowStore(timezone="UTC", lease_ttl=600)
    sink = MemorySink()

    async def go() -> int:
        gateway = Gateway(
            settings,
            client=HttpClient(),
            authenticator=_Caller(),
            registry=Registry(),
            usage=sink,
            limiter=limiter,
        )
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        tasks = []
        for i in range(2):
            request = Request("POST", "/v1/chat/completions", "", {}, body, "127.0.0.1:1", False)
            request.request_id = f"gone-{i}"
            tasks.append(asyncio.ensure_future(gateway.forward("chat", request)))
        await asyncio.sleep(0.05)  # both are inside the limiter's admit
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.4)  # the admissions finish, then settle in the background
        await gateway.drain()
        usage = await limiter.usage(PRINCIPAL.user, PRINCIPAL.limits, 0.0)  # type: ignore[arg-type]
        return next(u.used for u in usage.limits if u.name == "concurrent_requests")

    assert 0 == asyncio.run(go())
    assert [499, 499] == [e.status for e in sink.events]
    assert {"gone-0", "gone-1"} == {e.request_id for e in sink.events}
