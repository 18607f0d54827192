"""CORS: a browser page on an allowed origin calls the gateway; one on another origin cannot.

Headless Chromium (Playwright) runs ``fetch()`` from pages served on two other ports against a
gateway that allows only the first; the preflight (``Authorization`` and a JSON body make one)
is answered without auth.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import sync_playwright

from gateway_helpers import ADMIN_KEY, Stack, request
from support import free_port, start_process, stop_process

CHROMIUM = "/usr/bin/chromium"
_PAGE = b"<!doctype html><title>cors</title>"


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(_PAGE)))
        self.end_headers()
        self.wfile.write(_PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[tuple[str, str]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def gateway(
    stack: Stack, pages: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    config = tmp_path_factory.mktemp("cors") / "citadel.yaml"
    config.write_text(
        f"""
env: test
gateway: {{cors_origins: ["{pages[0]}"]}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "{stack.sim}", model: sim-chat}}]
"""
    )
    port = free_port()
    proc = start_process(
        [
            sys.executable,
            "-m",
            "citadel",
            "--config",
            str(config),
            "serve",
            "gateway",
            "--port",
            str(port),
        ],
        port,
        env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


_FETCH = """async ([url, key]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {
      method: "POST",
      headers: {"authorization": "Bearer " + key, "content-type": "application/json"},
      body: JSON.stringify({model: "sim-chat", messages: [{role: "user", content: "hi"}]}),
    });
    const body = await r.json();
    return {status: r.status, model: body.model, rid: r.headers.get("x-request-id")};
  } catch (e) {
    return {error: String(e)};
  }
}"""


def _fetch_from(page_url: str, gateway: str) -> dict[str, object]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(page_url)
            result: dict[str, object] = page.evaluate(_FETCH, [gateway, ADMIN_KEY])
            return result
        finally:
            browser.close()


def test_browser_on_an_allowed_origin_calls_the_gateway(
    gateway: str, pages: tuple[str, str]
) -> None:
    """A page on the allowed origin gets the reply, and can read the exposed request id."""
    result = _fetch_from(pages[0], gateway)
    assert (200, "sim-chat") == (result.get("status"), result.get("model")), result
    assert str(result.get("rid")).startswith("req_")


def test_browser_on_another_origin_is_refused(gateway: str, pages: tuple[str, str]) -> None:
    """A page on another origin fails its preflight: fetch() rejects with a TypeError."""
    result = _fetch_from(pages[1], gateway)
    assert "TypeError" in str(result.get("error"))


def test_preflight_needs_no_auth_and_refuses_other_origins(
    gateway: str, pages: tuple[str, str]
) -> None:
    """A preflight without a key is a 204 for the allowed origin and a 403 for another."""
    asked = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization",
    }
    status, headers, _ = request(
        gateway, "OPTIONS", "/v1/chat/completions", b"", {"origin": pages[0], **asked}, auth=False
    )
    assert (204, pages[0]) == (status, headers.get("access-control-allow-origin"))
    status, headers, _ = request(
        gateway, "OPTIONS", "/v1/chat/completions", b"", {"origin": pages[1], **asked}, auth=False
    )
    assert 403 == status
    assert "access-control-allow-origin" not in headers
