"""`solanalm train ...`: data-parallel fine-tune (dp), federated rounds (fl), export (export)."""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from cluster.config import Settings, load_settings

if TYPE_CHECKING:
    from train_jobs.config import FederatedJob

app = typer.Typer(
    help="Training: Ray Train DDP, Flower federated rounds with DP, train -> serve export.",
    no_args_is_help=True,
)
console = Console()

SettingsOpt = Annotated[
    Path | None,
    typer.Option("--settings", "-s", help="Settings YAML (sections); env SOLANALM_* overrides."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster to attach to (default: settings.ray.address)."),
]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", exists=True, help="Job YAML under configs/train/.")]
SecAggOpt = Annotated[
    bool | None,
    typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="Aggregate with SecAgg+ (the job's secure_aggregation parameters); default: as the job says.",
    ),
]


def _settings(path: Path | None, address: str | None) -> Settings:
    logging.basicConfig(level=logging.WARNING)
    return load_settings(path, ray={"address": address} if address else {})


@app.command()
def dp(
    config: ConfigOpt,
    num_workers: Annotated[int | None, typer.Option(help="Override the job's num_workers.")] = None,
    settings_path: SettingsOpt = None,
    address: AddressOpt = None,
) -> None:
    """Fine-tune with Ray Train (DDP) and print the final metrics and checkpoint."""
    import ray

    from train_jobs.config import DataParallelJob, load_job
    from train_jobs.data_parallel import run_data_parallel
    from train_jobs.ray_connect import connect

    settings = _settings(settings_path, address)
    job = load_job(config, DataParallelJob, num_workers=num_workers)
    console.print(f"[bold]dp[/] {job.name}: {job.model.name}, {job.num_workers} workers, {job.sharding}")
    connect(settings.ray, log_to_driver=False)
    try:
        result = run_data_parallel(job, settings.training)
    finally:
        ray.shutdown()
    table = Table("metric", "value", title=f"{job.name} (final step)")
    for key in (
        "step",
        "loss",
        "eval_loss_before",
        "eval_loss",
        "samples_per_s",
        "mean_samples_per_s",
        "resumed_from_step",
    ):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4g}")
    console.print(table)
    console.print(f"checkpoint: {result.checkpoint_path}")


