"""The one command, ``citadel``: the only place that reads settings and wires objects together.

citadel up                 every service on this machine, with embedded defaults
citadel serve NAME         one service (gateway, ...)
citadel sim                the model simulator
citadel rules | dashboards | prometheus-config | alertmanager-config
                           the generated observability files (citadel.observability.commands)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from citadel import __version__
from citadel.errors import ConfigError
from citadel.log import configure_logging
from citadel.registry import SERVICES as REGISTRY
from citadel.settings import Deployment, Model, Price, Settings, load_settings, parsers

# Services by their `citadel serve NAME` name -> the settings.Ports attribute (citadel.registry).
SERVICES: dict[str, str] = {name: spec.port for name, spec in REGISTRY.items()}
# Names later issues add; `serve` says they are not built yet rather than "unknown".
PLANNED: tuple[str, ...] = ()


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one clear line, not usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(parse: Callable[[object, str], int], what: str) -> Callable[[str], int]:
    """An argparse type for an integer flag checked as the settings check ``what``: ``--port
    99999`` is one line saying what is expected, not a port wrapped modulo 65536."""

    def convert(text: str) -> int:
        try:
            return parse(int(text), what)
        except (ValueError, ConfigError) as exc:
            expected = exc.expected if isinstance(exc, ConfigError) else "an integer"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from exc

    convert.__name__ = what  # argparse names a failed conversion by it
    return convert


_PORT = _flag(parsers.port, "port")
_WORKERS = _flag(parsers.integer(1), "workers")
_CONCURRENCY = _flag(parsers.integer(1), "concurrency")


def embedded_models(settings: Settings) -> tuple[Model, ...]:
    """The models served when none are configured: the simulator's, on its default port."""
    url = f"http://127.0.0.1:{settings.ports.simulator}"

    def model(name: str, kind: str, specialties: tuple[str, ...], price: Price) -> Model:
        deployment = Deployment(name=f"{name}-sim", url=url, upstream_model=name)
        return Model(
            name=name,
            kind=kind,
            deployments=(deployment,),
            specialties=specialties,
            price=price,
            timeouts=settings.timeouts,
        )

    return (
        model("sim-chat", "chat", ("chat",), Price(input_per_1k=0.0005, output_per_1k=0.0015)),
        model("sim-code", "chat", ("code",), Price(input_per_1k=0.001, output_per_1k=0.003)),
        model("sim-embed", "embedding", ("embedding",), Price(input_per_1k=0.0001)),
    )


def _with_defaults(settings: Settings) -> Settings:
    return settings if settings.models else settings.with_models(embedded_models(settings))


# -- commands ---------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    name = args.name
    if name in PLANNED:
        print(f"citadel: service {name!r} is not built yet", file=sys.stderr)
        return 2
    configure_logging(name, settings.log_level)
    settings = _with_defaults(settings)
    from citadel.service import App, serve

    spec = REGISTRY.get(name)
    if spec is None:  # pragma: no cover - argparse only lets SERVICES through
        print(f"citadel: unknown service {name!r}", file=sys.stderr)
        return 2
    for variable, value in spec.environment.items():
        os.environ.setdefault(variable, value)
    module = spec.load()
    if name == "gateway":
        workers = args.workers if args.workers is not None else settings.gateway.workers
    elif spec.one_worker:
        workers = 1
    else:
        workers = args.workers if args.workers is not None else 1
    grace = settings.gateway.shutdown_grace_seconds

    host = args.host or settings.host
    port = args.port if args.port is not None else getattr(settings.ports, SERVICES[name])
    if name != "gateway":
        from litestar import Litestar

        from citadel.web.run import serve as serve_web

        app = module.create_app(settings, module.default_deps(settings))
        if isinstance(app, Litestar):
            if workers > 1:
                print(f"citadel: {name} runs one worker process; drop --workers", file=sys.stderr)
                return 2
            return serve_web(app, host=host, port=port, grace=grace)

    def factory() -> App:
        app: App = module.create_app(settings, module.default_deps(settings))
        return app

    return serve(factory, host=host, port=port, workers=workers, grace=grace)


