"""The replica of one model's pipeline: creates its stage actors in its placement-group bundles and serves.

One `PipelineServer` = one pipeline (N stage actors) + one scheduler. Ray Serve replicates it; each
replica's `placement_group_bundles` reserve one bundle per stage. The class is plain so tests can build
it with an injected executor instead of Ray actors.
"""

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import ray

from cluster.config import Settings
from cluster.config.serving import PipelineSection, WeightQuant
from cluster.models import load_catalogue, materialize
from cluster.network.model_cost import model_cost_from_config
from cluster.network.serving_plan import is_provider_host
from cluster.observability.logs import REQUEST_ID, configure_logging
from serve_apps import metrics
from serve_apps.engine.detokenizer import Detokenizer
from serve_apps.engine.device import stage_dtype
from serve_apps.engine.engine import Engine, EngineError
from serve_apps.engine.executor import StepExecutor
from serve_apps.engine.grammar import GrammarCompiler, GrammarError, TokenConstraint
from serve_apps.engine.kv_cache import KVPlan, kv_bytes_per_token, plan_kv_slots
from serve_apps.engine.layer_split import StageSpec, head_balanced_weights, split_layers
from serve_apps.engine.messages import SamplingParams
from serve_apps.engine.scheduler import QueueFullError, Scheduler, SchedulerLimits, Sequence
from serve_apps.engine.stage_model import load_config
from serve_apps.protocol import (
    Accepted,
    Embedded,
    EmbedRequest,
    Finished,
    GenerateEvent,
    GenerateRequest,
    PipelineInfo,
    ProviderWork,
    Rejected,
    TextDelta,
    TokenScore,
)
from serve_apps.routing.stats import RegistryLink
from serve_apps.server.hybrid import HybridPool
from serve_apps.server.providers import AuditSubmitter, build_hybrid_pool
from serve_apps.server.scores import TokenScorer
from serve_apps.server.stages import StagePool
from serve_apps.server.tokenization import PromptProcessor

