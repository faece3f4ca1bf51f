"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the chat-completion path.

A Responses request is validated strictly here (unknown fields, other tool types, stored state: 400s naming
the field), then translated into the gateway's own `ChatCompletionRequest`: `instructions` is the first
system message, message items are chat messages, `function_call` items are an assistant message's
tool_calls and `function_call_output` items are tool messages; `text.format` is `response_format` (the
same grammar-constrained decoding), `max_output_tokens` is `max_completion_tokens`. From there it is a
chat request: the same admission, hold, engine, tool-call parsing and settlement (`Gateway.admit`,
`Gateway.complete`, `Gateway.chunk_events`); responses_output.py turns the chat answer or its chunks into
a Response object or OpenAI's streamed events.

Nothing is stored: `store` may be false or absent (a response is never kept), and `previous_response_id`,
`conversation`, `background` and `include` of stored things are 400s saying so.
"""

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from payments.protocol import SETTLEMENT_HEADER
from serve_apps import metrics
from serve_apps.gateway.errors import OpenAIError
from serve_apps.gateway.openai_protocol import ChatCompletionRequest, Temperature, Text, TopP, _encodable
from serve_apps.gateway.responses_output import ResponseEvents, echo_fields, from_chat_completion, sse_event
from serve_apps.gateway.structured import MAX_ARGUMENTS_CHARS, MAX_TOOLS, FunctionDefinition, Name, Schema

if TYPE_CHECKING:
    from serve_apps.gateway.app import Gateway

MAX_ITEMS = 4096  # input items, as chat's messages
MAX_PARTS = 256  # content parts of one message item
MAX_METADATA = 16  # OpenAI's bounds: 16 pairs, keys <= 64 characters, values <= 512
ItemStatus = Literal["in_progress", "completed", "incomplete"]
CallId = Annotated[StrictStr, Field(min_length=1, max_length=128)]
ItemId = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text"]
    text: StrictStr  # checked by the item (inside the content union a part's own error would be hidden)


class OutputText(BaseModel):
    """An assistant's text as this API returned it (annotations and logprobs are accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["output_text"]
    text: StrictStr
    annotations: list[dict[str, Any]] | None = Field(default=None, max_length=256)
    logprobs: list[dict[str, Any]] | None = Field(default=None, max_length=65_536)


ContentPart = Annotated[InputText | OutputText, Field(discriminator="type")]


def _check_text(value: list[Any]) -> list[Any]:
    for part in value:
        _encodable(part.text)
    return value


def _text_as_part(declared: Any) -> BeforeValidator:
    """A string stands for one input_text part. Converted before validation, so that a bad part is reported
    as itself (inside a str | list union pydantic reports the str branch first); `declared` is what the
    OpenAPI schema shows."""

    def convert(value: Any) -> Any:
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    return BeforeValidator(convert, json_schema_input_type=declared)


def _text_as_message(value: Any) -> Any:
    """A string input is one user message."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[list[ContentPart], _text_as_part(str | list[ContentPart])] = Field(
        description="Text, or input_text / output_text parts."
    )
    id: ItemId | None = None
    status: ItemStatus | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: list[ContentPart]) -> list[ContentPart]:
        if len(value) > MAX_PARTS:
            raise ValueError(f"at most {MAX_PARTS} content parts")
        return _check_text(value)

    def text(self) -> str:
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made, as this API returned it (its call_id ties it to its output)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: CallId
    name: Name
    arguments: StrictStr = Field(max_length=MAX_ARGUMENTS_CHARS)
    id: ItemId | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: CallId
    output: Annotated[list[InputText], _text_as_part(str | list[InputText])] = Field(
        description="The function's result: text, or input_text parts."
    )
    id: ItemId | None = None
    status: ItemStatus | None = None

    @field_validator("output")
    @classmethod
    def _output(cls, value: list[InputText]) -> list[InputText]:
        if len(value) > MAX_PARTS:
            raise ValueError(f"at most {MAX_PARTS} output parts")
        return _check_text(value)

    def text(self) -> str:
        return "".join(part.text for part in self.output)


def _item_type(value: Any) -> str | None:
    """An item's tag: its `type`, "message" when it has none (OpenAI's easy input message)."""
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="an input item is a message, function_call or function_call_output (SolanaLM "
        "serves no other item types)",
    ),
]


class FunctionTool(FunctionDefinition):
    """Responses' flat function tool: chat's function definition with its type beside it; no other tool type
    is served."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(f"tool type {data.get('type')!r} is not supported: only function tools are")
        return data


class NamedFunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: Name


class PlainTextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaTextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["json_schema"]
    name: Name
    schema_: Schema = Field(alias="schema")
    description: StrictStr | None = Field(default=None, max_length=8192)
    strict: StrictBool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Annotated[PlainTextFormat | JsonObjectFormat | JsonSchemaTextFormat, Field(discriminator="type")] | None = (
        None
    )


MetadataKey = Annotated[StrictStr, Field(max_length=64)]
MetadataValue = Annotated[StrictStr, Field(max_length=512)]


