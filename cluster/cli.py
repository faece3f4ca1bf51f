"""The `solanalm` command: up, status, chat, down (+ sub-commands other packages register as plugins)."""

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cluster.config import Settings
from cluster.config.serving import RaySection
from cluster.deploy import (
    ServeApp,
    deploy,
    drain_and_shutdown,
    plan_deployment,
    read_serve_config,
    register_local_node,
    settings_for,
    start_controller,
    with_plans,
)
from cluster.models import load_catalogue, materialize
from cluster.models.local import catalogue_with_local, describe_local
from cluster.observability.logs import configure_logging
from cluster.ray_cluster import (
    ClusterError,
    ClusterHandle,
    connect_existing,
    ensure_cluster,
    port_in_use,
    stop_local_head,
)
from cluster.security.operator_token import find_operator_token, operator_token_path
from cluster.security.ray_auth import AUTH_MODE_ENV, TOKEN_PATH_ENV, driver_env, shell_exports
from cluster.security.ray_tls import certificate_hosts, default_hosts, init_tls, tls_dir, tls_env
from cluster.serve_wait import DeployFailed, StartupTimeout
from cluster.status import render_status

app = typer.Typer(help="SolanaLM: a decentralized LLM compute network on Ray.", no_args_is_help=True)
tls_app = typer.Typer(help="Certificates for Ray's mutual TLS between the operator's nodes.", no_args_is_help=True)
app.add_typer(tls_app, name="tls")
console = Console()
DEFAULT_SERVE_CONFIG = Path("configs/serve.yaml")
DEMO_QUESTION = "What is the capital of France?"


@app.callback()
def _logging() -> None:
    """SolanaLM: a decentralized LLM compute network on Ray."""
    # SOLANALM_LOGGING__FORMAT=json / __LEVEL=DEBUG apply to every command, plugins included.
    configure_logging(Settings().logging)


def _state_dir(settings: Settings) -> Path:
    return settings.model.cache_dir / "state"


@app.command()
def up(
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting a local head.")] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Catalogue name, .gguf file or HF checkpoint dir (repeatable).")
    ] = None,
    stages: Annotated[int | None, typer.Option(min=1, help="Pipeline stages per replica.")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="Pipelines (Serve replicas) per model.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port of the OpenAI endpoint.")] = None,
    config: Annotated[Path, typer.Option(help="Serve config file (import path + args).")] = DEFAULT_SERVE_CONFIG,
    demo: Annotated[bool, typer.Option(help="Answer one demo chat request once up.")] = True,
    block: Annotated[bool, typer.Option(help="Keep serving until Ctrl-C, then shut down.")] = False,
) -> None:
    """Start (or join) a Ray cluster, deploy the OpenAI endpoint over sharded pipelines, answer a demo."""
    serve_app = read_serve_config(config)
    settings = settings_for(
        serve_app,
        {
            "ray": {"address": address},
            "pipeline": {"num_stages": stages, "num_replicas": replicas},
            "http": {"port": port},
        },
    )
    if model:
        _select_models(settings, model)
    started = start_serving(serve_app, settings)
    settings, plans, handle, took = started.settings, started.plans, started.handle, started.took
    base_url = f"{settings.http.scheme}://{settings.http.host}:{settings.http.port}/v1"
    console.print(f"[green]ready[/] in {took:.1f} s")
    console.print(f"[bold]OpenAI base URL[/] {base_url}")
    console.print(f"[bold]Ray dashboard[/]   {handle.dashboard_url or 'n/a'}")
    if settings.http.operator_token is None:
        where = operator_token_path(_state_dir(settings))
        console.print(f"[bold]Operator token[/]  in {where} (/healthz?detail=1): `solanalm operator-token`")
    if demo:
        console.print(f"\n[bold]demo[/] > {DEMO_QUESTION}")
        _stream_chat(base_url, settings.model.served[0], DEMO_QUESTION, max_tokens=64)
    if block:
        # Watches the registry: re-plans when a planned node leaves or a provider's stage host registers.
        controller = start_controller(serve_app, settings, plans)
        _serve_until_interrupted(settings, handle.started_here)
        if controller is not None:
            controller.stop()


