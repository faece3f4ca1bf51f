"""The stage actor's Ray options and thread counts, computed from its bundle: no Ray needed."""

from cluster.config.serving import SHARED_NODE_SPIN_COUNT
from serve_apps.engine.stage_actor import omp_spin_count_for, solo_threads_for, stage_actor_options, torch_threads_for


def test_options_request_exactly_the_bundle_and_set_the_openmp_spin_count() -> None:
    options = stage_actor_options({"CPU": 2.0, "memory": 1e9, "provider": 1.0}, omp_spin_count=20_000)
    assert options["num_cpus"] == 2.0 and options["num_gpus"] == 0.0 and options["memory"] == 1e9
    assert options["resources"] == {"provider": 1.0}
    assert options["runtime_env"] == {"env_vars": {"GOMP_SPINCOUNT": "20000"}}
    assert "runtime_env" not in stage_actor_options({"CPU": 1.0})


def test_a_solo_step_may_use_every_bundle_of_the_pipeline_on_its_node() -> None:
    bundle = {"CPU": 1.0}
    nodes: list[str | None] = ["n1", "n1", "n2"]
    assert [solo_threads_for(bundle, nodes, index) for index in range(3)] == [2, 2, 1]
    assert solo_threads_for({"CPU": 2.0}, ["n1", "n1", "n1"], 1) == 6
    assert solo_threads_for(bundle, [], 0) == torch_threads_for(bundle) == 1  # no placement group: its own
    assert solo_threads_for({"CPU": 0.5}, ["n1"], 0) == 1


def test_stages_that_share_a_node_spin_briefly_and_a_stage_alone_keeps_libgomps_default() -> None:
    nodes: list[str | None] = ["n1", "n1", "n2"]
    assert [omp_spin_count_for(None, nodes, index) for index in range(3)] == [
        SHARED_NODE_SPIN_COUNT,
        SHARED_NODE_SPIN_COUNT,
        None,
    ]
    assert omp_spin_count_for(None, [], 0) is None  # no placement group: nodes unknown
    assert omp_spin_count_for(5, nodes, 2) == 5  # configured: every stage
