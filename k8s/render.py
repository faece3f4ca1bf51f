#!/usr/bin/env python3
"""Render SolanaLM's KubeRay custom resources from the Serve config and one shared cluster spec.

    python k8s/render.py           # rewrite k8s/rayservice.yaml and k8s/rayjob-*.yaml
    python k8s/render.py --check   # exit 1 (and name the files) if any of them is out of date
    python k8s/render.py --tls --out DIR   # the same resources with Ray's mutual TLS on, into DIR

Inputs: `configs/serve.yaml` (the `serve run` config; it becomes RayService.spec.serveConfigV2 after
the k8s-only overrides in `K8S_SERVE_OVERRIDES`), `k8s/templates/raycluster-spec.yaml` (the
RayClusterSpec every resource shares) and one template per resource in `k8s/templates/`.
Needs only PyYAML; it does not import Ray or the project.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
TEMPLATES_DIR = K8S_DIR / "templates"
CLUSTER_SPEC_TEMPLATE = TEMPLATES_DIR / "raycluster-spec.yaml"
SERVE_CONFIG = REPO_ROOT / "configs" / "serve.yaml"

# Every difference between configs/serve.yaml and serveConfigV2: (path, value). "*" matches each
# item of a list; an override applies only where its parent mapping exists in the Serve config.
K8S_SERVE_OVERRIDES: tuple[tuple[tuple[str, ...], Any], ...] = (
    # The proxy must bind the pod IP, not loopback, or the Kubernetes Service cannot reach it.
    (("http_options", "host"), "0.0.0.0"),
    # Spread pipeline stages over provider pods (the decentralized layout); PACK suits one machine.
    (("applications", "*", "args", "pipeline", "placement_strategy"), "SPREAD"),
)


@dataclass(frozen=True)
class Manifest:
    """One generated file: its template and where the shared cluster spec goes in it."""

    filename: str  # both the template's name in k8s/templates/ and the output's name in k8s/
    cluster_field: str  # spec field that receives the RayClusterSpec
    serve_config: bool = False  # whether spec.serveConfigV2 is filled from configs/serve.yaml
    train_storage: bool = False  # whether every pod mounts the shared training volume
    ledger: bool = False  # whether the head (payments workers) reads the ledger URL from the Secret


MANIFESTS: tuple[Manifest, ...] = (
    Manifest("rayservice.yaml", "rayClusterConfig", serve_config=True, ledger=True),
    Manifest("rayjob-data-parallel.yaml", "rayClusterSpec", train_storage=True),
    Manifest("rayjob-federated.yaml", "rayClusterSpec", train_storage=True),
)

# Ray Train writes checkpoints from worker pods and the driver (on the head) reads them back, so the
# training clusters share a ReadWriteMany claim (k8s/storage/pvc-train.yaml) as the training
# output directory (cluster/config/training.py, `training.output_dir`).
TRAIN_CLAIM = "solanalm-train"
TRAIN_MOUNT_PATH = "/mnt/solanalm-train"


# The payments ledger is PostgreSQL, never a file in the head container: its URL comes from this Secret
# (an in-cluster k8s/postgres/ledger.yaml StatefulSet, or an external server), read by the head only, where
# the payments workers run. With PostgreSQL there are LEDGER_WORKERS payments workers and GATEWAY_REPLICAS
# gateway replicas (docs/operations.md, "Scaling out").
LEDGER_SECRET = "solanalm-ledger"
LEDGER_SECRET_KEY = "database-url"
LEDGER_WORKERS = 2
GATEWAY_REPLICAS = 2


class _Dumper(yaml.SafeDumper):
    """Block-style YAML without anchors; multi-line strings (serveConfigV2) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def load_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping, naming the file when it is something else."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return data


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _set_path(node: Any, path: tuple[str, ...], value: Any) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node if isinstance(node, list) else []:
            _set_path(item, rest, value)
    elif isinstance(node, dict):
        if not rest:
            node[head] = value
        elif head in node:
            _set_path(node[head], rest, value)