logger = logging.getLogger(__name__)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GRAMMAR_BROKEN = "the last stage sampled a token the request's grammar does not allow"
HEAD_WORK_SHARE = 0.5  # share of a stage's tokens that reach the lm_head (decodes; prompts skip it)
EMBED = SamplingParams(max_tokens=1, temperature=0.0, embed=True)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What one replica serves: the model, its local weights, dtype, context and stage layout."""

    name: str
    model_dir: Path
    dtype: str
    weight_quant: WeightQuant
    max_model_len: int
    num_layers: int
    stages: tuple[StageSpec, ...]
    kv: KVPlan


def plan_model(model_name: str, settings: Settings) -> ModelPlan:
    """Resolve the catalogue entry, materialise weights once, and split layers into stages."""
    spec = load_catalogue(settings.model.catalogue).get(model_name)
    dtype = settings.model.dtype or spec.dtype
    if stages_on_gpu(settings.pipeline):
        dtype = stage_dtype("cuda", dtype)  # half precision on a GPU, whatever a CPU entry asks
    model_dir = materialize(spec, settings.model.cache_dir, dtype)
    config = load_config(model_dir)
    limit = settings.pipeline.max_model_len or spec.max_model_len or config.max_position_embeddings
    max_len = min(limit, config.max_position_embeddings)
    stages = _stage_specs(model_name, config, settings)
    kv = _plan_kv(config, stages, dtype, max_len, settings.pipeline)
    logger.info(
        "%s: %d KV slots of %d tokens, %.0f MiB per stage", model_name, kv.slots, max_len, kv.bytes_per_stage / 2**20
    )
    quant = settings.model.weight_quant or spec.weight_quant
    return ModelPlan(model_name, model_dir, dtype, quant, max_len, config.num_hidden_layers, tuple(stages), kv)


def _plan_kv(config: Any, stages: list[StageSpec], dtype: str, max_len: int, pipeline: PipelineSection) -> KVPlan:
    """KV slots from the model's shape and the memory budget: every admitted sequence can reach max_len."""
    kv_heads = int(config.num_key_value_heads or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    per_token = kv_bytes_per_token(max(s.num_layers for s in stages), kv_heads, head_dim, DTYPE_BYTES[dtype])
    budget = pipeline.kv_cache_bytes
    if budget is None and stages_on_gpu(pipeline):
        # The replica does not see its stages' GPUs: each stage sizes its slots to its own GPU's free memory
        # (StageWorker._device_kv_slots) and the replica serves with the fewest (PipelineServer.__init__).
        wanted = pipeline.max_num_seqs
        return KVPlan(wanted, per_token, wanted * max_len * per_token)
    if budget is None:  # stages of one replica may share a node: each plans with its share of free memory
        budget = int(psutil.virtual_memory().available * pipeline.kv_memory_fraction / len(stages))
    return plan_kv_slots(pipeline.max_num_seqs, max_len, per_token, budget)


def stages_on_gpu(pipeline: PipelineSection) -> bool:
    """Whether the stages compute on GPUs: their bundles reserve one and pipeline.device does not say cpu."""
    return pipeline.stage_resources.get("GPU", 0.0) > 0 and pipeline.device != "cpu"


def _stage_specs(model_name: str, config: Any, settings: Settings) -> list[StageSpec]:
    """The planned layer ranges (`pipeline.placements[model]`), else `num_stages` ranges of equal work
    (the last stage, which also runs the lm_head, gets fewer layers)."""
    num_layers, stages = config.num_hidden_layers, settings.pipeline.num_stages
    placement = settings.pipeline.placements.get(model_name)
    if placement is None:
        # The lm_head runs only for sampled tokens, the layers for prompt tokens too: count it at half its size.
        head = model_cost_from_config(config).head_layer_equiv * HEAD_WORK_SHARE
        return split_layers(num_layers, stages, weights=head_balanced_weights(num_layers, stages, head))
    if sum(placement.stage_layers) != num_layers:
        raise ValueError(
            f"placement of {model_name}: stage_layers {placement.stage_layers} sum to "
            f"{sum(placement.stage_layers)}, the model has {num_layers} layers"
        )
    counts = [float(count) for count in placement.stage_layers]
    return split_layers(num_layers, len(counts), weights=counts)


ExecutorFactory = Callable[[ModelPlan, Settings], tuple[StepExecutor, StagePool | HybridPool | None]]


class PipelineServer:
    """Serve replica: `generate` streams GenerateEvents; `describe` reports the pipeline's stages."""

    def __init__(
        self, model_name: str, settings: dict | Settings, executor_factory: ExecutorFactory | None = None
    ) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        configure_logging(self.settings.logging)
        self.plan = plan_model(model_name, self.settings)
        self.replica_id = _replica_id()
        self.prompts = PromptProcessor.from_model_dir(self.plan.model_dir, self.plan.max_model_len)
        self.scorer = TokenScorer(self.prompts.tokenizer)
        model_config = load_config(self.plan.model_dir)
        self.hidden_size, self.vocab_size = int(model_config.hidden_size), int(model_config.vocab_size)
        factory = executor_factory or _ray_executor
        executor, self.pool = factory(self.plan, self.settings)
        pipeline = self.settings.pipeline
        if isinstance(self.pool, StagePool) and stages_on_gpu(pipeline):
            slots = min(self.plan.kv.slots, self.pool.kv_slots())  # what the GPU stages could hold
            self.plan = replace(self.plan, kv=replace(self.plan.kv, slots=slots))
        inflight = self.pool.max_inflight if self.pool else (pipeline.max_inflight_steps or len(self.plan.stages))
        limits = SchedulerLimits(
            self.plan.kv.slots, pipeline.max_batch_size, pipeline.max_queue, pipeline.prefill_chunk, inflight
        )
        scheduler = Scheduler(limits, self.prompts.eos_token_ids)
        self.engine = Engine(
            scheduler,
            executor,
            recovery=self.pool,
            max_inflight_steps=inflight,
            recovery_timeout_s=pipeline.recovery_timeout_s,
        )
        # Each stage's host, asked once (a describe of every stage): routing, request records and payees use it.
        self.node_ids = self.pool.node_ids() if self.pool is not None else []
        self._operator_payees = self._provider_work()  # fixed for a pool of operator stages
        self.audits = AuditSubmitter(self.settings)
        if isinstance(self.pool, HybridPool):
            self.audits.start()  # the auditor's process starts while this replica finishes loading
        # Routing: this pipeline's nodes, whose registry records rank the replica and record its requests.
        self.registry = RegistryLink(self.settings.network, self.settings.ray.namespace)
        self.gauges = metrics.EngineGauges(model_name, self.engine)  # queue, running, KV slots, steps
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        logger.info("pipeline %s ready: %d stages", model_name, len(self.plan.stages))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """Accepted/Rejected first, then text deltas, then one Finished."""
        prepared = self.prompts.prepare(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        outside = [t for t, _ in request.sampling.logit_bias if t >= self.vocab_size]
        if outside:
            yield Rejected(
                400,
                f"logit_bias names token {outside[0]}, outside {self.plan.name}'s vocabulary of {self.vocab_size}",
                "logit_bias",
                "invalid_value",
            )
            return
        constraint = await self._constraint(request)
        if isinstance(constraint, Rejected):
            yield constraint
            return
        self.gauges.ensure_started()
        sampling = self._checkable(_with_max_tokens(request.sampling, prepared.max_tokens))
        seq = Sequence(request.request_id, prepared.token_ids, sampling, self.plan.max_model_len, constraint=constraint)
        prompt_tokens = len(prepared.token_ids)
        audit = self.pool.audit if isinstance(self.pool, HybridPool) else None
        if audit is not None:
            audit.admit(seq.seq_id, request.request_id)  # a secret draw: audited or not, served the same
        try:
            events = self.engine.stream(seq)
            first = await anext(events)
        except QueueFullError as exc:
            self._end_audit(seq.seq_id, served=False)
            yield Rejected(503, f"server overloaded: {exc}", code="overloaded", retry_after_s=1.0)
            return
        except EngineError as exc:
            self._end_audit(seq.seq_id, served=False)
            yield Rejected(503, str(exc), code="pipeline_unavailable", retry_after_s=1.0)
            return
        REQUEST_ID.set(request.request_id)  # after the engine loop started: its task must not inherit the id
        yield Accepted(prompt_tokens, providers=self.providers())
        started = time.monotonic()
        try:
            async for event in self._text_events(request, seq, first, events, prompt_tokens):
                if isinstance(event, Finished):
                    per_token_s = (time.monotonic() - started) / max(1, event.completion_tokens)
                    self.registry.record_request(self.node_ids, event.finish_reason != "error", per_token_s)
                yield event
        finally:
            self._end_audit(seq.seq_id, served=True)  # a client that left still had its tokens computed

    async def _constraint(self, request: GenerateRequest) -> TokenConstraint | Rejected | None:
        """The request's grammar compiled for this tokenizer (off the event loop), or a 400 naming it."""
        if request.grammar is None:
            return None
        try:
            if self._grammars is None:
                vocab = int(load_config(self.plan.model_dir).vocab_size)
                tokenizer, eos = self.prompts.tokenizer, self.prompts.eos_token_ids
                self._grammars = await asyncio.to_thread(GrammarCompiler, tokenizer, vocab, eos)
            compiled = await asyncio.to_thread(self._grammars.compile, request.grammar)
        except GrammarError as exc:
            param = "tools" if request.tools else "response_format"
            return Rejected(400, str(exc), param, "invalid_json_schema")
        return self._grammars.constraint(compiled)

    async def embed(self, request: EmbedRequest) -> Embedded | Rejected:
        """Pooled embeddings of every input: one embedding sequence per input, all queued at once, so the
        scheduler puts their prompts into the same steps (at most as many at a time as there are KV slots)."""
        if request.dimensions is not None and request.dimensions != self.hidden_size:
            return Rejected(
                400,
                f"dimensions={request.dimensions} is not supported by {self.plan.name}: its embeddings have "
                f"{self.hidden_size} dimensions (omit dimensions, or give {self.hidden_size})",
                "dimensions",
                "unsupported_dimensions",
            )
        encoded = self.prompts.embedding_inputs(request.inputs, self.vocab_size)
        if isinstance(encoded, Rejected):
            return encoded
        self.gauges.ensure_started()
        REQUEST_ID.set(request.request_id)
        wave = asyncio.Semaphore(self.plan.kv.slots)  # more inputs than slots would overflow the queue

        async def pooled(index: int, ids: list[int]) -> tuple[float, ...]:
            async with wave:
                seq = Sequence(f"{request.request_id}-{index}", ids, EMBED, self.plan.max_model_len)
                events = self.engine.stream(seq)
                try:
                    event = await anext(events)
                finally:
                    await events.aclose()
                if event.embedding is None:
                    raise EngineError(f"input {index} ended without its embedding ({event.finish_reason})")
                return event.embedding

        try:
            async with asyncio.TaskGroup() as group:  # one failing input cancels (and frees) the others
                tasks = [group.create_task(pooled(i, ids)) for i, ids in enumerate(encoded)]
        except ExceptionGroup as group_error:
            first = group_error.exceptions[0]
            if isinstance(first, QueueFullError):
                return Rejected(503, f"server overloaded: {first}", code="overloaded", retry_after_s=1.0)
            if isinstance(first, EngineError):
                return Rejected(503, str(first), code="pipeline_unavailable", retry_after_s=1.0)
            raise
        vectors = tuple(task.result() for task in tasks)
        return Embedded(vectors, sum(len(ids) for ids in encoded), providers=self.providers())

    def _checkable(self, sampling: SamplingParams) -> SamplingParams:
        """A provider's last stage samples: an unseeded draw gets a secret seed, so an audit can redo it
        exactly (seeded sampling draws from (seed, position); the client sees no difference)."""
        if not isinstance(self.pool, HybridPool) or self.pool.stage_wallets()[-1] is None:
            return sampling
        if sampling.greedy or sampling.seed is not None:
            return sampling
        return replace(sampling, seed=secrets.randbits(63))

    def _end_audit(self, seq_id: str, served: bool) -> None:
        """An audited sequence ended: hand its provider stages' work to the auditor (nothing otherwise)."""
        if not isinstance(self.pool, HybridPool) or self.pool.audit is None:
            return
        if not served:
            self.pool.audit.discard(seq_id)
            return
        self.audits.submit(self.pool.audit.finish(seq_id))

    async def record_routing_stats(self) -> dict:
        """Serve polls this every `routing.stats_period_s`; the ReputationRouter ranks replicas by it."""
        scheduler = self.engine.scheduler
        return await self.registry.routing_stats(
            self.replica_id, self.node_ids, scheduler.num_waiting, len(scheduler.running)
        )

    async def _text_events(self, request, seq, first, events, prompt_tokens):  # type: ignore[no-untyped-def]
        """Detokenized text per token; tokens already waiting (the reader fell behind) go out as one delta,
        so a loaded gateway gets fewer, larger messages instead of falling further behind. Asked-for logprobs
        travel with the delta their tokens' text is in (an end-of-sequence token's are not sent: it has no text)."""
        detok = Detokenizer(self.prompts.tokenizer, request.sampling.stop)
        count, event, pending = 0, first, ""
        scores: list[TokenScore] = []
        try:
            while True:
                count += 1
                final = event.finish_reason is not None
                pending += detok.add(event.token_id, final=final)
                if event.logprobs is not None and not self._is_eos(event.token_id, request.sampling):
                    scores.append(self.scorer.score(event.token_id, event.logprobs))
                if detok.stopped:
                    self.engine.abort(seq.seq_id, "stop")
                    if pending or scores:
                        yield TextDelta(pending, count, tuple(scores))
                    yield Finished("stop", prompt_tokens, count, providers=self.providers())
                    return
                if (pending or (final and scores)) and (final or not self.engine.ready(seq.seq_id)):
                    yield TextDelta(pending, count, tuple(scores))
                    pending, scores = "", []
                if final:
                    error = GRAMMAR_BROKEN if event.finish_reason == "error" else None
                    yield Finished(event.finish_reason, prompt_tokens, count, error=error, providers=self.providers())
                    return
                event = await anext(events)
        except EngineError as exc:
            yield Finished("error", prompt_tokens, count, error=str(exc))
        finally:
            await events.aclose()

    def _is_eos(self, token_id: int, sampling: SamplingParams) -> bool:
        return token_id in self.prompts.eos_token_ids and not sampling.ignore_eos

    def providers(self) -> tuple[ProviderWork, ...]:
        """The payees of a request finishing now: a provider stage replaced by an operator stage after a
        failover is the operator's from then on, so a dead provider is not paid for layers it no longer serves."""
        if isinstance(self.pool, HybridPool):
            return provider_work(self.plan.stages, self.pool.stage_wallets())
        return self._operator_payees

    def _provider_work(self) -> tuple[ProviderWork, ...]:
        """Which wallet serves which layers: a provider's stage host is paid to the wallet it proved at
        registration (from the registry, never from the provider); an operator node's stage to its wallet
        label (None: the operator's own)."""
        if self.pool is None:
            return (ProviderWork(None, self.plan.num_layers),)
        return provider_work(self.plan.stages, self._stage_wallets())

    def _stage_wallets(self) -> list[str | None]:
        if self.pool is None:
            return []
        if isinstance(self.pool, HybridPool):
            return self.pool.stage_wallets()
        wallet_key = f"{self.settings.network.label_prefix}/wallet"
        labels = {node["NodeID"]: node.get("Labels") or {} for node in ray.nodes()}
        return [labels.get(node_id, {}).get(wallet_key) for node_id in self.node_ids]

    async def describe(self) -> PipelineInfo:
        stages = await self.pool.describe() if self.pool is not None else ()
        return PipelineInfo(
            model=self.plan.name,
            replica_id=self.replica_id,
            node_id=_node_id(),
            dtype=self.plan.dtype,
            num_layers=self.plan.num_layers,
            max_model_len=self.plan.max_model_len,
            stages=tuple(stages),
            queue_depth=self.engine.scheduler.num_waiting,
            running=len(self.engine.scheduler.running),
            steps=self.engine.steps,
            max_inflight_steps=self.engine.max_inflight_steps,
        )

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it.

        A dead stage alone is not unhealthy: the engine recreates it and replays its sequences (replacing
        the whole replica would lose every in-flight request). Only a pipeline that could not be
        recovered is reported, so Serve starts a fresh replica with a fresh placement group.
        """
        if not self.engine.healthy:
            raise RuntimeError("the pipeline lost a stage and could not recover it")

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.kill()


def provider_work(stages: tuple[StageSpec, ...], wallets: list[str | None]) -> tuple[ProviderWork, ...]:
    """Layers per payee wallet, from the plan's layer ranges (the coordinator's, not anything reported)."""
    work: dict[str | None, int] = {}
    for spec, wallet in zip(stages, wallets, strict=True):
        work[wallet] = work.get(wallet, 0) + spec.num_layers
    return tuple(ProviderWork(wallet, layers) for wallet, layers in work.items())


def _with_max_tokens(sampling: SamplingParams, max_tokens: int) -> SamplingParams:
    return replace(sampling, max_tokens=max_tokens)


def _ray_executor(plan: ModelPlan, settings: Settings) -> tuple[StepExecutor, StagePool | HybridPool]:
    placement = settings.pipeline.placements.get(plan.name)
    if placement is not None and any(is_provider_host(n) for n in placement.node_ids or ()):
        hybrid = build_hybrid_pool(plan, settings, list(placement.node_ids or ()))
        return hybrid.executor(), hybrid
    pool = StagePool.create(
        plan.name,
        plan.model_dir,
        plan.dtype,
        plan.stages,
        plan.max_model_len,
        settings.pipeline,
        plan.kv.slots,
        plan.weight_quant,
    )
    return pool.executor(), pool


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests)
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
