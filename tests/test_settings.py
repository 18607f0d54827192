"""Settings: loading YAML and environment, defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from citadel.errors import ConfigError
from citadel.settings import (
    DEV_ADMIN_KEY,
    Deployment,
    Endpoints,
    Model,
    Ports,
    Price,
    Settings,
    Timeouts,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "citadel.example.yaml"

ONE_MODEL = """
models:
  - name: m
    deployments:
      - {url: "http://127.0.0.1:8100"}
"""


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "citadel.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(str(path), environ or {})


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    return caught.value


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file and an empty environment every setting has its default; there are no models."""
    monkeypatch.chdir(tmp_path)

    settings = load_settings(None, {})

    assert "development" == settings.env
    assert ("127.0.0.1", "localhost", "INFO") == (
        settings.host,
        settings.hostname,
        settings.log_level,
    )
    assert Ports() == settings.ports
    assert Endpoints() == settings.endpoints
    assert Timeouts() == settings.timeouts
    assert DEV_ADMIN_KEY == settings.gateway.admin_key
    assert () == settings.models
    assert None is settings.config_path


def test_example_file_loads() -> None:
    """The shipped example loads cleanly with three simulator models."""
    settings = load_settings(str(EXAMPLE), {})

    assert ["sim-chat", "sim-code", "sim-embed"] == [model.name for model in settings.models]
    assert ["chat", "chat", "embedding"] == [model.kind for model in settings.models]
    assert ("code",) == settings.models[1].specialties
    urls = {d.url for model in settings.models for d in model.deployments}
    assert {"http://127.0.0.1:8100"} == urls
    assert str(EXAMPLE) == settings.config_path


def test_deployment_defaults_come_from_the_model(tmp_path: Path) -> None:
    """A deployment without name or model is named "<model>-<index>" and sends the model's name."""
    text = """
models:
  - name: m
    deployments:
      - {url: "http://127.0.0.1:8100/v1/"}
      - {url: "https://h.example", name: other, model: upstream-m, weight: 3}
"""
    deployments = load_text(tmp_path, text).models[0].deployments

    expected = (
        Deployment(name="m-0", url="http://127.0.0.1:8100", upstream_model="m"),
        Deployment(name="other", url="https://h.example", upstream_model="upstream-m", weight=3.0),
    )
    assert expected == deployments
    assert isinstance(deployments[1].weight, float)


def test_model_timeouts_fall_back_field_by_field(tmp_path: Path) -> None:
    """A model's timeouts override the top-level ones only for the fields it sets."""
    text = """
timeouts: {connect: 2, total: 100}
models:
  - name: m
    timeouts: {first_byte: 7.5}
    price: {input_per_1k: 1}
    deployments:
      - {url: "http://127.0.0.1:8100", price: {output_per_1k: 0.5}}
"""
    settings = load_text(tmp_path, text)
    model = settings.models[0]

    assert Timeouts(connect=2.0, first_byte=60.0, total=100.0) == settings.timeouts
    assert Timeouts(connect=2.0, first_byte=7.5, total=100.0) == model.timeouts
    assert Price(input_per_1k=1.0) == model.price
    assert Price(output_per_1k=0.5) == model.deployments[0].price


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    """Environment variables win over the file, and an empty one counts as unset."""
    text = "host: 10.0.0.1\nports: {routing_api: 1234, graphql_api: 1235}\n"
    environ = {
        "CITADEL_ENV": "staging",
        "SERVER_IP": "0.0.0.0",
        "SERVER_HOSTNAME": "llm.example.com",
        "CITADEL_LOG_LEVEL": "debug",
        "ROUTING_API_PORT": "9999",
        "API_GATEWAY_PORT": "8080",
        "GRAPHQL_API_PORT": "",
        "REDIS_ENDPOINT": "redis://cache:6379/0",
        "PROMETHEUS_ENDPOINT": "http://prom:9090/",
        "CITADEL_ADMIN_KEY": "sk-admin",
        "CITADEL_WORKERS": "4",
        "CITADEL_MAX_BODY_BYTES": "2048",
    }

    settings = load_text(tmp_path, text, environ)

    assert ("staging", "0.0.0.0", "llm.example.com", "DEBUG") == (
        settings.env,
        settings.host,
        settings.hostname,
        settings.log_level,
    )
    assert (9999, 8080, 1235) == (
        settings.ports.routing_api,
        settings.ports.gateway,
        settings.ports.graphql_api,
    )
    assert "redis://cache:6379/0" == settings.endpoints.redis
    assert "http://prom:9090" == settings.endpoints.prometheus
    assert ("sk-admin", 4, 2048) == (
        settings.gateway.admin_key,
        settings.gateway.workers,
        settings.gateway.max_body_bytes,
    )


