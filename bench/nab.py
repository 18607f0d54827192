"""NAB benchmark: run a streaming anomaly detector over a NAB-format corpus and score it.

Each series gets a fresh detector (one parameter set for all) fed its rows in order; the scores are
written as NAB result files (``timestamp,value,anomaly_score``) under ``--out`` when given, and the
corpus is scored under NAB's three profiles (standard, reward low FP, reward low FN) at the
corpus-wide threshold that maximises each. ``--reference DIR`` scores stored NAB result files
instead of running a detector (``reference/contextOSE`` must give 75.4 / 72.7 / 78.5). The data
default to the NAB subset vendored in ``bench/data/nab`` (``nab_scoring.DATA``).

    .venv/bin/python bench/nab.py [--data DIR --windows FILE] [--out DIR] [--detector records]

``--loco`` measures generalisation: ``--candidates`` parameter sets of ``RecordDetector`` are drawn
from ``SPACE`` with ``--seed`` (the default parameters are always candidate 0), each is run over
every series, and for each of the six categories the candidate and the thresholds are chosen on
the other five and the held-out category is scored at them (``nab_scoring``).
``--without-default`` leaves the default parameters out (they were first picked by hand on the
whole subset, so only the drawn candidates give a held-out figure with no leak). It prints each
category's held-out score, all held-out folds scored as one corpus, the same for the stored
reference outputs in ``<data>/../reference`` (only their threshold is chosen), and the candidate the
same search chooses on the whole subset (the procedure that gives the default ``Params``).

    .venv/bin/python bench/nab.py --loco [--candidates 12] [--seed 19] [--jobs 2]

``--detector records-basic`` runs the former five-signal default, for comparison.

``--early`` measures the warm-up (the first ``Params.warmup`` rows, where the full model only
learns): every labelled window gives a series of its own that starts a seeded 40 to 120 rows
before the window and is ``warmup`` rows long, and every series gives its first ``warmup`` rows
(a new series, anomalous or not), all scored with NAB's rules (probation: the first 22 rows). The
candidates are ``EARLY_SPACE``'s early-score parameters over the default ``Params`` (the
``early_rows=0`` candidate is no early score: the warm-up scores 0, NAB's null detector), chosen
by leave one category out as above; it also prints the held-out figures at the rules' fixed alarm
score (``ALARM_SCORE``), the threshold a deployment applies.

    .venv/bin/python bench/nab.py --early [--seed 19] [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from nab_scoring import (
    DATA,
    PROFILES,
    FloatArray,
    HeldOut,
    NabError,
    Profile,
    ProfileScore,
    Series,
    category,
    choose,
    held_out_total,
    leave_one_category_out,
    load_corpus,
    load_profiles,
    load_scores,
    sample_grid,
    score_corpus,
)

from citadel.alerting.anomaly import DEFAULT_DETECTOR, DETECTORS, Detector, Params, RecordDetector
from citadel.alerting.defaults import ALARM_SCORE

# The free parameters of RecordDetector the search chooses among (the rest are fixed by
# construction: warm-up below NAB's shortest probation, scale-free signals, alarm ratio 1.05).
SPACE: dict[str, tuple[object, ...]] = {
    "decay_half": (3000.0, 5000.0, 8000.0),
    "refractory_rows": (10, 20, 40),
    "median_rows": (15, 25, 31),
    "shape_categories": (6, 10, 15),
    "w_median": (0.0, 1.0),
    "w_shape": (0.0, 1.0),
}


# The early score parameters (``Params.early_rows``, ``early_z``) that --early chooses among.
EARLY_SPACE: dict[str, tuple[object, ...]] = {
    "early_rows": (10, 20, 40, 60),
    "early_z": (2.0, 3.0, 4.0, 6.0, 8.0, 12.0),
}


def early_corpus(corpus: Sequence[Series], rows: int, seed: int) -> list[Series]:
    """The warm-up corpus of ``--early``: per labelled window, ``rows`` rows from a seeded 40 to
    120 rows before it (its windows clipped to them); per series, its first ``rows`` rows."""
    rng = random.Random(seed)
    found: list[Series] = []

    def cut(series: Series, start: int) -> Series:
        end = start + rows
        windows = tuple(
            (max(a, start) - start, min(b, end - 1) - start)
            for a, b in series.windows
            if a < end and b >= start
        )
        return Series(
            name=f"{series.name}@{start}",
            timestamps=series.timestamps[start:end],
            values=series.values[start:end],
            windows=windows,
        )

    for series in corpus:
        if len(series) < rows:
            continue
        found.append(cut(series, 0))
        for a, _ in series.windows:
            start = a - rng.randint(40, 120)
            if start > 0 and start + rows <= len(series):
                found.append(cut(series, start))
    return found


def run_detector(detector: Detector, series: Series) -> FloatArray:
    """Scores of ``detector`` (fresh) fed every row of ``series`` in order."""
    update = detector.update
    return np.array(
        [
            update(t, v)
            for t, v in zip(series.timestamps.tolist(), series.values.tolist(), strict=True)
        ]
    )


def _run_params(job: tuple[dict[str, object], Series]) -> FloatArray:
    overrides, series = job
    return run_detector(RecordDetector(Params(**overrides)), series)  # type: ignore[arg-type]


def run_candidates(
    corpus: Sequence[Series], candidates: Sequence[Mapping[str, object]], jobs: int
) -> list[dict[str, FloatArray]]:
    """Every candidate parameter set's output on every series (``jobs`` processes)."""
    work = [(dict(c), s) for c in candidates for s in corpus]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            outputs = list(pool.map(_run_params, work, chunksize=4))
    else:
        outputs = [_run_params(job) for job in work]
    found: list[dict[str, FloatArray]] = []
    for i in range(len(candidates)):
        chunk = outputs[i * len(corpus) : (i + 1) * len(corpus)]
        found.append({s.name: out for s, out in zip(corpus, chunk, strict=True)})
    return found


