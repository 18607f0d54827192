"""NAB v1.1 scoring: how well a stream of anomaly scores finds labelled anomaly windows.

Theory of operation
-------------------
A corpus is a set of series, each with rows (timestamp, value) and labelled anomaly *windows*
(row ranges ``[start, end]``, inclusive). A detector gives every row a score in [0, 1]; a row is a
*detection* when its score is at or above one threshold shared by the whole corpus.

- The first ``min(floor(0.15 n), 750)`` rows of a series of ``n`` rows are a *probation* period:
  never scored, neither as detections nor as parts of windows.
- A window counts once. Its earliest detection ``i`` earns ``A_TP x sigma(y) / sigma(-1)`` with
  ``y = -(end - i + 1) / width``: close to ``A_TP`` at the window's start, close to 0 at its end. A
  window without a detection costs ``A_FN``.
- A detection outside every window is a false positive: ``A_FP x sigma(|end_prev - i| /
  (width_prev - 1))`` after an earlier window (cheap just after it, ``-A_FP`` far from it) and
  ``-A_FP`` before the first window.
- ``sigma(y) = 2 / (1 + e^(5y)) - 1`` (and -1 when ``y > 3``).
- For each profile the threshold maximising the corpus total is found by one sweep: every scorable
  row is sorted by score, descending, and the total is updated as each distinct score admits its
  rows (a false positive adds its weight; a window keeps its best, i.e. earliest, detection).
- The corpus score is ``100 x (raw - null) / (perfect - null)``: the null detector detects nothing
  (``-A_FN`` per window) and the perfect one earns ``A_TP`` on every window.

**Leave one category out** (``leave_one_category_out``) measures a parameter search honestly:
given each candidate parameter set's output on every series, for each NAB category it chooses the
candidate and each profile's threshold on the *other* categories, and scores the held-out one at
them (``score_corpus(..., thresholds=...)``). ``held_out_total`` scores all held-out folds as one
corpus (their raw, null and perfect totals add up). ``sample_grid`` draws the candidates
reproducibly from a grid.

This module serves the benchmark and the tests only (it is not part of the package); the NAB
subset it reads is vendored in ``bench/data/nab`` (``DATA``), gzipped, with NAB's MIT licence.

Everything here is pure except ``load_corpus``, ``load_profiles`` and ``load_scores``, which read
NAB-format files (``timestamp,value`` series, a windows JSON, ``timestamp,...,anomaly_score``
result files).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from citadel.errors import CitadelError

FloatArray = npt.NDArray[np.float64]

DATA = Path(__file__).resolve().parent / "data" / "nab"  # the vendored NAB subset
PROBATION_FRACTION = 0.15
PROBATION_MAX = 750


class NabError(CitadelError):
    """A corpus, profile or result file that cannot be read or does not match its series."""


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Weights of one NAB application profile."""

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES: tuple[Profile, ...] = (
    Profile(name="standard", tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    Profile(name="reward_low_FP_rate", tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    Profile(name="reward_low_FN_rate", tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
)


@dataclass(frozen=True, kw_only=True)
class Series:
    """One series of a corpus: rows and labelled windows as inclusive row ranges."""

    name: str
    timestamps: FloatArray
    values: FloatArray
    windows: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True, kw_only=True)
class ProfileScore:
    """The corpus score under one profile, at the threshold that maximises it."""

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    score: float
    true_positives: int
    false_positives: int
    false_negatives: int


def probation_length(rows: int) -> int:
    """Rows at the start of a series that are never scored."""
    return min(math.floor(PROBATION_FRACTION * rows), PROBATION_MAX)


def scaled_sigmoid(y: float) -> float:
    """NAB's reward curve: about 1 well before a window's end, 0 at it, -1 well after it."""
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass(frozen=True)
class _Rows:
    """The scorable rows of one series, with what each would be worth as a detection."""

    first: int  # index of the first scorable row (end of probation)
    window: npt.NDArray[np.int64]  # window number in the corpus, -1 outside every window
    tp: FloatArray  # TP reward / A_TP inside a window (0 outside)
    fp: FloatArray  # FP cost / A_FP outside windows (0 inside), negative


def _rows(series: Series, window_base: int) -> tuple[_Rows, int]:
    """Per-row worth of a detection in ``series``; windows are numbered from ``window_base``."""
    n = len(series)
    first = probation_length(n)
    window = np.full(n, -1, dtype=np.int64)
    tp = np.zeros(n)
    fp = np.full(n, -1.0)
    max_tp = scaled_sigmoid(-1.0)
    counted = 0
    prev_end: int | None = None
    prev_width = 0.0
    cursor = 0
    for start, end in sorted(series.windows):
        if prev_end is not None:
            for i in range(cursor, start):
                fp[i] = scaled_sigmoid(abs(prev_end - i) / (prev_width - 1.0))
        width = float(end - start + 1)
        for i in range(start, end + 1):
            tp[i] = scaled_sigmoid(-(end - i + 1) / width) / max_tp
            fp[i] = 0.0
        if end >= first:  # a window wholly inside probation is not scored at all
            window[start : end + 1] = window_base + counted
            counted += 1
        prev_end, prev_width, cursor = end, width, end + 1
    if prev_end is not None:
        for i in range(cursor, n):
            fp[i] = scaled_sigmoid(abs(prev_end - i) / (prev_width - 1.0))
    return _Rows(first=first, window=window[first:], tp=tp[first:], fp=fp[first:]), counted


def score_corpus(
    corpus: Sequence[Series],
    scores: Mapping[str, Sequence[float] | FloatArray],
    profiles: Sequence[Profile] = PROFILES,
    *,
    thresholds: Mapping[str, float] | None = None,
) -> tuple[ProfileScore, ...]:
    """Score detector output ``scores`` (one score per row, by series name) under each profile,
    at the threshold that maximises it, or at ``thresholds[profile.name]`` when given (a row is
    a detection when its score is at or above the threshold)."""
    windows = 0
    parts_window: list[npt.NDArray[np.int64]] = []
    parts_tp: list[FloatArray] = []
    parts_fp: list[FloatArray] = []
    parts_score: list[FloatArray] = []
    for series in corpus:
        if series.name not in scores:
            raise NabError(f"no scores for series {series.name!r}")
        row_scores = np.asarray(scores[series.name], dtype=np.float64)
        if row_scores.shape != (len(series),):
            raise NabError(
                f"series {series.name!r} has {len(series)} rows but {row_scores.size} scores"
            )
        rows, counted = _rows(series, windows)
        windows += counted
        parts_window.append(rows.window)
        parts_tp.append(rows.tp)
        parts_fp.append(rows.fp)
        parts_score.append(row_scores[rows.first :])
    if not parts_score:
        raise NabError("the corpus holds no series")
    score = np.concatenate(parts_score)
    order = np.argsort(-score, kind="stable")
    score = score[order]
    window = np.concatenate(parts_window)[order]
    tp = np.concatenate(parts_tp)[order]
    fp = np.concatenate(parts_fp)[order]
    # Rows that share a score are admitted together: the sweep may stop only at the last of them.
    group_end = np.ones(len(score), dtype=bool)
    group_end[:-1] = score[1:] != score[:-1]
    return tuple(
        _sweep(
            profile,
            windows,
            score,
            window,
            tp,
            fp,
            group_end,
            None if thresholds is None else thresholds[profile.name],
        )
        for profile in profiles
    )


def _sweep(
    profile: Profile,
    windows: int,
    score: FloatArray,
    window: npt.NDArray[np.int64],
    tp: FloatArray,
    fp: FloatArray,
    group_end: npt.NDArray[np.bool_],
    threshold: float | None = None,
) -> ProfileScore:
    """Find the threshold maximising the corpus total under ``profile``, rows sorted by score;
    with ``threshold``, the total at that threshold instead."""
    null = -profile.fn_weight * windows
    perfect = profile.tp_weight * windows
    best = (null, math.inf, 0, 0)  # total, threshold, true positives, false positives
    # Only the first admitted row of a window (the best TP seen so far) can change the total:
    # the sweep keeps, per window, the largest reward admitted so far.
    window_best = [-profile.fn_weight] * windows
    total = null
    true_positives = 0
    false_positives = 0
    tp_w = profile.tp_weight
    fp_w = profile.fp_weight
    admitted = len(score)
    if threshold is not None:  # rows are sorted by score, descending
        admitted = int(np.searchsorted(-score, -threshold, "right"))
    for k, (w, reward, cost, last) in enumerate(
        zip(
            window[:admitted].tolist(),
            tp[:admitted].tolist(),
            fp[:admitted].tolist(),
            group_end[:admitted].tolist(),
            strict=True,
        )
    ):
        if w < 0:
            total += fp_w * cost
            false_positives += 1
        else:
            gain = tp_w * reward
            old = window_best[w]
            if gain > old:
                if old == -profile.fn_weight:
                    true_positives += 1
                window_best[w] = gain
                total += gain - old
        if threshold is None and last and total > best[0]:
            best = (total, float(score[k]), true_positives, false_positives)
    if threshold is not None:
        best = (total, threshold, true_positives, false_positives)
    raw, chosen, tps, fps = best
    return ProfileScore(
        profile=profile.name,
        threshold=chosen,
        raw=float(raw),
        null=null,
        perfect=perfect,
        score=float(100.0 * (raw - null) / (perfect - null)) if perfect != null else 0.0,
        true_positives=tps,
        false_positives=fps,
        false_negatives=windows - tps,
    )


def window_starts(series: Series) -> FloatArray:
    """The perfect detector's output: 1 at each window's first row, 0 elsewhere."""
    out = np.zeros(len(series))
    for start, _ in series.windows:
        out[start] = 1.0
    return out


# --- files -------------------------------------------------------------------------------------


def parse_timestamp(text: str) -> float:
    """A NAB timestamp (``2014-04-10 07:15:00`` with optional fraction), as UTC unix seconds."""
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise NabError(f"timestamp {text!r} is not ISO 8601 (YYYY-MM-DD HH:MM:SS)") from exc


def _stored(path: Path) -> Path:
    """``path``, or its gzipped copy ``path.gz`` when only that exists (the vendored subset)."""
    packed = path.with_name(path.name + ".gz")
    return packed if not path.exists() and packed.exists() else path


def _read_columns(path: Path, column: str) -> tuple[FloatArray, FloatArray]:
    path = _stored(path)
    try:
        with (
            gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="")
        ) as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise NabError(f"{path}: expected a 'timestamp' and a {column!r} column")
            pairs = [(parse_timestamp(row["timestamp"]), float(row[column])) for row in reader]
    except OSError as exc:
        raise NabError(f"{path}: cannot read ({exc})") from exc
    except (KeyError, ValueError) as exc:
        raise NabError(f"{path}: bad row ({exc})") from exc
    times = np.array([t for t, _ in pairs], dtype=np.float64)
    values = np.array([v for _, v in pairs], dtype=np.float64)
    return times, values


def load_corpus(data_dir: Path, windows_file: Path) -> tuple[Series, ...]:
    """Read every series named in ``windows_file`` (NAB's ``combined_windows.json``)."""
    try:
        labels = json.loads(windows_file.read_text())
    except (OSError, ValueError) as exc:
        raise NabError(f"{windows_file}: cannot read the windows ({exc})") from exc
    corpus = []
    for name in sorted(labels):
        times, values = _read_columns(data_dir / name, "value")
        index = {t: i for i, t in enumerate(times.tolist())}
        windows = []
        for start_text, end_text in labels[name]:
            start, end = parse_timestamp(start_text), parse_timestamp(end_text)
            if start not in index or end not in index:
                raise NabError(f"{name}: window [{start_text}, {end_text}] is not on a row")
            windows.append((index[start], index[end]))
        corpus.append(Series(name=name, timestamps=times, values=values, windows=tuple(windows)))
    return tuple(corpus)


def load_profiles(path: Path) -> tuple[Profile, ...]:
    """Read NAB's ``profiles.json`` (``{name: {"CostMatrix": {"tpWeight": ...}}}``)."""
    try:
        raw = json.loads(path.read_text())
        return tuple(
            Profile(
                name=name,
                tp_weight=float(spec["CostMatrix"]["tpWeight"]),
                fp_weight=float(spec["CostMatrix"]["fpWeight"]),
                fn_weight=float(spec["CostMatrix"]["fnWeight"]),
            )
            for name, spec in raw.items()
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NabError(f"{path}: expected NAB profiles with CostMatrix weights ({exc})") from exc


def load_scores(results_dir: Path, corpus: Sequence[Series]) -> dict[str, FloatArray]:
    """Read NAB result files (``<category>/<series>.csv`` with an ``anomaly_score`` column).

    A detector's result file may be named ``<category>/<detector>_<series>.csv`` as NAB stores them.
    """
    scores: dict[str, FloatArray] = {}
    for series in corpus:
        path = _stored(results_dir / series.name)
        if not path.exists():
            matches = sorted(path.parent.glob(f"*_{path.name}")) or sorted(
                path.parent.glob(f"*_{path.name}.gz")
            )
            if not matches:
                raise NabError(f"{results_dir}: no result file for {series.name!r}")
            path = matches[0]
        times, values = _read_columns(path, "anomaly_score")
        if not np.array_equal(times, series.timestamps):
            raise NabError(f"{path}: timestamps differ from the series {series.name!r}")
        scores[series.name] = values
    return scores


# --- leave one category out -------------------------------------------------------------------


def category(series: Series) -> str:
    """The NAB category of a series: the folder its file is in (``realTweets/...``)."""
    return series.name.split("/", 1)[0] if "/" in series.name else ""


def combine(results: Sequence[ProfileScore]) -> ProfileScore:
    """Several scores of one profile as one corpus: raw, null and perfect totals add up."""
    raw = sum(r.raw for r in results)
    null = sum(r.null for r in results)
    perfect = sum(r.perfect for r in results)
    return ProfileScore(
        profile=results[0].profile,
        threshold=math.nan,  # each part has its own
        raw=raw,
        null=null,
        perfect=perfect,
        score=100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0,
        true_positives=sum(r.true_positives for r in results),
        false_positives=sum(r.false_positives for r in results),
        false_negatives=sum(r.false_negatives for r in results),
    )


@dataclass(frozen=True, kw_only=True)
class HeldOut:
    """One fold of leave-one-category-out: what was chosen without ``category``, and its score."""

    category: str
    candidate: int  # index of the candidate chosen on the other categories
    train: tuple[ProfileScore, ...]  # its scores there (their thresholds are the ones applied)
    test: tuple[ProfileScore, ...]  # the held-out category, scored at those thresholds


Scores = Mapping[str, Sequence[float] | FloatArray]


def choose(
    corpus: Sequence[Series],
    candidates: Sequence[Scores],
    profile: Profile = PROFILES[0],
) -> tuple[int, float]:
    """The candidate scoring best on ``corpus`` under ``profile`` (the first of equals), and its
    score: the parameter search, given each candidate's output on every series."""
    best, best_score = -1, -math.inf
    for i, scores in enumerate(candidates):
        (result,) = score_corpus(corpus, scores, (profile,))
        if result.score > best_score:
            best, best_score = i, result.score
    if best < 0:
        raise NabError("no candidates to choose from")
    return best, best_score


def leave_one_category_out(
    corpus: Sequence[Series],
    candidates: Sequence[Scores],
    profiles: Sequence[Profile] = PROFILES,
    *,
    select: str = "standard",
) -> tuple[HeldOut, ...]:
    """For each category: choose the candidate (by ``select``) and each profile's threshold on
    the other categories only, then score the category at them. Nothing is tuned on what is
    scored: the held-out rows reach neither the choice nor the thresholds."""
    by_name = {p.name: p for p in profiles}
    if select not in by_name:
        raise NabError(f"select={select!r}: not one of the profiles {sorted(by_name)}")
    folds = []
    for held in sorted({category(s) for s in corpus}):
        train = [s for s in corpus if category(s) != held]
        test = [s for s in corpus if category(s) == held]
        if not train:
            raise NabError("leave-one-category-out needs at least two categories")
        chosen, _ = choose(train, candidates, by_name[select])
        fitted = score_corpus(train, candidates[chosen], profiles)
        at = {r.profile: r.threshold for r in fitted}
        folds.append(
            HeldOut(
                category=held,
                candidate=chosen,
                train=fitted,
                test=score_corpus(test, candidates[chosen], profiles, thresholds=at),
            )
        )
    return tuple(folds)


def held_out_total(folds: Sequence[HeldOut]) -> tuple[ProfileScore, ...]:
    """Every held-out category scored together as one corpus, per profile."""
    return tuple(combine([f.test[i] for f in folds]) for i in range(len(folds[0].test)))


def sample_grid(
    space: Mapping[str, Sequence[object]], n: int, seed: int
) -> list[dict[str, object]]:
    """``n`` distinct points of the grid ``space`` (all of it when smaller), drawn with ``seed``:
    the same seed gives the same points in the same order."""
    names = sorted(space)
    size = math.prod(len(space[k]) for k in names)
    rng = random.Random(seed)
    picks = range(size) if n >= size else sorted(rng.sample(range(size), n))
    points = []
    for index in picks:
        point: dict[str, object] = {}
        for name in reversed(names):
            index, digit = divmod(index, len(space[name]))
            point[name] = space[name][digit]
        points.append(dict(sorted(point.items())))
    return points
