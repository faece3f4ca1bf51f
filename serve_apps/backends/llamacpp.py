"""llama.cpp backend: one GGUF served by llama-cpp-python inside the Serve replica (extra `cpu`).

For single-node CPU providers: no conversion, no stage actors. llama.cpp runs one sequence at a time,
so requests queue in an `AdmissionGate` (bounded: 503 when full). Each token is produced by one call
of llama-cpp-python's `Llama.generate` iterator in a worker thread, so the event loop stays free and a
client that goes away stops generation at the next token. Control tokens a client writes in a message
are tokenized as text (`_chat_ids`), a completion prompt wholly so. The `Llama` object is injected
(`llama_factory`), which is the unit tests' seam.
"""

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.config import Settings
from cluster.models import ModelSpec, load_catalogue
from serve_apps.backends.protocol import AdmissionGate, node_id, node_wallet, replica_id
from serve_apps.engine.detokenizer import Detokenizer
from serve_apps.protocol import (
    Accepted,
    ChatTurn,
    Finished,
    GenerateEvent,
    GenerateRequest,
    PipelineInfo,
    ProviderWork,
    Rejected,
    TextDelta,
)

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
# Used when a GGUF carries no chat template: ChatML, what most small instruct models expect.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class LlamaLike(Protocol):
    """The part of `llama_cpp.Llama` the replica uses."""

    metadata: dict[str, str]

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes: ...

    def generate(
        self,
        tokens: Sequence[int],
        *,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        temp: float = ...,
        repeat_penalty: float = ...,
    ) -> Iterator[int]: ...

    def token_eos(self) -> int: ...

    def token_bos(self) -> int: ...

    def n_ctx(self) -> int: ...

    def set_seed(self, seed: int) -> None: ...


LlamaFactory = Callable[[Path, ModelSpec], LlamaLike]


def load_llama(gguf: Path, spec: ModelSpec) -> LlamaLike:
    """The real `llama_cpp.Llama` (imported here: the `cpu` extra is optional)."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise RuntimeError(
            "the llamacpp backend needs llama-cpp-python: pip install 'solanalm[cpu]' (builds llama.cpp, ~20 min)"
        ) from exc
    options = spec.llamacpp_options()
    threads = options.n_threads or max(1, int(options.num_cpus))
    llama: LlamaLike = Llama(
        model_path=str(gguf),
        n_ctx=spec.max_model_len or DEFAULT_CONTEXT,
        n_threads=threads,
        n_batch=options.n_batch,
        verbose=False,
    )
    return llama


class _Decoder:
    """Adapts llama's byte detokenizer to the engine's `Detokenizer` (partial UTF-8 becomes U+FFFD)."""

    def __init__(self, llama: LlamaLike) -> None:
        self.llama = llama

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llama.detokenize(token_ids, special=not skip_special_tokens).decode("utf-8", errors="replace")


class ChatTemplate:
    """The GGUF's Jinja chat template (`tokenizer.chat_template`), rendered in a sandbox as HF does."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, turns: Sequence[ChatTurn], marked: bool = False) -> str:
        """The chat as text; `marked`: each content between TEXT_START and TEXT_END (see `split_marked`)."""
        messages = [{"role": turn.role, "content": _marked(turn.content) if marked else turn.content} for turn in turns]
        return self.template.render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
        )


# Private-use characters around each message's content, so the template's own text can be told apart from
# the client's after rendering; removed from client text first, so a client cannot forge them.
TEXT_START, TEXT_END = "\U000f0000", "\U000f0001"


def _marked(content: str) -> str:
    return TEXT_START + content.replace(TEXT_START, "").replace(TEXT_END, "") + TEXT_END


def split_marked(text: str) -> list[tuple[str, bool]]:
    """(piece, is the client's) in order; TemplateError when the template split or dropped a marker."""
    pieces: list[tuple[str, bool]] = []
    rest = text
    while TEXT_START in rest:
        before, _, after = rest.partition(TEXT_START)
        inside, found, rest = after.partition(TEXT_END)
        if not found or TEXT_START in inside or TEXT_END in before:
            raise TemplateError("the chat template reshapes message contents; control tokens in them are refused")
        pieces += [(before, False), (inside, True)]
    if TEXT_END in rest:
        raise TemplateError("the chat template reshapes message contents; control tokens in them are refused")
    return [*pieces, (rest, False)]


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


