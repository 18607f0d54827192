"""A stand-in for the part of Grafana's HTTP API that provisioning uses — the one mock in the
observability tests (Grafana has no Debian or PyPI package to run here).

Small on purpose, and strict where Grafana's documentation is (Grafana 11/12, ``/api``;
docs/sources/developers/http_api/{folder,data_source,dashboard}.md in grafana/grafana): every
call needs a token or basic auth (401 ``{"message": "Unauthorized"}``); ``POST /api/folders``
takes ``title`` and an optional ``uid`` of at most 40 characters (409 when the uid is taken);
``POST /api/datasources`` takes ``name``, ``type``, ``url`` and ``access`` (proxy or direct; 409
when the name is taken); ``PUT /api/datasources/uid/{uid}`` (404 when missing);
``POST /api/dashboards/db`` takes ``dashboard`` with a ``title``, a ``uid`` of at most 40
characters and ``id`` null or the stored one, an existing ``folderUid``, and answers 412
``name-exists`` when the uid is taken without ``overwrite``; each answer has the documented
fields. A request Grafana would refuse is a 400 naming what is wrong, so a provisioning bug shows
here instead of against a real Grafana.

``fail`` queues statuses to answer to the next calls (a 412, a 500); ``calls`` records every
method and path.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "glsa_standin_token"
USER, PASSWORD = "admin", "standin-password"


@dataclass
class State:
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: list[int] = field(default_factory=list)
    next_id: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


def _bad(message: str) -> _Refused:
    return _Refused(400, {"message": message})


def _uid(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 40:
        raise _bad(f"{what} must be a string of 1 to 40 characters")
    return value


def _slug(title: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in title.lower()).split())


def _folder(state: State, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
    if method == "GET" and len(rest) == 1:
        found = state.folders.get(rest[0])
        if found is None:
            raise _Refused(404, {"message": "Folder not found"})
        return 200, found
    if method == "POST" and not rest:
        if not isinstance(body, dict) or not isinstance(body.get("title"), str):
            raise _bad("title is required")
        uid = _uid(body.get("uid"), "uid")
        if uid in state.folders:
            raise _Refused(409, {"message": "a folder with the same uid already exists"})
        folder = {
            "id": state.new_id(),
            "uid": uid,
            "title": body["title"],
            "url": f"/dashboards/f/{uid}/{_slug(body['title'])}",
            "version": 1,
        }
        state.folders[uid] = folder
        return 200, folder
    raise _Refused(404, {"message": "Not found"})


def _datasource(state: State, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
    if rest[:1] != ["uid"] and not (method == "POST" and not rest):
        raise _Refused(404, {"message": "Not found"})
    if method == "GET" and len(rest) == 2:
        found = state.datasources.get(rest[1])
        if found is None:
            raise _Refused(404, {"message": "Data source not found"})
        return 200, found
    if method in ("POST", "PUT"):
        if not isinstance(body, dict):
            raise _bad("expected a JSON object")
        for key in ("name", "type", "url", "access"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise _bad(f"{key} is required")
        if body["access"] not in ("proxy", "direct"):
            raise _bad("access must be proxy or direct")
        if method == "POST":
            uid = _uid(body.get("uid"), "uid")
            if any(d["name"] == body["name"] for d in state.datasources.values()):
                raise _Refused(409, {"message": "data source with the same name already exists"})
            stored = body | {"id": state.new_id(), "orgId": 1, "version": 1, "readOnly": False}
            state.datasources[uid] = stored
            message = "Datasource added"
        else:
            uid = rest[1] if len(rest) == 2 else ""
            if uid not in state.datasources:
                raise _Refused(404, {"message": "Data source not found"})
            old = state.datasources[uid]
            stored = old | body | {"version": old["version"] + 1}
            state.datasources[uid] = stored
            message = "Datasource updated"
        return 200, {
            "datasource": stored,
            "id": stored["id"],
            "message": message,
            "name": body["name"],
        }
    raise _Refused(404, {"message": "Not found"})


def _dashboard(state: State, method: str, rest: list[str], body: Any) -> tuple[int, Any]:
    if method == "GET" and len(rest) == 2 and rest[0] == "uid":
        found = state.dashboards.get(rest[1])
        if found is None:
            raise _Refused(404, {"message": "Dashboard not found"})
        return 200, found
    if method == "POST" and rest == ["db"]:
        if not isinstance(body, dict) or not isinstance(body.get("dashboard"), dict):
            raise _bad("dashboard is required")
        board = body["dashboard"]
        if not isinstance(board.get("title"), str):
            raise _bad("dashboard.title is required")
        uid = _uid(board.get("uid"), "dashboard.uid")
        folder = body.get("folderUid")
        if folder is not None and folder not in state.folders:
            raise _bad("folder not found")
        stored = state.dashboards.get(uid)
        if stored is not None and not body.get("overwrite"):
            raise _Refused(
                412,
                {
                    "message": "A dashboard with the same uid already exists",
                    "status": "name-exists",
                },
            )
        if board.get("id") not in (None, stored and stored["dashboard"]["id"]):
            raise _bad("dashboard.id must be null (new) or the stored dashboard's id")
        version = (stored["dashboard"]["version"] + 1) if stored else 1
        ident = stored["dashboard"]["id"] if stored else state.new_id()
        slug = _slug(board["title"])
        url = f"/d/{uid}/{slug}"
        state.dashboards[uid] = {
            "dashboard": board | {"id": ident, "uid": uid, "version": version},
            "meta": {"folderUid": folder, "url": url, "slug": slug, "version": version},
        }
        return 200, {
            "id": ident,
            "uid": uid,
            "url": url,
            "status": "success",
            "version": version,
            "slug": slug,
        }
    raise _Refused(404, {"message": "Not found"})


_ROUTES = {"folders": _folder, "datasources": _datasource, "dashboards": _dashboard}


def _authorised(header: str | None) -> bool:
    if header == f"Bearer {TOKEN}":
        return True
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return header == f"Basic {basic}"


def _handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            with state.lock:
                state.calls.append((self.command, self.path))
                try:
                    if not _authorised(self.headers.get("authorization")):
                        raise _Refused(401, {"message": "Unauthorized"})
                    if state.fail:
                        status = state.fail.pop(0)
                        raise _Refused(status, {"message": f"stand-in failure {status}"})
                    parts = self.path.split("?", 1)[0].strip("/").split("/")
                    route = (
                        _ROUTES.get(parts[1]) if parts[:1] == ["api"] and len(parts) > 1 else None
                    )
                    if route is None:
                        raise _Refused(404, {"message": "Not found"})
                    if raw and self.headers.get("content-type") != "application/json":
                        raise _bad("content-type must be application/json")
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        raise _bad("invalid JSON") from None
                    status, doc = route(state, self.command, parts[2:], body)
                except _Refused as refused:
                    status, doc = refused.status, refused.body
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _answer  # noqa: N815 - the names BaseHTTPRequestHandler calls

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def grafana_standin() -> Iterator[tuple[str, State]]:
    """A running stand-in on a loopback port: its URL and its state."""
    state = State()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
