"""Typed messages between the gateway (ingress) and the pipeline server (replica).

The gateway validates HTTP input and sends a `GenerateRequest`; the replica streams back events: first
`Accepted` (or `Rejected` with an HTTP status), then `TextDelta`s (n > 1: of each choice, by `index`, and a
`ChoiceEnd` per choice), then exactly one `Finished`.
"""

import json
from dataclasses import dataclass, field

from serve_apps.engine.messages import GrammarSpec, SamplingParams, StageInfo


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: str | None = None  # an assistant turn's calls: OpenAI's tool_calls list as JSON text
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None  # a tool turn: the function's name, when the client gave it


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated request: exactly one of `prompt` (completions) and `messages` (chat)."""

    request_id: str
    model: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    max_tokens_given: bool = True  # False: fill the context (max_tokens was omitted)
    max_tokens_cap: int | None = None  # max_tokens omitted: at most this many (what the gateway held); None: no cap
    payer: str | None = None  # the paying wallet, set by the gateway once admitted (None: open mode)
    grammar: GrammarSpec | None = None  # the output must match it (response_format, or a forced tool call)
    tools: str | None = None  # the functions the model may call: OpenAI's tools list as JSON text (chat only)
    parallel_tool_calls: bool = True  # False: at most one call is returned
    n: int = 1  # choices, sampled independently from one prefill (their KV caches fork from the prompt's)

    def tool_names(self) -> set[str]:
        """Names of the functions offered (empty without tools)."""
        return {tool["function"]["name"] for tool in json.loads(self.tools)} if self.tools else set()

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages must be set")

    def completion_budget(self, room: int) -> int:
        """The completion tokens a replica allows where the context leaves `room`: max_tokens when the client
        gave it, else the room (or a backend's default), never more than the gateway held for."""
        if self.max_tokens_given:
            return self.sampling.max_tokens
        return room if self.max_tokens_cap is None else min(room, self.max_tokens_cap)


@dataclass(frozen=True, slots=True)
class Accepted:
    """The replica took the request; its payees as of now, so a request that never finishes (the client
    left) can still pay for what it was sent."""

    prompt_tokens: int
    providers: tuple["ProviderWork", ...] = ()
    proxy: "ProxyCommission | None" = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """The replica refused the request before generating: mapped to an OpenAI error by the gateway."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class TokenScore:
    """A generated token's logprob as the client sees it: its text, UTF-8 bytes (a token may hold part of a
    character) and logprob, and (for the sampled token) its most likely alternatives, most likely first."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple["TokenScore", ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    completion_tokens: int  # all choices' generated tokens so far (n > 1: summed)
    logprobs: tuple[TokenScore, ...] = ()  # the tokens this delta's text came from (only when asked)
    index: int = 0  # the choice (n > 1)


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """One choice of an n > 1 request ended (before the request's Finished, which ends them all)."""

    index: int
    finish_reason: str


@dataclass(frozen=True, slots=True)
class ProviderWork:
    """Layers one provider wallet served for a request (None: a node with no wallet label)."""

    wallet: str | None
    layers: int


@dataclass(frozen=True, slots=True)
class ProxyCommission:
    """A proxy node served the request: its wallet (None: the operator's) earns the proxy commission."""

    wallet: str | None
    commission_bps: int | None = None  # None: the network's configured payments.proxy_commission_bps


@dataclass(frozen=True, slots=True)
class Finished:
    """The request's end; its token counts are final (a proxy learns the prompt's only from the upstream)."""

    finish_reason: str  # "stop" | "length" | "error" | "abort"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    providers: tuple[ProviderWork, ...] = ()
    proxy: ProxyCommission | None = None


GenerateEvent = Accepted | Rejected | TextDelta | ChoiceEnd | Finished


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """A validated embeddings request: each input a text or token ids; all go through the scheduler together."""

    request_id: str
    model: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None  # None: the model's own; anything else must equal it
    payer: str | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("an embeddings request needs at least one input")


@dataclass(frozen=True, slots=True)
class Embedded:
    """The answer to an EmbedRequest: one unit-length vector per input, in order, and who computed them."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int
    providers: tuple[ProviderWork, ...] = ()


@dataclass(frozen=True, slots=True)
class PipelineInfo:
    """One replica's pipeline: which model, and each stage's layers, process and memory."""

    model: str
    replica_id: str
    node_id: str
    dtype: str
    num_layers: int
    max_model_len: int
    stages: tuple[StageInfo, ...]
    queue_depth: int = 0
    running: int = 0
    steps: int = 0
    max_inflight_steps: int = 0  # steps the engine keeps in flight at most (its micro-batches)
    extra: dict[str, str] = field(default_factory=dict)