def loco_candidates(n: int, seed: int, *, default: bool = True) -> list[dict[str, object]]:
    """``n`` points of ``SPACE`` drawn with ``seed``; with ``default``, the default parameters
    first and then the other draws (at most ``n`` in all)."""
    drawn = sample_grid(SPACE, n, seed)
    if not default:
        return drawn
    params = Params()
    first = {name: getattr(params, name) for name in sorted(SPACE)}
    return [first, *[p for p in drawn if p != first][: max(0, n - 1)]]


def write_results(out: Path, series: Series, scores: FloatArray) -> None:
    """One NAB result file: ``timestamp,value,anomaly_score``."""
    path = out / series.name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "anomaly_score"])
        for t, v, s in zip(
            series.timestamps.tolist(), series.values.tolist(), scores.tolist(), strict=True
        ):
            stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
            writer.writerow([stamp, repr(v), f"{s:.6f}"])


def _cells(results: Sequence[ProfileScore], windows: int) -> str:
    standard = results[0]
    if windows == 0:  # no windows: a score is undefined, the false positives are what counts
        scores = f"{'-':>8} {'-':>7} {'-':>7}"
    else:
        scores = " ".join(f"{r.score:{w}.1f}" for r, w in zip(results, (8, 7, 7), strict=True))
    tp_fn = f"{standard.true_positives}/{standard.false_negatives}"
    return f"{scores} {tp_fn:>7} {standard.false_positives:>8}"