class LlamaCppServer:
    """Serve replica of one GGUF model on llama.cpp; implements `ModelReplica`."""

    def __init__(self, model_name: str, settings: dict | Settings, llama_factory: LlamaFactory | None = None) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        self.spec = load_catalogue(self.settings.model.catalogue).get(model_name)
        if self.spec.backend != "llamacpp":
            raise ValueError(f"model {model_name!r} has backend {self.spec.backend!r}, not 'llamacpp'")
        options = self.spec.llamacpp_options()
        self.gguf = self.spec.source.gguf_file()
        self.llama = (llama_factory or load_llama)(self.gguf, self.spec)
        self.max_model_len = self.llama.n_ctx()
        self.num_layers = _block_count(self.llama.metadata)
        self.eog_ids = _end_of_generation_ids(self.llama)
        self.template = self._chat_template()
        self.gate = AdmissionGate(1, options.max_queue)
        self.replica_id = replica_id("llamacpp")
        self.providers = (ProviderWork(node_wallet(self.settings.network.label_prefix), self.num_layers),)
        self.tokens_generated = 0
        logger.info("llama.cpp replica of %s ready: %s, context %d", model_name, self.gguf.name, self.max_model_len)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """Accepted (or Rejected), text deltas, then one Finished; queued while another request runs."""
        rejected = self.gate.reserve()
        if rejected is not None:
            yield rejected
            return
        try:
            prepared = self._prepare(request)
            if isinstance(prepared, Rejected):
                yield prepared
                return
            prompt_ids, max_tokens = prepared
            yield Accepted(len(prompt_ids), providers=self.providers)
            async with self.gate.slot():
                async for event in self._decode(request, prompt_ids, max_tokens):
                    yield event
        finally:
            self.gate.release()

    def _prepare(self, request: GenerateRequest) -> tuple[list[int], int] | Rejected:
        """Prompt token ids and the completion budget, or a 400 explaining why the request cannot run."""
        try:
            if request.messages is not None:
                ids = self._chat_ids(request.messages)
            else:
                add_bos = self.llama.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"
                ids = self.llama.tokenize((request.prompt or "").encode(), add_bos=add_bos, special=False)
        except TemplateError as exc:
            return Rejected(400, f"could not apply the chat template: {exc}", "messages", "invalid_messages")
        if not ids:
            return Rejected(400, "the prompt is empty", "prompt" if request.prompt is not None else "messages")
        room = self.max_model_len - len(ids)
        max_tokens = request.completion_budget(room)
        if room < 1 or len(ids) + max_tokens > self.max_model_len:
            return Rejected(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the prompt, {max(max_tokens, 1)} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        return list(ids), max_tokens

    def _chat_ids(self, turns: Sequence[ChatTurn]) -> list[int]:
        """The rendered chat's ids; control tokens written inside a message's content are plain text (only
        the template's own markers are parsed as special tokens), so a client cannot open a turn of its own."""
        if not any(self._holds_control_tokens(turn.content) for turn in turns):
            return list(self.llama.tokenize(self.template.render(turns).encode(), add_bos=False, special=True))
        ids: list[int] = []
        for piece, clients in split_marked(self.template.render(turns, marked=True)):
            if piece:
                ids += self.llama.tokenize(piece.encode(), add_bos=False, special=not clients)
        return ids

    def _holds_control_tokens(self, text: str) -> bool:
        data = text.encode()
        return self.llama.tokenize(data, add_bos=False, special=True) != self.llama.tokenize(
            data, add_bos=False, special=False
        )

    async def _decode(
        self, request: GenerateRequest, prompt_ids: list[int], max_tokens: int
    ) -> AsyncIterator[GenerateEvent]:
        detok = Detokenizer(_Decoder(self.llama), request.sampling.stop)
        count, prompt_tokens = 0, len(prompt_ids)
        try:
            async for token in self._tokens(request, prompt_ids, max_tokens):
                count += 1
                if token in self.eog_ids and not request.sampling.ignore_eos:
                    if tail := detok.flush():
                        yield TextDelta(tail, count)
                    yield Finished("stop", prompt_tokens, count, providers=self.providers)
                    return
                text = detok.add(token, final=count == max_tokens)
                if text:
                    yield TextDelta(text, count)
                if detok.stopped:
                    yield Finished("stop", prompt_tokens, count, providers=self.providers)
                    return
            if tail := detok.flush():
                yield TextDelta(tail, count)
            yield Finished("length", prompt_tokens, count, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - a llama.cpp failure ends this request, not the replica
            logger.exception("llama.cpp failed on %s", request.request_id)
            yield Finished("error", prompt_tokens, count, error=f"{type(exc).__name__}: {exc}")

    async def _tokens(self, request: GenerateRequest, prompt_ids: list[int], max_tokens: int) -> AsyncIterator[int]:
        """Up to `max_tokens` sampled token ids; each one computed in a worker thread."""
        sampling = request.sampling
        self.llama.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        tokens = self.llama.generate(
            prompt_ids,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
        )
        step: asyncio.Future | None = None
        try:
            for _ in range(max_tokens):
                step = asyncio.ensure_future(asyncio.to_thread(next, tokens, None))
                token = await asyncio.shield(step)  # cancelled: the token in flight still finishes below
                if token is None:
                    return
                self.tokens_generated += 1
                yield int(token)
        finally:
            if step is not None and not step.done():
                await asyncio.wait([step])  # llama.cpp must be idle before the next request may use it
            tokens.close()  # type: ignore[attr-defined]

    def _chat_template(self) -> ChatTemplate:
        source = self.llama.metadata.get("tokenizer.chat_template") or CHATML
        bos = self.llama.detokenize([self.llama.token_bos()], special=True).decode("utf-8", errors="replace")
        eos = self.llama.detokenize([self.llama.token_eos()], special=True).decode("utf-8", errors="replace")
        return ChatTemplate(source, bos, eos)

    async def describe(self) -> PipelineInfo:
        return PipelineInfo(
            model=self.spec.name,
            replica_id=self.replica_id,
            node_id=node_id(),
            dtype="gguf",
            num_layers=self.num_layers,
            max_model_len=self.max_model_len,
            stages=(),
            queue_depth=self.gate.waiting,
            running=self.gate.running,
            steps=self.tokens_generated,
            extra={"backend": "llamacpp", "gguf": self.gguf.name},
        )

    async def check_health(self) -> None:
        """llama.cpp runs in-process: a crash takes the replica down and Serve replaces it."""


def _block_count(metadata: dict[str, str]) -> int:
    arch = metadata.get("general.architecture", "llama")
    return int(metadata.get(f"{arch}.block_count", "1"))


def _end_of_generation_ids(llama: LlamaLike) -> frozenset[int]:
    ids = {llama.token_eos()}
    eot = llama.metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        ids.add(int(eot))
    return frozenset(ids)