def _cmd_graphql_schema(args: argparse.Namespace, settings: Settings) -> int:
    """Print the GraphQL schema (SDL) the graphql-api service serves."""
    from citadel.graphql.schema import build_schema

    print(build_schema().as_str())
    return 0


def _cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from citadel.service import serve
    from citadel.sim.app import create_app
    from citadel.sim.config import config_from_args

    configure_logging("simulator", settings.log_level)
    config = config_from_args(args)
    port = args.port if args.port is not None else settings.ports.simulator
    return serve(
        lambda: create_app(config),
        host=args.host or settings.host,
        port=port,
        workers=args.workers,
        grace=5.0,
    )


def _usage_stream(settings: Settings) -> bool:
    """Whether the gateway's usage events go to a Redis Stream (``endpoints.redis``, else a
    redis:// limiter backend: the gateway's ``usage_sink`` choice) for a ledger writer to drain."""
    from citadel.metering.writer import redis_url

    try:
        redis_url(settings.endpoints.redis, settings.limits.backend)
    except ConfigError:
        return False
    return True


def _cmd_ledger_writer(args: argparse.Namespace, settings: Settings) -> int:
    from citadel.metering.writer import run_writer

    configure_logging("ledger-writer", settings.log_level)
    return run_writer(
        settings,
        consumer=args.consumer,
        claim_idle_seconds=args.claim_idle_seconds,
        concurrency=args.concurrency,
    )


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start the simulator (when no model is configured), every service, Prometheus and
    Alertmanager (when installed and none is configured: citadel.observability.monitoring)
    and, when usage goes through Redis, a ledger writer; then keep them running until a
    signal."""
    base = [sys.executable, "-m", "citadel"]
    if args.config:
        base += ["--config", args.config]
    plan: list[tuple[str, list[str], int | None]] = []
    if not settings.models:
        plan.append(("simulator", [*base, "sim"], settings.ports.simulator))
    plan.extend(
        (name, [*base, "serve", name], getattr(settings.ports, attr))
        for name, attr in SERVICES.items()
    )
    from citadel.observability.monitoring import plan as monitoring_plan

    monitoring = monitoring_plan(_with_defaults(settings))
    plan.extend(monitoring.processes)
    # The services find the Prometheus and Alertmanager started here (children inherit these).
    os.environ.update(monitoring.environment)
    if _usage_stream(settings):
        # The gateway sends usage events to a Redis Stream: one writer drains it into the SQL
        # ledger. Without Redis the gateway writes the ledger itself and no writer is needed.
        plan.append(("ledger-writer", [*base, "ledger-writer"], None))
    from citadel.supervisor import Supervisor

    supervisor = Supervisor(
        [(name, command) for name, command, _port in plan],
        grace=settings.gateway.shutdown_grace_seconds,
    )
    print(banner(plan, settings), end="", flush=True)
    if monitoring.note:
        print(monitoring.note, flush=True)
    # A child that exits is restarted with backoff while the others keep serving
    # (citadel.supervisor); SIGTERM or SIGINT stops them all.
    return supervisor.run()


def banner(plan: Sequence[tuple[str, list[str], int | None]], settings: Settings) -> str:
    """What `citadel up` starts and where, one aligned row each (and the development admin key)."""
    host = settings.hostname
    # The live console first: what a person starting Citadel wants to open.
    rows = [("console", f"http://{host}:{settings.ports.grafana_dashboards}/")]
    rows += [
        (name, f"http://{host}:{port}" if port is not None else settings.metering.stream)
        for name, _command, port in plan
    ]
    if settings.env in ("development", "test") and not os.environ.get("CITADEL_ADMIN_KEY"):
        rows.append(("admin key", settings.gateway.admin_key))
    width = max(len(name) for name, _ in rows)
    return "Citadel is starting:\n" + "".join(f"  {n:<{width}}  {w}\n" for n, w in rows)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="citadel",
        description="Citadel: an OpenAI-compatible gateway for self-hosted language models.",
    )
    parser.add_argument("--version", action="version", version=f"citadel {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (default: $CITADEL_CONFIG, else ./citadel.yaml if present)",
    )
    # Not required=True: argparse would then report a missing command before an unknown flag,
    # and `citadel --bogus` would not name --bogus. `main` checks both, the flag first.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    up = commands.add_parser(
        "up",
        help="start every service on this machine (and the simulator if no model is configured)",
        description="Start every built service on this machine with embedded defaults; when no "
        "model is configured the simulator is started too and the gateway routes to it.",
    )
    up.set_defaults(func=_cmd_up)

    serve = commands.add_parser(
        "serve",
        help="start one service",
        description="Start one service in the foreground. SIGTERM stops it gracefully.",
    )
    serve.add_argument(
        "name",
        choices=[*SERVICES, *PLANNED],
        metavar="NAME",
        help="one of: " + ", ".join([*SERVICES, *PLANNED]),
    )
    serve.add_argument("--host", help="address to bind (default: SERVER_IP or 127.0.0.1)")
    serve.add_argument("--port", type=_PORT, help="port to bind (default: the service's port)")
    serve.add_argument(
        "--workers",
        type=_WORKERS,
        help="worker processes sharing the port (default: from settings)",
    )
    serve.set_defaults(func=_cmd_serve)

    sim = commands.add_parser(
        "sim",
        help="start the simulated OpenAI-compatible model server",
        description="A simulated vLLM-like model server with fault injection, for tests, "
        "benchmarks and the embedded default upstream.",
    )
    sim.add_argument("--host", help="address to bind (default: SERVER_IP or 127.0.0.1)")
    sim.add_argument("--port", type=_PORT, help="port to bind (default: 8100 or SIMULATOR_PORT)")
    sim.add_argument("--workers", type=_WORKERS, default=1, help="worker processes (default: 1)")
    from citadel.sim.config import add_arguments

    add_arguments(sim)
    sim.set_defaults(func=_cmd_sim)
    graphql = commands.add_parser(
        "graphql",
        help="the GraphQL API's schema",
        description="Tools for the GraphQL API (graphql-api, :9095).",
    )
    graphql_commands = graphql.add_subparsers(
        dest="graphql_command", metavar="COMMAND", parser_class=_Parser, required=True
    )
    schema = graphql_commands.add_parser("schema", help="print the schema (SDL)")
    schema.set_defaults(func=_cmd_graphql_schema)
    writer = commands.add_parser(
        "ledger-writer",
        help="drain the usage stream (Redis) into the SQL ledger",
        description="Run one ledger writer until SIGTERM or SIGINT (`citadel up` starts one "
        "when usage goes through Redis; run more on other hosts: they share the work).",
    )
    writer.add_argument(
        "--consumer", help="this writer's name in the group (default: host-pid; unique per writer)"
    )
    writer.add_argument(
        "--claim-idle-seconds",
        type=float,
        default=30.0,
        help="take over entries another writer has held this long (default: 30)",
    )
    writer.add_argument(
        "--concurrency",
        type=_CONCURRENCY,
        default=2,
        help="batches written at once, each on its own connection (default: 2)",
    )
    writer.set_defaults(func=_cmd_ledger_writer)
    from citadel.accounts import admin
    from citadel.observability import commands as observability

    admin.add_arguments(commands)
    observability.add_arguments(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("a command is required: up, serve or sim")
    try:
        settings = load_settings(args.config, os.environ)
    except ConfigError as exc:
        print(f"citadel: {exc}", file=sys.stderr)
        return 2
    command: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        return command(args, settings)
    except ConfigError as exc:
        print(f"citadel: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"citadel: {exc}", file=sys.stderr)
        return 1
