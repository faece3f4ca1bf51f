"""Application builder: what `serve run configs/serve.yaml`, `serve deploy`, RayService and `solanalm up` import.

`build_app(args)` takes the settings sections as its arguments (the `args:` of a Serve config file) and
returns the Serve application: one PipelineServer deployment per served model, whose replicas each
reserve a placement group of one bundle per stage, behind the OpenAI ingress.
"""

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import Settings, load_settings
from cluster.config.network import RoutingWeights
from cluster.config.serving import PipelineSection
from cluster.models import load_catalogue
from cluster.network.serving_plan import operator_stage_indices
from cluster.security.operator_token import resolve_operator_token
from serve_apps.backends.deployments import backend_deployment
from serve_apps.gateway.app import ModelCard
from serve_apps.gateway.ingress import OpenAIIngress
from serve_apps.routing.router import ReputationRouter
from serve_apps.server.pipeline_server import PipelineServer

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the SolanaLM Serve application from settings sections (`{"model": {...}, "pipeline": {...}}`)."""
    settings = _absolute_paths(load_settings(**dict(args or {})))
    catalogue = load_catalogue(settings.model.catalogue)
    pipelines, cards = {}, []
    for name in settings.model.served:
        spec = catalogue.get(name)
        if spec.backend == "transformers":
            deployment = pipeline_deployment(
                name, settings.pipeline, settings.network.placement.node_label_key, settings.network.routing
            )
            pipelines[name] = deployment.bind(name, _own_placement(settings, name))
        else:  # llamacpp, vllm, proxy: same replica contract, their own deployment (docs/backends.md)
            pipelines[name] = backend_deployment(spec, settings)
        if spec.price is not None and name not in settings.payments.prices:
            settings.payments.prices = {**settings.payments.prices, name: spec.price}
        card = ModelCard(name, spec.owned_by, spec.max_model_len, spec.backend, embeddings=spec.embeddings)
        cards.append(card)
    # A redeploy (re-placement after a node left) replaces the gateway too: the old one finishes its
    # requests, which the new pipeline replicas may answer only after they load, so it may take as long
    # as a request may.
    options: dict[str, Any] = {
        "graceful_shutdown_timeout_s": settings.pipeline.request_timeout_s,
        "num_replicas": settings.http.gateway_replicas,
    }
    if any(p.node_ids for p in settings.pipeline.placements.values()):
        # Stages run on provider nodes that may leave; the gateway (and the payments actor it starts
        # next to itself) stays on the operator's head, which Ray marks with this resource.
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    ingress = OpenAIIngress.options(**options).bind  # type: ignore[attr-defined]
    return ingress(
        pipelines,
        cards,
        settings.pipeline.request_timeout_s,
        settings.http.max_body_bytes,
        settings.http.rate_limits,
        settings.payments,
        settings.ray.namespace,
        settings.network,
        settings.logging,
        resolve_operator_token(settings.http, settings.model.cache_dir / "state"),  # the state dir `solanalm up` uses
    )


def pipeline_deployment(  # type: ignore[no-untyped-def]
    model: str, pipeline: PipelineSection, node_label_key: str = "ray.io/node-id", routing: RoutingWeights | None = None
):
    """The PipelineServer deployment of one model: one placement group of one bundle per stage per replica;
    a planned placement (`pipeline.placements[model]`) pins each bundle to its node by label. Requests are
    routed by the ReputationRouter (serve_apps/routing)."""
    placement = pipeline.placements.get(model)
    pinned = placement is not None and placement.node_ids is not None
    bundles = stage_bundles(pipeline, model)
    options: dict[str, Any] = {}
    if bundles:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = "SPREAD" if pinned else pipeline.placement_strategy
        # Serve schedules the replica into *any* bundle of its placement group (bundle index -1), so a
        # replica that reserved CPU could take a stage's share; the replica only coordinates, so it
        # reserves none and every bundle stays exactly one stage's.
        options["ray_actor_options"] = {"num_cpus": 0}
    else:
        # Every stage is a provider's stage host: no bundle to hold; the coordinator stays on the head.
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    if pinned and bundles:
        # Each bundle's node is fixed by its selector; SPREAD is Serve's scheduling path for such groups.
        options["placement_group_bundle_label_selector"] = stage_label_selectors(model, pipeline, node_label_key)
    return serve.deployment(PipelineServer).options(  # type: ignore[attr-defined]
        name=f"pipeline-{model}",
        num_replicas=pipeline.num_replicas,
        max_ongoing_requests=pipeline.max_num_seqs + pipeline.max_queue + 8,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=pipeline.graceful_shutdown_timeout_s,
        request_router_config=request_router_config(routing or RoutingWeights()),
        **options,
    )


def request_router_config(routing: RoutingWeights) -> RequestRouterConfig:
    """Serve's router config: the ReputationRouter, fed by each replica's `record_routing_stats`."""
    fields: dict[str, Any] = {  # Ray's pydantic model confuses mypy's view of its keywords
        "request_router_class": ReputationRouter,
        "request_router_kwargs": {"score_tolerance": routing.score_tolerance},
        "request_routing_stats_period_s": routing.stats_period_s,
    }
    return RequestRouterConfig(**fields)


def stage_bundles(pipeline: PipelineSection, model: str | None = None) -> list[dict[str, float]]:
    """One bundle per operator stage, in stage order (a planned model has its plan's stage count; stages on
    providers' stage hosts run outside the operator's cluster and hold no bundle)."""
    placement = pipeline.placements.get(model) if model is not None else None
    if placement is None:
        return [dict(pipeline.stage_resources) for _ in range(pipeline.num_stages)]
    local = operator_stage_indices(placement.node_ids, len(placement.stage_layers))
    return [dict(pipeline.stage_resources) for _ in local]


def stage_label_selectors(model: str, pipeline: PipelineSection, node_label_key: str) -> list[dict[str, str]]:
    """Bundle j's label selector pins it to the planned node of the j-th operator stage."""
    placement = pipeline.placements[model]
    node_ids = placement.node_ids or []
    return [{node_label_key: node_ids[i]} for i in operator_stage_indices(placement.node_ids, len(node_ids))]


def _own_placement(settings: Settings, model: str) -> Settings:
    # Each pipeline sees only its own placement, so re-planning one model does not restart the others.
    own = {k: v for k, v in settings.pipeline.placements.items() if k == model}
    return settings.model_copy(update={"pipeline": settings.pipeline.model_copy(update={"placements": own})})


def _absolute_paths(settings: Settings) -> Settings:
    # Replicas run with another working directory: resolve relative paths where the builder runs,
    # falling back to the repository root (a `ray job`/`serve run` from elsewhere).
    catalogue = settings.model.catalogue
    if not catalogue.is_absolute():
        candidate = Path.cwd() / catalogue
        settings.model.catalogue = candidate if candidate.exists() else REPO_ROOT / catalogue
    settings.model.cache_dir = settings.model.cache_dir.expanduser().resolve()
    return settings
