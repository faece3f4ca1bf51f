"""Pushing SolanaLM's dashboards and a Prometheus datasource into a Grafana through `grafana-client`.

Idempotent: the datasource and folder are created or updated by uid, dashboards are overwritten by uid,
so running `solanalm grafana provision` again after a dashboard change updates it in place.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "dashboards"
DATASOURCE_UID = "solanalm-prometheus"
FOLDER_UID = "solanalm"


class ProvisionError(RuntimeError):
    """Grafana refused or could not be reached; the message says which call and why."""


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    datasource_uid: str
    datasource_created: bool
    folder_uid: str
    dashboards: tuple[str, ...]  # the URLs Grafana answered for each dashboard


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> list[dict[str, Any]]:
    """Every dashboard JSON in `directory`, sorted by file name (ValueError when there is none)."""
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise ValueError(f"no dashboard JSON in {directory}")
    return [json.loads(path.read_text()) for path in paths]


def datasource_body(prometheus_url: str, name: str = "SolanaLM Prometheus") -> dict[str, Any]:
    return {
        "uid": DATASOURCE_UID,
        "name": name,
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url,
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "10s"},
    }


def provision(
    api: GrafanaApi, prometheus_url: str, dashboards: list[dict[str, Any]], folder_title: str = "SolanaLM"
) -> ProvisionResult:
    """Upsert the datasource, the folder, and every dashboard (dashboards default to the new datasource)."""
    created = _call("datasource", lambda: _upsert_datasource(api, datasource_body(prometheus_url)))
    _call("folder", lambda: _ensure_folder(api, folder_title))
    urls = []
    for board in dashboards:
        payload = {
            "dashboard": _with_default_datasource({**board, "id": None}),
            "folderUid": FOLDER_UID,
            "overwrite": True,
            "message": "solanalm grafana provision",
        }
        answer = _call(f"dashboard {board.get('uid')}", lambda p=payload: api.dashboard.update_dashboard(p))
        urls.append(str((answer or {}).get("url", board.get("uid"))))
    return ProvisionResult(DATASOURCE_UID, created, FOLDER_UID, tuple(urls))


def _upsert_datasource(api: GrafanaApi, body: dict[str, Any]) -> bool:
    """True when created, False when an existing one (same uid) was updated."""
    try:
        api.datasource.get_datasource_by_uid(body["uid"])
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.datasource.create_datasource(body)
        return True
    api.datasource.update_datasource_by_uid(body["uid"], body)
    return False


def _ensure_folder(api: GrafanaApi, title: str) -> None:
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(title, uid=FOLDER_UID)


def _with_default_datasource(board: dict[str, Any]) -> dict[str, Any]:
    # The `datasource` template variable starts on the provisioned Prometheus (users can switch).
    variables = board.get("templating", {}).get("list", [])
    for variable in variables:
        if variable.get("type") == "datasource":
            variable["current"] = {"text": "SolanaLM Prometheus", "value": DATASOURCE_UID}
    return board


def _call(what: str, fn: Any) -> Any:
    try:
        return fn()
    except GrafanaException as exc:
        raise ProvisionError(f"Grafana {what}: {exc.status_code or 'no answer'} {exc.message}") from exc
    except OSError as exc:  # niquests' connection errors (refused, DNS, TLS) are OSErrors
        raise ProvisionError(f"Grafana {what}: cannot connect: {exc}") from exc