@app.command()
def status(
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
) -> None:
    """Nodes, deployments, and each pipeline's stages with their layer ranges, process and node."""
    settings = _join_existing(address)
    render_status(console, settings.network, settings.ray.namespace, settings.http.app_name)


@app.command()
def tui(
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
    refresh: Annotated[float, typer.Option(min=0.2, help="Seconds between snapshots.")] = 2.0,
    logs_dir: Annotated[
        Path | None, typer.Option(help="JSON logs to follow (default: the connected Ray session's logs dir).")
    ] = None,
) -> None:
    """Live monitor: nodes, pipelines and where their stages run, requests/s and tokens/s, earnings per wallet;
    the cluster's JSON logs (filter by request id); training jobs, rounds, loss, ε and rewards."""
    from cluster.tui.app import NetworkMonitor
    from cluster.tui.source import ClusterSource
    from cluster.tui.training import JobsTrainingSource, TailLogSource, session_logs_dir

    settings = _join_existing(address)
    directory = logs_dir or session_logs_dir()
    logs = TailLogSource(directory) if directory is not None else None
    training = JobsTrainingSource(settings.training.output_dir)
    NetworkMonitor(ClusterSource(settings), refresh_s=refresh, logs=logs, training=training).run()


@app.command()
def chat(
    message: Annotated[str, typer.Argument(help="What to ask.")],
    model: Annotated[str | None, typer.Option(help="Model name (default: the first served).")] = None,
    url: Annotated[str, typer.Option(help="OpenAI base URL.")] = "http://127.0.0.1:8000/v1",
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.0,
) -> None:
    """Stream a chat answer to the terminal."""
    chosen = model or _first_model(url)
    _stream_chat(url, chosen, message, max_tokens=max_tokens, temperature=temperature)


@app.command()
def down(
    address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
) -> None:
    """Drain and remove the serve application; stop the local head if `solanalm up` started it."""
    settings = _join_existing(address)
    _shutdown(settings, stop_head=True)


@app.command("ray-env")
def ray_env(
    address: Annotated[str | None, typer.Option(help="Ray cluster address (only its token is looked up).")] = None,
) -> None:
    """Print the RAY_AUTH_*/RAY_TLS_* exports that let `ray job submit`, `ray status` and scripts reach the cluster.

    Use it as `eval "$(solanalm ray-env)"`; it prints nothing when no token is found and TLS is off."""
    settings = Settings(ray={"address": address})
    state_dir = _state_dir(settings)
    try:
        env = {**driver_env(settings.ray, state_dir), **tls_env(settings.ray, state_dir)}
    except RuntimeError as exc:
        _fail(str(exc))
    typer.echo(shell_exports(env))


@app.command("operator-token")
def operator_token() -> None:
    """Print the gateway's operator token (for `Authorization: Bearer` on /healthz?detail=1 and
    /v1/network/nodes?detail=1): http.operator_token, else the one `solanalm up` wrote to the state dir."""
    settings = Settings()
    token = find_operator_token(settings.http, _state_dir(settings))
    if token is None:
        _fail(f"no operator token in {operator_token_path(_state_dir(settings))}; `solanalm up` creates it")
        return
    typer.echo(token.get_secret_value())


@tls_app.command("init")
def tls_init(
    directory: Annotated[Path | None, typer.Option("--dir", help="Where to write (default: ray.tls_dir).")] = None,
    host: Annotated[list[str] | None, typer.Option(help="DNS name or IP the node is reached at (repeatable).")] = None,
    name: Annotated[str, typer.Option(help="File stem of the node's certificate and key.")] = "node",
    new_ca: Annotated[bool, typer.Option(help="Replace an existing CA (every node then needs a new cert).")] = False,
) -> None:
    """Create the cluster CA (once) and a node certificate signed by it; turn TLS on with SOLANALM_RAY__TLS=true."""
    settings = Settings()
    target = (directory or tls_dir(settings.ray, _state_dir(settings))).expanduser()
    hosts = list(dict.fromkeys([*default_hosts(), *(host or [])]))
    files = init_tls(target, hosts, name=name, new_ca=new_ca)
    console.print(f"[bold]CA[/]        {files.ca_cert} (key {files.ca_key}, 0600: keep it off the worker nodes)")
    console.print(f"[bold]{name}[/] {files.cert} (key {files.key}) for {', '.join(certificate_hosts(files.cert))}")
    console.print("copy ca.crt and a node's own cert/key to each node; set SOLANALM_RAY__TLS=true (ray.tls)")