def test_citadel_config_names_the_file(tmp_path: Path) -> None:
    """Without a path argument the file named by CITADEL_CONFIG is read."""
    path = tmp_path / "elsewhere.yaml"
    path.write_text(ONE_MODEL, encoding="utf-8")

    settings = load_settings(None, {"CITADEL_CONFIG": str(path)})

    assert (str(path), "m") == (settings.config_path, settings.models[0].name)


def test_citadel_yaml_in_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a path or CITADEL_CONFIG, ./citadel.yaml is read when it exists."""
    (tmp_path / "citadel.yaml").write_text(ONE_MODEL, encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    settings = load_settings(None, {})

    assert ("citadel.yaml", "m") == (settings.config_path, settings.models[0].name)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    """A file named explicitly but absent is an error naming where the name came from."""
    missing = str(tmp_path / "nope.yaml")

    with pytest.raises(ConfigError) as from_argument:
        load_settings(missing, {})
    with pytest.raises(ConfigError) as from_environment:
        load_settings(None, {"CITADEL_CONFIG": missing})

    assert ("config", missing) == (from_argument.value.key, from_argument.value.value)
    assert "CITADEL_CONFIG" == from_environment.value.key


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    """A YAML syntax error names the file, the offending line and its number."""
    error = config_error(tmp_path, "env: development\nports:\n  gateway: : 8000\n")

    assert str(tmp_path / "citadel.yaml") == error.key
    assert "  gateway: : 8000" == error.value
    assert error.expected.startswith("valid YAML: ")
    assert "line 3" in error.expected


def test_unknown_top_level_key_has_no_prefix(tmp_path: Path) -> None:
    """An unknown top-level key is named alone, not under the file's path."""
    error = config_error(tmp_path, "modles: []\n")

    assert ("modles", []) == (error.key, error.value)


def test_null_takes_the_default(tmp_path: Path) -> None:
    """A key set to null or left empty takes its default."""
    settings = load_text(tmp_path, "host:\nendpoints: {redis: null}\ngateway: {workers: null}\n")

    assert ("127.0.0.1", None, 1) == (
        settings.host,
        settings.endpoints.redis,
        settings.gateway.workers,
    )


def test_repeated_yaml_key_is_an_error(tmp_path: Path) -> None:
    """A key given twice in one mapping is refused instead of the last one silently winning."""
    error = config_error(tmp_path, "ports:\n  gateway: 8000\n  gateway: 8001\n")

    assert "found duplicate key 'gateway'" in error.expected
    assert "line 3" in error.expected


@pytest.mark.parametrize(
    ("weight", "expected"),
    [('"heavy"', "heavy"), ("true", True), ("0", 0), ("-1.5", -1.5), (".nan", None)],
)
def test_bad_weight_names_the_dotted_key(tmp_path: Path, weight: str, expected: object) -> None:
    """A weight that is not a positive number is refused with its full dotted path."""
    text = f"""
models:
  - name: m
    deployments:
      - {{url: "http://a:1"}}
      - {{url: "http://b:1", weight: {weight}}}
"""
    error = config_error(tmp_path, text)

    assert ("models[0].deployments[1].weight", "a number > 0") == (error.key, error.expected)
    if expected is not None:
        assert expected == error.value


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    """A boolean where an integer belongs is refused."""
    error = config_error(tmp_path, "gateway: {workers: true}\n")

    assert ("gateway.workers", True, "an integer >= 1") == (error.key, error.value, error.expected)


