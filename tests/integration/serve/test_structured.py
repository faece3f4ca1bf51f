"""Tools and structured outputs from the real SmolLM2-135M through three stages (issue 20): valid by construction
under the grammar, through the official openai client and two agent frameworks no one here wrote (the OpenAI
Agents SDK's tool loop, pydantic-ai's extraction into a pydantic model)."""

import json
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from tests.integration.serve.conftest import ServedApp

SMOL = "smollm2-135m-instruct-fp32"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["engineer", "artist", "doctor"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Ada is a 36 year old engineer. Describe her as JSON."}]


def test_json_schema_output_is_valid_by_construction(served: ServedApp) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = served.client().chat.completions.create(
        model=SMOL,
        messages=ASK,
        response_format=fmt,
        max_tokens=60,
        temperature=0,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)


def test_json_object_sampled_is_still_an_object(served: ServedApp) -> None:
    reply = served.client().chat.completions.create(
        model=SMOL,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0.8,
        seed=7,
    )
    text = reply.choices[0].message.content or ""
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_named_tool_call_streams_in_openais_shape(served: ServedApp) -> None:
    chunks = list(
        served.client().chat.completions.create(
            model=SMOL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    head, arguments = calls[0][0], calls[1][0]
    assert head.id and head.type == "function" and head.function and head.function.name == "get_weather"
    assert arguments.function and arguments.id is None
    jsonschema.validate(json.loads(arguments.function.arguments or ""), WEATHER["function"]["parameters"])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3  # the call's tokens, metered


def test_openai_agents_sdk_runs_a_tool_loop(served: ServedApp) -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # no trace export to OpenAI
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is 21 degrees and sunny in {city}."

    client = AsyncOpenAI(base_url=served.base_url, api_key="test", max_retries=0)
    model = agents.OpenAIChatCompletionsModel(model=SMOL, openai_client=client)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool's result.",
        tools=[get_weather],
        model=model,
        # Forced on the first turn; the SDK resets tool_choice after a call, so the second turn answers.
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=40),
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(seen) == 1 and seen[0]
    outputs = [item for item in result.new_items if isinstance(item, agents.ToolCallOutputItem)]
    assert outputs and "21 degrees" in str(outputs[0].output)  # the result went back to the model
    assert isinstance(result.final_output, str) and result.final_output


class Person(BaseModel):
    name: str
    age: int
    occupation: str


def test_pydantic_ai_extracts_into_a_pydantic_model(served: ServedApp) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(SMOL, provider=OpenAIProvider(base_url=served.base_url, api_key="test"))
    agent: Any = Agent(model, output_type=Person, model_settings={"temperature": 0, "max_tokens": 60})
    result = agent.run_sync("Ada is a 36 year old engineer from London.")
    assert isinstance(result.output, Person)
    assert result.usage.output_tokens > 0
