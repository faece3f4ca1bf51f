"""The ledger on Kubernetes: PostgreSQL by a URL from a Secret (in-cluster StatefulSet or external), never a
file in the head container."""

from __future__ import annotations

from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from cluster.config.payments import PaymentsSection
from tests.unit.k8s.conftest import K8S_DIR, manifest
from tests.unit.k8s.crd_schema import load_yaml_documents

LEDGER_FILE = K8S_DIR / "postgres" / "ledger.yaml"


def _env(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}


def test_the_rayservice_head_reads_the_ledger_url_from_the_secret_and_workers_do_not(render: ModuleType) -> None:
    cluster = manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    head = _env(cluster["headGroupSpec"])
    url = head["SOLANALM_PAYMENTS__DATABASE_URL"]
    assert "value" not in url  # never a literal in the manifest
    assert url["valueFrom"]["secretKeyRef"] == {
        "name": render.LEDGER_SECRET,
        "key": render.LEDGER_SECRET_KEY,
        "optional": False,
    }
    workers = int(head["SOLANALM_PAYMENTS__WORKERS"]["value"])
    assert workers == render.LEDGER_WORKERS > 1 and int(head["SOLANALM_HTTP__GATEWAY_REPLICAS"]["value"]) > 1
    for group in cluster["workerGroupSpecs"]:  # provider pods never see the ledger's credentials
        assert not {k for k in _env(group) if k.startswith("SOLANALM_PAYMENTS__")}
    assert "SOLANALM_PAYMENTS__STATE_DIR" not in head
    # Those settings are accepted together (several workers need PostgreSQL: the Secret's URL).
    section = PaymentsSection(workers=workers, database_url="postgresql+psycopg://u:p@solanalm-ledger:5432/solanalm")
    assert section.workers == workers


def test_the_training_jobs_do_not_get_the_ledger_secret() -> None:
    for name in ("rayjob-data-parallel.yaml", "rayjob-federated.yaml"):
        cluster = manifest(name)["spec"]["rayClusterSpec"]
        assert "SOLANALM_PAYMENTS__DATABASE_URL" not in _env(cluster["headGroupSpec"])


def test_the_in_cluster_postgres_is_a_statefulset_with_its_own_volume_behind_the_secret_url_host(
    render: ModuleType,
) -> None:
    docs = {doc["kind"]: doc for doc in load_yaml_documents(LEDGER_FILE)}
    assert set(docs) == {"Service", "StatefulSet"}
    service, stateful = docs["Service"], docs["StatefulSet"]
    assert stateful["spec"]["serviceName"] == service["metadata"]["name"] and stateful["spec"]["replicas"] == 1
    assert service["spec"]["selector"] == stateful["spec"]["template"]["metadata"]["labels"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == render.LEDGER_SECRET
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/postgresql/data"
    assert "hostPath" not in str(stateful) and "emptyDir" not in str(stateful)
    # The URL the file tells the operator to store points at this Service.
    documented = next(line for line in LEDGER_FILE.read_text().splitlines() if "database-url=" in line)
    url = documented.split("database-url=", 1)[1].strip().strip('"')
    assert urlsplit(url).hostname == service["metadata"]["name"] and urlsplit(url).port == 5432