def _print_ray_security(section: RaySection, env: dict[str, str]) -> None:
    if env.get(AUTH_MODE_ENV) == "token":
        where = env.get(TOKEN_PATH_ENV, "$RAY_AUTH_TOKEN")
        console.print(f'[bold]Ray auth[/]      token in {where}; Ray CLI/jobs: eval "$(solanalm ray-env)"')
    elif section.auth == "disabled":
        console.print("[yellow]Ray auth[/]      off (ray.auth: disabled): anyone reaching Ray's ports controls it")
    else:
        console.print("[yellow]Ray auth[/]      no token found: this cluster accepted a driver without one")
    if env.get("RAY_USE_TLS") == "1":
        console.print(f"[bold]Ray TLS[/]       on (CA {env.get('RAY_TLS_CA_CERT')})")


def _join_existing(address: str | None) -> Settings:
    """Settings for a command on a running cluster; a clear error (exit 1) when none runs."""
    settings = Settings(ray={"address": address})
    try:
        connect_existing(settings.ray, _state_dir(settings))
    except ClusterError as exc:
        _fail(str(exc))
    return settings


def _select_models(settings: Settings, models: list[str]) -> None:
    """Catalogue names as given; a .gguf file or HF directory is served with the name, context and chat
    template it carries (cluster.models.local), the catalogue lending only prices and options."""
    catalogue_path = settings.model.catalogue
    local = [Path(entry).expanduser() for entry in models if _is_local(entry)]
    by_path: dict[Path, str] = {}
    if local:
        try:
            catalogue_path, found = catalogue_with_local(catalogue_path, local, _state_dir(settings))
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        for path, found_model in zip(local, found, strict=True):
            by_path[path] = found_model.name
            console.print(f"[bold]local model[/] {describe_local(found_model)}")
    names = [by_path.get(Path(entry).expanduser(), entry) for entry in models]
    settings.model.catalogue = catalogue_path.resolve()
    catalogue = load_catalogue(settings.model.catalogue)
    for name in names:
        try:
            catalogue.get(name)
        except KeyError as exc:
            _fail(str(exc.args[0]))
    settings.model.served = list(dict.fromkeys(names))


def _is_local(entry: str) -> bool:
    path = Path(entry).expanduser()
    return path.is_dir() or path.suffix.lower() == ".gguf"


def _materialize_models(settings: Settings) -> None:
    # Convert once here, with progress on the terminal, so replicas only load the cache.
    catalogue = load_catalogue(settings.model.catalogue)
    for name in settings.model.served:
        spec = catalogue.get(name)
        if spec.backend != "transformers":  # llama.cpp reads its GGUF as is; vLLM its dir; a proxy has none
            continue
        started = time.perf_counter()
        with console.status(
            f"preparing weights of {name} ({settings.model.dtype or spec.dtype}; a GGUF is converted once, ~20 s)..."
        ):
            path = materialize(spec, settings.model.cache_dir, settings.model.dtype)
        console.print(f"weights of {name}: {path} ({time.perf_counter() - started:.1f} s)")


def _plan_placements(settings: Settings) -> tuple[Settings, dict]:
    """Stages planned over the registry's eligible providers (pinned by label); none: the equal split."""
    from cluster.network.placement import PlacementError
    from cluster.network.serving_plan import describe_plan

    try:
        plans = plan_deployment(settings)
    except PlacementError as exc:
        _fail(f"the provider nodes cannot hold the served models: {exc}")
    for model, plan in plans.items():
        console.print(f"[bold]placement[/] {model}: {describe_plan(plan)}")
    if plans:
        return with_plans(settings, plans), plans
    return _fit_to_memory(settings), plans