def test_error_message_names_key_value_and_expectation(tmp_path: Path) -> None:
    """The message reads: invalid setting KEY=VALUE: expected WHAT."""
    error = config_error(tmp_path, "ports: {simulator: 70000}\n")

    assert "invalid setting ports.simulator=70000: expected an integer port 1-65535" == str(error)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """A misspelt key is refused with its path and the list of known keys."""
    text = ONE_MODEL.replace("- name: m", "- name: m\n    context_windw: 4096")

    error = config_error(tmp_path, text)

    assert ("models[0].context_windw", 4096) == (error.key, error.value)
    assert error.expected.startswith("one of the known keys: name, kind, context_window")


def test_bad_url_is_refused(tmp_path: Path) -> None:
    """A deployment URL must be http:// or https:// with a host."""
    error = config_error(tmp_path, ONE_MODEL.replace("http://127.0.0.1:8100", "127.0.0.1:8100"))

    assert ("models[0].deployments[0].url", "127.0.0.1:8100") == (error.key, error.value)


def test_bad_port_env_var_is_named(tmp_path: Path) -> None:
    """A bad port in the environment is reported under the variable's name, as written."""
    error = config_error(tmp_path, "", {"ROUTING_API_PORT": "abc"})

    assert "invalid setting ROUTING_API_PORT='abc': expected an integer port 1-65535" == str(error)


def test_out_of_range_port_env_var_shows_the_text(tmp_path: Path) -> None:
    """An out-of-range port from the environment is shown as the text that was set."""
    error = config_error(tmp_path, "", {"SIMULATOR_PORT": "0"})

    assert ("SIMULATOR_PORT", "0") == (error.key, error.value)


def test_unknown_env_name_is_refused(tmp_path: Path) -> None:
    """CITADEL_ENV must be one of the four environments."""
    error = config_error(tmp_path, "", {"CITADEL_ENV": "prod"})

    assert ("CITADEL_ENV", "prod") == (error.key, error.value)
    assert "one of development, test, staging, production" == error.expected


@pytest.mark.parametrize("deployments", ["", "    deployments: []\n"])
def test_model_without_deployments_is_refused(tmp_path: Path, deployments: str) -> None:
    """A model needs at least one deployment."""
    error = config_error(tmp_path, f"models:\n  - name: m\n{deployments}")

    assert ("models[0].deployments", "a non-empty list of deployments") == (
        error.key,
        error.expected,
    )


def test_duplicate_model_name_or_alias_is_refused(tmp_path: Path) -> None:
    """An alias may not repeat another model's name."""
    text = """
models:
  - {name: a, deployments: [{url: "http://h:1"}]}
  - {name: b, aliases: [x, a], deployments: [{url: "http://h:1"}]}
"""
    error = config_error(tmp_path, text)

    assert ("models[1].aliases[1]", "a") == (error.key, error.value)


def test_duplicate_deployment_name_is_refused(tmp_path: Path) -> None:
    """Deployment names are unique across all models, default names included."""
    text = """
models:
  - {name: a, deployments: [{url: "http://h:1"}]}
  - {name: b, deployments: [{url: "http://h:1", name: a-0}]}
"""
    error = config_error(tmp_path, text)

    assert ("models[1].deployments[0].name", "a-0") == (error.key, error.value)


def test_production_requires_an_admin_key(tmp_path: Path) -> None:
    """Outside development and test there is no default admin key."""
    error = config_error(tmp_path, "env: production\n")

    assert (
        "invalid setting gateway.admin_key=None: expected an admin key (set CITADEL_ADMIN_KEY)"
        == str(error)
    )


def test_production_refuses_the_development_admin_key(tmp_path: Path) -> None:
    """The well-known development key is refused in production even when set explicitly."""
    error = config_error(
        tmp_path, "", {"CITADEL_ENV": "production", "CITADEL_ADMIN_KEY": DEV_ADMIN_KEY}
    )

    assert "gateway.admin_key" == error.key


