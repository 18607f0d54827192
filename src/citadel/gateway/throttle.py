"""Who is calling from where, and a short refusal after repeated failed authentication. Pure.

``client_address``: the socket's peer, unless that peer is one of ``gateway.trusted_proxies``
(addresses or networks); then the right-most address of ``X-Forwarded-For`` that is not itself a
trusted proxy (a client can write any left part of that header, never the part its proxy
appended).

``AuthThrottle`` counts failed authentications per client address in a fixed window: once an
address has failed ``limit`` times within ``window`` seconds it is refused (429 with
``Retry-After``) until the window ends, before any key is checked. Success does not reset the
count (a guesser with one good key would). The map of addresses is bounded (least recently
failed evicted first), so a spread of addresses cannot grow it without end.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass

from citadel.lru import LruCache

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[_Network, ...]:
    """``gateway.trusted_proxies`` entries as networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def _host(peer: str) -> str:
    """The host of a ``host:port`` peer (``[v6]:port`` and ``v6:port`` too)."""
    host, sep, _ = peer.rpartition(":")
    return (host if sep else peer).strip("[]")


def _trusted(host: str, networks: tuple[_Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_address(peer: str, forwarded_for: bytes | None, trusted: tuple[_Network, ...]) -> str:
    """The address a request comes from; see the module docstring."""
    host = _host(peer)
    if not trusted or forwarded_for is None or not _trusted(host, trusted):
        return host
    hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64]  # a client-written value: bounded
    return host


@dataclass(slots=True)
class _Window:
    started: float
    failures: int


class AuthThrottle:
    """Failed authentications per address; ``retry_after`` says when a refused one may retry."""

    __slots__ = ("_limit", "_window", "_windows")

    def __init__(self, *, limit: int, window: float, addresses: int = 65_536) -> None:
        self._limit = limit
        self._window = window
        self._windows: LruCache[str, _Window] = LruCache(addresses)

    def retry_after(self, address: str, now: float) -> int:
        """Seconds ``address`` must wait before trying again (0: it may try now)."""
        if self._limit <= 0:
            return 0
        entry = self._windows.get(address)
        if entry is None or entry.failures < self._limit:
            return 0
        left = entry.started + self._window - now
        return math.ceil(left) if left > 0 else 0

    def failed(self, address: str, now: float) -> None:
        """Count one failed authentication from ``address``."""
        if self._limit <= 0:
            return
        entry = self._windows.get(address)
        if entry is None or now - entry.started >= self._window:
            self._windows.put(address, _Window(now, 1))
        else:
            entry.failures += 1
