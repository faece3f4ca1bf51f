"""The provider network on a real Ray cluster: two extra Ray nodes on this machine join with wallets
(`ray start --address ... --labels ... --block`, one process group each), the registry verifies and
persists them across an actor restart, stages are planned and pinned onto them by label, and when one
node is stopped the registry marks it dead and the re-plan runs every layer on the other."""

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from solders.keypair import Keypair

from cluster.config.network import NetworkSection
from cluster.network import join as joining
from cluster.network.placement import ModelCost, capacities_from_records, plan_stages, plan_to_bundles
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import call_registry, get_or_create_registry
from cluster.network.wallet import ProofError, sign_challenge, write_keypair

pytestmark = pytest.mark.slow
NAMESPACE = "solanalm-test"
TIMEOUT_S = 60
COST = ModelCost(num_layers=6, layer_bytes=2**20, embed_bytes=2**20, head_bytes=2**20, layer_flops_per_token=1e9)


class Providers:
    """Two provider Ray nodes started by `join`, each `ray start --block` in its own process group."""

    def __init__(self, settings: NetworkSection, tmp: Path) -> None:
        self.settings, self.tmp = settings, tmp
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.records: dict[str, NodeRecord] = {}
        self.temp_dirs: list[str] = []

    def join(self, name: str, gflops: float) -> NodeRecord:
        keypair_path = write_keypair(Keypair(), self.tmp / f"{name}.json")

        def start(command: list[str]) -> None:
            # Its own (short: socket paths) temp dir, so `ray start` does not point /tmp/ray/ray_current_cluster,
            # which a bare ray.init() on this machine follows, at the test cluster.
            temp_dir = tempfile.mkdtemp(prefix="slm-", dir="/tmp")
            self.temp_dirs.append(temp_dir)
            self.processes[name] = subprocess.Popen([*command, f"--temp-dir={temp_dir}"], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL, start_new_session=True)

        node, record = joining.join(
            ray.get_runtime_context().gcs_address, keypair_path, self.settings, NAMESPACE, region=f"{name}-region",
            num_cpus=1, capabilities=NodeCapabilities(throughput_gflops=gflops), runner=start, block=True)
        self.records[name] = record
        return record

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=TIMEOUT_S)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def network(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Providers, Any]]:
    settings = NetworkSection(registry_name=f"solanalm-registry-{uuid.uuid4().hex[:8]}", persist_interval_s=0,
                              join_timeout_s=TIMEOUT_S)
    registry = get_or_create_registry(settings, NAMESPACE)
    providers = Providers(settings, tmp_path_factory.mktemp("wallets"))
    try:
        with ThreadPoolExecutor(2) as pool:  # both raylets start at once (each takes ~10-25 s here)
            list(pool.map(providers.join, ["fast", "slow"], [20.0, 10.0]))
        yield providers, registry
    finally:
        providers.stop_all()
        ray.kill(registry, no_restart=True)
        from ray.experimental import internal_kv as kv

        kv._internal_kv_del(f"{settings.registry_name}/", del_by_prefix=True, namespace=settings.kv_namespace)


@ray.remote(num_cpus=1)
class FakeStage:
    """Stands in for a stage actor: reports its node and adds its layer count to the running total."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def forward(self, layers_done: int) -> int:
        return layers_done + self.num_layers


def deploy(records: list[NodeRecord]) -> tuple[PlacementGroup, list[str], list[ray.actor.ActorHandle]]:
    plan = plan_stages(COST, capacities_from_records(records, COST), max_stages=4, min_stage_gain=0.0)
    bundles, selectors = plan_to_bundles(plan, {"CPU": 1})
    pg = placement_group(bundles, strategy="SPREAD", bundle_label_selector=selectors)
    ray.get(pg.ready(), timeout=TIMEOUT_S)
    stage_cls: Any = FakeStage
    stages = [stage_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote(s.num_layers)
              for i, s in enumerate(plan.stages)]
    return pg, plan.node_ids, stages


def serve_one(stages: list[ray.actor.ActorHandle]) -> int:
    done: Any = 0
    for stage in stages:
        done = ray.get(stage.forward.remote(done), timeout=TIMEOUT_S)
    return done


def test_providers_join_with_their_labels(network: tuple[Providers, Any]) -> None:
    providers, registry = network
    records = {r.node_id: r for r in call_registry(registry, "list_nodes", timeout_s=TIMEOUT_S)}
    for name, joined in providers.records.items():
        record = records[joined.node_id]
        assert (record.health, record.verified, record.region) == ("alive", True, f"{name}-region")
        assert record.labels["solanalm.io/wallet"] == record.wallet and record.capabilities.num_cpus == 1.0
    assert len(call_registry(registry, "eligible_nodes", timeout_s=TIMEOUT_S)) == 2


def test_a_node_without_the_wallet_label_gets_no_registration(network: tuple[Providers, Any]) -> None:
    _, registry = network
    head, keypair = ray.get_runtime_context().get_node_id(), Keypair()
    challenge = call_registry(registry, "issue_challenge", head, str(keypair.pubkey()), timeout_s=TIMEOUT_S)
    with pytest.raises(ProofError, match="not labelled"):
        ray.get(registry.register.remote(sign_challenge(keypair, challenge), NodeCapabilities()), timeout=TIMEOUT_S)


def test_registry_state_survives_an_actor_restart(network: tuple[Providers, Any]) -> None:
    providers, registry = network
    fast = providers.records["fast"].node_id
    call_registry(registry, "record_request", [fast], True, 0.25, timeout_s=TIMEOUT_S)
    ray.kill(registry, no_restart=False)
    records = {r.node_id: r for r in call_registry(registry, "list_nodes", timeout_s=TIMEOUT_S)}
    assert records[fast].requests_served == 1 and records[fast].latency_ewma_s == 0.25
    assert len(records) == 2
    # The registry lives on the head, never on a provider node that may leave.
    head = ray.get_runtime_context().get_node_id()
    assert call_registry(registry, "node_id", timeout_s=TIMEOUT_S) == head


def test_stages_follow_the_plan_and_move_when_a_node_leaves(network: tuple[Providers, Any]) -> None:
    providers, registry = network
    fast, slow = providers.records["fast"].node_id, providers.records["slow"].node_id
    pg, planned, stages = deploy(call_registry(registry, "eligible_nodes", timeout_s=TIMEOUT_S))
    assert planned == [fast, slow] or planned == [slow, fast]
    assert [ray.get(s.node.remote(), timeout=TIMEOUT_S) for s in stages] == planned
    assert serve_one(stages) == COST.num_layers

    providers.stop("slow")
    for stage in stages:
        ray.kill(stage)
    remove_placement_group(pg)
    records = {r.node_id: r for r in call_registry(registry, "list_nodes", timeout_s=TIMEOUT_S)}
    assert records[slow].health == "dead" and records[fast].health == "alive"
    pg, planned, stages = deploy(call_registry(registry, "eligible_nodes", timeout_s=TIMEOUT_S))
    assert planned == [fast]
    assert serve_one(stages) == COST.num_layers
    remove_placement_group(pg)
