"""The MCP server: three tools and seven resources over a gateway (`GatewayAccess`) and Ray's job server.

Tools (input schemas: docs/mcp.md):
- `llm_inference_distributed`: a chat completion through the gateway (metered like /v1/chat/completions).
- `llm_train_distributed`: a data-parallel or federated training run, submitted as a Ray job.
- `llm_data_shard`: shard a dataset as the training jobs do, submitted as a Ray job.
- `llm_job_status`: status and progress of a job the two above submitted.
Resources: llm://models, llm://nodes, llm://performance, training://jobs, training://data_shards,
training://checkpoints, training://metrics, and the template training://jobs/{job_id}.
Every failure is a `ToolError`/`ResourceError` with the reason, which the SDK answers as an MCP error.
"""

import asyncio
import json
import re
import time
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel, ConfigDict, Field

from serve_apps.mcp.access import GatewayAccess, GatewayCallError, authorization_of
from serve_apps.mcp.jobs import JobsUnavailable, TrainingJobs

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_:-]{1,128}$")
ENTRY_POINTS = {
    "data_parallel": ("train_dp", "train_jobs.data_parallel"),
    "federated": ("train_fl", "train_jobs.federated"),
}


class ChatMessageIn(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(min_length=1, max_length=100_000, description="The turn's text.")


def build_mcp_server(gateway: GatewayAccess, jobs: TrainingJobs | None) -> MCPServer:
    """One MCP server for both transports; `jobs` None: training tools answer that no job server is set."""
    server = MCPServer(
        "solanalm", instructions="SolanaLM: distributed LLM inference and training on Ray.", log_level="WARNING"
    )
    _add_inference(server, gateway)
    _add_training(server, jobs)
    _add_resources(server, gateway, jobs)
    return server


def _add_inference(server: MCPServer, gateway: GatewayAccess) -> None:
    @server.tool(description="Generate a chat completion on the network's pipeline (sharded across stages).")
    async def llm_inference_distributed(
        ctx: Context,
        model: Annotated[str, Field(min_length=1, max_length=200, description="A model id from llm://models.")],
        messages: Annotated[
            list[ChatMessageIn] | None, Field(max_length=256, description="Chat turns (give this or prompt).")
        ] = None,
        prompt: Annotated[
            str | None, Field(min_length=1, max_length=100_000, description="A single user turn (or messages).")
        ] = None,
        max_tokens: Annotated[int, Field(ge=1, le=4096, description="Most tokens to generate.")] = 128,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")] = 0.7,
        seed: Annotated[int | None, Field(ge=0, description="Sampling seed, for reproducible answers.")] = None,
    ) -> dict[str, Any]:
        if (messages is None) == (prompt is None):
            raise ToolError("give exactly one of `messages` or `prompt`")
        turns = [m.model_dump() for m in messages] if messages else [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": model, "messages": turns, "max_tokens": max_tokens}
        body.update(temperature=temperature, **({"seed": seed} if seed is not None else {}))
        started = time.perf_counter()
        try:
            answer = await gateway.chat(body, authorization_of(ctx.request_context.request))
        except GatewayCallError as exc:
            raise ToolError(f"inference failed: {exc}") from None
        choice = (answer.get("choices") or [{}])[0]
        return {
            "text": (choice.get("message") or {}).get("content", ""),
            "finish_reason": choice.get("finish_reason"),
            "model": answer.get("model", model),
            "usage": answer.get("usage"),
            "request_id": answer.get("id"),
            "settlement_id": answer.get("settlement_id"),  # the receipt: GET /v1/receipts/{id}
            "latency_s": round(time.perf_counter() - started, 3),
        }


def _add_training(server: MCPServer, jobs: TrainingJobs | None) -> None:
    def need_jobs() -> TrainingJobs:
        if jobs is None:
            raise ToolError("training jobs are not available here: no Ray job server is configured")
        return jobs

    @server.tool(description="Start a distributed training run (Ray Train DDP or Flower federated) as a Ray job.")
    async def llm_train_distributed(
        mode: Annotated[
            Literal["data_parallel", "federated"], Field(description="data_parallel: Ray Train; federated: Flower.")
        ],
        config: Annotated[
            str, Field(min_length=1, max_length=300, description="Job YAML, relative to the repository root.")
        ],
        num_workers: Annotated[
            int | None, Field(ge=1, le=64, description="data_parallel only: override the job's num_workers.")
        ] = None,
    ) -> dict[str, Any]:
        target = need_jobs()
        path = _repo_relative(config, target)
        if num_workers is not None and mode != "data_parallel":
            raise ToolError("num_workers applies to mode=data_parallel only")
        kind, module = ENTRY_POINTS[mode]
        args = [module, "--config", path] + (["--num-workers", str(num_workers)] if num_workers else [])
        return await _submit(target, kind, args)

    @server.tool(description="Shard a dataset as the training jobs do (round_robin, hash, random), as a Ray job.")
    async def llm_data_shard(
        num_shards: Annotated[int, Field(ge=1, le=1024, description="How many shards.")],
        dataset: Annotated[
            str | None, Field(max_length=300, description="JSONL/text file relative to the repository root.")
        ] = None,
        strategy: Annotated[
            Literal["round_robin", "hash", "random"], Field(description="How examples are assigned to shards.")
        ] = "round_robin",
        seed: Annotated[int, Field(ge=0, description="Seed of the random strategy.")] = 0,
        name: Annotated[str | None, Field(description="Shard set name (letters, digits, . _ -).")] = None,
    ) -> dict[str, Any]:
        target = need_jobs()
        name = name or f"shards-{int(time.time() * 1000)}"
        if not NAME_PATTERN.match(name):
            raise ToolError(f"bad shard set name {name!r}: letters, digits, '.', '_' or '-', at most 64")
        output = target.config.output_dir.expanduser() / "shards" / name
        args = ["train_jobs.shard", "--num-shards", str(num_shards), "--strategy", strategy, "--seed", str(seed)]
        args += ["--name", name, "--output", str(output)]
        if dataset is not None:
            args += ["--dataset", _repo_relative(dataset, target)]
        return {**await _submit(target, "shard", args), "output_dir": str(output)}

    @server.tool(description="Status and progress of a job submitted by llm_train_distributed or llm_data_shard.")
    async def llm_job_status(
        job_id: Annotated[str, Field(min_length=1, max_length=128, description="The job id a tool returned.")],
    ) -> dict[str, Any]:
        if not JOB_ID_PATTERN.match(job_id):
            raise ToolError(f"bad job id {job_id!r}")
        try:
            return await need_jobs().status(job_id)
        except JobsUnavailable as exc:
            raise ToolError(str(exc)) from None


async def _submit(jobs: TrainingJobs, kind: str, args: list[str]) -> dict[str, Any]:
    try:
        submitted = await jobs.submit(kind, args)
    except JobsUnavailable as exc:
        raise ToolError(str(exc)) from None
    return {**submitted, "progress": f"read training://jobs/{submitted['job_id']} or call llm_job_status"}


def _repo_relative(path: str, jobs: TrainingJobs) -> str:
    """A path inside the uploaded working directory that exists there (jobs run from its copy)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ToolError(f"{path!r}: give a path relative to the repository root, without '..'")
    if not (jobs.config.working_dir / pure).is_file():
        raise ToolError(f"{path!r}: no such file under {jobs.config.working_dir}")
    return str(pure)


def _add_resources(server: MCPServer, gateway: GatewayAccess, jobs: TrainingJobs | None) -> None:
    def text(payload: Any) -> str:
        return json.dumps(payload, indent=2, default=str)

    async def from_gateway(call: Any) -> str:
        try:
            return text(await call())
        except GatewayCallError as exc:
            raise ResourceError(str(exc)) from None

    async def from_jobs(call: Any) -> str:
        if jobs is None:
            raise ResourceError("no Ray job server is configured here")
        try:
            result = call(jobs)
            return text(await result if asyncio.iscoroutine(result) else result)
        except JobsUnavailable as exc:
            raise ResourceError(str(exc)) from None

    @server.resource("llm://models", mime_type="application/json", description="Models this gateway serves.")
    async def models() -> str:
        return await from_gateway(gateway.models)

    @server.resource("llm://nodes", mime_type="application/json", description="Registered provider nodes.")
    async def nodes() -> str:
        return await from_gateway(gateway.nodes)

    @server.resource("llm://performance", mime_type="application/json", description="Pipelines' stages and load.")
    async def performance() -> str:
        return await from_gateway(gateway.performance)

    @server.resource("training://jobs", mime_type="application/json", description="Ray jobs, newest first.")
    async def training_jobs() -> str:
        return await from_jobs(lambda j: j.list_jobs())

    @server.resource("training://jobs/{job_id}", mime_type="application/json", description="One job's progress.")
    async def training_job(job_id: str) -> str:
        if not JOB_ID_PATTERN.match(job_id):
            raise ResourceError(f"bad job id {job_id!r}")
        return await from_jobs(lambda j: j.status(job_id))

    @server.resource("training://data_shards", mime_type="application/json", description="Shard sets written.")
    async def data_shards() -> str:
        return await from_jobs(lambda j: j.data_shards())

    @server.resource("training://checkpoints", mime_type="application/json", description="Training checkpoints.")
    async def checkpoints() -> str:
        return await from_jobs(lambda j: j.checkpoints())

    @server.resource("training://metrics", mime_type="application/json", description="Training jobs' progress.")
    async def metrics() -> str:
        return await from_jobs(lambda j: j.metrics())
