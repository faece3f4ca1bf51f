"""OpenAI request schemas, validated strictly: a bad field is a 400 naming the field, never a 500.

Fields OpenAI defines but SolanaLM does not implement are accepted only at their neutral value and
otherwise rejected with a clear message (e.g. echo, suffix, best_of > 1); unknown fields are rejected. Tools
and response_format are defined in structured.py. Sampling fields a backend cannot honour (penalties,
logit_bias, logprobs, n > 1 off SolanaLM's own pipeline) are refused by the gateway naming the backend.
"""

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve_apps.gateway.structured import (
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's own bound)
MAX_TOP_LOGPROBS = 20  # chat top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions logprobs


def _encodable(value: str) -> str:
    """JSON can escape a lone surrogate ("\\ud800"): valid JSON, but no UTF-8 text, so counting, hashing or
    tokenizing it fails later; refuse it here, where a bad field is a 400 naming the field."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode: a lone surrogate at position {exc.start}") from None
    return value


def _encodable_parts(value: object) -> object:
    """_encodable over a union field's value: a string, or a list of strings or text parts."""
    for item in value if isinstance(value, list) else [value]:
        text = item.text if isinstance(item, TextPart) else item
        if isinstance(text, str):
            _encodable(text)
    return value


Text = Annotated[str, AfterValidator(_encodable)]  # for plain string fields; unions use _encodable_parts
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str  # checked by ChatMessage (inside the content union a part's own error would be hidden)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Before content: its check reads them (fields are validated in this order).
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: Text | None = Field(default=None, min_length=1, max_length=128)
    content: str | list[TextPart] | None = Field(
        default=None,
        validate_default=True,
        description="Text, or a list of text parts; may be null on an assistant message with tool_calls.",
    )
    name: Text | None = Field(default=None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content_encodable(
        cls, value: str | list[TextPart] | None, info: ValidationInfo
    ) -> str | list[TextPart] | None:
        if value is None:
            if not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
                raise ValueError("content is required (null only on an assistant message with tool_calls)")
            return None
        return _encodable_parts(value)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _roles(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=256)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    top_k: StrictInt | None = Field(default=None, ge=-1, le=100_000, description="SolanaLM extension; -1/0: off.")
    n: StrictInt | None = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices, sharing the prompt's KV cache.")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, strict=True)]] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id (a decimal string) -> bias added to its logit; ids are checked against the vocabulary.",
    )
    user: Text | None = Field(default=None, max_length=256)
    ignore_eos: StrictBool = Field(default=False, description="SolanaLM extension for benchmarks.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must be non-empty strings")
        _encodable_parts(stops)
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdecimal()) or len(key) > 9:
                raise ValueError(f"keys must be token ids (decimal strings of at most 9 digits), got {key[:20]!r}")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) sorted by id (a key repeated as "7" and "07" keeps its last value)."""
        merged = {int(key): float(bias) for key, bias in (self.logit_bias or {}).items()}
        return tuple(sorted(merged.items()))

    def choices(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        self._check_tools()
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ (give one; they are the same limit)")
        return self

    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: the sampled token's logprob and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: two functions share a name")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice 'required' or a named function needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("a forced tool call (tool_choice) and a JSON response_format exclude each other")

    def tools_active(self) -> bool:
        """Tools are offered to the model (and its output parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="A string (or a one-element list of strings).")
    max_tokens: StrictInt | None = Field(default=16, ge=1, le=1_000_000)
    echo: StrictBool | None = False
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: StrictInt | None = Field(default=None, ge=1, le=1)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        _encodable_parts(value)
        return value

    @model_validator(mode="after")
    def _completion_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens
