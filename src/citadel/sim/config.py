"""The simulator's configuration: one frozen object, built once from the command line by the cli.

Fault rates are exclusive shares of the requests (a request draws at most one of hang, error,
disconnect and malformed), so together they may not exceed 1.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from citadel.errors import ConfigError

__all__ = ["DEFAULT_MODELS", "SimConfig", "add_arguments", "config_from_args"]

DEFAULT_MODELS: tuple[str, ...] = ("sim-chat", "sim-code", "sim-embed")


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    """What the simulator serves, how fast, and which faults it injects unasked."""

    models: tuple[str, ...] = DEFAULT_MODELS
    completion_tokens: int = 16
    """Reply length when the request gives no ``max_tokens``."""
    max_model_len: int = 32768
    """Prompt plus completion tokens above this are refused with a 400, as vLLM does."""
    embedding_dim: int = 64
    max_num_seqs: int = 0
    """Requests of one model running at once, as vLLM's flag; more wait (0: no limit)."""
    kv_cache_tokens: int = 1_048_576
    """Tokens of KV cache per model; a running request holds its prompt and completion."""
    seed: int = 0
    """The generation seed of requests that give none."""
    ttft_ms: float = 0.0
    tbt_ms: float = 0.0
    latency_ms: float = 0.0
    """Extra delay before the first byte of every response (a fault counted as ``latency``)."""
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 503)
    hang_rate: float = 0.0
    disconnect_rate: float = 0.0
    disconnect_after: int = 1
    malformed_rate: float = 0.0
    fault_seed: int = 0

    def __post_init__(self) -> None:
        if not self.models or any(not m or m != m.strip() for m in self.models):
            raise ConfigError("--models", ",".join(self.models), "comma-separated model names")
        if len(set(self.models)) != len(self.models):
            raise ConfigError("--models", ",".join(self.models), "model names without repeats")
        _at_least("--completion-tokens", self.completion_tokens, 1)
        _at_least("--max-model-len", self.max_model_len, 1)
        _at_least("--embedding-dim", self.embedding_dim, 1)
        _at_least("--max-num-seqs", self.max_num_seqs, 0)
        _at_least("--kv-cache-tokens", self.kv_cache_tokens, 1)
        _at_least("--disconnect-after", self.disconnect_after, 0)
        for key, ms in (
            ("--ttft-ms", self.ttft_ms),
            ("--tbt-ms", self.tbt_ms),
            ("--latency-ms", self.latency_ms),
        ):
            if not (math.isfinite(ms) and ms >= 0):
                raise ConfigError(key, ms, "a number of milliseconds >= 0")
        for key, rate in (
            ("--error-rate", self.error_rate),
            ("--hang-rate", self.hang_rate),
            ("--disconnect-rate", self.disconnect_rate),
            ("--malformed-rate", self.malformed_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(key, rate, "a fraction between 0 and 1")
        if self.fault_rate_total > 1.0 + 1e-9:
            raise ConfigError(
                "--error-rate + --hang-rate + --disconnect-rate + --malformed-rate",
                self.fault_rate_total,
                "a total of at most 1 (each request draws at most one of these faults)",
            )
        if not self.error_codes or any(not 400 <= c <= 599 for c in self.error_codes):
            raise ConfigError(
                "--error-codes",
                ",".join(map(str, self.error_codes)),
                "comma-separated HTTP error statuses between 400 and 599",
            )

    @property
    def fault_rate_total(self) -> float:
        """The share of requests that draw a random fault."""
        return self.error_rate + self.hang_rate + self.disconnect_rate + self.malformed_rate

    @property
    def injects_faults(self) -> bool:
        """Whether a request without a fault header may get a fault from this configuration."""
        return self.fault_rate_total > 0.0 or self.latency_ms > 0.0


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags (everything but --host, --port and --workers) to ``parser``."""
    d = SimConfig()
    add = parser.add_argument
    add(
        "--models",
        default=",".join(d.models),
        metavar="NAMES",
        help=f"comma-separated model names to serve (default: {','.join(d.models)})",
    )
    add(
        "--completion-tokens",
        type=int,
        default=d.completion_tokens,
        metavar="N",
        help=f"reply length without max_tokens (default: {d.completion_tokens})",
    )
    add(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        metavar="N",
        help=f"context length: prompt + max_tokens above it is a 400 (default: {d.max_model_len})",
    )
    add(
        "--embedding-dim",
        type=int,
        default=d.embedding_dim,
        metavar="N",
        help=f"embedding dimensions (default: {d.embedding_dim})",
    )
    add(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        metavar="N",
        help="requests of a model running at once; more wait in vllm:num_requests_waiting "
        "(default: 0, no limit)",
    )
    add(
        "--kv-cache-tokens",
        type=int,
        default=d.kv_cache_tokens,
        metavar="N",
        help="KV cache per model in tokens: a running request holds prompt + completion, one "
        f"that does not fit waits (default: {d.kv_cache_tokens})",
    )
    add(
        "--seed",
        type=int,
        default=d.seed,
        metavar="N",
        help="generation seed of requests that give none (default: 0)",
    )
    add(
        "--ttft-ms",
        type=float,
        default=d.ttft_ms,
        metavar="MS",
        help="time to first token; header x-sim-ttft-ms overrides it (default: 0)",
    )
    add(
        "--tbt-ms",
        type=float,
        default=d.tbt_ms,
        metavar="MS",
        help="time between tokens; header x-sim-tbt-ms overrides it (default: 0)",
    )
    faults = parser.add_argument_group(
        "fault injection",
        "Random faults for requests without an x-sim-fault header (which decides alone).",
    )
    add = faults.add_argument
    add(
        "--latency-ms",
        type=float,
        default=d.latency_ms,
        metavar="MS",
        help="extra delay before the first byte of every response (default: 0)",
    )
    add(
        "--error-rate",
        type=float,
        default=d.error_rate,
        metavar="P",
        help="share of requests answered with an error status (default: 0)",
    )
    add(
        "--error-codes",
        default=",".join(map(str, d.error_codes)),
        metavar="CODES",
        help="comma-separated statuses drawn from for --error-rate (default: 500,503)",
    )
    add(
        "--hang-rate",
        type=float,
        default=d.hang_rate,
        metavar="P",
        help="share of requests never answered (default: 0)",
    )
    add(
        "--disconnect-rate",
        type=float,
        default=d.disconnect_rate,
        metavar="P",
        help="share of requests whose connection is closed mid-response (default: 0)",
    )
    add(
        "--disconnect-after",
        type=int,
        default=d.disconnect_after,
        metavar="N",
        help="content tokens streamed before such a close (default: 1)",
    )
    add(
        "--malformed-rate",
        type=float,
        default=d.malformed_rate,
        metavar="P",
        help="share of requests answered 200 with a body that is not JSON (default: 0)",
    )
    add(
        "--fault-seed",
        type=int,
        default=d.fault_seed,
        metavar="N",
        help="seed of the fault draws, for reproducible runs (default: 0)",
    )


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    """The configuration the parsed flags describe; a bad value raises ``ConfigError``."""
    models = tuple(name.strip() for name in ns.models.split(","))
    try:
        codes = tuple(int(code) for code in ns.error_codes.split(","))
    except ValueError as exc:
        raise ConfigError(
            "--error-codes", ns.error_codes, "comma-separated HTTP statuses such as 500,503"
        ) from exc
    return SimConfig(
        models=models,
        completion_tokens=ns.completion_tokens,
        max_model_len=ns.max_model_len,
        embedding_dim=ns.embedding_dim,
        max_num_seqs=ns.max_num_seqs,
        kv_cache_tokens=ns.kv_cache_tokens,
        seed=ns.seed,
        ttft_ms=ns.ttft_ms,
        tbt_ms=ns.tbt_ms,
        latency_ms=ns.latency_ms,
        error_rate=ns.error_rate,
        error_codes=codes,
        hang_rate=ns.hang_rate,
        disconnect_rate=ns.disconnect_rate,
        disconnect_after=ns.disconnect_after,
        malformed_rate=ns.malformed_rate,
        fault_seed=ns.fault_seed,
    )