def print_loco(
    label: str,
    corpus: Sequence[Series],
    folds: Sequence[HeldOut],
    names: Sequence[str] | None = None,
) -> ProfileScore:
    """The held-out table of one detector; returns the combined standard score."""
    print(f"\n{label}: held-out scores (candidate and thresholds chosen on the other categories)")
    print(
        f"{'category':<24} {'windows':>7} {'chosen':>6} {'standard':>8} {'low FP':>7} "
        f"{'low FN':>7} {'TP/FN':>7} {'FP rows':>8}"
    )
    for fold in folds:
        windows = sum(len(s.windows) for s in corpus if category(s) == fold.category)
        print(f"{fold.category:<24} {windows:>7} {fold.candidate:>6} {_cells(fold.test, windows)}")
    total = held_out_total(folds)
    windows = sum(len(s.windows) for s in corpus)
    print(f"{'combined (held out)':<24} {windows:>7} {'':>6} {_cells(total, windows)}")
    if names is not None:
        for index in sorted({f.candidate for f in folds}):
            print(f"  candidate {index}: {names[index]}")
    return total[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "data", help="NAB data directory")
    parser.add_argument("--windows", type=Path, default=DATA / "labels" / "combined_windows.json")
    parser.add_argument("--profiles", type=Path, help="profiles.json (default: NAB v1.1's three)")
    parser.add_argument("--out", type=Path, help="write NAB result files here")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS))
    parser.add_argument("--reference", type=Path, help="score these NAB result files instead")
    parser.add_argument("--loco", action="store_true", help="leave one category out")
    parser.add_argument("--early", action="store_true", help="the warm-up's early score (LOCO)")
    parser.add_argument("--candidates", type=int, default=12, help="parameter sets (--loco)")
    parser.add_argument("--seed", type=int, default=19, help="draws the candidates (--loco)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (--loco)")
    parser.add_argument(
        "--without-default",
        action="store_true",
        help="leave the default parameters out of the candidates (--loco)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        corpus = load_corpus(args.data, args.windows)
        profiles = load_profiles(args.profiles) if args.profiles else PROFILES
    except NabError as exc:
        parser.error(str(exc))
    if args.early:
        return early(corpus, profiles, args, started)
    if args.loco:
        return loco(corpus, profiles, args, started)
    loaded = time.perf_counter()
    if args.reference:
        label = f"reference {args.reference}"
        scores = load_scores(args.reference, corpus)
    else:
        label = f"detector {args.detector}"
        scores = {}
        for series in corpus:
            scores[series.name] = run_detector(DETECTORS[args.detector](), series)
            if args.out:
                write_results(args.out, series, scores[series.name])
    detected = time.perf_counter()
    results = score_corpus(corpus, scores, profiles)
    scored = time.perf_counter()

    rows = sum(len(s) for s in corpus)
    windows = sum(len(s.windows) for s in corpus)
    print(f"{label}: {len(corpus)} series, {rows} rows, {windows} windows")
    print(f"{'profile':<20} {'score':>6} {'threshold':>10} {'TP':>4} {'FN':>4} {'FP rows':>8}")
    for r in results:
        print(
            f"{r.profile:<20} {r.score:6.1f} {r.threshold:10.4f} "
            f"{r.true_positives:4d} {r.false_negatives:4d} {r.false_positives:8d}"
        )
    print(
        f"time: load {loaded - started:.1f}s, detect {detected - loaded:.1f}s, "
        f"score {scored - detected:.1f}s, total {scored - started:.1f}s"
    )
    return 0


def search(
    label: str,
    corpus: Sequence[Series],
    candidates: Sequence[Mapping[str, object]],
    profiles: Sequence[Profile],
    args: argparse.Namespace,
) -> tuple[list[dict[str, FloatArray]], tuple[HeldOut, ...], list[str], float]:
    """Run every candidate on ``corpus``, leave one category out, print the held-out table:
    the outputs, the folds, the candidates' names and when the detection ended."""
    names = [", ".join(f"{k}={v}" for k, v in c.items()) for c in candidates]
    outputs = run_candidates(corpus, candidates, args.jobs)
    detected = time.perf_counter()
    folds = leave_one_category_out(corpus, outputs, profiles)
    print_loco(label, corpus, folds, names)
    return outputs, folds, names, detected


def loco(
    corpus: Sequence[Series], profiles: Sequence[Profile], args: argparse.Namespace, started: float
) -> int:
    candidates = loco_candidates(args.candidates, args.seed, default=not args.without_default)
    print(
        f"leave one category out: {len(corpus)} series, {len(candidates)} candidates "
        f"(seed {args.seed}, space {', '.join(SPACE)})"
    )
    outputs, _, names, detected = search("RecordDetector", corpus, candidates, profiles, args)
    best, _ = choose(corpus, outputs, profiles[0])
    chosen = score_corpus(corpus, outputs[best], profiles)
    print(
        f"\nsubset (all six categories, in-sample): the search on all six chooses candidate "
        f"{best}: {' / '.join(f'{r.score:.1f}' for r in chosen)} ({names[best]})"
    )
    reference = args.data.parent / "reference"
    for found in sorted(p for p in reference.glob("*") if p.is_dir()) if reference.is_dir() else []:
        stored = load_scores(found, corpus)
        print_loco(
            f"{found.name} (stored output)", corpus, leave_one_category_out(corpus, [stored])
        )
        full = score_corpus(corpus, stored, profiles)
        print(f"subset (in-sample threshold): {' / '.join(f'{r.score:.1f}' for r in full)}")
    print(
        f"\ntime: detect {detected - started:.0f}s, choose and score "
        f"{time.perf_counter() - detected:.0f}s"
    )
    return 0


def early(
    corpus: Sequence[Series], profiles: Sequence[Profile], args: argparse.Namespace, started: float
) -> int:
    rows = Params().warmup
    warm = early_corpus(corpus, rows, args.seed)
    candidates = [{"early_rows": 0}, *sample_grid(EARLY_SPACE, 100, args.seed)]
    windows = sum(len(s.windows) for s in warm)
    print(
        f"warm-up (first {rows} rows): {len(warm)} series of {rows} rows from {len(corpus)}, "
        f"{windows} windows; {len(candidates)} candidates (candidate 0: no early score)"
    )
    outputs, folds, names, detected = search("early score", warm, candidates, profiles, args)
    at = {p.name: ALARM_SCORE for p in profiles}
    fixed = [
        score_corpus([s for s in warm if category(s) == f.category], outputs[f.candidate],
                     profiles, thresholds=at)
        for f in folds
    ]  # fmt: skip
    total = held_out_total(
        [HeldOut(category=f.category, candidate=f.candidate, train=f.train, test=t)
         for f, t in zip(folds, fixed, strict=True)]
    )  # fmt: skip
    print(
        f"combined held out at the rules' alarm score {ALARM_SCORE:.4f}: "
        f"{' / '.join(f'{r.score:.1f}' for r in total)} "
        f"(TP/FN {total[0].true_positives}/{total[0].false_negatives}, "
        f"FP rows {total[0].false_positives})"
    )
    none = score_corpus(warm, outputs[0], profiles)
    print(f"no early score (warm-up scores 0): {' / '.join(f'{r.score:.1f}' for r in none)}")
    best, _ = choose(warm, outputs, profiles[0])
    print(f"the search on all six chooses candidate {best} ({names[best]})")
    print(f"time: detect {detected - started:.0f}s, score {time.perf_counter() - detected:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
