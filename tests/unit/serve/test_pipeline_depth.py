"""How many steps a pipeline keeps in flight: the stages that can compute at once, from their self-descriptions."""

from serve_apps.engine.messages import StageInfo
from serve_apps.server.stages import concurrent_stages


def stage(index: int, node: str, cpus: int, threads: int = 1) -> StageInfo:
    return StageInfo(index, 0, 1, index == 0, False, 0, 0, 0, 0, 0, node, "", threads, 4, 64, cpus=cpus)


def test_stages_sharing_a_node_compute_at_once_only_as_far_as_its_cores_go() -> None:
    assert concurrent_stages([stage(i, "n1", cpus=2) for i in range(3)]) == 2  # 3 one-thread stages, 2 cores
    assert concurrent_stages([stage(i, "n1", cpus=16) for i in range(3)]) == 3
    assert concurrent_stages([stage(i, "n1", cpus=4, threads=2) for i in range(3)]) == 2
    assert concurrent_stages([stage(0, "n1", cpus=2, threads=2)]) == 1


def test_stages_on_their_own_nodes_all_compute_at_once() -> None:
    assert concurrent_stages([stage(0, "n1", cpus=2), stage(1, "n2", cpus=2), stage(2, "n3", cpus=1)]) == 3
    mixed = [stage(0, "n1", cpus=2), stage(1, "n1", cpus=2), stage(2, "n1", cpus=2), stage(3, "n2", cpus=1)]
    assert concurrent_stages(mixed) == 3  # two on the 2-core node, one on the other


def test_unknown_cpus_keep_one_step_per_stage() -> None:
    assert concurrent_stages([stage(i, "n1", cpus=0) for i in range(3)]) == 3
    assert concurrent_stages([]) == 1
