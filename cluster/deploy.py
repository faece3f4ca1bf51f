"""Deploying the serve application from a Serve config file, by import path (as `serve run` does).

`cluster` sits below `serve_apps`, so it never imports the builder statically: the config file names
it (`import_path: serve_apps.builder:build_app`) and it is resolved at run time.
"""

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from cluster.config import Settings, load_settings


@dataclass(frozen=True, slots=True)
class ServeApp:
    """One application entry of a Serve config file, with its `args` as SolanaLM settings sections."""

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any]
    http_options: dict[str, Any]


def read_serve_config(path: Path) -> ServeApp:
    """The first application of a Serve config YAML (`applications: [{name, import_path, args}]`)."""
    raw = yaml.safe_load(path.read_text()) or {}
    apps = raw.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    app = apps[0]
    return ServeApp(
        name=app.get("name", "solanalm"),
        route_prefix=app.get("route_prefix", "/"),
        import_path=app["import_path"],
        args=dict(app.get("args") or {}),
        http_options=dict(raw.get("http_options") or {}),
    )


def settings_for(app: ServeApp, overrides: dict[str, dict[str, Any]]) -> Settings:
    """Settings from the config file's args, CLI overrides on top (environment still wins)."""
    merged: dict[str, dict[str, Any]] = {key: dict(value or {}) for key, value in app.args.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return load_settings(**merged)


def deploy(app: ServeApp, settings: Settings) -> float:
    """Start Serve's HTTP proxy and run the application; returns the seconds it took to become ready."""
    started = time.perf_counter()
    serve.start(http_options={"host": settings.http.host, "port": settings.http.port})
    builder = _resolve(app.import_path)
    args = settings.model_dump(mode="json", include={"model", "pipeline", "http", "network"})
    # Secrets are masked in a JSON dump; payments settings travel as values, unmasked.
    args["payments"] = settings.payments.model_dump(mode="python")
    args["payments"] = {
        k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v) for k, v in args["payments"].items()
    }
    serve.run(builder(args), name=settings.http.app_name or app.name, route_prefix=app.route_prefix, blocking=False)
    return time.perf_counter() - started


def _resolve(import_path: str):  # type: ignore[no-untyped-def]
    module_name, _, attr = import_path.partition(":")
    if not attr:
        module_name, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)