def _fit_to_memory(settings: Settings) -> Settings:
    """Without a registry plan: models whose layers do not fit `num_stages` stages' memory get more stages,
    from the per-layer bytes and each stage's memory (pipeline.stage_resources' `memory`, else the largest
    node's); a model that even network.placement.max_stages stages cannot hold is refused (exit 1)."""
    from cluster.network.placement import PlacementError
    from cluster.network.serving_plan import memory_fitted_layers

    explicit = settings.pipeline.stage_resources.get("memory")
    stage_memory = int(explicit) if explicit else _largest_node_memory()
    try:
        fitted = memory_fitted_layers(
            _weight_costs(settings),
            settings.pipeline.num_stages,
            stage_memory,
            settings.network.placement,
            explicit_memory=bool(explicit),
        )
    except PlacementError as exc:
        _fail(f"cannot split the model to fit: {exc}")
    if not fitted:
        return settings
    placed = settings.model_copy(deep=True)
    placed.pipeline.placements = {  # type: ignore[assignment]  # validated on assignment
        **{name: p.model_dump() for name, p in settings.pipeline.placements.items()},
        **{model: {"stage_layers": layers} for model, layers in fitted.items()},
    }
    for model, layers in fitted.items():
        console.print(
            f"[bold]memory split[/] {model}: {len(layers)} stages of {stage_memory / 2**30:.2f} GiB, layers {layers}"
        )
    return placed


def _weight_costs(settings: Settings) -> dict:
    """Per-layer weight bytes (dense + low-bit copies, no KV: the KV cache is sized from what is left) of
    each model the sharded engine serves."""
    from cluster.network.model_cost import model_cost_for

    catalogue = load_catalogue(settings.model.catalogue)
    costs = {}
    for name in settings.model.served:
        spec = catalogue.get(name)
        if spec.backend != "transformers":
            continue
        dtype = settings.model.dtype or spec.dtype
        quant = settings.model.weight_quant or spec.weight_quant
        costs[name] = model_cost_for(materialize(spec, settings.model.cache_dir, dtype), dtype, weight_quant=quant)
    return costs


def _largest_node_memory() -> int:
    """The memory Ray may schedule on its roomiest live node (this machine's before a cluster is up)."""
    import psutil
    import ray

    nodes = ray.nodes() if ray.is_initialized() else []
    sizes = [int((n.get("Resources") or {}).get("memory", 0)) for n in nodes if n.get("Alive")]
    return max(sizes, default=0) or int(psutil.virtual_memory().total)


@dataclass(frozen=True, slots=True)
class Serving:
    """What start_serving started: the settings as placed, the stage plans, the cluster, seconds to ready."""

    settings: Settings
    plans: dict
    handle: ClusterHandle
    took: float


def start_serving(serve_app: ServeApp, settings: Settings) -> Serving:
    """What `up` does before it answers: weights, the cluster (joined or started), placement, the deploy.
    Nothing is left running when start-up gives up (a deadline, a failed deploy, Ctrl-C): the application,
    Serve, and the head this call started are stopped (exit 1 with what was still awaited)."""
    _materialize_models(settings)
    handle = _start_cluster(settings)
    console.print(f"[bold]Ray cluster[/] {handle.address}  dashboard: {handle.dashboard_url or 'n/a'}")
    _print_ray_security(settings.ray, handle.ray_env)
    try:
        local = register_local_node(settings, _state_dir(settings))
        if local is not None:
            console.print(f"[bold]local node[/]  {local.node_id[:12]} in the registry, wallet {local.wallet}")
        placed, plans = _plan_placements(settings)
        took = _deploy_reporting(serve_app, placed)
    except BaseException as exc:
        gave_up = isinstance(exc, StartupTimeout | DeployFailed)
        if gave_up:
            console.print(f"[red]error:[/] start-up gave up: {exc}")
        _shutdown(settings, stop_head=handle.started_here)
        if gave_up:
            raise typer.Exit(code=1) from None
        raise
    return Serving(placed, plans, handle, took)