def _federated_job(config: Path, secure_aggregation: bool | None) -> "FederatedJob":
    from pydantic import ValidationError

    from train_jobs.config import FederatedJob, load_job, with_secure_aggregation

    try:
        return with_secure_aggregation(load_job(config, FederatedJob), secure_aggregation)
    except ValidationError as exc:
        console.print(f"[red]invalid job {config}:[/] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def fl(
    config: ConfigOpt,
    secure_aggregation: SecAggOpt = None,
    settings_path: SettingsOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run Flower FedAvg rounds (LoRA, optional DP-SGD) on the Ray cluster and record rewards."""
    from train_jobs.federated import run_dir, run_federated
    from train_jobs.fl_server import privacy_report

    settings = _settings(settings_path, address)
    job = _federated_job(config, secure_aggregation)
    console.print(f"[bold]fl[/] {job.name}: {job.num_clients} clients x {job.num_rounds} rounds")
    console.print_json(json.dumps({"privacy": privacy_report(job)}))
    summary = run_federated(job, settings)
    table = Table(
        "round",
        "clients",
        "dropped",
        "round s",
        "mean client s",
        "eval loss",
        "max eps (cum.)",
        title=f"{job.name}: eval loss before {summary['eval_loss_before']:.4f}",
    )
    for stats in summary["rounds"]:
        times = list(stats["client_time_s"].values())
        table.add_row(
            str(stats["round"]),
            f"{len(stats['completed'])}/{len(stats['selected'])}",
            str(len(stats["dropped"])),
            f"{stats['round_time_s']:.1f}",
            f"{sum(times) / max(len(times), 1):.1f}",
            f"{stats['eval_loss']:.4f}" if stats["eval_loss"] is not None else "-",
            f"{max(stats['client_epsilon'].values(), default=0.0):.3f}",
        )
    console.print(table)
    console.print(f"adapter: {summary['adapter_dir']}  (delta={job.privacy.delta})")
    console.print(f"outputs: {run_dir(job, settings)}")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(exists=True, help="DDP checkpoint dir or a federated run's adapter/.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Servable HF directory to write.")],
    name: Annotated[str | None, typer.Option(help="Catalogue name for the export.")] = None,
    catalogue: Annotated[
        Path | None, typer.Option(help="Catalogue YAML to add the entry to (else just printed).")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base catalogue model of an adapter (default: recorded).")
    ] = None,
) -> None:
    """Merge LoRA (or copy full weights) into a servable HF dir and emit its catalogue entry."""
    from train_jobs.config import ModelRef
    from train_jobs.export import catalogue_entry, export_checkpoint, register_model

    model = ModelRef(name=base_model) if base_model else None
    served = export_checkpoint(checkpoint, out, model)
    entry_name = name or served.name
    if catalogue is not None:
        register_model(catalogue, entry_name, served)
        console.print(f"registered [bold]{entry_name}[/] in {catalogue}")
    console.print(yaml.safe_dump({entry_name: catalogue_entry(served)}, sort_keys=False))
    console.print(f"serve it: solanalm up --model {entry_name}")


FlwrHomeOpt = Annotated[
    Path, typer.Option("--flwr-home", help="The operator's Flower state: SuperLink connection, admitted nodes.")
]
DEFAULT_FLWR_HOME = Path("~/.local/state/solanalm/flwr")


@app.command("fl-superlink")
def fl_superlink(
    tls_dir: Annotated[Path, typer.Option(help="ca.pem, superlink.pem, superlink.key (made here when absent).")],
    host_name: Annotated[
        list[str], typer.Option("--name", help="Host name / IP providers dial (in the certificate; repeatable).")
    ],
    bind: Annotated[str, typer.Option(help="Address the SuperLink binds.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="SuperLink port (Fleet + Control APIs).")] = 9092,
    flwr_home: FlwrHomeOpt = DEFAULT_FLWR_HOME,
) -> None:
    """Run Flower's SuperLink for providers' SuperNodes (TLS, SuperNode authentication) until Ctrl-C."""
    import subprocess

    from cluster.security.certs import create_ca, issue
    from train_jobs.fl_deploy import LinkTls, flower_env, superlink_command, write_connection

    tls_dir = tls_dir.expanduser()
    tls = LinkTls(tls_dir / "ca.pem", tls_dir / "superlink.pem", tls_dir / "superlink.key")
    if not tls.cert.exists():
        tls_dir.mkdir(parents=True, exist_ok=True)
        ca = create_ca("solanalm-superlink-ca")
        server = issue(ca, host_name, "solanalm-superlink")
        tls.ca_cert.write_bytes(ca.cert_pem)
        tls.cert.write_bytes(server.cert_pem)
        tls.key.touch(mode=0o600)
        tls.key.write_bytes(server.key_pem)
        console.print(f"made a CA and certificate in {tls_dir}: give providers {tls.ca_cert}")
    home = flwr_home.expanduser()
    write_connection(home, f"{host_name[0]}:{port}", tls.ca_cert)
    proc = subprocess.Popen(superlink_command(tls, bind, port, home / "superlink.db"), env=flower_env(home))
    try:
        raise typer.Exit(proc.wait())
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)


@app.command("fl-admit")
def fl_admit(
    binding_file: Annotated[Path, typer.Argument(exists=True, help="A provider's node-binding.json.")],
    flwr_home: FlwrHomeOpt = DEFAULT_FLWR_HOME,
    settings_path: SettingsOpt = None,
    address: AddressOpt = None,
) -> None:
    """Admit a provider's SuperNode: its key binding must verify for a wallet the registry has proven."""
    import ray

    from cluster.network.cli import network_section
    from cluster.network.wallet import ProofError
    from train_jobs.fl_deploy import FlowerCommandError, admit_node
    from train_jobs.node_keys import NodeKeyBinding, registry_proven_wallets
    from train_jobs.ray_connect import connect

    settings = _settings(settings_path, address)
    connect(settings.ray, log_to_driver=False)
    try:
        proven = registry_proven_wallets(network_section(settings), settings.ray.namespace)
        binding = NodeKeyBinding.from_json(binding_file.read_text())
        node_id, wallet = admit_node(flwr_home.expanduser(), binding, proven.__contains__)
    except (ProofError, FlowerCommandError) as exc:
        console.print(f"[red]not admitted:[/] {exc}")
        raise typer.Exit(1) from exc
    finally:
        ray.shutdown()
    console.print(f"[green]admitted[/] SuperNode {node_id} for wallet {wallet}")


@app.command("fl-submit")
def fl_submit(
    config: ConfigOpt,
    secure_aggregation: SecAggOpt = None,
    flwr_home: FlwrHomeOpt = DEFAULT_FLWR_HOME,
    settings_path: SettingsOpt = None,
) -> None:
    """Run a federated job on the admitted providers' SuperNodes (`flwr run` against the SuperLink)."""
    from train_jobs.federated import run_dir
    from train_jobs.fl_deploy import FlowerCommandError, submit_run

    settings = _settings(settings_path, None)
    job = _federated_job(config, secure_aggregation)
    out = run_dir(job, settings)
    try:
        run_id = submit_run(flwr_home.expanduser(), job, out)
    except FlowerCommandError as exc:
        console.print(f"[red]not submitted:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"run {run_id}: {job.name}, outputs in {out} (summary.json when it ends)")
