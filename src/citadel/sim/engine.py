"""The simulator's scheduler: vLLM's admission reduced to its two limits, per model.

At most ``--max-num-seqs`` requests of a model run at once (0: no limit), and the requests
running hold at most ``--kv-cache-tokens`` tokens of KV cache: each holds its prompt and its
whole completion from admission to its end (vLLM allocates blocks as tokens are generated; the
simulator reserves them up front, which saturates a little earlier). A request that does not fit
waits, first come first served; one that could never fit runs when nothing else does, so nothing
waits forever. The three gauges are vLLM's: ``vllm:num_requests_running``,
``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``.

Admission that fits is synchronous (``try_admit``: a few integer operations, no await), so the
simulator stays cheap as the upstream of every benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from citadel.metrics import SIM_KV_CACHE, SIM_RUNNING, SIM_WAITING, Registry

__all__ = ["Engine"]


class Engine:
    """One model's running and waiting requests and the KV cache they hold."""

    __slots__ = (
        "_labels",
        "_max_seqs",
        "_running_g",
        "_usage",
        "_waiters",
        "_waiting",
        "capacity",
        "held",
        "running",
    )

    def __init__(
        self, model: str, *, max_num_seqs: int, kv_cache_tokens: int, registry: Registry
    ) -> None:
        self._labels = (model,)
        self._max_seqs = max_num_seqs
        self.capacity = kv_cache_tokens
        self.running = 0
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._running_g = registry.gauge(SIM_RUNNING)
        self._waiting = registry.gauge(SIM_WAITING)
        self._usage = registry.gauge(SIM_KV_CACHE)
        self._publish()

    def _fits(self, need: int) -> bool:
        if self._max_seqs and self.running >= self._max_seqs:
            return False
        return self.running == 0 or self.held + need <= self.capacity

    def _publish(self) -> None:
        self._running_g.set(self._labels, self.running)
        self._waiting.set(self._labels, len(self._waiters))
        self._usage.set(self._labels, min(1.0, self.held / self.capacity))

    def try_admit(self, need: int) -> bool:
        """Admit a request holding ``need`` tokens now if it fits and nobody waits before it."""
        if self._waiters or not self._fits(need):
            return False
        self.running += 1
        self.held += need
        self._publish()
        return True

    async def admit(self, need: int) -> None:
        """Admit, waiting in line when the request does not fit; cancellable while waiting."""
        if self.try_admit(need):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (need, future)
        self._waiters.append(entry)
        self._publish()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(need)  # admitted as the waiter was cancelled: give it back
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(entry)
                self._wake()
                self._publish()
            raise

    def release(self, need: int) -> None:
        """A request admitted with ``need`` tokens ended: free its slot and cache, wake waiters."""
        self.running -= 1
        self.held -= need
        self._wake()
        self._publish()

    def _wake(self) -> None:
        while self._waiters:
            need, future = self._waiters[0]
            if future.done():  # cancelled, its task not yet resumed
                self._waiters.popleft()
                continue
            if not self._fits(need):
                return
            self._waiters.popleft()
            self.running += 1
            self.held += need
            future.set_result(None)