def stop_serving(serving: Serving) -> None:
    """Drain and remove the application, stop Serve, and stop the head if start_serving started it."""
    _shutdown(serving.settings, stop_head=serving.handle.started_here)


def _deploy_reporting(serve_app: ServeApp, settings: Settings) -> float:
    """deploy, with the spinner saying what start-up is waiting for (and how long it will wait)."""
    what = (
        f"deploying {', '.join(settings.model.served)} "
        f"({settings.pipeline.num_stages} stages x {settings.pipeline.num_replicas} replicas)"
    )
    started = time.monotonic()
    limit = settings.http.startup_timeout_s
    with console.status(what + "...") as spinner:

        def report(awaited: str) -> None:
            waited = time.monotonic() - started
            spinner.update(f"{what}: waiting for {awaited} ({waited:.0f} s of at most {limit:.0f} s)")

        return deploy(serve_app, settings, report)


def _start_cluster(settings: Settings):  # type: ignore[no-untyped-def]
    needed = (
        settings.pipeline.num_replicas
        * len(settings.model.served)
        * (settings.pipeline.num_stages * settings.pipeline.stage_resources.get("CPU", 0))
    )
    num_cpus = settings.ray.num_cpus or max(os.cpu_count() or 1, int(needed) + 2)
    if (
        not settings.ray.address
        and not port_in_use("127.0.0.1", settings.ray.head_port)
        and port_in_use(settings.http.host, settings.http.port)
    ):
        _fail(f"port {settings.http.port} is taken by another process; pass --port or stop that process")
    try:
        return ensure_cluster(settings.ray, num_cpus, _state_dir(settings))
    except ClusterError as exc:
        _fail(str(exc))


def _stream_chat(base_url: str, model: str, message: str, max_tokens: int, temperature: float = 0.0) -> None:
    from openai import APIConnectionError, APIStatusError, OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get("SOLANALM_API_KEY", "open"), max_retries=0)
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": message}],
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                console.print(chunk.choices[0].delta.content, end="", soft_wrap=True, highlight=False)
        console.print()
    except APIConnectionError:
        _fail(f"cannot reach {base_url}; is SolanaLM running (`solanalm up`)?")
    except APIStatusError as exc:
        _fail(f"{exc.status_code}: {exc.message}")


def _first_model(base_url: str) -> str:
    from openai import APIConnectionError, OpenAI

    try:
        models = OpenAI(base_url=base_url, api_key="open", max_retries=0).models.list().data
    except APIConnectionError:
        _fail(f"cannot reach {base_url}; is SolanaLM running (`solanalm up`)?")
    if not models:
        _fail("the endpoint serves no model")
    return models[0].id


def _serve_until_interrupted(settings: Settings, started_here: bool) -> None:
    stop = threading.Event()
    # Explicit handlers: a shell that starts us in the background ignores SIGINT by default.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    console.print("\nserving; press Ctrl-C to stop")
    while not stop.wait(1.0):
        pass
    _shutdown(settings, stop_head=started_here)


def _shutdown(settings: Settings, stop_head: bool) -> None:
    with console.status("draining in-flight requests and removing the serve application..."):
        drain_and_shutdown(settings.http.app_name)
    if stop_head and stop_local_head(_state_dir(settings)):
        console.print("stopped the local Ray head")
    console.print("[green]shut down cleanly[/]")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code=1)


def _register_plugins() -> None:
    # Sub-commands of other packages (payments, train, ...) join through entry points, keeping
    # imports one-way; a plugin that fails to import is reported, not fatal.
    for entry in entry_points(group="solanalm.commands"):
        try:
            app.add_typer(entry.load(), name=entry.name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `solanalm up`
            logging.getLogger(__name__).debug("plugin %s unavailable: %s", entry.name, exc)


_register_plugins()


def main() -> None:
    app()


__all__ = ["ServeApp", "app", "main"]
