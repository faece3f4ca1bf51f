"""Start-up's one deadline: what each Serve status means is awaited, and a miss names it."""

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ProxyStatus,
    ServeStatus,
)

from cluster.serve_wait import DeployFailed, StartupTimeout, application_awaited, proxies_awaited, wait_until


def _app(status: ApplicationStatus, deployments: dict[str, DeploymentStatusOverview], message: str = "") -> ServeStatus:
    overview = ApplicationStatusOverview(status, message, 0.0, deployments)
    return ServeStatus(proxies={"n1": ProxyStatus.HEALTHY}, applications={"solanalm": overview})


def _deployment(
    status: DeploymentStatus, states: dict[ReplicaState, int], message: str = ""
) -> DeploymentStatusOverview:
    return DeploymentStatusOverview(status, DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, states, message)


def test_proxies_are_awaited_until_every_one_is_healthy() -> None:
    assert proxies_awaited(ServeStatus()) == "Serve's HTTP proxy to start"
    starting = ServeStatus(proxies={"a" * 40: ProxyStatus.HEALTHY, "b" * 40: ProxyStatus.STARTING})
    assert proxies_awaited(starting) == f"Serve's HTTP proxy on node {'b' * 12} (STARTING)"
    assert proxies_awaited(ServeStatus(proxies={"a": ProxyStatus.HEALTHY})) is None


def test_an_application_names_the_deployments_it_waits_for() -> None:
    assert application_awaited(ServeStatus(), "solanalm") == "application 'solanalm' to be created"
    updating = _app(
        ApplicationStatus.DEPLOYING,
        {
            "OpenAIIngress": _deployment(DeploymentStatus.HEALTHY, {ReplicaState.RUNNING: 1}),
            "PipelineServer": _deployment(
                DeploymentStatus.UPDATING, {ReplicaState.STARTING: 1}, "Deployment is waiting for resources."
            ),
        },
    )
    assert application_awaited(updating, "solanalm") == (
        "PipelineServer (1 starting): Deployment is waiting for resources."
    )
    assert application_awaited(_app(ApplicationStatus.RUNNING, {}), "solanalm") is None


def test_the_plain_strings_serve_status_gives_are_read_as_well() -> None:
    plain = _app("DEPLOYING", {"PipelineServer": _deployment("UPDATING", {"STARTING": 2})})  # type: ignore[arg-type]
    assert application_awaited(plain, "solanalm") == "PipelineServer (2 starting)"


def test_a_failed_deploy_is_not_waited_for() -> None:
    with pytest.raises(DeployFailed, match="replica raised"):
        application_awaited(_app(ApplicationStatus.DEPLOY_FAILED, {}, "replica raised ValueError"), "solanalm")


def test_the_deadline_names_what_was_still_missing_and_each_change_is_reported() -> None:
    answers = iter(["the proxy", "the proxy", "the replicas"] + ["the replicas"] * 1000)
    heard: list[str] = []
    with pytest.raises(StartupTimeout) as caught:
        wait_until(lambda: next(answers), deadline=0.0, timeout_s=5, report=heard.append)
    assert caught.value.waiting_for == "the proxy" and heard == ["the proxy"]
    assert "not ready after 5 s: still waiting for the proxy" in str(caught.value)
    answers = iter(["the proxy", "the replicas", None])
    heard.clear()
    wait_until(lambda: next(answers), deadline=float("inf"), timeout_s=5, report=heard.append)
    assert heard == ["the proxy", "the replicas"]


def test_serves_own_sixty_seconds_for_the_proxies_are_not_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure seen on a loaded machine: serve.start's fixed 60 s ran out; start-up keeps waiting."""
    import cluster.serve_wait as serve_wait

    def slow_start(**_: object) -> None:
        raise TimeoutError("HTTP proxies not available after 60s.")

    statuses = iter(
        [ServeStatus(proxies={"n1": ProxyStatus.STARTING})] * 3 + [ServeStatus(proxies={"n1": ProxyStatus.HEALTHY})]
    )
    monkeypatch.setattr(serve_wait.serve, "start", slow_start)
    monkeypatch.setattr(serve_wait.serve, "status", lambda: next(statuses))
    monkeypatch.setattr(serve_wait, "POLL_S", 0.0)
    heard: list[str] = []
    serve_wait.start_serve("EveryNode", {}, timeout_s=600, report=heard.append)
    assert heard == ["Serve's controller and HTTP proxy", "Serve's HTTP proxy on node n1 (STARTING)"]
