"""Assembling a pipeline whose planned stages include providers' stage hosts (see `hybrid.py`).

The coordinator reads how to reach each planned provider from the registry (operator domain: endpoint,
pinned certificate, link token, proven wallet), asks each provider's stage host to load its layer range
with the digest of the operator's own copy of those tensors (a provider with other weights refuses), and
starts the operator's stages in the replica's placement-group bundles as usual.
"""

import logging
from typing import Any

from cluster.config import Settings
from cluster.network.registry import call_registry, get_registry
from cluster.network.serving_plan import is_provider_host
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo
from serve_apps.server.hybrid import HybridPool, HybridStage, ProviderLink, ProviderStage
from serve_apps.server.stages import in_bundle, stage_name_prefix, stage_recipe
from serve_apps.verification.audit import AuditedStage, AuditJob, AuditLimits, ServedAudit

logger = logging.getLogger(__name__)


def provider_links(settings: Settings, provider_ids: list[str]) -> dict[str, ProviderLink]:
    """The registry's links to `provider_ids`; KeyError naming the ones it does not know."""
    registry = get_registry(settings.network, settings.ray.namespace)
    raw: dict[str, dict[str, Any]] = call_registry(
        registry, "provider_links", provider_ids, timeout_s=settings.network.registry_call_timeout_s
    )
    missing = [pid for pid in provider_ids if pid not in raw]
    if missing:
        raise KeyError(f"the registry knows no provider {missing}")
    return {
        pid: ProviderLink(
            provider_id=pid,
            endpoint=str(link["endpoint"]),
            cert_pem=link["cert_pem"].encode() if isinstance(link["cert_pem"], str) else bytes(link["cert_pem"]),
            link_token=str(link["link_token"]),
            wallet=str(link["wallet"]),
        )
        for pid, link in raw.items()
        if pid in provider_ids
    }


def build_hybrid_pool(plan: Any, settings: Settings, node_ids: list[str]) -> HybridPool:
    """The stages of `plan` (a ModelPlan) over operator bundles and the planned providers; loaded and ready."""
    from ray.util import get_current_placement_group

    from serve_apps.stagehost.client import RemoteStage
    from serve_apps.stagehost.wire import FrameLimits, weights_digest

    pipeline = settings.pipeline
    links = provider_links(settings, sorted({n for n in node_ids if is_provider_host(n)}))
    placement_group = get_current_placement_group()
    prefix = stage_name_prefix(plan.name)
    stages, bundle = [], 0
    for spec, node_id in zip(plan.stages, node_ids, strict=True):
        recipe = stage_recipe(
            prefix, spec, plan.model_dir, plan.dtype, plan.max_model_len, pipeline, plan.kv.slots, plan.weight_quant
        )
        if is_provider_host(node_id):
            stages.append(HybridStage(spec, recipe, links[node_id]))
        else:
            in_bundle(recipe, placement_group, bundle)
            bundle += 1
            stages.append(HybridStage(spec, recipe, None))
    limits = FrameLimits.for_model(
        plan.model_dir, plan.kv.slots, plan.max_model_len, pipeline.max_batch_size, pipeline.prefill_chunk
    )

    def client(link: ProviderLink, spec: StageSpec) -> RemoteStage:
        timeout_s = pipeline.stage_call_timeout_s
        return RemoteStage(link.endpoint, link.cert_pem, link.link_token, limits, timeout_s, spec, plan.dtype)

    async def load(endpoint: ProviderStage, stage: HybridStage) -> StageInfo:
        digest = weights_digest(plan.model_dir, stage.spec)
        client = endpoint.client()
        info: StageInfo = await client.load(plan.name, stage.recipe.config, digest)
        endpoint.stage_id = client.stage_id  # the serving loop's own client addresses the same stage
        logger.info("provider %s loaded layers %d-%d", endpoint.name, info.layer_start, info.layer_end)
        return info

    max_inflight = pipeline.max_inflight_steps or len(stages)
    audit = ServedAudit(AuditLimits.from_network(settings.network))
    for index, stage in enumerate(stages):
        if stage.link is not None:
            audit.set_stage(index, AuditedStage(stage.link.provider_id, stage.link.wallet, stage.recipe.config))
    pool = HybridPool(stages, pipeline.stage_call_timeout_s, max_inflight, client, load, audit)
    pool.wait_ready()
    return pool


class AuditSubmitter:
    """Hands finished audited sequences to the operator's auditor actor (created on first use, on the
    head), fire and forget: an answer never waits for its audit."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._auditor: Any = None

    def start(self) -> None:
        """Create (or find) the auditor now, so the first audit does not wait for its process to start."""
        try:
            self._actor()
        except Exception:  # noqa: BLE001 - retried at the first submit
            logger.exception("could not start the auditor")

    def submit(self, jobs: list[AuditJob]) -> None:
        if not jobs:
            return
        try:
            self._actor().submit.remote(jobs)  # an actor call runs whether or not its result is awaited
        except Exception:  # noqa: BLE001 - an audit lost is counted as not sampled, the answer stands
            logger.exception("could not hand %d audit jobs to the auditor", len(jobs))

    def _actor(self) -> Any:
        if self._auditor is None:
            from serve_apps.verification.auditor import RaySanctions, get_or_create_auditor

            network = self.settings.network.model_dump(mode="json")
            # Only how to reach the payments actor: Ray stores actor arguments, so no secret goes in them.
            section = self.settings.payments
            payments = {"actor_name": section.actor_name, "actor_call_timeout_s": section.actor_call_timeout_s}
            sanctions = RaySanctions(network, payments, self.settings.ray.namespace)
            self._auditor = get_or_create_auditor(sanctions, self.settings.ray.namespace)
        return self._auditor
