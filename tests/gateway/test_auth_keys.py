"""API keys a server can refuse without a lookup, an LRU key cache, and the failed-auth throttle."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from test_limits import start_gateway

from citadel.accounts import keyformat
from citadel.accounts.auth import KeyAuthenticator
from citadel.accounts.schema import ApiKeyRow
from citadel.accounts.sql import SqlAccountStore, open_store
from citadel.accounts.store import KeyRecord
from citadel.errors import StoreUnavailable, Unauthorized, Unavailable
from citadel.gateway.throttle import AuthThrottle, client_address, parse_networks
from citadel.lru import LruCache
from citadel.metrics import Registry
from citadel.settings import DEFAULT_TIERS
from citadel.stores.sql import build_engine

from gateway_helpers import Stack, chat, post_json
from support import stop_process

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


# -- the key format ------------------------------------------------------------------------------


def test_new_keys_carry_a_checksum_that_a_typo_breaks() -> None:
    """A new key is well formed; changing any one character of it makes it malformed."""
    secret = keyformat.new_secret().encode()
    assert keyformat.LENGTH == len(secret)
    assert "valid" == keyformat.shape(secret)
    for i in range(len(keyformat.PREFIX), len(secret)):
        typo = bytearray(secret)
        typo[i] = ord("A") if secret[i] != ord("A") else ord("B")
        assert "malformed" == keyformat.shape(bytes(typo)), i


@pytest.mark.parametrize(
    "token",
    [b"", b"sk-cit-", b"sk-other-" + b"a" * 47, secrets.token_urlsafe(40).encode(), b"x" * 56],
)
def test_random_and_malformed_tokens_are_malformed(token: bytes) -> None:
    assert "malformed" == keyformat.shape(token)


def test_keys_of_the_old_format_are_legacy() -> None:
    """``sk-cit-`` and 43 random characters, as keys were made before the checksum."""
    assert "legacy" == keyformat.shape(("sk-cit-" + secrets.token_urlsafe(32)).encode())


# -- the LRU cache ---------------------------------------------------------------------------------


def test_the_lru_cache_evicts_only_the_least_recently_used() -> None:
    """When full, one insert evicts one entry: the one used longest ago."""
    cache: LruCache[int, str] = LruCache(3)
    for i in range(3):
        cache.put(i, str(i))
    assert "0" == cache.get(0)  # 0 is now the most recently used; 1 the least
    cache.put(3, "3")
    assert (3, None, "0", "2", "3") == (
        len(cache),
        cache.get(1),
        cache.get(0),
        cache.get(2),
        cache.get(3),
    )


# -- the authenticator over a real SQLite accounts store --------------------------------------


class _Switchable:
    """The real store, with a switch that makes it unreachable (as a database outage would)."""

    def __init__(self, store: SqlAccountStore) -> None:
        self.store = store
        self.down = False
        self.lookups = 0

    async def find_key(self, digest: bytes) -> KeyRecord | None:
        self.lookups += 1
        if self.down:
            raise StoreUnavailable("accounts", "down (test switch)")
        return await self.store.find_key(digest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _authenticator(
    tmp_path: Path, *, cache_size: int = 100, accept_legacy: bool = True
) -> tuple[KeyAuthenticator, _Switchable, _Clock, str]:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'accounts.db'}", migrate=True)
    user = await store.create_user(name="u", email="u@example.com", tier="free")
    _, secret = await store.create_key(user.id, name="k")
    switch = _Switchable(store)
    clock = _Clock()
    auth = KeyAuthenticator(
        switch,  # type: ignore[arg-type]  # the store's protocol, through __getattr__
        admin_key="sk-admin",
        tiers={t.name: t for t in DEFAULT_TIERS},
        default_tier="free",
        ttl=5.0,
        registry=Registry(),
        cache_size=cache_size,
        accept_legacy=accept_legacy,
        clock=clock,
    )
    return auth, switch, clock, secret


def test_malformed_keys_are_refused_without_a_lookup(tmp_path: Path) -> None:
    """Random keys are 401s with no store lookup, even while the store is down."""

    async def go() -> tuple[int, int]:
        auth, switch, _, _ = await _authenticator(tmp_path)
        switch.down = True
        refused = 0
        for _ in range(200):
            try:
                await auth.authenticate(b"Bearer " + secrets.token_urlsafe(40).encode())
            except Unauthorized:
                refused += 1
        await switch.store.aclose()
        return refused, switch.lookups

    assert (200, 0) == run(go())


def test_a_known_key_keeps_working_through_an_outage_after_a_flood(tmp_path: Path) -> None:
    """A flood of well-formed unknown keys evicts no known key: it is served while the store is
    down, past its TTL; an unseen key then gets a 503."""

    async def go() -> str:
        auth, switch, clock, secret = await _authenticator(tmp_path, cache_size=10)
        bearer = b"Bearer " + secret.encode()
        principal = await auth.authenticate(bearer)
        for _ in range(300):  # unknown, well formed: looked up once each, remembered apart
            with pytest.raises(Unauthorized):
                await auth.authenticate(b"Bearer " + keyformat.new_secret().encode())
        switch.down = True
        clock.now += 60.0  # every entry is stale
        assert principal == await auth.authenticate(bearer)
        with pytest.raises(Unavailable):
            await auth.authenticate(b"Bearer " + keyformat.new_secret().encode())
        await switch.store.aclose()
        return principal.user

    assert run(go())


def test_legacy_keys_are_looked_up_unless_turned_off(tmp_path: Path) -> None:
    """A stored key of the old format works; with accept_legacy off it is refused unseen."""

    async def go() -> tuple[str, int]:
        auth, switch, _, _ = await _authenticator(tmp_path / "a")
        off, off_switch, _, _ = await _authenticator(tmp_path / "b", accept_legacy=False)
        legacy = "sk-cit-" + secrets.token_urlsafe(32)
        store = switch.store
        user = await store.create_user(name="old", email="old@example.com", tier="free")
        key, _ = await store.create_key(user.id, name="old")
        # A key row as the old format stored it: the digest of an old-format secret.
        engine = build_engine(f"sqlite+aiosqlite:///{tmp_path / 'a' / 'accounts.db'}")
        async with engine.begin() as conn:
            await conn.execute(
                sa.update(ApiKeyRow)
                .where(ApiKeyRow.id == key.id)
                .values(digest=hashlib.sha256(legacy.encode()).digest())
            )
        await engine.dispose()
        principal = await auth.authenticate(b"Bearer " + legacy.encode())
        with pytest.raises(Unauthorized):
            await off.authenticate(b"Bearer " + legacy.encode())
        await store.aclose()
        await off_switch.store.aclose()
        return principal.user, off_switch.lookups

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    user, lookups = run(go())
    assert user.startswith("usr")
    assert 0 == lookups


# -- client addresses and the throttle ----------------------------------------------------------


def test_client_address_is_the_peer_unless_a_trusted_proxy_forwards() -> None:
    trusted = parse_networks(["10.0.0.0/8", "::1"])
    assert "203.0.113.9" == client_address("203.0.113.9:5555", b"198.51.100.1", trusted)
    assert "198.51.100.1" == client_address("10.1.2.3:5555", b"6.6.6.6, 198.51.100.1", trusted)
    # the right-most untrusted hop: a client-written left part cannot hide it
    assert "198.51.100.1" == client_address("[::1]:80", b"198.51.100.1, 10.9.9.9", trusted)
    assert "10.1.2.3" == client_address("10.1.2.3:5555", None, trusted)
    assert "10.1.2.3" == client_address("10.1.2.3:5555", b"1.2.3.4", ())


def test_the_throttle_refuses_after_the_limit_until_the_window_ends() -> None:
    throttle = AuthThrottle(limit=3, window=60.0)
    for t in range(3):
        assert 0 == throttle.retry_after("a", 100.0 + t)
        throttle.failed("a", 100.0 + t)
    assert 58 == throttle.retry_after("a", 102.0)
    assert 0 == throttle.retry_after("b", 102.0)  # per address
    assert 0 == throttle.retry_after("a", 160.0)  # the window ended


def test_the_gateway_answers_429_with_retry_after_after_repeated_failures(
    stack: Stack, tmp_path: Path
) -> None:
    """A client that fails authentication N times is refused for a while, before any key check."""
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f"""
gateway: {{auth_failure_limit: 3, auth_failure_window_seconds: 30}}
accounts: {{database: "sqlite+aiosqlite:///{tmp_path / "accounts.db"}"}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "{stack.sim}", model: sim-chat}}]
"""
    )
    proc, url = start_gateway(config)
    try:
        bad = {"authorization": "Bearer " + keyformat.new_secret()}
        statuses = [
            post_json(url, "/v1/chat/completions", chat(), bad, auth=False)[0] for _ in range(3)
        ]
        status, headers, _ = post_json(url, "/v1/chat/completions", chat(), auth=True)
    finally:
        stop_process(proc)
    assert [401, 401, 401] == statuses
    assert 429 == status  # even the admin key: the address is refused first
    assert 25 <= int(headers["retry-after"]) <= 30
