"""Pricing: what a deployment really costs per 1000 tokens, and what self-hosting saves.

Three prices meet here, all in integer micro-USD wherever amounts are summed:

- **Charged**: what users are charged, from the model's price (or the deployment's override). The
  gateway computes it per request (``limits.policy.cost_micros``) and the ledger sums it.
- **Infrastructure**: what a deployment costs to run. Its GPUs cost ``gpu_hour_usd x gpus`` every
  hour, busy or idle, from the hour it first served (its first event in the ledger, whatever its
  status): over the H hours of a window it has been running, it costs that times H, and the real
  cost of 1000 tokens is that amount over the tokens it served in the window (in thousands). The
  busier the deployment, the cheaper each token: utilisation sets the real price. A deployment
  that never served costs nothing yet (a new install is not charged for the weeks before it).
  The analytics API and the business metrics on ``/metrics`` use this one definition.
- **Reference**: what the same tokens would have cost at a commercial API's price
  (``Model.reference_price``). It is computed on a window's token totals, rounded up to the
  micro-dollar once, not per request: it is a counterfactual, not a bill.

Savings are the reference cost less the infrastructure cost; the return on investment is the
savings over the infrastructure cost. Both are None when they cannot be known (no reference
price; no infrastructure cost to divide by), never a made-up zero.

Pure functions on plain data: the window's length and the totals are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from citadel.limits.policy import cost_micros
from citadel.settings import Deployment, Price

__all__ = [
    "DeploymentCost",
    "Savings",
    "Totals",
    "deployment_cost",
    "infra_micros",
    "per_1k_micros",
    "reference_micros",
    "savings",
    "sum_savings",
    "usd",
]

_SECONDS_PER_HOUR = 3600
_MICROS = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """What was served over a window: requests, tokens, and the amount charged for them."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0  # charged to users

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            requests=self.requests + other.requests,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_micros=self.cost_micros + other.cost_micros,
        )


def _exact(value: float) -> Decimal:
    # The decimal the settings file spelt (2.5), not the binary float nearest to it.
    return Decimal(repr(value))


def infra_micros(gpu_hour_usd: float, gpus: int, seconds: float) -> int:
    """What ``gpus`` GPUs at ``gpu_hour_usd`` each per hour cost over ``seconds``, in micro-USD
    (to the nearest micro-dollar, halves up)."""
    if gpu_hour_usd < 0 or gpus < 0 or seconds < 0:
        raise ValueError(
            f"gpu_hour_usd={gpu_hour_usd!r}, gpus={gpus!r}, seconds={seconds!r}: "
            "expected numbers >= 0"
        )
    usd = _exact(gpu_hour_usd) * gpus * _exact(seconds) / _SECONDS_PER_HOUR
    return int((usd * _MICROS).to_integral_value(rounding=ROUND_HALF_UP))


def per_1k_micros(amount_micros: int, tokens: int) -> float | None:
    """An amount spread over ``tokens``, per 1000 tokens, in micro-USD; None without tokens."""
    if tokens <= 0:
        return None
    return amount_micros * 1000 / tokens


