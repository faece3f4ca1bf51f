"""`solanalm provider ...`: run a stage host for a network from outside its Ray cluster.

    solanalm provider keygen ~/.config/solana/provider.json
    solanalm provider serve --gateway https://gw.example.org --wallet ~/.config/solana/provider.json \\
        --model smollm2-135m-instruct --advertise stage.example.org --port 7443 [--ca-cert gw-ca.pem]

`serve` materializes the models' weights here, makes a self-signed TLS certificate for the advertised host,
starts the stage host (gRPC over TLS) refusing every call until it has a link token, registers over the gateway's
HTTP API (the wallet signs locally; only its public key and signature travel), hands the registry's link
token to the stage host, prints one JSON line (provider_id, wallet, endpoint, ...) on stdout when ready,
heartbeats until SIGTERM/SIGINT, then leaves and stops. Logs go to stderr.

    solanalm provider mode training|serving|hybrid [--state-dir DIR] [--wait]
    solanalm provider status [--state-dir DIR]

A running node listens on a local control endpoint (a unix socket and token file in its state directory,
`serve_apps.stagehost.control`); `mode` switches it (`serve_apps.stagehost.modes`: training drains the
stages first; serving ends training after its round and registers again; hybrid runs both with the CPU
split of `provider.hybrid` in the settings). Training needs `serve --train-superlink ... --train-data ...`.
"""

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from solders.keypair import Keypair

from cluster.config import load_settings
from cluster.config.provider import ProviderSection
from cluster.network.wallet import ProofError, load_keypair, write_keypair
from cluster.security.certs import CertKey, self_signed
from serve_apps.stagehost.control import ControlError, ControlServer, call
from serve_apps.stagehost.modes import ModeController
from serve_apps.stagehost.node_sides import HostStages, SuperNodeProcess, TrainingOptions
from serve_apps.stagehost.registration import GatewayClient, ProviderAgent, Registration, RegistrationError

