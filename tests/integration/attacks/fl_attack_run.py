"""Driver of the federated-rewards attack test: the real ServerApp against a mix of honest and
malicious ClientApps, in a Flower simulation on the test's Ray cluster (run as a subprocess, since
Flower ends with `ray.shutdown()`).

Clients are told apart by their node's `partition-id` (the simulation's virtual client number):
0 honest, 1 inflates `num-examples` 10x, 2 names the victim wallet with its own signature (forged),
3 names the second victim wallet with no signature at all. Each writes what it claimed to
`<run>/roles/<client>.json`, so the test can find the wallets.

    python -m tests.integration.attacks.fl_attack_run --config JOB.yaml --settings S.yaml \
        --ray-address ADDR --victims W1,W2
"""

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from cluster.config import load_settings
from train_jobs.config import FederatedJob, load_job
from train_jobs.federated import backend_config, resolve_job, run_dir
from train_jobs.fl_client import build_client_app
from train_jobs.fl_server import build_server_app
from train_jobs.protocol import make_reward_sink
from train_jobs.ray_connect import connect

ROLES = {0: "honest", 1: "inflater", 2: "forger", 3: "unsigned"}
INFLATION = 10


def _client(context: Context) -> int:
    return int(context.node_config["partition-id"])


def build_attack_client_app(job: FederatedJob, victims: list[str], roles_dir: Path) -> ClientApp:
    """Honest ClientApp behaviour, tampered with per role after the honest handler ran."""
    honest = build_client_app(job)
    app = ClientApp()

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        client, role = _client(context), ROLES[_client(context)]
        identity = dict(reply.content["identity"])  # type: ignore[arg-type]
        own_wallet = str(identity["wallet"])
        if role == "forger":
            identity["wallet"] = victims[0]  # keeps its own signature, made over its own wallet
        elif role == "unsigned":
            identity["wallet"] = victims[1]
            identity.pop("signature", None)
        roles_dir.mkdir(parents=True, exist_ok=True)
        claim = {"role": role, "own_wallet": own_wallet, "claimed_wallet": str(identity["wallet"])}
        (roles_dir / f"{client}.json").write_text(json.dumps(claim))
        return Message(RecordDict({"identity": ConfigRecord(identity)}), reply_to=message)  # type: ignore[arg-type]

    @app.train()
    def train_round(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if ROLES[_client(context)] != "inflater":
            return reply
        metrics: dict[str, Any] = dict(reply.content["metrics"])  # type: ignore[arg-type]
        metrics["num-examples"] = int(metrics["num-examples"]) * INFLATION
        content = RecordDict({"arrays": reply.content["arrays"], "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app


def main() -> None:
    from flwr.simulation import run_simulation

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--settings", type=Path, required=True)
    parser.add_argument("--ray-address", required=True)
    parser.add_argument("--victims", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = load_settings(args.settings, ray={"address": args.ray_address})
    job = load_job(args.config, FederatedJob)
    out = run_dir(job, settings)
    job = resolve_job(job, out)
    out.mkdir(parents=True, exist_ok=True)
    connect(settings.ray)
    sink = make_reward_sink(settings.training, settings.ray.namespace, jsonl_path=out / "rewards.jsonl")
    run_simulation(
        server_app=build_server_app(job, sink, settings.training.reward_lamports_per_example, out),
        client_app=build_attack_client_app(job, args.victims.split(","), out / "roles"),
        num_supernodes=job.num_clients,
        backend_config=backend_config(job),  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