def reference_micros(price: Price | None, prompt_tokens: int, completion_tokens: int) -> int | None:
    """What the tokens would cost at the commercial ``price`` (rounded up); None without one."""
    if price is None:
        return None
    return cost_micros(price, prompt_tokens, completion_tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentCost:
    """One deployment over one window: what it served, what that was charged, what it cost."""

    deployment: str
    model: str
    configured: bool  # False: seen in the ledger, no longer in the settings (no infra cost known)
    gpus: int
    gpu_hour_usd: float
    hours: float  # the hours of the window it was running (passed, and from its first traffic)
    totals: Totals
    infra_micros: int
    reference_micros: int | None
    costed_from: datetime | None = None  # the hour it first served; None: it never has

    @property
    def tokens_per_hour(self) -> float:
        return self.totals.tokens / self.hours if self.hours > 0 else 0.0

    @property
    def infra_per_1k_micros(self) -> float | None:
        """The real cost of 1000 tokens: the infrastructure cost over the tokens served."""
        return per_1k_micros(self.infra_micros, self.totals.tokens)

    @property
    def charged_per_1k_micros(self) -> float | None:
        return per_1k_micros(self.totals.cost_micros, self.totals.tokens)

    @property
    def margin_micros(self) -> int:
        """Charged less infrastructure: what internal charging recovers beyond the cost."""
        return self.totals.cost_micros - self.infra_micros


def deployment_cost(
    *,
    name: str,
    model: str,
    deployment: Deployment | None,
    totals: Totals,
    seconds: float,
    reference: Price | None,
    costed_from: datetime | None = None,
) -> DeploymentCost:
    """The cost of deployment ``name`` running ``seconds`` (the part of a window from its first
    traffic, ``costed_from``, on); ``deployment`` is its settings, or None when it is no longer
    configured (its infrastructure cost is then 0)."""
    gpus = deployment.gpus if deployment is not None else 0
    gpu_hour = deployment.gpu_hour_usd if deployment is not None else 0.0
    return DeploymentCost(
        deployment=name,
        model=model,
        configured=deployment is not None,
        gpus=gpus,
        gpu_hour_usd=gpu_hour,
        hours=seconds / _SECONDS_PER_HOUR,
        totals=totals,
        infra_micros=infra_micros(gpu_hour, gpus, seconds),
        reference_micros=reference_micros(
            reference, totals.prompt_tokens, totals.completion_tokens
        ),
        costed_from=costed_from,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Savings:
    """What serving tokens ourselves saved against a commercial API."""

    model: str
    totals: Totals
    infra_micros: int
    reference_micros: int | None  # None: the model has no reference price

    @property
    def savings_micros(self) -> int | None:
        """Reference cost less infrastructure cost: what self-hosting saved the organisation."""
        return None if self.reference_micros is None else self.reference_micros - self.infra_micros

    @property
    def savings_vs_charged_micros(self) -> int | None:
        """Reference cost less the charged cost: what users saved against the commercial API."""
        if self.reference_micros is None:
            return None
        return self.reference_micros - self.totals.cost_micros

    @property
    def roi(self) -> float | None:
        """Savings over infrastructure cost (1.0: every dollar spent saved another one)."""
        saved = self.savings_micros
        if saved is None or self.infra_micros <= 0:
            return None
        return saved / self.infra_micros

    @property
    def savings_ratio(self) -> float | None:
        """Savings as a share of the reference cost (0.75: three quarters cheaper)."""
        saved = self.savings_micros
        if saved is None or not self.reference_micros:
            return None
        return saved / self.reference_micros


def savings(*, model: str, totals: Totals, infra_micros: int, reference: Price | None) -> Savings:
    """The savings of ``model``: its token totals priced at ``reference`` against the
    infrastructure cost of its deployments over the same window."""
    return Savings(
        model=model,
        totals=totals,
        infra_micros=infra_micros,
        reference_micros=reference_micros(
            reference, totals.prompt_tokens, totals.completion_tokens
        ),
    )


def sum_savings(items: Iterable[Savings]) -> Savings:
    """The savings of several models together, over the models that have a reference price
    (the others' tokens cannot be compared, so they are left out of every amount); the
    reference is None when no model has one."""
    totals, infra, reference, compared = Totals(), 0, 0, False
    for item in items:
        if item.reference_micros is None:
            continue
        compared = True
        totals += item.totals
        infra += item.infra_micros
        reference += item.reference_micros
    return Savings(
        model="*",
        totals=totals,
        infra_micros=infra,
        reference_micros=reference if compared else None,
    )


def usd(micros: int | float | None) -> float | None:
    """Micro-USD as US dollars (None stays None); for presentation only, never for sums."""
    if micros is None:
        return None
    value = micros / _MICROS
    return value if math.isfinite(value) else None
