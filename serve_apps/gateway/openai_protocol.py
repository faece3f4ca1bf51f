"""OpenAI request schemas, validated strictly: a bad field is a 400 naming the field, never a 500.

Fields OpenAI defines but SolanaLM does not implement are accepted only at their neutral value and
otherwise rejected with a clear message (e.g. logprobs, n > 1); unknown fields are rejected. Tools and
response_format are defined in structured.py.
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
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


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
    n: StrictInt | None = Field(default=1, ge=1, le=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, float] | None = None
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

    @model_validator(mode="after")
    def _unsupported(self) -> "_SamplingFields":
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs are not supported")
        self._check_tools()
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

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
    logprobs: StrictInt | None = None
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
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens
