"""The MCP server in-process (the `mcp` client's in-memory transport) over a fake gateway and fake jobs."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, MCPError

from serve_apps.mcp.access import GatewayCallError
from serve_apps.mcp.jobs import JobsConfig, JobsUnavailable
from serve_apps.mcp.server import build_mcp_server


class FakeGateway:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        self.bodies.append(body)
        if body["model"] == "broken":
            raise GatewayCallError(402, "insufficient balance")
        choice = {"message": {"content": "hi"}, "finish_reason": "stop"}
        return {"id": "chatcmpl-1", "model": body["model"], "choices": [choice], "usage": {"completion_tokens": 1}}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny"}]}

    async def nodes(self) -> dict[str, Any]:
        raise GatewayCallError(503, "this gateway has no provider registry")

    async def performance(self) -> dict[str, Any]:
        return {"pipelines": []}


class FakeJobs:
    def __init__(self, root: Path) -> None:
        self.config = JobsConfig(lambda: "http://x:8265", root, root / "out")
        self.submitted: list[tuple[str, list[str]]] = []

    async def submit(self, kind: str, args: list[str]) -> dict[str, Any]:
        self.submitted.append((kind, args))
        return {"job_id": f"raysubmit_{len(self.submitted)}", "status": "PENDING"}

    async def status(self, job_id: str) -> dict[str, Any]:
        if job_id == "gone":
            raise JobsUnavailable("Job gone does not exist")
        return {"job_id": job_id, "status": "RUNNING", "progress": ["[ROUND 1/2]"], "log_tail": []}

    async def list_jobs(self) -> list[dict[str, Any]]:
        return [{"job_id": "raysubmit_1", "kind": "shard"}]

    async def metrics(self) -> list[dict[str, Any]]:
        return []

    def checkpoints(self) -> list[dict[str, Any]]:
        return []

    def data_shards(self) -> list[dict[str, Any]]:
        return [{"name": "s"}]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "configs" / "train").mkdir(parents=True)
    (tmp_path / "configs" / "train" / "dp.yaml").write_text("name: dp\n")
    return tmp_path


def call(server: Any, tool: str, args: dict[str, Any]) -> Any:
    async def run() -> Any:
        async with Client(server) as client:
            return await client.call_tool(tool, args)

    return asyncio.run(run())


def read(server: Any, uri: str) -> Any:
    """The resource's JSON, or {"mcp_error": message} when the server answered with an MCP error."""

    async def run() -> Any:
        async with Client(server) as client:
            try:
                return json.loads((await client.read_resource(uri)).contents[0].text)
            except MCPError as exc:
                return {"mcp_error": str(exc)}

    return asyncio.run(run())


def test_inference_sends_an_openai_body_and_returns_text_usage_and_receipt_id() -> None:
    gateway = FakeGateway()
    result = call(build_mcp_server(gateway, None), "llm_inference_distributed", {"model": "tiny", "prompt": "Hi"})
    assert not result.is_error and result.structured_content["text"] == "hi"
    assert gateway.bodies == [
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 128, "temperature": 0.7}
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"model": "tiny"}, "exactly one"),
        ({"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"model": "tiny", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "broken", "prompt": "x"}, "insufficient balance (HTTP 402)"),
    ],
)
def test_inference_errors_are_clear_tool_errors(args: dict[str, Any], needle: str) -> None:
    result = call(build_mcp_server(FakeGateway(), None), "llm_inference_distributed", args)
    assert result.is_error and needle in result.content[0].text and "Traceback" not in result.content[0].text


def test_training_submits_the_existing_entry_point_with_a_repo_relative_config(repo: Path) -> None:
    jobs = FakeJobs(repo)
    server = build_mcp_server(FakeGateway(), jobs)  # type: ignore[arg-type]
    args = {"mode": "data_parallel", "config": "configs/train/dp.yaml", "num_workers": 2}
    result = call(server, "llm_train_distributed", args)
    assert result.structured_content["job_id"] == "raysubmit_1"
    assert jobs.submitted == [
        ("train_dp", ["train_jobs.data_parallel", "--config", "configs/train/dp.yaml", "--num-workers", "2"])
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"mode": "federated", "config": "/etc/passwd"}, "relative to the repository root"),
        ({"mode": "federated", "config": "../x.yaml"}, "relative to the repository root"),
        ({"mode": "federated", "config": "configs/train/none.yaml"}, "no such file"),
        ({"mode": "federated", "config": "configs/train/dp.yaml", "num_workers": 2}, "data_parallel only"),
        ({"mode": "sideways", "config": "configs/train/dp.yaml"}, "mode"),
    ],
)
def test_training_rejects_bad_arguments(repo: Path, args: dict[str, Any], needle: str) -> None:
    jobs = FakeJobs(repo)
    result = call(build_mcp_server(FakeGateway(), jobs), "llm_train_distributed", args)  # type: ignore[arg-type]
    assert result.is_error and needle in result.content[0].text and not jobs.submitted


def test_shard_job_writes_under_the_output_dir_and_bad_names_are_refused(repo: Path) -> None:
    jobs = FakeJobs(repo)
    server = build_mcp_server(FakeGateway(), jobs)  # type: ignore[arg-type]
    result = call(server, "llm_data_shard", {"num_shards": 4, "strategy": "hash", "name": "set1"})
    assert result.structured_content["output_dir"] == str(repo / "out" / "shards" / "set1")
    kind, args = jobs.submitted[0]
    assert kind == "shard" and args[:5] == ["train_jobs.shard", "--num-shards", "4", "--strategy", "hash"]
    assert call(server, "llm_data_shard", {"num_shards": 2, "name": "../up"}).is_error


def test_without_a_job_server_training_tools_and_resources_say_so() -> None:
    server = build_mcp_server(FakeGateway(), None)
    result = call(server, "llm_data_shard", {"num_shards": 2})
    assert result.is_error and "no Ray job server" in result.content[0].text
    assert "no Ray job server" in read(server, "training://jobs")["mcp_error"]


def test_resources_read_the_gateway_and_the_jobs(repo: Path) -> None:
    server = build_mcp_server(FakeGateway(), FakeJobs(repo))  # type: ignore[arg-type]
    assert read(server, "llm://models")["data"] == [{"id": "tiny"}]
    assert read(server, "training://jobs") == [{"job_id": "raysubmit_1", "kind": "shard"}]
    assert read(server, "training://data_shards") == [{"name": "s"}]
    assert read(server, "training://jobs/raysubmit_1")["progress"] == ["[ROUND 1/2]"]
    assert "no provider registry (HTTP 503)" in read(server, "llm://nodes")["mcp_error"]
    status = call(server, "llm_job_status", {"job_id": "gone"})
    assert status.is_error and "does not exist" in status.content[0].text