app = typer.Typer(help="Providers outside the cluster: serve stages, register with a wallet.", no_args_is_help=True)
console = Console(stderr=True)
logger = logging.getLogger(__name__)
DEFAULT_STATE_DIR = Path("~/.local/state/solanalm/provider")
ANY_ADDRESS = {"0.0.0.0", "::", ""}


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What `provider serve` was asked to do."""

    gateway: str
    wallet: Path
    models: tuple[str, ...] = ()
    catalogue: Path = Path("configs/models.yaml")
    cache_dir: Path = Path("~/.cache/solanalm")
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None
    advertise_port: int | None = None  # where the operator dials when a NAT or proxy forwards to `port`
    throughput_gflops: float | None = None  # a benchmarked speed instead of the start-up measurement
    region: str = ""
    num_cpus: int | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    ca_cert: Path | None = None
    server_options: dict[str, Any] = field(default_factory=dict)  # extra StageHostServer keywords
    provider: ProviderSection = field(default_factory=ProviderSection)  # mode and hybrid split (settings)
    training: TrainingOptions | None = None  # None: this node serves only

    @property
    def advertised_host(self) -> str:
        if self.advertise:
            return self.advertise
        if self.host in ANY_ADDRESS:
            raise typer.BadParameter("--host binds every address: say which one the operator dials (--advertise)")
        return self.host


def endpoint_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def materialize_models(names: tuple[str, ...], catalogue_path: Path, cache_dir: Path) -> dict[str, Path]:
    """Each model's local weights directory (as pipeline_server.plan_model does), default: the catalogue's."""
    from cluster.models.catalogue import load_catalogue
    from cluster.models.materialize import materialize

    catalogue = load_catalogue(catalogue_path)
    dirs = {}
    for name in names or (catalogue.default,):
        spec = catalogue.get(name)
        if spec.backend != "transformers":
            raise typer.BadParameter(f"model {name!r} has backend {spec.backend!r}; a stage host serves transformers")
        dirs[name] = materialize(spec, cache_dir.expanduser())
    return dirs


def claimed_capabilities(num_cpus: int | None, throughput_gflops: float | None = None) -> dict[str, Any]:
    """This machine's capabilities (dense-matmul GFLOP/s measured now, or the benchmarked figure given);
    `num_cpus` caps the CPUs offered. Claims steer placement only, never pay."""
    from cluster.network.join import local_capabilities

    capabilities = asdict(local_capabilities(measure_s=0.3 if throughput_gflops is None else 0.0))
    if throughput_gflops is not None:
        capabilities["throughput_gflops"] = float(throughput_gflops)
    if num_cpus is not None:
        capabilities["num_cpus"] = float(min(num_cpus, capabilities["num_cpus"]))
    return capabilities


def certificate_for(options: ServeOptions) -> CertKey:
    """A fresh self-signed certificate naming the advertised host (and the bound one, when it differs);
    written to the state directory, the key readable by its owner only."""
    hosts = [options.advertised_host]
    if options.host not in ANY_ADDRESS and options.host not in hosts:
        hosts.append(options.host)
    cert = self_signed(hosts)
    state = options.state_dir.expanduser()
    state.mkdir(parents=True, exist_ok=True)
    cert.write(state / "stage-host.crt", state / "stage-host.key")
    return cert


def serve(
    options: ServeOptions,
    server_factory: Callable[..., Any] | None = None,
    stop: threading.Event | None = None,
    ready: Callable[[dict[str, Any]], None] | None = None,
    client: GatewayClient | None = None,
) -> Registration:
    """Run a provider until `stop` is set (SIGTERM/SIGINT in the CLI); returns the last registration.
    `server_factory` builds the stage host (default: serve_apps.stagehost.server.StageHostServer); `client`
    reaches the gateway (default: a GatewayClient for `options.gateway`)."""
    keypair = load_keypair(options.wallet)
    model_dirs = materialize_models(options.models, options.catalogue, options.cache_dir)
    cert = certificate_for(options)
    if server_factory is None:
        from serve_apps.stagehost.server import StageHostServer

        server_factory = StageHostServer
    extra = dict(options.server_options)
    if options.num_cpus is not None and "limits" not in extra:
        from serve_apps.stagehost.server import HostLimits

        extra["limits"] = HostLimits(max_torch_threads=options.num_cpus)
    # No link token until the registry issues one: until then the stage host refuses every call.
    server = server_factory(
        model_dirs=model_dirs, link_token=None, cert=cert, host=options.host, port=options.port, **extra
    )
    port = server.start()
    stop = stop or threading.Event()
    client = client or GatewayClient(options.gateway, options.ca_cert)
    endpoint = endpoint_of(options.advertised_host, options.advertise_port or port)
    agent = ProviderAgent(
        client,
        keypair,
        endpoint,
        cert.cert_pem.decode(),
        claimed_capabilities(options.num_cpus, options.throughput_gflops),
        list(model_dirs),
        options.region,
        on_registered=lambda registration: server.set_link_token(registration.link_token),
    )
    try:
        registration = agent.register()
        agent.start_heartbeats()
        line = {
            "provider_id": registration.provider_id,
            "wallet": registration.wallet,
            "endpoint": endpoint,
            "models": list(model_dirs),
            "cert_fingerprint": cert.fingerprint,
        }
        controller, control = _start_control(options, server, agent)
        _write_state(options.state_dir, line)
        (ready or _print_ready)(line)
        try:
            stop.wait()
        finally:
            control.stop()
            controller.training.stop(timeout_s=0)
        return agent.registration or registration
    finally:
        agent.leave()
        client.close()
        server.stop()


def node_cpus(num_cpus: int | None) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(num_cpus or cpus, cpus))


def _start_control(options: ServeOptions, server: Any, agent: ProviderAgent) -> tuple[ModeController, ControlServer]:
    """The node's mode controller and its local control endpoint; switches to the configured mode."""
    section = options.provider
    controller = ModeController(
        HostStages(server, agent),
        SuperNodeProcess(options.training, nice=section.hybrid.train_nice),
        node_cpus(options.num_cpus),
        section.hybrid,
        section.drain_timeout_s,
        section.round_timeout_s,
    )
    control = ControlServer(options.state_dir, controller)
    control.start()
    if section.mode != "serving":
        controller.switch(section.mode)
    return controller, control


def _print_ready(line: dict[str, Any]) -> None:
    # The one line on stdout: machine-readable, parsed by scripts and tests (rich would wrap it).
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _write_state(state_dir: Path, line: dict[str, Any]) -> None:
    path = state_dir.expanduser() / "provider.json"
    path.write_text(json.dumps(line, indent=2))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: leaving the network", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@app.command("serve")
