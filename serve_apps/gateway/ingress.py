"""The Ray Serve ingress deployment wrapping the FastAPI gateway."""

from ray import serve

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.backend import ServeHandleBackend
from serve_apps.gateway.current import set_current

gateway_app = create_gateway_app()


@serve.deployment(name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(gateway_app)
class OpenAIIngress:
    """Routes OpenAI requests to one PipelineServer deployment per model."""

    def __init__(self, pipelines: dict, cards: list[ModelCard], request_timeout_s: float, max_body_bytes: int) -> None:
        set_current(Gateway(ServeHandleBackend(pipelines), cards, request_timeout_s), max_body_bytes)
