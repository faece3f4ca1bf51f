"""Prompt preparation for one model: chat templates, token counting, context checks, EOS ids.

Everything a client sends is text: a control token of the model (`<|im_start|>`, `<|im_end|>`, ...) written
inside a message or a completion prompt is encoded as the plain-text tokens of its characters, so a user
cannot open a system turn of their own; only the markers the chat template writes are special tokens.
Chats use transformers' `apply_chat_template(..., sanitize_control_tokens=True)`; a tokenizer without it
refuses (400) a message that holds a control token rather than encoding it as one.
"""

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from serve_apps.protocol import ChatTurn, GenerateRequest, Rejected
from serve_apps.server.tool_prompt import fallback_messages, template_knows_tools, template_messages


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    token_ids: list[int]
    max_tokens: int


class PromptProcessor:
    """Turns a GenerateRequest into prompt token ids, or a Rejected explaining why it cannot run."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_model_dir(cls, model_dir: Path, max_model_len: int) -> "PromptProcessor":
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls(tokenizer, max_model_len, eos_token_ids(model_dir, tokenizer))

    def prepare(self, request: GenerateRequest) -> PreparedPrompt | Rejected:
        try:
            ids = self._encode(request)
        except (ValueError, TypeError, KeyError) as exc:  # template errors: roles/order the model rejects
            return Rejected(400, f"could not apply the chat template: {exc}", "messages", "invalid_messages")
        if not ids:
            return Rejected(400, "the prompt is empty", "prompt" if request.prompt is not None else "messages")
        room = self.max_model_len - len(ids)
        if room < 1:
            return _too_long(len(ids), 1, self.max_model_len)
        max_tokens = request.completion_budget(room)
        if len(ids) + max_tokens > self.max_model_len:
            return _too_long(len(ids), max_tokens, self.max_model_len)
        return PreparedPrompt(ids, max_tokens)

    def embedding_inputs(self, inputs: Sequence[str | tuple[int, ...]], vocab_size: int) -> list[list[int]] | Rejected:
        """Token ids of each embeddings input (a text as a completion prompt is encoded; token ids as given,
        checked against the vocabulary), or a Rejected naming the input that is empty, unknown or too long."""
        encoded: list[list[int]] = []
        for index, item in enumerate(inputs):
            ids = encode_text(self.tokenizer, item) if isinstance(item, str) else list(item)
            if not ids:
                return Rejected(400, f"input {index} is empty", "input", "invalid_input")
            if min(ids) < 0 or max(ids) >= vocab_size:
                outside = f"input {index} holds token ids outside [0, {vocab_size})"
                return Rejected(400, outside, "input", "invalid_input")
            if len(ids) > self.max_model_len:
                return Rejected(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. However, input {index} "
                    f"has {len(ids)} tokens. Please reduce the length of the input.",
                    "input",
                    "context_length_exceeded",
                )
            encoded.append(ids)
        return encoded

    def _encode(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            return encode_chat(self.tokenizer, request.messages, request.tools)
        return encode_text(self.tokenizer, request.prompt or "")


def encode_chat(tokenizer: Any, turns: Sequence[ChatTurn], tools_json: str | None = None) -> list[int]:
    """The chat template over `turns` (and `tools`, OpenAI's list as JSON text; tool_prompt.py renders them
    where the template does not) with a generation prompt, as token ids; control tokens inside any
    turn's content (every role's: the client wrote them all) are plain text. ValueError: not encodable."""
    extra: dict[str, Any] = {}
    if template_knows_tools(tokenizer):
        messages: list[dict[str, Any]] = template_messages(turns)
        if tools_json:
            extra["tools"] = json.loads(tools_json)
    else:
        messages = list(fallback_messages(turns, tools_json))
    if "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=True, **extra
        )
        return list(encoded["input_ids"])
    if any(_holds_control_tokens(tokenizer, turn.content) for turn in turns):
        raise ValueError("a message contains a control token of this model, which this tokenizer cannot encode as text")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A completion prompt as token ids (BOS as the model adds it): special-token strings in it are text."""
    return list(tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])


def _holds_control_tokens(tokenizer: Any, text: str) -> bool:
    parsed = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(parsed != tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _too_long(prompt_tokens: int, max_tokens: int, limit: int) -> Rejected:
    return Rejected(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
        "Please reduce the length of the prompt or max_tokens.",
        "max_tokens",
        "context_length_exceeded",
    )


def eos_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """EOS ids from generation_config.json and the tokenizer (chat models often end turns differently)."""
    ids: set[int] = set()
    generation = model_dir / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
