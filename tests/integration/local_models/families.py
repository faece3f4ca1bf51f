"""Tiny local models of every family the sharded engine knows, built in code (random weights, a real config
shape from cluster.models.tiny, SmolLM2's tokenizer with the family's own chat template), as HF directories
that `solanalm up --model DIR` serves. A family is every `tiny_<family>_config` function in
cluster.models.tiny, so families added there are picked up without touching this file."""

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import tiny
from cluster.models.materialize import tokenizer_dir

# Each family's own turn markers (their real templates' shape); a family not listed gets one naming it.
TEMPLATES = {
    "llama": (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "qwen2": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "gemma": (
        "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    "phi3": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n",
}


def families() -> dict[str, Callable[..., Any]]:
    """family name -> its tiny config factory in cluster.models.tiny."""
    found = {}
    for name, factory in inspect.getmembers(tiny, inspect.isfunction):
        if name.startswith("tiny_") and name.endswith("_config") and factory.__module__ == tiny.__name__:
            found[name.removeprefix("tiny_").removesuffix("_config")] = factory
    return dict(sorted(found.items()))


def template_for(family: str) -> str:
    for key, template in TEMPLATES.items():
        if family.startswith(key):
            return template
    return (
        "{% for m in messages %}<|" + family + "-{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|" + family + "-bot|>"
    )


def build_family_dir(family: str, root: Path, cache_dir: Path, seed: int = 0) -> Path:
    """A tiny random `family` model as an HF directory named after it (float32), with its own chat template."""
    out = root / f"tiny-{family}-local"
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cache_dir))
    tokenizer.chat_template = template_for(family)
    factory = families()[family]
    kwargs: dict[str, Any] = {"vocab_size": len(tokenizer)}
    if "num_layers" in inspect.signature(factory).parameters:
        kwargs["num_layers"] = 4
    config = factory(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def reference_chat(path: Path, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[int, str]:
    """Prompt tokens under the directory's own chat template, and transformers' greedy completion (float32)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return len(ids), tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