def k8s_serve_config(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The Serve config as RayService runs it: configs/serve.yaml with `K8S_SERVE_OVERRIDES`."""
    result = copy.deepcopy(serve_config)
    for path, value in K8S_SERVE_OVERRIDES:
        _set_path(result, path, value)
    return result


def with_train_storage(cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the cluster spec whose Ray containers mount the training claim and use it."""
    spec = copy.deepcopy(cluster_spec)
    volume = {"name": "train-storage", "persistentVolumeClaim": {"claimName": TRAIN_CLAIM}}
    mount = {"name": "train-storage", "mountPath": TRAIN_MOUNT_PATH}
    env = {"name": "SOLANALM_TRAINING__OUTPUT_DIR", "value": TRAIN_MOUNT_PATH}
    # New lists, never append: YAML anchors (the template's shared `env`) alias one list.
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        pod["volumes"] = [*pod.get("volumes", []), volume]
        # The image's `ray` user is in group `users` (gid 100): let it write the claim.
        pod["securityContext"] = {"fsGroup": 100, **pod.get("securityContext", {})}
        ray_container = pod["containers"][0]
        ray_container["volumeMounts"] = [*ray_container.get("volumeMounts", []), mount]
        ray_container["env"] = [*ray_container.get("env", []), env]
    return spec


def with_ledger(cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the cluster spec whose head reads the ledger URL from the Secret (required: without it the
    pod does not start, rather than opening a SQLite ledger on the container's disk)."""
    spec = copy.deepcopy(cluster_spec)
    ray_container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    secret = {"secretKeyRef": {"name": LEDGER_SECRET, "key": LEDGER_SECRET_KEY, "optional": False}}
    ray_container["env"] = [  # a new list: the template's env is a YAML anchor the worker groups alias
        *ray_container.get("env", []),
        {"name": "SOLANALM_PAYMENTS__DATABASE_URL", "valueFrom": secret},
        {"name": "SOLANALM_PAYMENTS__WORKERS", "value": str(LEDGER_WORKERS)},
        {"name": "SOLANALM_HTTP__GATEWAY_REPLICAS", "value": str(GATEWAY_REPLICAS)},
    ]
    return spec


def with_tls(cluster_spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of the cluster spec with Ray's mutual TLS managed by KubeRay (`tlsOptions`, v1.7.0).

    KubeRay then has cert-manager issue a CA and a certificate per pod (pod IPs included, renewed as
    pods come and go) and sets RAY_USE_TLS/RAY_TLS_* itself; it needs the operator's RayClusterMTLS
    feature gate and cert-manager in the cluster, and rejects pods that set those variables themselves.
    """
    spec = copy.deepcopy(cluster_spec)
    spec["tlsOptions"] = {"enabled": True}
    return spec


def render_manifest(
    manifest: Manifest,
    cluster_spec: dict[str, Any],
    serve_config: dict[str, Any] | None,
    tls: bool = False,
) -> str:
    """The generated file's text: a do-not-edit header and the completed resource."""
    resource = load_yaml(TEMPLATES_DIR / manifest.filename)
    spec = resource.setdefault("spec", {})
    if manifest.serve_config:
        if serve_config is None:
            raise ValueError(f"{manifest.filename} needs the Serve config")
        spec["serveConfigV2"] = dump_yaml(k8s_serve_config(serve_config))
    if manifest.train_storage:
        cluster_spec = with_train_storage(cluster_spec)
    if manifest.ledger:
        cluster_spec = with_ledger(cluster_spec)
    if tls:
        cluster_spec = with_tls(cluster_spec)
    spec[manifest.cluster_field] = copy.deepcopy(cluster_spec)
    sources = f"k8s/templates/{manifest.filename}, k8s/templates/{CLUSTER_SPEC_TEMPLATE.name}"
    if manifest.serve_config:
        sources += ", configs/serve.yaml"
    flags = " --tls" if tls else ""
    header = f"# GENERATED by k8s/render.py{flags} from {sources}.\n# Do not edit: change those and rerun it.\n"
    return header + dump_yaml(resource)


def render_all(serve_config_path: Path = SERVE_CONFIG, tls: bool = False, out_dir: Path = K8S_DIR) -> dict[Path, str]:
    """Every generated file's path (under `out_dir`) and expected text."""
    cluster_spec = load_yaml(CLUSTER_SPEC_TEMPLATE)
    serve_config = load_yaml(serve_config_path)
    return {out_dir / m.filename: render_manifest(m, cluster_spec, serve_config, tls) for m in MANIFESTS}


def stale_files(rendered: dict[Path, str]) -> list[Path]:
    """The generated files whose committed text differs from a fresh render."""
    return [p for p, text in rendered.items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale")
    parser.add_argument(
        "--serve-config",
        type=Path,
        default=SERVE_CONFIG,
        help="Serve config (default: %(default)s)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="turn on Ray's mutual TLS (tlsOptions; needs cert-manager and --out)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write into this directory (default: k8s/)")
    args = parser.parse_args(argv)
    if args.tls and (args.out is None or args.out.resolve() == K8S_DIR):
        parser.error("--tls needs --out DIR: the committed manifests stay TLS-off")
    out_dir = (args.out or K8S_DIR).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = render_all(args.serve_config, tls=args.tls, out_dir=out_dir)
    stale = stale_files(rendered)
    if args.check:
        for path in stale:
            sys.stderr.write(f"out of date: {_shown(path)} (run python k8s/render.py)\n")
        return 1 if stale else 0
    for path in stale:
        path.write_text(rendered[path])
        sys.stdout.write(f"wrote {_shown(path)}\n")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


if __name__ == "__main__":
    sys.exit(main())