class ResponsesRequest(BaseModel):
    """OpenAI's Responses request, strictly; what SolanaLM cannot serve is a 400 naming the field."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=256)
    input: Annotated[
        list[InputItem], BeforeValidator(_text_as_message, json_schema_input_type=str | list[InputItem])
    ] = Field(description="A user message's text, or a list of input items.")
    instructions: StrictStr | None = Field(default=None, description="The first system message.")
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: StrictBool | None = False
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=MAX_METADATA)
    user: Text | None = Field(default=None, max_length=256)
    store: StrictBool | None = Field(default=None, description="false or absent: nothing is stored.")
    include: list[StrictStr] | None = Field(default=None, max_length=0, description="Nothing to include.")
    truncation: Literal["disabled"] | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=0)
    # Stored state and features SolanaLM does not serve: declared so that giving one says why it is refused.
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    reasoning: Any = None
    prompt: Any = None

    _chat: ChatCompletionRequest | None = PrivateAttr(default=None)

    @field_validator("input")
    @classmethod
    def _input(cls, value: list[Any]) -> list[Any]:
        if not 1 <= len(value) <= MAX_ITEMS:
            raise ValueError(f"input needs 1 to {MAX_ITEMS} items")
        return value

    @field_validator("instructions")
    @classmethod
    def _instructions(cls, value: str | None) -> str | None:
        return _encodable(value) if value is not None else None

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server is stateless and stores no response: send store false or leave it out")
        return value

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _no_state(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("this server is stateless: send the whole conversation as input items instead")
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: Any) -> Any:
        if value not in (None, False):
            raise ValueError("background responses need stored state; this server is stateless")
        return value

    @field_validator("reasoning", "prompt")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("not supported by this server")
        return value

    @model_validator(mode="after")
    def _as_chat(self) -> "ResponsesRequest":
        try:
            self._chat = ChatCompletionRequest.model_validate(chat_body(self))
        except ValidationError as exc:  # e.g. a named tool_choice not in tools: said in the chat request's terms
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ValueError(f"{where}: {message}" if where else message) from None
        return self

    def chat_request(self) -> ChatCompletionRequest:
        if self._chat is None:  # only a model built without validation (model_construct) lacks it
            self._chat = ChatCompletionRequest.model_validate(chat_body(self))
        return self._chat


def chat_body(body: ResponsesRequest) -> dict[str, Any]:
    """The chat-completion request (as JSON) that serves `body`."""
    chat: dict[str, Any] = {"model": body.model, "messages": chat_messages(body)}
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    for field in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if getattr(body, field) is not None:
            chat[field] = getattr(body, field)
    if body.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # the last event's usage
    if body.tools:
        chat["tools"] = [{"type": "function", "function": chat_function(tool)} for tool in body.tools]
    if isinstance(body.tool_choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, JsonSchemaTextFormat):
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {k: v for k, v in schema.items() if v is not None},
        }
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    return chat


def chat_function(tool: FunctionTool) -> dict[str, Any]:
    fields = {"name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": tool.strict}
    return {k: v for k, v in fields.items() if v is not None}


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions, then the items: consecutive function_call items join the assistant message before them
    (or one of their own) as its tool_calls; a function_call_output is a tool message."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    for item in body.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


async def create_response(
    gateway: "Gateway", body: ResponsesRequest, authorization: str | None
) -> JSONResponse | StreamingResponse:
    """_create, counting a request rejected before a replica accepted it (as chat does)."""
    try:
        return await _create(gateway, body, authorization)
    except OpenAIError as exc:
        metrics.record_rejection(body.model if body.model in gateway.cards else "unknown", exc.status)
        raise


async def _create(
    gateway: "Gateway", body: ResponsesRequest, authorization: str | None
) -> JSONResponse | StreamingResponse:
    response_id = f"resp_{uuid.uuid4().hex}"
    request, hold = await gateway.admit(body.chat_request(), authorization, response_id)
    echo = echo_fields(body)
    headers = {"x-request-id": response_id}
    try:
        if not body.stream:
            answer = await gateway.complete(request, True, hold)
            result = from_chat_completion(response_id, echo, answer)
            if "settlement_id" in result:
                headers[SETTLEMENT_HEADER] = result["settlement_id"]
            return JSONResponse(result, headers=headers)
        accepted, events = await gateway.open_stream_retrying(request)
    except BaseException:
        hold.release("failed")  # nothing if already closed (a client that left mid-answer pays for it)
        raise
    chunks = gateway.chunk_events(request, events, accepted, True, True, hold)
    stream = _sse(ResponseEvents(response_id, echo), chunks)
    headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _sse(events: ResponseEvents, chunks: AsyncGenerator[dict | str, None]) -> AsyncIterator[str]:
    """The Responses events of a chat stream; closing this closes the chunks (so a client that left pays)."""
    async with contextlib.aclosing(chunks):
        for event in events.start():
            yield sse_event(event)
        async for chunk in chunks:
            for event in events.feed(chunk):
                yield sse_event(event)