def test_model_lookup_by_name_and_alias() -> None:
    """A model is found by its name or any alias; an unknown name gives None."""
    settings = load_settings(str(EXAMPLE), {})

    assert settings.models[0] is settings.model("default")
    assert settings.models[1] is settings.model("coder")
    assert settings.models[2] is settings.model("sim-embed")
    assert None is settings.model("gpt-4")


def test_with_models_replaces_models_and_index() -> None:
    """with_models returns a copy whose lookups see only the new models."""
    settings = load_settings(str(EXAMPLE), {})
    deployment = Deployment(name="sim-0", url="http://127.0.0.1:9999", upstream_model="sim")
    model = Model(name="sim", aliases=("default",), deployments=(deployment,))

    replaced = settings.with_models((model,))

    assert (model,) == replaced.models
    assert model is replaced.model("default")
    assert None is replaced.model("sim-chat")
    assert settings.models[0] is settings.model("default")
    assert dataclasses.replace(settings, models=(model,)) == replaced


def test_with_models_refuses_duplicates() -> None:
    """The index built for new models refuses a name used twice."""
    settings = load_settings(str(EXAMPLE), {})
    model = settings.models[0]

    with pytest.raises(ConfigError) as caught:
        settings.with_models((model, dataclasses.replace(model, aliases=())))

    assert "models[1].name" == caught.value.key


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading."""
    settings = load_settings(str(EXAMPLE), {})

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.env = "production"  # type: ignore[misc]


_MODELS = """
models:
  - name: chat
    fallbacks: [backup]
    deployments: [{url: "http://127.0.0.1:8100"}]
  - name: backup
    deployments: [{url: "http://127.0.0.1:8101"}]
"""


def test_tiers_limits_accounts_and_routing_load(tmp_path: Path) -> None:
    """Tiers, limits, accounts and routing sections load into their typed settings."""
    settings = load_text(
        tmp_path,
        _MODELS
        + """
tiers:
  gold: {requests_per_minute: 5, cost_per_month_usd: 2.5, models: [chat]}
  open: {}
