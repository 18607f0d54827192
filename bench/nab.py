"""NAB benchmark: run a streaming anomaly detector over a NAB-format corpus and score it.

Each series gets a fresh detector (one parameter set for all) fed its rows in order; the scores are
written as NAB result files (``timestamp,value,anomaly_score``) under ``--out`` when given, and the
corpus is scored under NAB's three profiles (standard, reward low FP, reward low FN) at the
corpus-wide threshold that maximises each. ``--reference DIR`` scores stored NAB result files
instead of running a detector (``reference/contextOSE`` must give 75.4 / 72.7 / 78.5).

    .venv/bin/python bench/nab.py --data ../shared/nab/data \\
        --windows ../shared/nab/labels/combined_windows.json [--out DIR] [--detector records]

``--detector records-basic`` runs the former five-signal default, for comparison.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from nab_scoring import (
    PROFILES,
    FloatArray,
    Series,
    load_corpus,
    load_profiles,
    load_scores,
    score_corpus,
)

from citadel.alerting.anomaly import DEFAULT_DETECTOR, DETECTORS


def run_detector(name: str, series: Series) -> FloatArray:
    """Scores of a fresh ``name`` detector fed every row of ``series`` in order."""
    detector = DETECTORS[name]()
    update = detector.update
    return np.array(
        [
            update(t, v)
            for t, v in zip(series.timestamps.tolist(), series.values.tolist(), strict=True)
        ]
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="NAB data directory")
    parser.add_argument("--windows", type=Path, required=True, help="combined_windows.json")
    parser.add_argument("--profiles", type=Path, help="profiles.json (default: NAB v1.1's three)")
    parser.add_argument("--out", type=Path, help="write NAB result files here")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS))
    parser.add_argument("--reference", type=Path, help="score these NAB result files instead")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    corpus = load_corpus(args.data, args.windows)
    profiles = load_profiles(args.profiles) if args.profiles else PROFILES
    loaded = time.perf_counter()
    if args.reference:
        label = f"reference {args.reference}"
        scores = load_scores(args.reference, corpus)
    else:
        label = f"detector {args.detector}"
        scores = {}
        for series in corpus:
            scores[series.name] = run_detector(args.detector, series)
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


if __name__ == "__main__":
    sys.exit(main())
