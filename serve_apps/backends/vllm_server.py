"""vLLM backend: the replica starts `vllm serve` from vLLM's own environment and forwards to it over HTTP.

vLLM pins its own torch/transformers/fastapi, so it never shares a process (nor a pickle) with the gateway:
the replica tokenizes with the project's own chat template and context check (as every backend does),
sends the prompt's token ids to the process's `/v1/completions` as JSON, and reads the SSE answer with the
proxy backend's OpenAI client (`proxy/upstream.py`). The process is the replica's child: it is stopped when
the replica shuts down, and dies with it (PR_SET_PDEATHSIG) if the replica is killed. The process and its
HTTP transport are injected, the unit tests' seam.
"""

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from cluster.config import Settings
from cluster.models import ModelSpec, load_catalogue
from serve_apps.backends.protocol import node_id, node_wallet, replica_id
from serve_apps.backends.proxy.upstream import OpenAIUpstream, UpstreamDone, UpstreamError, UpstreamText
from serve_apps.backends.vllm_config import VllmLaunch, vllm_launch
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

HEALTH_POLL_S = 0.5
HEALTH_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 20.0
READ_TIMEOUT_S = 600.0  # between two chunks of one answer
LOG_TAIL_CHARS = 4000
_PR_SET_PDEATHSIG = 1


class EngineProcess(Protocol):
    """A started `vllm serve`, healthy once constructed."""

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


Launcher = Callable[[VllmLaunch], EngineProcess]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmProcess:
    """`vllm serve` as a child process in its own session (its workers are its children), output in a log."""

    def __init__(self, launch: VllmLaunch) -> None:
        self.launch = launch
        self.log = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        python = Path(launch.argv[0])
        if not python.exists():
            raise RuntimeError(
                f"no vLLM environment at {python}: run `make vllm-cpu` (or set the catalogue's vllm.python)"
            )
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                launch.argv,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl call
            )
        logger.info("vllm serve started (pid %d, log %s): %s", self.popen.pid, self.log, " ".join(launch.argv))
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        health = self.launch.base_url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + self.launch.startup_timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(health, timeout=HEALTH_TIMEOUT_S).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_S)
        raise RuntimeError(f"vllm serve not healthy after {self.launch.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_bytes()[-LOG_TAIL_CHARS:].decode(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM to the process group (vLLM and its workers), SIGKILL if it has not left in time."""
        if self.popen.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_paths(spec: ModelSpec, cache_dir: Path) -> tuple[str, str | None]:
    """(weights, tokenizer) for vLLM: a local HF dir (a GGUF or tiny source materialized into the cache,
    nothing downloaded); a GGUF served as is (`quantization: gguf`) needs its tokenizer extracted."""
    from cluster.models.materialize import materialize, tokenizer_dir

    if spec.vllm_options().quantization == "gguf" and spec.source.kind in ("gguf", "gguf_package"):
        return str(spec.source.gguf_file()), str(tokenizer_dir(cache_dir, spec.source))
    return str(materialize(spec, cache_dir)), None


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class VllmServer:
    """Serve replica of one model on a `vllm serve` process; implements `ModelReplica`."""

    def __init__(
        self,
        model_name: str,
        settings: dict | Settings,
        launcher: Launcher | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        tokenizer_loader: Callable[[str], Any] = load_tokenizer,
    ) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        self.spec = load_catalogue(self.settings.model.catalogue).get(model_name)
        if self.spec.backend != "vllm":
            raise ValueError(f"model {model_name!r} has backend {self.spec.backend!r}, not 'vllm'")
        self.options = self.spec.vllm_options()
        weights, tokenizer_path = model_paths(self.spec, self.settings.model.cache_dir)
        self.tokenizer = tokenizer_loader(tokenizer_path or weights)
        self.num_layers = _num_layers(weights)
        self.launch = vllm_launch(self.spec, weights, free_port(), os.environ, tokenizer_path)
        self.process = (launcher or VllmProcess)(self.launch)
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=HEALTH_TIMEOUT_S)
        limits = httpx.Limits(max_connections=self.options.max_num_seqs * 2)
        self.client = httpx.AsyncClient(
            base_url=self.launch.base_url, timeout=timeout, limits=limits, transport=transport
        )
        self.api = OpenAIUpstream()
        self.max_model_len = self.spec.max_model_len or _max_position(weights)
        self.providers = (ProviderWork(node_wallet(self.settings.network.label_prefix), self.num_layers),)
        self.replica_id = replica_id("vllm")
        self.running = 0
        logger.info("vLLM replica of %s ready at %s (%s)", model_name, self.launch.base_url, self.options)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """Accepted (or Rejected), text deltas, then one Finished; vLLM batches concurrent requests."""
        prepared = self._prompt_ids(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        ids, max_tokens = prepared
        call = self.api.call(request, self.spec.name, max_tokens, None)
        body = {key: value for key, value in call.body.items() if key not in ("messages", "prompt")}
        body["prompt"] = ids  # our template's tokens: the same prompt as every other backend
        self.running += 1
        try:
            try:
                response = await self.client.send(
                    self.client.build_request("POST", "/completions", json=body), stream=True
                )
            except httpx.TransportError as exc:
                logger.warning("vllm serve of %s unreachable: %s", self.spec.name, type(exc).__name__)
                yield Rejected(503, "the vLLM engine is unavailable", code="engine_unavailable", retry_after_s=5.0)
                return
            try:
                if response.status_code >= 400:
                    error = self.api.error(
                        response.status_code, await response.aread(), response.headers.get("retry-after")
                    )
                    logger.warning("vllm serve refused %s: %s", request.request_id, error.detail)
                    yield Rejected(error.status, error.message, error.param, error.code, error.retry_after_s)
                    return
                yield Accepted(len(ids), providers=self.providers)
                async for event in self._relay(response, len(ids)):
                    yield event
            finally:
                await response.aclose()  # a client that went away: vLLM aborts the request on disconnect
        finally:
            self.running -= 1

    async def _relay(self, response: httpx.Response, prompt_tokens: int) -> AsyncIterator[GenerateEvent]:
        count = 0
        try:
            async for item in self.api.items(response.aiter_lines()):
                if isinstance(item, UpstreamText):
                    count += 1
                    yield TextDelta(item.text, count)
                elif isinstance(item, UpstreamDone):
                    completion = item.completion_tokens if item.completion_tokens is not None else count
                    yield Finished(item.finish_reason, prompt_tokens, completion, providers=self.providers)
                    return
        except (UpstreamError, httpx.HTTPError) as exc:
            logger.warning("vllm serve stream of %s broke: %s", self.spec.name, exc)
            yield Finished("error", prompt_tokens, count, error="the vLLM engine failed", providers=self.providers)

    def _prompt_ids(self, request: GenerateRequest) -> tuple[list[int], int] | Rejected:
        try:
            # Control tokens the client writes are plain text; only the template's markers are special.
            if request.messages is not None:
                ids = encode_chat(self.tokenizer, request.messages, request.tools)
            else:
                ids = encode_text(self.tokenizer, request.prompt or "")
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

    async def describe(self) -> PipelineInfo:
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
                "device": self.options.device,
                "tensor_parallel_size": str(self.options.tensor_parallel_size),
                "pipeline_parallel_size": str(self.options.pipeline_parallel_size),
            },
        )

    async def check_health(self) -> None:
        """The process is alive and its /health answers 200; otherwise Serve replaces the replica."""
        if not self.process.alive():
            raise RuntimeError("vllm serve exited")
        health = self.launch.base_url.removesuffix("/v1") + "/health"
        response = await self.client.get(health, timeout=HEALTH_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"vllm serve unhealthy: HTTP {response.status_code}")

    def shutdown(self) -> None:
        """Stop the process (Serve calls __del__ when it stops the replica)."""
        self.process.stop()

    def __del__(self) -> None:
        process = getattr(self, "process", None)
        if process is not None:
            process.stop()


def _num_layers(weights: str) -> int:
    config = Path(weights) / "config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("num_hidden_layers", 1))
    return 1


def _max_position(weights: str) -> int:
    config = Path(weights) / "config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_position_embeddings", 2048))
    return 2048
