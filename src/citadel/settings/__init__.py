"""Citadel's settings: one frozen, typed object, read once from a YAML file and the environment.

``load_settings(path, environ)`` is the only way in; ``cli.py`` calls it once and hands the result
to what it wires. The loader is given the environment as a mapping and never reads ``os.environ``.

Where a value comes from, strongest first: an environment variable, the YAML file, the default here.
The file is ``path`` if given, else ``$CITADEL_CONFIG``, else ``./citadel.yaml`` if it exists, else
none (all defaults, no models). An empty environment variable counts as unset, as in env files.

Every bad value raises ``ConfigError(key, value, expected)``, where ``key`` is the dotted YAML path
(``models[0].deployments[1].weight``) or the environment variable's name. Types are strict: a bool
is not a number, a string is not a list; an int is accepted where a float is expected. Unknown and
repeated YAML keys are errors too, because a misspelt key silently ignored is a setting lost. A
key set to null (or left empty) takes its default.

This module is the front: the loader, the environment overlay, and every public name. The
sections (``Settings`` and its parts) are frozen dataclasses in ``sections``, what each YAML key
accepts is in ``schema``, and the parsers of single values, which build the ``ConfigError``
messages, are in ``parsers``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from citadel.errors import ConfigError
from citadel.observability.names import parse_slos
from citadel.settings.parsers import (
    Parser,
    mapping,
    parse_keys,
    parse_section,
    raw_section,
    timezone,
)
from citadel.settings.schema import (
    ACCOUNTS,
    ENDPOINTS,
    GATEWAY,
    GRAFANA,
    GRAPHQL,
    LIMITS,
    METERING,
    METRICS,
    OBSERVABILITY,
    PORTS,
    SCALARS,
    TIMEOUTS,
    TOP,
    parse_models,
    parse_routing,
    parse_tiers,
)
from citadel.settings.sections import (
    BALANCERS,
    DEFAULT_TIERS,
    ENVS,
    KINDS,
    LOG_LEVELS,
    AccountsSettings,
    BreakerSettings,
    Deployment,
    Endpoints,
    GatewaySettings,
    GrafanaSettings,
    GraphQLSettings,
    HealthSettings,
    LimitsSettings,
    MeteringSettings,
    MetricsSettings,
    Model,
    ObservabilitySettings,
    Ports,
    Price,
    RoutingSettings,
    Settings,
    Tier,
    Timeouts,
)

__all__ = [
    "BALANCERS",
    "DEFAULT_CONFIG",
    "DEFAULT_TIERS",
    "DEV_ADMIN_KEY",
    "ENVS",
    "KINDS",
    "LOG_LEVELS",
    "AccountsSettings",
    "BreakerSettings",
    "Deployment",
    "Endpoints",
    "GatewaySettings",
    "GrafanaSettings",
    "GraphQLSettings",
    "HealthSettings",
    "LimitsSettings",
    "MeteringSettings",
    "MetricsSettings",
    "Model",
    "ObservabilitySettings",
    "Ports",
    "Price",
    "RoutingSettings",
    "Settings",
    "Tier",
    "Timeouts",
    "load_settings",
]

DEFAULT_CONFIG = "citadel.yaml"
# The admin key a development or test instance gets when none is set; refused anywhere else.
DEV_ADMIN_KEY = "sk-citadel-dev"
_INSECURE_ENVS = ("development", "test")


# --- The environment overlay: which variables set which fields, and how their text is read.


def _integer_text(parse: Parser) -> Parser:
    """Adapt an integer parser to an environment variable's text."""

    def parse_text(value: object, key: str) -> Any:
        text = str(value).strip()
        return parse(int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else text, key)

    return parse_text


EnvTable = Mapping[str, tuple[str, Parser]]  # variable name -> (field name, parser)


def _from_env(environ: Mapping[str, str], table: EnvTable) -> dict[str, Any]:
    """The fields set by those variables of `table` that are present in `environ`."""
    values: dict[str, Any] = {}
    for var, (name, parse) in table.items():
        text = environ.get(var, "")
        if text.strip():
            try:
                values[name] = parse(text, var)
            except ConfigError as exc:  # report the text as written, not as converted
                raise ConfigError(var, text, exc.expected) from None
    return values


_SCALARS_ENV = {
    "CITADEL_ENV": ("env", SCALARS["env"]),
    "SERVER_IP": ("host", SCALARS["host"]),
    "SERVER_HOSTNAME": ("hostname", SCALARS["hostname"]),
    "CITADEL_LOG_LEVEL": ("log_level", SCALARS["log_level"]),
}
_PORTS_ENV = {
    f"{'API_GATEWAY' if name == 'gateway' else name.upper()}_PORT": (name, _integer_text(parse))
    for name, parse in PORTS.items()
}
_ENDPOINTS_ENV = {f"{name.upper()}_ENDPOINT": (name, parse) for name, parse in ENDPOINTS.items()}
_GATEWAY_ENV = {
    "CITADEL_ADMIN_KEY": ("admin_key", GATEWAY["admin_key"]),
    "CITADEL_READONLY_KEY": ("readonly_key", GATEWAY["readonly_key"]),
    "CITADEL_MAX_BODY_BYTES": ("max_body_bytes", _integer_text(GATEWAY["max_body_bytes"])),
    "CITADEL_WORKERS": ("workers", _integer_text(GATEWAY["workers"])),
}
_LIMITS_ENV = {"CITADEL_LIMITS_FAILURE_MODE": ("failure_mode", LIMITS["failure_mode"])}
_METRICS_ENV = {"CITADEL_METRICS_TOKEN": ("token", METRICS["token"])}
_GRAFANA_ENV = {f"GRAFANA_{k.upper()}": (k, GRAFANA[k]) for k in GRAFANA}


