"""Examples: load a JSONL/text file (or the bundled set), format, tokenise, split and shard.

Pure functions over lists and tensors; Ray Data and Flower partitions are both built from
`shard_indices`, so the three sharding strategies behave the same in DDP and federated runs.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from train_jobs.config import DataSpec, ShardingStrategy


@dataclass(frozen=True)
class TokenizedSet:
    """Fixed-length examples: `input_ids` and `attention_mask` of shape [N, max_length]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, indices: list[int]) -> "TokenizedSet":
        """The examples at `indices`, in that order."""
        index = torch.tensor(indices, dtype=torch.long)
        return TokenizedSet(self.input_ids[index], self.attention_mask[index], [self.texts[i] for i in indices])


def bundled_dataset_path() -> Path:
    """The instruction set shipped in the package (made by `train_jobs.corpus.generate`)."""
    return Path(str(resources.files("train_jobs.corpus").joinpath("instructions.jsonl")))


def load_records(path: Path | None) -> list[dict[str, str]]:
    """Records from JSONL ({instruction, response} or {text}) or text (one per paragraph)."""
    path = bundled_dataset_path() if path is None else path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.suffix == ".jsonl":
        records = [_check_record(json.loads(line), path) for line in path.read_text().splitlines() if line.strip()]
    else:
        records = [{"text": block.strip()} for block in path.read_text().split("\n\n") if block.strip()]
    if len(records) < 2:
        raise ValueError(f"{path}: need at least 2 examples, found {len(records)}")
    return records


def _check_record(record: Any, path: Path) -> dict[str, str]:
    if isinstance(record, dict) and ("text" in record or {"instruction", "response"} <= record.keys()):
        return {key: str(value) for key, value in record.items()}
    raise ValueError(f"{path}: each line needs 'text' or 'instruction' and 'response'")


def format_record(record: dict[str, str], tokenizer: Any, prompt_format: str) -> str:
    """One training string; chat uses the tokenizer's template when it has one."""
    if "text" in record:
        return record["text"]
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["response"]},
        ]
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return plain_prompt(record["instruction"]) + record["response"]


def plain_prompt(instruction: str) -> str:
    """The prompt half of the plain format (what a served fine-tune should be prompted with)."""
    return f"### Instruction:\n{instruction}\n### Response:\n"


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> TokenizedSet:
    """Pad/truncate to `max_length`; an EOS token is appended so the model learns to stop."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token or ""
    encoded = tokenizer(
        [text + eos for text in texts],
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return TokenizedSet(encoded["input_ids"], encoded["attention_mask"], texts)


def load_examples(spec: DataSpec, tokenizer: Any) -> tuple[TokenizedSet, TokenizedSet]:
    """(train, held-out) tokenised sets; the split is seeded and independent of the sharding."""
    records = load_records(spec.path)
    if spec.max_examples is not None:
        records = records[: spec.max_examples]
    texts = [format_record(record, tokenizer, spec.prompt_format) for record in records]
    full = tokenize(texts, tokenizer, spec.max_length)
    order = list(range(len(full)))
    random.Random(spec.seed).shuffle(order)
    num_eval = max(1, round(len(order) * spec.eval_fraction))
    return full.subset(sorted(order[num_eval:])), full.subset(sorted(order[:num_eval]))


def shard_indices(keys: list[str], num_shards: int, strategy: ShardingStrategy, seed: int = 0) -> list[list[int]]:
    """Split example indices among `num_shards` workers or clients.

    round_robin: i -> i mod n (balanced). hash: a stable hash of the example text, so the same
    example lands on the same shard whatever the order (balanced in expectation). random: a seeded
    shuffle cut into near-equal contiguous pieces.
    """
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    if strategy == "round_robin":
        for index in range(len(keys)):
            shards[index % num_shards].append(index)
    elif strategy == "hash":
        for index, key in enumerate(keys):
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            shards[int.from_bytes(digest, "big") % num_shards].append(index)
    elif strategy == "random":
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
        for position, index in enumerate(order):
            shards[position * num_shards // max(len(order), 1)].append(index)
    else:
        raise ValueError(f"unknown sharding strategy {strategy!r}")
    return [sorted(shard) for shard in shards]
