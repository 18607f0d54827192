"""The live console (:9093/) in a real browser against a real installation under load.

Headless Chromium (Debian's, driven by Playwright) signs in with the read-only key, opens every
dashboard while traffic runs through the gateway, and waits for each panel to finish; Prometheus
is Debian's, scraping every second with the generated rules. Checked: the panels fed by this
stack drew points (counted in the SVG, not just a loaded page), the ledger panels drew, no panel
failed, and the page logged no console error. A second dashboards service without Prometheus
shows the ledger panels still drawing and the Prometheus panels saying why they cannot. A
screenshot of every dashboard is kept under the test's temporary directory.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from citadel.observability.dashboards import BY_UID

from console_stack import Stack, console_stack
from support import free_port, start_process, stop_process

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
pytestmark = pytest.mark.timeout(300)
BOARDS = (
    "citadel-overview",
    "citadel-deployments",
    "citadel-users",
    "citadel-business",
    "citadel-predictive",
)
# Panels this stack feeds (gateway, simulator, custom-metrics under traffic): each must draw.
MUST_DRAW = {
    "citadel-overview": ("Requests/s", "Latency", "Time to first token", "Tokens/s"),
    "citadel-deployments": ("Share of traffic", "Model server: requests/s", "Healthy"),
    "citadel-users": ("Admissions/s by decision", "Top teams by spend this month"),
    "citadel-business": (
        "Ledger: spend per hour by team",
        "Ledger: tokens per hour by model",
        "Ledger: real cost per 1k tokens by deployment (GPU-hours) and price charged",
        "Ledger: reference cost, infrastructure cost and savings by model",
        "Ledger: top users by tokens",
    ),
}
_SETTLED = """() => {
  const panels = [...document.querySelectorAll("main .panel")];
  return panels.length > 0 && panels.every((p) => p.dataset.state !== "loading");
}"""
_PANELS = """() => [...document.querySelectorAll("main .panel")].map((p) => ({
  title: p.querySelector("h3").textContent,
  state: p.dataset.state,
  source: p.dataset.source,
  points: Number(p.dataset.points),
  drawn: p.querySelectorAll("svg .series").length,
  message: (p.querySelector(".message") || {}).textContent || "",
}))"""


_LEGEND = """(title) => {
  const panel = [...document.querySelectorAll("main .panel")]
    .find((p) => p.querySelector("h3").textContent === title);
  return [...panel.querySelectorAll(".legend span")].map((s) => s.textContent);
}"""


def _get(base: str, path: str, key: str) -> tuple[int, Any]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with console_stack(tmp_path_factory.mktemp("console")) as running:
        # Until every Prometheus panel the test needs has data (scrapes and rule evaluations
        # take a few seconds to show), bounded.
        wanted = [
            (uid, i)
            for uid, titles in MUST_DRAW.items()
            for i, panel in enumerate(BY_UID[uid].panels)
            if panel.title in titles
        ]
        deadline = time.monotonic() + 90
        while wanted and time.monotonic() < deadline:
            now = int(time.time())
            uid, index = wanted[0]
            status, body = _get(
                running.console,
                f"/v1/query?dashboard={uid}&panel={index}&start={now - 900}&end={now}",
                running.admin_key,
            )
            if status == 200 and any(s["values"] for s in body["series"]):
                wanted.pop(0)
            else:
                time.sleep(1)
        if wanted:
            pytest.fail(f"no data through the console in 90 s for {wanted}: {status} {body}")
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _sign_in(page: Page, base: str, key: str) -> None:
    page.goto(base + "/")
    page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    page.fill("#key", key)
    page.click("#login button[type=submit]")


def _open(page: Page, uid: str) -> list[dict[str, Any]]:
    page.evaluate(f"location.hash = '#/{uid}'")
    page.wait_for_function(
        f"() => document.title.startsWith({json.dumps(_title(uid))})", timeout=10_000
    )
    page.wait_for_function(_SETTLED, timeout=30_000)
    panels: list[dict[str, Any]] = page.evaluate(_PANELS)
    return panels


def _title(uid: str) -> str:
    return BY_UID[uid].title


def test_every_dashboard_draws_its_panels_with_no_console_error(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    try:
        _sign_in(page, stack.console, stack.readonly_key)
        page.wait_for_selector("#tabs a", timeout=10_000)
        tabs = page.eval_on_selector_all("#tabs a", "as => as.map((a) => a.dataset.uid)")
        assert tuple(tabs) == BOARDS
        drawn_total = 0
        for uid in BOARDS:
            panels = _open(page, uid)
            page.screenshot(path=str(tmp_path / f"{uid}.png"), full_page=True)
            failed = [p for p in panels if p["state"] == "error"]
            assert failed == [], (uid, failed)
            drawn = {p["title"] for p in panels if p["state"] == "drawn" and p["points"] > 0}
            for p in panels:
                if p["state"] == "drawn":
                    assert p["drawn"] > 0, p  # points counted and SVG series drawn agree
            missing = set(MUST_DRAW.get(uid, ())) - drawn
            assert missing == set(), (uid, missing, panels)
            drawn_total += len(drawn)
        assert drawn_total >= 25, drawn_total
        # A refresh redraws: the timestamp the page sets after each round moves on.
        first = page.evaluate("document.body.dataset.refreshed")
        page.select_option("#refresh", "5")
        page.wait_for_function(
            f"() => document.body.dataset.refreshed !== {json.dumps(first)}", timeout=15_000
        )
        # A variable narrows the panels: with model=sim-chat only its series are drawn.
        _open(page, "citadel-overview")
        page.wait_for_function(
            "() => [...document.querySelectorAll('select[name=model] option')]"
            ".some((o) => o.value === 'sim-chat')",
            timeout=10_000,
        )
        assert any(n.startswith("sim-code") for n in page.evaluate(_LEGEND, "Requests/s"))
        page.select_option("select[name=model]", "sim-chat")
        page.wait_for_function(
            f"() => {{ const names = ({_LEGEND})('Requests/s');"
            " return names.length > 0 && names.every((n) => n.startsWith('sim-chat')); }",
            timeout=15_000,
        )
        assert problems == []
    finally:
        page.close()
    assert len([s for s in stack.sent if s == 200]) > 20


def test_a_wrong_key_brings_the_sign_in_form_back(stack: Stack, browser: Browser) -> None:
    page = browser.new_page()
    try:
        _sign_in(page, stack.console, "sk-wrong")
        page.wait_for_function(
            "() => document.getElementById('login-error').textContent.includes('refused')",
            timeout=10_000,
        )
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        page.close()


def test_without_prometheus_the_ledger_panels_still_draw(
    stack: Stack, browser: Browser, tmp_path: Path
) -> None:
    port = free_port()
    proc = start_process(
        [
            sys.executable,
            "-m",
            "citadel",
            "--config",
            str(stack.config),
            "serve",
            "grafana-dashboards",
            "--port",
            str(port),
        ],
        port,
        env={
            "CITADEL_ADMIN_KEY": stack.admin_key,
            "CITADEL_READONLY_KEY": stack.readonly_key,
            "METRICS_SERVER_ENDPOINT": stack.metrics,
        },
    )
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        _sign_in(page, f"http://127.0.0.1:{port}", stack.admin_key)
        page.wait_for_selector("#tabs a", timeout=10_000)
        panels = _open(page, "citadel-business")
        page.screenshot(path=str(tmp_path / "business-without-prometheus.png"), full_page=True)
        ledger = [p for p in panels if p["source"] == "ledger"]
        assert len(ledger) == 5
        assert all(p["state"] == "drawn" and p["points"] > 0 for p in ledger), ledger
        others = [p for p in panels if p["source"] == "prometheus"]
        assert others
        assert all(
            p["state"] == "error" and "PROMETHEUS_ENDPOINT" in p["message"] for p in others
        ), others
        assert errors == []  # the failed calls are answered, not thrown
    finally:
        page.close()
        stop_process(proc)


def test_a_cached_panel_answer_is_revalidated_by_its_etag(stack: Stack) -> None:
    """The console keeps each panel's answer as sent, with an ETag: the browser's If-None-Match
    gets a 304 and no body while the answer stands; another tag gets the answer itself."""
    uid, titles = next(iter(MUST_DRAW.items()))
    index = next(i for i, p in enumerate(BY_UID[uid].panels) if p.title in titles)
    now = int(time.time())
    path = f"/v1/query?dashboard={uid}&panel={index}&start={now - 900}&end={now}"
    host, port = stack.console.removeprefix("http://").split(":")

    def get(**headers: str) -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", path, headers={"authorization": f"Bearer {stack.admin_key}",
                                               **headers})  # fmt: skip
            response = conn.getresponse()
            return response.status, response.getheader("etag"), response.read()
        finally:
            conn.close()

    status, etag, body = get()
    assert 200 == status
    assert etag is not None
    assert json.loads(body)["series"]
    assert (304, etag, b"") == get(**{"if-none-match": etag})
    assert (200, etag, body) == get(**{"if-none-match": '"another"'})
