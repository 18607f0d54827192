"""A streaming memory of normal *shapes*: fuzzy ART hyperboxes over recent-window features.

Theory of operation
-------------------
``ShapeMemory`` answers one question per row: how unlike every shape seen so far is the series'
recent past? It is a clean-room fuzzy ART (Adaptive Resonance Theory, Carpenter, Grossberg and
Rosen 1991) clusterer in the style described for ARTime (Hampton), written from the published
descriptions of the method.

**Input.** The last ``rows`` values are averaged into ``features`` consecutive chunks (a handful of
numbers that keep the window's shape but little of its noise), giving a point ``a`` in feature
space. The series' range ``[lo, hi]`` seen so far (the current row included) is its scale: sizes
and distances below are divided by ``features x (hi - lo)``, so the memory is scale-free.

**Categories.** With complement coding ``I = (a, 1 - a)`` a fuzzy ART category ``w = (u, 1 - v)``
is a hyperbox ``[u, v]``. For ``|I| = d`` the match ``|I ^ w| / |I|`` is ``1 - |box grown to
include a| / d`` (``|.|`` the L1 size of the box), so "match >= vigilance rho" is "the grown box
stays no larger than ``d (1 - rho)``", and fast learning (``beta = 1``) grows the box to include
``a``. The memory stores the boxes in the series' own units (``u``, ``v`` as arrays) and checks
sizes against ``cap x features x (hi - lo)``, which keeps old boxes meaningful when the range
grows. Each row the box that would grow least takes the point if it stays within the cap
(resonance), otherwise the point founds a new box (up to ``max_categories``).

**Novelty.** The row's novelty is the L1 distance from ``a`` to the nearest box (0 inside one),
as a fraction of ``features x (hi - lo)``, measured *before* learning the point: large for a
window whose shape no category holds, 0 for a shape seen before, whatever its level. A detector
compares it with its own past (``RecordDetector`` divides it by a decaying record).

**Vigilance.** One fixed vigilance would make a noisy series found a new box every few rows and a
smooth one almost never. Instead the first ``learn`` rows only collect their feature points; then
the cap is set, by bisection, to the smallest one with which those points form at most
``categories`` boxes, and the boxes are built from them. The memory keeps learning afterwards.

Cost: O(``max_categories`` x ``features``) per row, vectorised with numpy; the bisection runs
once, over ``learn`` points.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_BISECTIONS = 12  # steps of the vigilance search, between _CAP_LOW and 1 (geometric)
_CAP_LOW = 1e-4


def _fit(points: FloatArray, cap: float) -> tuple[FloatArray, FloatArray]:
    """Boxes ``(lower, upper)`` that fast-learning fuzzy ART builds from ``points`` with ``cap``."""
    lower = points[:1].copy()
    upper = points[:1].copy()
    for point in points[1:]:
        grown_lo = np.minimum(lower, point)
        grown_hi = np.maximum(upper, point)
        size = (grown_hi - grown_lo).sum(axis=1)
        j = int(np.argmin(size))
        if size[j] <= cap:
            lower[j] = grown_lo[j]
            upper[j] = grown_hi[j]
        else:
            lower = np.vstack([lower, point])
            upper = np.vstack([upper, point])
    return lower, upper


class ShapeMemory:
    """Fuzzy ART hyperboxes over range-normalised window features (module docstring)."""

    def __init__(
        self,
        *,
        rows: int = 8,
        features: int = 4,
        learn: int = 150,
        categories: int = 10,
        max_categories: int = 100,
    ) -> None:
        if rows % features:
            raise ValueError("rows must be a multiple of features")
        if not 1 <= categories <= max_categories:
            raise ValueError("need 1 <= categories <= max_categories")
        self._rows = rows
        self._features = features
        self._learn = learn
        self._categories = categories
        self._max_categories = max_categories
        self._window: deque[float] = deque(maxlen=rows)
        self._n = 0
        self._lo = math.inf
        self._hi = -math.inf
        self._seen: list[FloatArray] = []  # feature points of the learning period
        self._cap = 0.0  # size limit of a box, as a fraction of features x range; 0: not tuned
        self._lower: FloatArray = np.empty((0, features))
        self._upper: FloatArray = np.empty((0, features))

    @property
    def cap(self) -> float:
        """Size limit of a category box, as a fraction of ``features x range`` (0: learning)."""
        return self._cap

    @property
    def categories(self) -> int:
        """Number of boxes learnt so far."""
        return len(self._lower)

    def update(self, value: float) -> float:
        """Learn the row ``value``; return its novelty (0 while learning or for a flat series)."""
        if not math.isfinite(value):
            return 0.0
        self._n += 1
        self._lo = min(self._lo, value)
        self._hi = max(self._hi, value)
        self._window.append(value)
        span = self._hi - self._lo
        if len(self._window) < self._rows or span <= 0.0:
            return 0.0
        point = np.fromiter(self._window, dtype=np.float64, count=self._rows)
        point = point.reshape(self._features, -1).mean(axis=1)
        scale = self._features * span
        if not self._cap:
            self._seen.append(point)
            if self._n >= self._learn:
                self._tune(np.array(self._seen), scale)
                self._seen = []
            return 0.0
        distance = float(
            (np.maximum(self._lower - point, 0.0) + np.maximum(point - self._upper, 0.0))
            .sum(axis=1)
            .min()
        )
        grown_lo = np.minimum(self._lower, point)
        grown_hi = np.maximum(self._upper, point)
        size = (grown_hi - grown_lo).sum(axis=1)
        j = int(np.argmin(size))
        if size[j] <= self._cap * scale:
            self._lower[j] = grown_lo[j]
            self._upper[j] = grown_hi[j]
        elif len(self._lower) < self._max_categories:
            self._lower = np.vstack([self._lower, point])
            self._upper = np.vstack([self._upper, point])
        return distance / scale

    def _tune(self, points: FloatArray, scale: float) -> None:
        """Smallest cap with which ``points`` form at most ``categories`` boxes; build them."""
        low, high = _CAP_LOW, 1.0
        for _ in range(_BISECTIONS):
            mid = math.sqrt(low * high)
            if len(_fit(points, mid * scale)[0]) > self._categories:
                low = mid
            else:
                high = mid
        self._cap = high
        self._lower, self._upper = _fit(points, high * scale)