limits: {failure_mode: closed, timezone: Europe/Paris}
accounts: {default_tier: gold, key_cache_ttl_seconds: 1}
routing: {balancer: cost_optimised, breaker: {minimum_calls: 3}, health: {enabled: false}}
""",
    )
    gold = settings.tier("gold")
    assert gold is not None
    assert (5, None, 2.5, ("chat",)) == (
        gold.requests_per_minute,
        gold.tokens_per_minute,
        gold.cost_per_month_usd,
        gold.models,
    )
    assert ("*",) == settings.tier("open").models  # type: ignore[union-attr]
    assert ("closed", "Europe/Paris") == (settings.limits.failure_mode, settings.limits.timezone)
    assert "gold" == settings.accounts.default_tier
    assert ("cost_optimised", 3, False) == (
        settings.routing.balancer,
        settings.routing.breaker.minimum_calls,
        settings.routing.health.enabled,
    )
    assert ("backup",) == settings.model("chat").fallbacks  # type: ignore[union-attr]


def test_store_endpoints_set_the_limiter_and_accounts_backends(tmp_path: Path) -> None:
    """REDIS_ENDPOINT and SQL_DATABASE_ENDPOINT (host:port or URI) choose the stores."""
    settings = load_text(
        tmp_path,
        "",
        {"REDIS_ENDPOINT": "10.0.0.5:6379", "SQL_DATABASE_ENDPOINT": "postgresql://db:5432/c"},
    )
    assert "redis://10.0.0.5:6379" == settings.limits.backend
    assert "postgresql://db:5432/c" == settings.accounts.database


def test_a_tiers_section_without_the_default_tier_says_which_tier_is_missing_and_why(
    tmp_path: Path,
) -> None:
    """Writing `tiers:` replaces the built-in tiers; when accounts.default_tier was not written,
    its default ('free') is then no tier: the error says so and what to do, listing the tiers."""
    error = config_error(tmp_path, "tiers: {gold: {}, silver: {requests_per_minute: 60}}")
    assert ("accounts.default_tier", "free") == (error.key, error.value)
    message = str(error)
    for part in ("gold, silver", "'free' is the default", "replaces the built-in tiers"):
        assert part in message
    assert "set accounts.default_tier" in message
    written = config_error(tmp_path, "tiers: {gold: {}}\naccounts: {default_tier: platinum}")
    assert "expected one of the tiers configured (gold)" in str(written)
    assert "built-in" not in str(written)  # written by the user: no word about the default


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tiers: {gold: {requests_per_minute: 0}}", "tiers.gold.requests_per_minute"),
        ("tiers: {gold: {models: [nope]}}", "tiers.gold.models[0]"),
        ("tiers: {gold: {speed: 3}}", "tiers.gold.speed"),
        ("accounts: {default_tier: platinum}", "accounts.default_tier"),
        ("limits: {timezone: Mars/Olympus}", "limits.timezone"),
        ("limits: {failure_mode: maybe}", "limits.failure_mode"),
        ("routing: {balancer: fastest}", "routing.balancer"),
        (
            "routing: {breaker: {failure_rate_threshold: 1.5}}",
            "routing.breaker.failure_rate_threshold",
        ),
        ("routing: {virtual_models: [chat]}", "routing.virtual_models[0]"),
    ],
)
def test_bad_limits_and_routing_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    """Each bad tier, limits, accounts or routing value fails naming its key."""
    assert key == config_error(tmp_path, _MODELS + text).key


def test_unknown_fallback_model_is_an_error(tmp_path: Path) -> None:
    """A fallback naming no configured model fails naming the key."""
    text = _MODELS.replace("fallbacks: [backup]", "fallbacks: [ghost]")
    assert "models[0].fallbacks[0]" == config_error(tmp_path, text).key


@pytest.mark.parametrize(
    ("field", "value", "maximum"),
    [
        ("tokens_per_minute", 100_000_000_000, "10000000000"),
        ("requests_per_minute", 10_000_000_001, "10000000000"),
        ("tokens_per_month", 2**53, str(2**53 - 1)),
        ("concurrent_requests", 2**60, str(2**53 - 1)),
        ("cost_per_month_usd", "1.0e+300", "9007199254"),
    ],
)
def test_a_tier_limit_the_limiter_cannot_represent_is_refused_at_start(
    tmp_path: Path, field: str, value: object, maximum: str
) -> None:
    """A limit above what the limiter's arithmetic holds fails at load, naming key and maximum."""
    error = config_error(tmp_path, f"tiers:\n  huge: {{{field}: {value}}}\n")
    assert f"tiers.huge.{field}" == error.key
    assert maximum in error.expected
    assert "the limiter can represent" in error.expected


def test_a_tier_limit_at_the_maximum_loads(tmp_path: Path) -> None:
    """The largest representable per-minute limit is accepted."""
    settings = load_text(
        tmp_path,
        "accounts: {default_tier: big}\ntiers:\n  big: {tokens_per_minute: 10000000000}\n",
    )
    assert 10_000_000_000 == settings.tiers[0].tokens_per_minute


def test_metrics_token_is_required_by_default_outside_development(tmp_path: Path) -> None:
    """/metrics is open in development, needs the admin key elsewhere, and metrics.token wins."""
    prod = {"CITADEL_ENV": "production", "CITADEL_ADMIN_KEY": "sk-prod-admin-key"}
    assert load_text(tmp_path, "").metrics_token() is None
    assert "sk-prod-admin-key" == load_text(tmp_path, "", prod).metrics_token()
    token = load_text(tmp_path, "metrics: {token: scrape}\n", prod).metrics_token()
    assert "scrape" == token
    env_token = {**prod, "CITADEL_METRICS_TOKEN": "from-env"}
    assert "from-env" == load_text(tmp_path, "", env_token).metrics_token()
    opened = load_text(tmp_path, "metrics: {require_token: false}\n", prod)
    assert opened.metrics_token() is None
    assert "dev-token" == load_text(tmp_path, "metrics: {token: dev-token}\n").metrics_token()
