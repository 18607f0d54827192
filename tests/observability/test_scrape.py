"""The generated prometheus.yml and Alertmanager configuration."""

from __future__ import annotations

from citadel.cli import SERVICES, embedded_models
from citadel.observability.scrape import alertmanager_config, prometheus_config
from citadel.settings import load_settings


def test_every_service_and_model_server_is_scraped_and_alerts_go_to_alertmanager() -> None:
    settings = load_settings(None, {"CITADEL_ENV": "test"})
    settings = settings.with_models(embedded_models(settings))
    config = prometheus_config(settings, alertmanager="http://127.0.0.1:9999")
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert {f"citadel-{name}" for name in SERVICES} <= set(jobs)
    assert jobs["citadel-model-servers"] == [f"127.0.0.1:{settings.ports.simulator}"]
    assert jobs["citadel-prometheus-rules"][0].endswith(":9094")
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9999"]


def test_a_ticket_is_inhibited_while_the_page_of_the_same_slo_fires() -> None:
    rule = alertmanager_config()["inhibit_rules"][0]
    assert rule["source_matchers"] == ['severity="page"']
    assert rule["target_matchers"] == ['severity="ticket"']
    assert rule["equal"] == ["slo"]