def serve_command(
    gateway: Annotated[str, typer.Option(help="The network gateway's base URL (https://...).")],
    wallet: Annotated[Path, typer.Option(help="Solana CLI keypair file; it never leaves this machine.")],
    model: Annotated[
        list[str] | None, typer.Option(help="Catalogue model to serve (repeatable; default: the catalogue's).")
    ] = None,
    catalogue: Annotated[Path, typer.Option(help="Model catalogue YAML.")] = Path("configs/models.yaml"),
    cache_dir: Annotated[Path, typer.Option(help="Converted-weights cache.")] = Path("~/.cache/solanalm"),
    host: Annotated[str, typer.Option(help="Address the stage host binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port the stage host binds (0: any free one).")] = 0,
    advertise: Annotated[
        str | None, typer.Option(help="Host name or address the operator dials (default: --host).")
    ] = None,
    advertise_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port the operator dials, where a NAT or proxy forwards to --port."),
    ] = None,
    region: Annotated[str, typer.Option(help="Region, e.g. eu-west.")] = "",
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs offered (default: all).")] = None,
    throughput_gflops: Annotated[
        float | None, typer.Option(min=0.001, help="Benchmarked GFLOP/s to plan with (default: measured at start).")
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Certificate and registration state.")] = DEFAULT_STATE_DIR,
    ca_cert: Annotated[Path | None, typer.Option(help="CA bundle that signs the gateway's HTTPS certificate.")] = None,
    settings: Annotated[
        Path | None, typer.Option(help="Settings YAML (its `provider` section: mode, hybrid split).")
    ] = None,
    train_superlink: Annotated[
        str | None, typer.Option(help="The operator's SuperLink (host:port): this node may train.")
    ] = None,
    train_data: Annotated[
        Path | None, typer.Option(help="Local training data directory (with --train-superlink).")
    ] = None,
    train_ca_cert: Annotated[Path | None, typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
) -> None:
    """Serve stages for the network at GATEWAY, registered with the wallet, until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    options = ServeOptions(
        gateway=gateway,
        wallet=wallet,
        models=tuple(model or ()),
        catalogue=catalogue,
        cache_dir=cache_dir,
        host=host,
        port=port,
        advertise=advertise,
        advertise_port=advertise_port,
        throughput_gflops=throughput_gflops,
        region=region,
        num_cpus=num_cpus,
        state_dir=state_dir,
        ca_cert=ca_cert,
        provider=load_settings(settings).provider,
        training=_training_options(train_superlink, train_data, train_ca_cert, wallet, state_dir),
    )
    try:
        serve(options, stop=_stop_on_signals())
    except (RegistrationError, ProofError, KeyError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]provider failed:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print("[green]left the network[/]")


def _training_options(
    superlink: str | None, data: Path | None, ca_cert: Path | None, wallet: Path, state_dir: Path
) -> TrainingOptions | None:
    given = [value is not None for value in (superlink, data, ca_cert)]
    if not any(given):
        return None
    if not all(given):
        raise typer.BadParameter("training needs --train-superlink, --train-data and --train-ca-cert together")
    assert superlink is not None and data is not None and ca_cert is not None  # (all given)
    return TrainingOptions(superlink, wallet, data, ca_cert, state_dir / "fl-node")


@app.command("mode")
def mode_command(
    mode: Annotated[str, typer.Argument(help="training, serving or hybrid.")],
    state_dir: Annotated[Path, typer.Option(help="The running node's state directory.")] = DEFAULT_STATE_DIR,
    wait: Annotated[bool, typer.Option(help="Wait until the switch has finished.")] = False,
    timeout_s: Annotated[float, typer.Option(min=1, help="How long --wait waits.")] = 1800.0,
) -> None:
    """Switch the running node: training drains its stages first, serving ends training after the round."""
    if mode not in ("training", "serving", "hybrid"):
        console.print(f"[red]mode must be training, serving or hybrid, not {mode!r}[/]")
        raise typer.Exit(2)
    try:
        status = call(state_dir, "mode", mode=mode)
        deadline = time.monotonic() + timeout_s
        while wait and _switching(status) and time.monotonic() < deadline:
            time.sleep(0.5)
            status = call(state_dir, "status")
    except ControlError as exc:
        console.print(f"[red]provider mode failed:[/] {exc}")
        raise typer.Exit(1) from exc
    _print_status(status)
    if status.get("phase") == "failed" or (wait and _switching(status)):
        raise typer.Exit(1)


@app.command("status")
def status_command(
    state_dir: Annotated[Path, typer.Option(help="The running node's state directory.")] = DEFAULT_STATE_DIR,
) -> None:
    """The running node's mode, the switch in progress, its CPU split and its stage host."""
    try:
        _print_status(call(state_dir, "status"))
    except ControlError as exc:
        console.print(f"[red]provider status failed:[/] {exc}")
        raise typer.Exit(1) from exc


def _switching(status: dict[str, Any]) -> bool:
    return status.get("phase") not in ("settled", "failed")


def _print_status(status: dict[str, Any]) -> None:
    # One JSON line on stdout (scripts and tests read it); the summary on stderr.
    sys.stdout.write(json.dumps(status) + "\n")
    sys.stdout.flush()
    host = status.get("stage_host") or {}
    console.print(
        f"mode [bold]{status['mode']}[/] (target {status['target']}, {status['phase']}); "
        f"serve threads {status['serve_threads']}, train threads {status['train_threads']} of {status['cpus']}; "
        f"stages {host.get('stages')}, open streams {host.get('open_streams')}"
        + (f"; [red]{status['error']}[/]" if status.get("error") else "")
    )


@app.command("keygen")
def keygen_command(
    path: Annotated[Path, typer.Argument(help="Where to write the keypair (Solana CLI JSON format, mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a new Solana keypair file (a provider's wallet)."""
    target = path.expanduser()
    if target.exists() and not force:
        console.print(f"[red]{target} exists[/] (use --force to overwrite)")
        raise typer.Exit(1)
    keypair = Keypair()
    write_keypair(keypair, target)
    console.print(f"wrote {target} for wallet {keypair.pubkey()}")


def _register_plugins() -> None:
    # `solanalm provider train` and other commands of packages above this one join through entry points
    # (group solanalm.provider_commands), keeping imports one-way; a broken one is skipped, not fatal.
    for entry in entry_points(group="solanalm.provider_commands"):
        try:
            app.command(entry.name)(entry.load())
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `provider serve`
            logging.getLogger(__name__).debug("provider command %s unavailable: %s", entry.name, exc)


_register_plugins()
