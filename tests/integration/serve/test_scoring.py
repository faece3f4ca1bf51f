"""Scoring and the Responses API from the real SmolLM2-135M through three stages (issue 20), with the official
openai client and the OpenAI Agents SDK's Responses model: logprobs are the raw model's (a greedy token is its
distribution's most likely one), penalties reach the sampler, /v1/responses answers, streams and runs a tool loop."""

import math

import pytest

from tests.integration.serve.conftest import ServedApp

SMOL = "smollm2-135m-instruct-fp32"
ASK = [{"role": "user", "content": "Name three colours."}]


def test_chat_logprobs_are_the_models_own(served: ServedApp) -> None:
    reply = served.client().chat.completions.create(
        model=SMOL, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    content = choice.logprobs.content if choice.logprobs else None
    assert content and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-4
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_and_streamed_usage(served: ServedApp) -> None:
    reply = served.client().completions.create(
        model=SMOL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    lp = reply.choices[0].logprobs
    assert lp and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or []) == 5
    assert "".join(lp.tokens) == reply.choices[0].text
    chunks = list(
        served.client().chat.completions.create(
            model=SMOL, messages=ASK, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_a_frequency_penalty_changes_a_repetitive_answer(served: ServedApp) -> None:
    ask = [{"role": "user", "content": "Repeat the word yes twenty times."}]
    plain = served.client().chat.completions.create(model=SMOL, messages=ask, max_tokens=24, temperature=0)
    penalised = served.client().chat.completions.create(
        model=SMOL, messages=ask, max_tokens=24, temperature=0, frequency_penalty=2.0
    )
    assert plain.choices[0].message.content != penalised.choices[0].message.content


def test_responses_create_and_stream(served: ServedApp) -> None:
    client = served.client()
    response = client.responses.create(
        model=SMOL,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        max_output_tokens=16,
        temperature=0,
    )
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage and response.usage.output_tokens > 0
    # A stream cut by max_output_tokens ends with response.incomplete (as OpenAI's does), so read the events.
    events = list(
        client.responses.create(model=SMOL, input="Say hello.", max_output_tokens=8, temperature=0, stream=True)
    )
    types = [event.type for event in events]
    assert types[0] == "response.created" and "response.output_text.delta" in types
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert final.output_text == deltas and deltas


def test_agents_sdk_tool_loop_over_responses(served: ServedApp) -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is 21 degrees and sunny in {city}."

    client = AsyncOpenAI(base_url=served.base_url, api_key="test", max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool's result.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=SMOL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=40, store=False),
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(seen) == 1 and seen[0]
    outputs = [item for item in result.new_items if isinstance(item, agents.ToolCallOutputItem)]
    assert outputs and "21 degrees" in str(outputs[0].output)
    assert isinstance(result.final_output, str) and result.final_output
