"""Which faults one simulated request suffers, and the per-request control headers. Pure: no I/O.

A request that carries ``x-sim-fault`` gets exactly the faults the header names and nothing from
the server's flags, so a test can pin a request's behaviour whatever the server was started with;
``x-sim-fault: none`` asks for no fault at all. The header is a comma-separated list of:

    status=CODE      answer with that error status (400-599) and an OpenAI-style error body
    latency=MS       wait MS milliseconds more before the first byte
    hang             never answer (until the client goes away, or an hour has passed)
    disconnect=N     close the connection after N content tokens (a whole response: before it)
    malformed        answer 200 with a body that is not JSON (a stream: one garbage event)
    linger=MS        a stream: hold the response open MS milliseconds after ``[DONE]`` before
                     ending it (an upstream whose end lags its last event)
    none             no fault

``latency`` and ``linger`` combine with any other; of ``status``, ``hang``, ``disconnect`` and
``malformed`` at most one may be named, since each of them is the end of the response.

Without the header the server's flags decide: ``--latency-ms`` applies to every request, and one
uniform draw in [0, 1) picks at most one other fault, the rates laid end to end on that interval
(hang, then error, then disconnect, then malformed); where the draw falls inside the error band
also picks the status among ``--error-codes``. The caller passes the draw in as a function, called
only when the configuration has a rate to draw for, so a seeded generator gives the same faults to
the same sequence of requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from citadel.errors import BadRequest
from citadel.sim.config import SimConfig

__all__ = [
    "FAULT_HEADER",
    "NO_FAULTS",
    "Faults",
    "decide",
    "draw_faults",
    "parse_fault_header",
    "parse_milliseconds",
]

FAULT_HEADER = "x-sim-fault"
_MAX_LATENCY_MS = 3_600_000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Faults:
    """The faults decided for one request."""

    status: int | None = None
    latency_ms: float = 0.0
    hang: bool = False
    disconnect_after: int | None = None
    malformed: bool = False
    linger_ms: float = 0.0

    @property
    def kinds(self) -> tuple[str, ...]:
        """The names of the faults present, as counted by ``citadel_sim_faults_injected_total``."""
        kinds: list[str] = []
        if self.latency_ms > 0:
            kinds.append("latency")
        if self.hang:
            kinds.append("hang")
        if self.status is not None:
            kinds.append("status")
        if self.disconnect_after is not None:
            kinds.append("disconnect")
        if self.malformed:
            kinds.append("malformed")
        if self.linger_ms > 0:
            kinds.append("linger")
        return tuple(kinds)


NO_FAULTS = Faults()


def decide(config: SimConfig, header: str | None, draw: Callable[[], float]) -> Faults:
    """The faults of one request: the header's if it has one, else drawn from the flags."""
    if header is not None:
        return parse_fault_header(header)
    return draw_faults(config, draw)


def draw_faults(config: SimConfig, draw: Callable[[], float]) -> Faults:
    """The faults the server's flags give one request; ``draw()`` is uniform in [0, 1)."""
    latency = config.latency_ms
    if config.fault_rate_total <= 0.0:
        return Faults(latency_ms=latency) if latency > 0 else NO_FAULTS
    u = draw()
    if u < config.hang_rate:
        return Faults(latency_ms=latency, hang=True)
    u -= config.hang_rate
    if u < config.error_rate:
        codes = config.error_codes
        pick = min(int(u / config.error_rate * len(codes)), len(codes) - 1)
        return Faults(latency_ms=latency, status=codes[pick])
    u -= config.error_rate
    if u < config.disconnect_rate:
        return Faults(latency_ms=latency, disconnect_after=config.disconnect_after)
    u -= config.disconnect_rate
    if u < config.malformed_rate:
        return Faults(latency_ms=latency, malformed=True)
    return Faults(latency_ms=latency) if latency > 0 else NO_FAULTS


def parse_fault_header(value: str) -> Faults:
    """The faults named by an ``x-sim-fault`` header; a bad value raises ``BadRequest``."""
    status: int | None = None
    latency = linger = 0.0
    hang = malformed = False
    disconnect: int | None = None
    seen: set[str] = set()
    for item in value.split(","):
        name, eq, arg = item.strip().partition("=")
        name, arg = name.strip().lower(), arg.strip()
        if not name:
            raise _bad_fault(value, "an empty item; expected a comma-separated list of faults")
        if name in seen:
            raise _bad_fault(value, f"{name!r} is named twice")
        seen.add(name)
        if name in ("hang", "malformed", "none"):
            if eq:
                raise _bad_fault(value, f"{name!r} takes no value")
            hang = hang or name == "hang"
            malformed = malformed or name == "malformed"
        elif name in ("status", "latency", "disconnect", "linger"):
            if not arg:
                raise _bad_fault(value, f"{name!r} needs a value, as in {name}={_EXAMPLES[name]}")
            if name == "status":
                status = _int_in(value, name, arg, 400, 599)
            elif name == "disconnect":
                disconnect = _int_in(value, name, arg, 0, 1_000_000)
            else:
                ms = _milliseconds(arg)
                if ms < 0:
                    raise _bad_fault(value, f"{name}={arg} is not a number of milliseconds >= 0")
                if name == "latency":
                    latency = ms
                else:
                    linger = ms
        else:
            raise _bad_fault(
                value,
                f"unknown fault {name!r}; expected status=CODE, latency=MS, hang, "
                "disconnect=N, malformed, linger=MS or none",
            )
    if "none" in seen and len(seen) > 1:
        raise _bad_fault(value, "'none' cannot be combined with other faults")
    ending = seen & {"status", "hang", "disconnect", "malformed"}
    if len(ending) > 1:
        named = ", ".join(sorted(ending))
        raise _bad_fault(
            value, f"{named}: at most one of status, hang, disconnect and malformed may be named"
        )
    if not seen - {"none"}:
        return NO_FAULTS
    return Faults(
        status=status,
        latency_ms=latency,
        hang=hang,
        disconnect_after=disconnect,
        malformed=malformed,
        linger_ms=linger,
    )


def parse_milliseconds(header: str, value: str) -> float:
    """A per-request delay header (``x-sim-ttft-ms``, ``x-sim-tbt-ms``) as milliseconds."""
    ms = _milliseconds(value.strip())
    if ms < 0:
        raise BadRequest(
            f"Invalid '{header}' header: {value!r}; expected a number of milliseconds "
            f"between 0 and {_MAX_LATENCY_MS:.0f}.",
            param=header,
            code="invalid_header",
        )
    return ms


_EXAMPLES = {"status": "503", "latency": "200", "disconnect": "3", "linger": "500"}


def _milliseconds(text: str) -> float:
    """``text`` as a finite number of milliseconds up to an hour, or -1 if it is not one."""
    try:
        ms = float(text)
    except ValueError:
        return -1.0
    return ms if math.isfinite(ms) and 0 <= ms <= _MAX_LATENCY_MS else -1.0


def _int_in(value: str, name: str, arg: str, low: int, high: int) -> int:
    if not (arg.isascii() and arg.isdigit()) or not low <= int(arg) <= high:
        raise _bad_fault(value, f"{name}={arg} is not an integer between {low} and {high}")
    return int(arg)


def _bad_fault(value: str, reason: str) -> BadRequest:
    return BadRequest(
        f"Invalid '{FAULT_HEADER}' header {value!r}: {reason}.",
        param=FAULT_HEADER,
        code="invalid_header",
    )
