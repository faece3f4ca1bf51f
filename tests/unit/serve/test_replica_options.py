"""The gateway and pipeline replicas run Serve's throughput profile when `http.throughput_optimized`."""

from cluster.config.serving import HttpSection, PipelineSection
from serve_apps.builder import THROUGHPUT_ENV, build_app, pipeline_deployment, replica_actor_options


def test_the_profile_adds_its_environment_and_keeps_the_proxy() -> None:
    options = replica_actor_options(HttpSection(), {"num_cpus": 0})
    assert options["num_cpus"] == 0
    assert options["runtime_env"]["env_vars"] == THROUGHPUT_ENV
    assert THROUGHPUT_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # Serve's proxy stays the HTTP entry


def test_existing_runtime_env_is_kept_and_merged() -> None:
    given = {"runtime_env": {"pip": ["x"], "env_vars": {"A": "1"}}}
    options = replica_actor_options(HttpSection(), given)
    assert options["runtime_env"]["pip"] == ["x"]
    assert options["runtime_env"]["env_vars"] == {"A": "1", **THROUGHPUT_ENV}
    assert given == {"runtime_env": {"pip": ["x"], "env_vars": {"A": "1"}}}  # the caller's dict is not changed


def test_off_leaves_the_options_as_given() -> None:
    assert replica_actor_options(HttpSection(throughput_optimized=False), {"num_cpus": 0}) == {"num_cpus": 0}
    assert replica_actor_options(HttpSection(throughput_optimized=False)) == {}


def test_pipeline_and_gateway_replicas_carry_the_profile() -> None:
    replica = pipeline_deployment("m", PipelineSection(), http=HttpSection())._replica_config
    assert replica.ray_actor_options["runtime_env"]["env_vars"] == THROUGHPUT_ENV
    assert replica.ray_actor_options["num_cpus"] == 0
    gateway = build_app({})._bound_deployment._replica_config
    assert gateway.ray_actor_options["runtime_env"]["env_vars"] == THROUGHPUT_ENV
    off = build_app({"http": {"throughput_optimized": False}})._bound_deployment._replica_config
    assert "runtime_env" not in off.ray_actor_options or not off.ray_actor_options["runtime_env"].get("env_vars")
