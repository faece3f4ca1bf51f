"""The embedded default shows a network: `up`'s start-up registers the head as the operator's node."""

import httpx
from rich.console import Console

from cluster.network.local_node import is_operator_record, local_wallet_path
from cluster.network.registry import call_registry, get_registry
from cluster.status import render_status
from tests.integration.embedded.conftest import NAMESPACE, Embedded


def test_network_nodes_lists_the_local_node(embedded: Embedded) -> None:
    settings = embedded.settings
    reply = httpx.get(embedded.base_url + "/network/nodes", timeout=30)
    assert reply.status_code == 200, reply.text
    nodes = reply.json()["data"]
    wallet = local_wallet_path(settings.model.cache_dir / "state")
    assert wallet.exists()
    assert len(nodes) == 1 and nodes[0]["health"] == "alive" and nodes[0]["verified"]
    registry = get_registry(settings.network, NAMESPACE)
    (record,) = call_registry(registry, "list_nodes", timeout_s=30)
    assert record.wallet == nodes[0]["wallet"] and is_operator_record(record, settings.network.label_prefix)
    assert record.capabilities.num_cpus > 0 and record.capabilities.memory_bytes > 0
    assert record.capabilities.throughput_gflops > 0
    assert embedded.serving.plans == {}  # placement unchanged: the operator's own stages, unpinned


def test_status_lists_the_local_node(embedded: Embedded) -> None:
    console = Console(record=True, width=200)
    render_status(console, embedded.settings.network, NAMESPACE)
    registry = get_registry(embedded.settings.network, NAMESPACE)
    (record,) = call_registry(registry, "list_nodes", timeout_s=30)
    text = console.export_text()
    assert record.wallet[:8] in text, text[-3000:]
