"""Putting the generated dashboards into Grafana: over its HTTP API, or as files on disk.

``provision`` (``POST /v1/provision`` on :9093, with ``GRAFANA_ENDPOINT`` set) makes the Citadel
folder, the Prometheus data source (``PROMETHEUS_ENDPOINT``) and every dashboard, each only when
missing or different from the generated one, so a second run changes nothing. The calls and
their shapes are Grafana's documented HTTP API (Grafana 11 and 12, ``/api``):

- ``GET /api/folders/{uid}`` (404: missing), ``POST /api/folders`` ``{"uid", "title"}``;
- ``GET /api/datasources/uid/{uid}`` (404: missing), ``POST /api/datasources`` and
  ``PUT /api/datasources/uid/{uid}`` ``{"uid", "name", "type", "url", "access", ...}``;
- ``GET /api/dashboards/uid/{uid}`` (``{"dashboard", "meta": {"folderUid", ...}}``), and
  ``POST /api/dashboards/db`` ``{"dashboard", "folderUid", "overwrite", "message"}``.

Authentication: a service account token (``grafana.token``, sent as a bearer token), else basic
auth (``grafana.user`` and ``grafana.password``). A 401/403, a 412 (Grafana's precondition
failures: version-mismatch, name-exists, plugin-dashboard) or a 5xx is a ``GrafanaError`` naming
the call and quoting Grafana's message.

``export_files`` writes the same for file provisioning: ``dashboards/*.json`` (the classic JSON;
Grafana 13's file provisioning refuses its v2 schema) and ``provisioning/dashboards/citadel.yaml``
and ``provisioning/datasources/citadel.yaml`` for Grafana's ``provisioning/`` directory.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import yaml

from citadel import __version__
from citadel.errors import CitadelError
from citadel.http.client import ConnectError, HttpClient, Origin, ProtocolError, ReadTimeout
from citadel.observability.dashboards import (
    DASHBOARDS,
    FOLDER,
    FOLDER_UID,
    Dashboard,
    grafana_json,
)

__all__ = [
    "DATASOURCE_NAME",
    "DATASOURCE_UID",
    "GrafanaClient",
    "GrafanaError",
    "Provisioned",
    "datasource_body",
    "differing",
    "export_files",
    "for_grafana",
    "provision",
]

DATASOURCE_UID = "citadel-prometheus"
DATASOURCE_NAME = "Citadel Prometheus"
# The fields of a stored dashboard Grafana sets itself; left out when comparing.
_GRAFANA_OWNS = ("id", "version")


class GrafanaError(CitadelError):
    """Grafana refused a call or could not be reached; ``status`` is its HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Provisioned:
    """What a run did: each of ``folder``, ``datasource`` and every dashboard uid is
    created, updated or unchanged (``datasource`` is skipped without PROMETHEUS_ENDPOINT)."""

    folder: str = "unchanged"
    datasource: str = "skipped"
    dashboards: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        states = [self.folder, self.datasource, *self.dashboards.values()]
        return any(s in ("created", "updated") for s in states)


