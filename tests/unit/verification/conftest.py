"""A tiny Llama checkpoint written from a config in code (no tokenizer), for in-process stage traces."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cluster.models.tiny import tiny_llama_config


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-verify")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=512, num_layers=6)).save_pretrained(path)
    return path
