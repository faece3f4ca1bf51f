"""OpenAI's tools, tool_choice and response_format: request schemas, their limits, and the grammar they imply.

Every field is validated here, so a bad one is a 400 naming it: function names match OpenAI's pattern,
at most `MAX_TOOLS` tools, a JSON schema (tool parameters, response_format) is a valid JSON Schema
(jsonschema's meta-schema check) of at most `MAX_SCHEMA_BYTES` serialized and `MAX_SCHEMA_DEPTH` levels
of nesting. `grammar_for` turns a request into the GrammarSpec the replica decodes under:
`json_object` / `json_schema` for response_format, and for `tool_choice` `required` or a named function
a JSON schema of one call, `{"name": <one of the tools>, "arguments": <its parameters>}`, so the call
and its arguments are valid by construction.
"""

import json
from typing import Annotated, Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from serve_apps.engine.messages import GrammarSpec

MAX_TOOLS = 128  # OpenAI's own limit
MAX_SCHEMA_BYTES = 32_768  # one schema, serialized compactly
MAX_SCHEMA_DEPTH = 16  # nested objects/arrays in one schema document
MAX_TOOL_CALLS = 128  # calls in one assistant message of the history
MAX_ARGUMENTS_CHARS = 65_536
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN, description="a-z, A-Z, 0-9, _ and -, at most 64")]


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` if it is a JSON Schema within the limits; ValueError (a 400) saying what is wrong."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON schema is {size} bytes, at most {MAX_SCHEMA_BYTES}")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None
    return schema


Schema = Annotated[dict[str, Any], AfterValidator(checked_schema)]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    description: StrictStr | None = Field(default=None, max_length=8192)
    parameters: Schema | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    description: StrictStr | None = Field(default=None, max_length=8192)
    schema_: Schema = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type json_schema, and only then")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    arguments: StrictStr = Field(max_length=MAX_ARGUMENTS_CHARS)


class ToolCall(BaseModel):
    """A call in an assistant message of the history (as this API returned it)."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: ToolCallFunction


def forced_tools(tools: list[Tool], choice: ToolChoice | None) -> list[Tool] | None:
    """The tools one of which must be called (`required` or a named function), else None."""
    if choice == "required":
        return tools
    if isinstance(choice, NamedToolChoice):
        return [tool for tool in tools if tool.function.name == choice.function.name]
    return None


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of exactly one call of one of `tools`."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar_for(
    response_format: ResponseFormat | None, tools: list[Tool] | None, choice: ToolChoice | None
) -> GrammarSpec | None:
    """What the output must match: a forced tool call, else response_format; None for free text."""
    forced = forced_tools(tools or [], choice) if tools else None
    if forced:
        return GrammarSpec("json_schema", json.dumps(call_schema(forced)))
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is not None:
        return GrammarSpec("json_schema", json.dumps(response_format.json_schema.schema_))
    return GrammarSpec("json_object")