def _store_uri(value: str, scheme: str) -> str:
    """A store endpoint given as host:port becomes a URI of ``scheme``."""
    return value if "://" in value else f"{scheme}://{value}"


def load_settings(path: str | None, environ: Mapping[str, str]) -> Settings:
    """Read the settings from the YAML file (see the module docstring) and `environ`."""
    source = _config_source(path, environ)
    config_path = source[0] if source else None
    data = _read_yaml(*source) if source else None
    if not isinstance(data, dict | None):
        raise ConfigError(str(config_path), data, "a mapping of settings at the top level")
    doc = mapping(data, "", TOP)
    scalars = parse_keys(doc, "", SCALARS) | _from_env(environ, _SCALARS_ENV)
    ports = parse_section(doc.get("ports"), "ports", PORTS) | _from_env(environ, _PORTS_ENV)
    endpoints = parse_section(doc.get("endpoints"), "endpoints", ENDPOINTS)
    endpoints |= _from_env(environ, _ENDPOINTS_ENV)
    gateway = parse_section(doc.get("gateway"), "gateway", GATEWAY)
    gateway |= _from_env(environ, _GATEWAY_ENV)
    _check_admin_key(gateway, scalars.get("env", "development"))
    timeouts = Timeouts(**parse_section(doc.get("timeouts"), "timeouts", TIMEOUTS))
    models = parse_models(doc.get("models"), timeouts)
    tiers = parse_tiers(doc.get("tiers"), models)
    limits = parse_section(doc.get("limits"), "limits", LIMITS) | _from_env(environ, _LIMITS_ENV)
    if "backend" not in limits and endpoints.get("redis"):
        limits["backend"] = _store_uri(endpoints["redis"], "redis")
    timezone(limits.get("timezone", "UTC"), "limits.timezone")
    accounts = parse_section(doc.get("accounts"), "accounts", ACCOUNTS)
    if "database" not in accounts and endpoints.get("sql_database"):
        accounts["database"] = _store_uri(endpoints["sql_database"], "postgresql")
    metrics = parse_section(doc.get("metrics"), "metrics", METRICS)
    metrics |= _from_env(environ, _METRICS_ENV)
    env = scalars.get("env", "development")
    metrics.setdefault("require_token", env not in _INSECURE_ENVS)
    gateway.setdefault("cors_origins", ("*",) if env == "development" else ())
    default_tier = accounts.get("default_tier", "free")
    names = [t.name for t in tiers]
    if default_tier not in names:
        expected = f"one of the tiers configured ({', '.join(names)})"
        if "default_tier" not in accounts:  # not written: the default met a `tiers:` section
            expected += (
                f"; '{default_tier}' is the default, and a `tiers:` section replaces the "
                f"built-in tiers ({', '.join(t.name for t in DEFAULT_TIERS)}): set "
                "accounts.default_tier, or define that tier"
            )
        raise ConfigError("accounts.default_tier", default_tier, expected)
    return Settings(
        **scalars,
        ports=Ports(**ports),
        endpoints=Endpoints(**endpoints),
        gateway=GatewaySettings(**gateway),
        timeouts=timeouts,
        models=models,
        tiers=tiers,
        limits=LimitsSettings(**limits),
        accounts=AccountsSettings(**accounts),
        routing=parse_routing(doc.get("routing"), models),
        metering=MeteringSettings(**parse_section(doc.get("metering"), "metering", METERING)),
        metrics=MetricsSettings(**metrics),
        grafana=GrafanaSettings(
            **parse_section(doc.get("grafana"), "grafana", GRAFANA)
            | _from_env(environ, _GRAFANA_ENV)
        ),
        alerting=raw_section(doc.get("alerting"), "alerting"),
        # With no model configured the embedded ones serve; services.slos_for checks those.
        slos=None
        if doc.get("slos") is None
        else parse_slos(doc["slos"], [m.name for m in models] if models else None),
        observability=ObservabilitySettings(
            **parse_section(doc.get("observability"), "observability", OBSERVABILITY)
        ),
        graphql=GraphQLSettings(**parse_section(doc.get("graphql"), "graphql", GRAPHQL)),
        config_path=config_path,
    )


def _config_source(path: str | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The file to read and the key naming it in errors, or None to read no file."""
    if path is not None:
        return path, "config"
    if environ.get("CITADEL_CONFIG", "").strip():
        return environ["CITADEL_CONFIG"].strip(), "CITADEL_CONFIG"
    if Path(DEFAULT_CONFIG).is_file():
        return DEFAULT_CONFIG, "config"
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str, key: str) -> object:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(key, path, f"an existing, readable UTF-8 YAML file ({reason})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        lines = text.splitlines()
        line = lines[mark.line] if mark and mark.line < len(lines) else None
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(path, line, f"valid YAML: {exc.problem or exc.context}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, f"valid YAML: {exc}") from exc


def _check_admin_key(gateway: dict[str, Any], env: str) -> None:
    """Give development and test instances the well-known key; demand a real one elsewhere."""
    key = gateway.get("admin_key")
    if env in _INSECURE_ENVS:
        gateway.setdefault("admin_key", DEV_ADMIN_KEY)
    elif key is None:
        raise ConfigError("gateway.admin_key", None, "an admin key (set CITADEL_ADMIN_KEY)")
    elif key == DEV_ADMIN_KEY:
        raise ConfigError("gateway.admin_key", key, f"a non-development key in {env}")
    readonly = gateway.get("readonly_key")
    if readonly is not None and readonly == gateway.get("admin_key"):
        raise ConfigError(
            "gateway.readonly_key", "(the admin key)", "a key other than the admin key"
        )
