"""Starting Ray Serve under one deadline, saying what is still awaited.

Serve's own waits do not fit a slow machine: `serve.start` gives its HTTP proxies a fixed 60 s (on a
machine with load ~7 a fresh proxy can take longer, and `make run` failed with "HTTP proxies not
available after 60s"), and `serve.run` waits for the application with no limit at all. Here both waits
share one deadline (`http.startup_timeout_s`), each poll reports what is still missing (a proxy on a
node, a deployment's replicas), and a miss raises `StartupTimeout` naming it, so the caller can stop
what it started instead of leaving it running.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.schema import ApplicationStatus, ProxyStatus, ServeStatus

logger = logging.getLogger(__name__)

POLL_S = 0.5
Report = Callable[[str], None]


class StartupTimeout(TimeoutError):
    """The deadline passed; `waiting_for` says what was still not ready."""

    def __init__(self, timeout_s: float, waiting_for: str) -> None:
        super().__init__(f"not ready after {timeout_s:.0f} s: still waiting for {waiting_for}")
        self.timeout_s = timeout_s
        self.waiting_for = waiting_for


class DeployFailed(RuntimeError):
    """Serve gave up on the application (DEPLOY_FAILED): waiting longer cannot help."""


def proxies_awaited(status: ServeStatus) -> str | None:
    """What the HTTP proxies still lack (None: every proxy is healthy)."""
    if not status.proxies:
        return "Serve's HTTP proxy to start"
    pending = sorted(node[:12] for node, state in status.proxies.items() if state != ProxyStatus.HEALTHY)
    if not pending:
        return None
    states = {_name(state) for node, state in status.proxies.items() if state != ProxyStatus.HEALTHY}
    return f"Serve's HTTP proxy on node {', '.join(pending)} ({'/'.join(sorted(states))})"


def application_awaited(status: ServeStatus, name: str) -> str | None:
    """What application `name` still lacks (None: RUNNING); DeployFailed when Serve gave up on it."""
    app = status.applications.get(name)
    if app is None:
        return f"application {name!r} to be created"
    if app.status == ApplicationStatus.RUNNING:
        return None
    if app.status == ApplicationStatus.DEPLOY_FAILED:
        raise DeployFailed(f"deploying {name!r} failed: {app.message.strip()[-2000:]}")
    waiting = []
    for deployment, overview in sorted(app.deployments.items()):
        if _name(overview.status) == "HEALTHY":
            continue
        replicas = ", ".join(f"{count} {_name(state).lower()}" for state, count in overview.replica_states.items())
        detail = f": {overview.message.strip()[:300]}" if overview.message.strip() else ""
        waiting.append(f"{deployment} ({replicas or 'no replicas yet'}){detail}")
    return "; ".join(waiting) or f"application {name!r} ({_name(app.status).lower()})"


def _name(state: Any) -> str:
    """An enum member's value or the plain string serve.status() gives (it varies by field)."""
    return str(getattr(state, "value", state))


def wait_until(awaited: Callable[[], str | None], deadline: float, timeout_s: float, report: Report) -> None:
    """Poll `awaited` until it answers None; report each new answer; StartupTimeout at the deadline."""
    last = None
    while True:
        missing = awaited()
        if missing is None:
            return
        if missing != last:
            report(missing)
            logger.info("waiting for %s", missing)
            last = missing
        if time.monotonic() >= deadline:
            raise StartupTimeout(timeout_s, missing)
        time.sleep(POLL_S)


def start_serve(proxy_location: str, http_options: dict[str, Any], timeout_s: float, report: Report) -> float:
    """Serve's controller and HTTP proxies, ready before `timeout_s`; returns the deadline (monotonic)."""
    deadline = time.monotonic() + timeout_s
    report("Serve's controller and HTTP proxy")
    try:
        serve.start(proxy_location=proxy_location, http_options=http_options)
    except TimeoutError:  # Serve's fixed 60 s for the proxies: a slow machine keeps waiting, to our deadline
        logger.info("Serve's proxies were not up within its own 60 s; waiting up to %.0f s in all", timeout_s)
    wait_until(lambda: proxies_awaited(serve.status()), deadline, timeout_s, report)
    return deadline


def run_application(
    target: Any, name: str, route_prefix: str, deadline: float, timeout_s: float, report: Report
) -> None:
    """Deploy `target` and wait until it is RUNNING, up to the deadline start_serve returned."""
    # `_run` is serve.run without its unbounded wait (wait_for_applications_running=False); we wait here.
    serve._run(target, _blocking=False, name=name, route_prefix=route_prefix)
    wait_until(lambda: application_awaited(serve.status(), name), deadline, timeout_s, report)


__all__ = [
    "DeployFailed",
    "StartupTimeout",
    "application_awaited",
    "proxies_awaited",
    "run_application",
    "start_serve",
    "wait_until",
]