class GrafanaClient:
    """Grafana's HTTP API at ``url`` over an injected ``HttpClient``."""

    def __init__(
        self,
        url: str,
        http: HttpClient,
        *,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self._origin = Origin.parse(url)
        self._prefix = parts.path.rstrip("/")  # Grafana may serve under a sub path
        self._http = http
        self._timeout = timeout
        user = user or parts.username
        password = password or parts.password
        self._auth: bytes | None = None
        if token:
            self._auth = f"Bearer {token}".encode()
        elif user:
            pair = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._auth = f"Basic {pair}".encode()

    async def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One call: its status and decoded JSON body (None when empty or not JSON)."""
        headers = [(b"accept", b"application/json")]
        raw = b""
        if body is not None:
            raw = orjson.dumps(body)
            headers.append((b"content-type", b"application/json"))
        if self._auth is not None:
            headers.append((b"authorization", self._auth))
        try:
            response = await self._http.request(
                method,
                self._origin,
                self._prefix + path,
                headers,
                raw,
                connect_timeout=self._timeout,
                first_byte_timeout=self._timeout,
            )
            data = await response.read()
        except (ConnectError, ReadTimeout, ProtocolError, OSError) as exc:
            raise GrafanaError(
                f"Grafana ({self.url}) did not answer {method} {path}: {exc}"
            ) from exc
        try:
            doc = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            doc = None
        return response.status, doc

    async def expect(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, ok: Sequence[int]
    ) -> tuple[int, Any]:
        """``call``, raising ``GrafanaError`` unless the status is one of ``ok``."""
        status, doc = await self.call(method, path, body)
        if status in ok:
            return status, doc
        message = doc.get("message") if isinstance(doc, dict) else None
        reason = doc.get("status") if isinstance(doc, dict) else None
        if status in (401, 403):
            hint = "check grafana.token (GRAFANA_TOKEN) or grafana.user and grafana.password"
            what = f"Grafana refused the credentials for {method} {path} (HTTP {status}): {hint}"
        elif status == 412:
            what = f"Grafana refused {method} {path} (HTTP 412, {reason or 'precondition failed'})"
        else:
            what = f"Grafana answered {method} {path} with HTTP {status}"
        raise GrafanaError(what + (f": {message}" if message else "") + ".", status)


def datasource_body(prometheus_url: str) -> dict[str, Any]:
    """The Prometheus data source Citadel's dashboards are bound to by default."""
    return {
        "uid": DATASOURCE_UID,
        "name": DATASOURCE_NAME,
        "type": "prometheus",
        "url": prometheus_url,
        "access": "proxy",
        "basicAuth": False,
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }


def for_grafana(board: Dashboard) -> dict[str, Any]:
    """The dashboard as provisioned: the generated JSON, its data source variable preset to
    Citadel's data source (a user may still pick another Prometheus)."""
    data = grafana_json(board)
    for variable in data.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            variable["current"] = {"text": DATASOURCE_NAME, "value": DATASOURCE_UID}
    return data


def _same(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    def strip(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in _GRAFANA_OWNS}

    return strip(stored) == strip(wanted)


async def provision(
    grafana: GrafanaClient,
    *,
    prometheus_url: str | None,
    boards: Sequence[Dashboard] = DASHBOARDS,
) -> Provisioned:
    """The folder, the data source and every dashboard, each made or updated only if it
    differs from what is generated (see the module docstring)."""
    done = Provisioned()
    status, _ = await grafana.expect("GET", f"/api/folders/{FOLDER_UID}", ok=(200, 404))
    if status == 404:
        await grafana.expect(
            "POST", "/api/folders", {"uid": FOLDER_UID, "title": FOLDER}, ok=(200,)
        )
        done.folder = "created"
    if prometheus_url:
        wanted = datasource_body(prometheus_url)
        path = f"/api/datasources/uid/{DATASOURCE_UID}"
        status, stored = await grafana.expect("GET", path, ok=(200, 404))
        if status == 404:
            await grafana.expect("POST", "/api/datasources", wanted, ok=(200,))
            done.datasource = "created"
        elif isinstance(stored, dict) and any(stored.get(k) != v for k, v in wanted.items()):
            await grafana.expect("PUT", path, wanted, ok=(200,))
            done.datasource = "updated"
        else:
            done.datasource = "unchanged"
    for board in boards:
        wanted = for_grafana(board)
        path = f"/api/dashboards/uid/{quote(board.uid)}"
        status, stored = await grafana.expect("GET", path, ok=(200, 404))
        if status == 200 and isinstance(stored, dict):
            meta = stored.get("meta") or {}
            if meta.get("folderUid") == FOLDER_UID and _same(stored.get("dashboard") or {}, wanted):
                done.dashboards[board.uid] = "unchanged"
                continue
        body = {
            "dashboard": wanted | {"id": None},
            "folderUid": FOLDER_UID,
            "overwrite": True,
            "message": f"Provisioned by Citadel {__version__}",
        }
        await grafana.expect("POST", "/api/dashboards/db", body, ok=(200,))
        done.dashboards[board.uid] = "created" if status == 404 else "updated"
    return done


async def differing(grafana: GrafanaClient, boards: Sequence[Dashboard] = DASHBOARDS) -> list[str]:
    """The uids of the dashboards missing from Grafana or different from the generated ones
    (what /health reports; ``provision`` would write exactly these)."""
    out = []
    for board in boards:
        path = f"/api/dashboards/uid/{quote(board.uid)}"
        status, stored = await grafana.expect("GET", path, ok=(200, 404))
        meta = stored.get("meta") or {} if isinstance(stored, dict) else {}
        if status == 404 or not (
            meta.get("folderUid") == FOLDER_UID
            and _same(stored.get("dashboard") or {}, for_grafana(board))
        ):
            out.append(board.uid)
    return out


def export_files(
    out: Path, *, prometheus_url: str | None, boards: Sequence[Dashboard] = DASHBOARDS
) -> list[Path]:
    """Write file provisioning for Grafana under ``out``: ``dashboards/<uid>.json``,
    ``provisioning/dashboards/citadel.yaml`` (a file provider reading that folder) and, with a
    Prometheus URL, ``provisioning/datasources/citadel.yaml``. Returns the files written."""
    dashboards = out / "dashboards"
    providers = out / "provisioning" / "dashboards"
    dashboards.mkdir(parents=True, exist_ok=True)
    providers.mkdir(parents=True, exist_ok=True)
    written = []
    for board in boards:
        path = dashboards / f"{board.uid}.json"
        path.write_text(json.dumps(for_grafana(board), indent=2, sort_keys=True) + "\n")
        written.append(path)
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "citadel",
                "folder": FOLDER,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": str(dashboards.resolve())},
            }
        ],
    }
    path = providers / "citadel.yaml"
    path.write_text(yaml.safe_dump(provider, sort_keys=False))
    written.append(path)
    if prometheus_url:
        sources = out / "provisioning" / "datasources"
        sources.mkdir(parents=True, exist_ok=True)
        body = datasource_body(prometheus_url)
        entry = {k: body[k] for k in ("name", "uid", "type", "access", "url", "isDefault")}
        entry["jsonData"] = body["jsonData"]
        path = sources / "citadel.yaml"
        path.write_text(yaml.safe_dump({"apiVersion": 1, "datasources": [entry]}, sort_keys=False))
        written.append(path)
    return written
