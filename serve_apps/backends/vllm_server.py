"""vLLM backend (extra `gpu`): a Serve replica whose placement-group bundles are vLLM's Ray workers.

vllm is imported only when a replica starts (`start_async_llm`), so CPU nodes, CI and the unit tests
never need it; the engine and its sampling parameters are injected, the unit tests' seam.
"""

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cluster.config import Settings
from cluster.models import ModelSpec, load_catalogue
from serve_apps.backends.protocol import node_id, replica_id
from serve_apps.backends.vllm_config import vllm_engine_kwargs, vllm_provider_work
from serve_apps.protocol import (
    Accepted,
    Finished,
    GenerateEvent,
    GenerateRequest,
    PipelineInfo,
    ProviderWork,
    Rejected,
    TextDelta,
)
from serve_apps.server.tokenization import encode_chat, encode_text

logger = logging.getLogger(__name__)

EngineFactory = Callable[[dict[str, Any]], Any]  # kwargs -> vllm.v1.engine.async_llm.AsyncLLM (or a fake)
ParamsFactory = Callable[..., Any]  # **kwargs -> vllm.SamplingParams (or a fake)


def start_async_llm(kwargs: dict[str, Any]) -> Any:
    """vLLM's AsyncLLM with its Ray workers in this replica's placement group (as Ray Serve LLM does)."""
    try:
        from ray.util import get_current_placement_group
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise RuntimeError("the vllm backend needs vLLM on a GPU node: pip install 'solanalm[gpu]'") from exc
    config = AsyncEngineArgs(**kwargs).create_engine_config()
    config.parallel_config.placement_group = get_current_placement_group()
    return AsyncLLM.from_vllm_config(config)


def vllm_sampling_params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def model_paths(spec: ModelSpec, cache_dir: Path) -> tuple[str, str | None]:
    """(weights, tokenizer) for vLLM: an HF dir serves both; a GGUF needs its tokenizer extracted."""
    if spec.source.kind == "hf_dir" and spec.source.path is not None:
        return str(spec.source.path.expanduser()), None
    from cluster.models.materialize import tokenizer_dir

    return str(spec.source.gguf_file()), str(tokenizer_dir(cache_dir, spec.source))


class VllmServer:
    """Serve replica of one model on vLLM; implements `ModelReplica`."""

    def __init__(
        self,
        model_name: str,
        settings: dict | Settings,
        engine_factory: EngineFactory | None = None,
        params_factory: ParamsFactory | None = None,
    ) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        self.spec = load_catalogue(self.settings.model.catalogue).get(model_name)
        weights, tokenizer = model_paths(self.spec, self.settings.model.cache_dir)
        self.engine = (engine_factory or start_async_llm)(vllm_engine_kwargs(self.spec, weights, tokenizer))
        self.params = params_factory or vllm_sampling_params
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.num_layers = _num_layers(weights)
        self.providers = self._provider_work()
        self.replica_id = replica_id("vllm")
        self.running = 0
        logger.info("vLLM replica of %s ready (%s)", model_name, self.spec.vllm_options())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """Accepted (or Rejected), text deltas, then one Finished; vLLM batches concurrent requests."""
        prepared = await self._prompt_ids(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        ids, max_tokens = prepared
        sampling = request.sampling
        params = self.params(
            n=1,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            seed=sampling.seed,
            stop=list(sampling.stop),
            ignore_eos=sampling.ignore_eos,
        )
        yield Accepted(len(ids), providers=self.providers)
        self.running += 1
        sent, finished = "", False
        try:
            async for output in self.engine.generate({"prompt_token_ids": ids}, params, request.request_id):
                completion = output.outputs[0]
                if len(completion.text) > len(sent):
                    yield TextDelta(completion.text[len(sent) :], len(completion.token_ids))
                    sent = completion.text
                if output.finished:
                    finished = True
                    reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else "stop"
                    yield Finished(reason, len(ids), len(completion.token_ids), providers=self.providers)
                    return
            yield Finished("error", len(ids), 0, error="vLLM ended the request without finishing it")
        finally:
            self.running -= 1
            if not finished:  # the client went away (or vLLM failed): free its KV cache now
                await self.engine.abort(request.request_id)

    async def _prompt_ids(self, request: GenerateRequest) -> tuple[list[int], int] | Rejected:
        tokenizer = await self.engine.get_tokenizer()
        try:
            # Control tokens the client writes are plain text; only the template's markers are special.
            if request.messages is not None:
                ids = encode_chat(tokenizer, request.messages)
            else:
                ids = encode_text(tokenizer, request.prompt or "")
        except (ValueError, TypeError, KeyError) as exc:
            return Rejected(400, f"could not apply the chat template: {exc}", "messages", "invalid_messages")
        room = self.max_model_len - len(ids)
        max_tokens = request.completion_budget(room)
        if not ids or room < 1 or len(ids) + max_tokens > self.max_model_len:
            return Rejected(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                f"and {max_tokens} were asked for the completion.",
                "max_tokens",
                "context_length_exceeded",
            )
        return ids, max_tokens

    def _provider_work(self) -> tuple[ProviderWork, ...]:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.placement_group import placement_group_table

        pg = get_current_placement_group() if ray.is_initialized() else None
        if pg is None:
            return (ProviderWork(None, self.num_layers),)
        bundles = placement_group_table(pg).get("bundles_to_node_id", {})
        nodes = [bundles[index] for index in sorted(bundles)]
        key = f"{self.settings.network.label_prefix}/wallet"
        labels = {str(n["NodeID"]): n.get("Labels") or {} for n in ray.nodes()}
        wallets = {node: str(label[key]) for node, label in labels.items() if label.get(key)}
        return vllm_provider_work(nodes, wallets, self.num_layers, self.spec.vllm_options().pipeline_parallel_size)

    async def describe(self) -> PipelineInfo:
        options = self.spec.vllm_options()
        return PipelineInfo(
            model=self.spec.name,
            replica_id=self.replica_id,
            node_id=node_id(),
            dtype=self.spec.dtype,
            num_layers=self.num_layers,
            max_model_len=self.max_model_len,
            stages=(),
            running=self.running,
            extra={
                "backend": "vllm",
                "tensor_parallel_size": str(options.tensor_parallel_size),
                "pipeline_parallel_size": str(options.pipeline_parallel_size),
            },
        )

    async def check_health(self) -> None:
        """vLLM's own health check (its engine core or a Ray worker died): Serve replaces the replica."""
        await self.engine.check_health()


def _num_layers(weights: str) -> int:
    config = Path(weights) / "config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("num_hidden_layers", 1))
    return 1
