"""The pipeline deployment is routed by the ReputationRouter with the network's routing settings."""

from cluster.config.network import RoutingWeights
from cluster.config.serving import PipelineSection
from serve_apps.builder import pipeline_deployment, request_router_config
from serve_apps.routing.router import ReputationRouter


def test_the_pipeline_deployment_names_the_reputation_router() -> None:
    routing = RoutingWeights(score_tolerance=0.05, stats_period_s=0.5)
    deployment = pipeline_deployment("tiny-llama", PipelineSection(), routing=routing)
    config = deployment._deployment_config.request_router_config
    assert config.get_request_router_class() is ReputationRouter
    assert config.request_router_kwargs == {"score_tolerance": 0.05}
    assert config.request_routing_stats_period_s == 0.5


def test_defaults_come_from_the_routing_section() -> None:
    config = request_router_config(RoutingWeights())
    assert config.request_routing_stats_period_s == RoutingWeights().stats_period_s
