"""Unit fixtures for serving: a tiny Llama checkpoint written from a config in code (no tokenizer)."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cluster.models.tiny import tiny_llama_config

TINY_VOCAB = 512
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
)


@pytest.fixture(params=["cpu", CUDA])
def stage_device(request: pytest.FixtureRequest) -> str:
    """Each device a stage can compute on here: cpu always, cuda (marked gpu) where torch sees one."""
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=TINY_VOCAB, num_layers=6)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-untied")
    config = tiny_llama_config(vocab_size=TINY_VOCAB, num_layers=4)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
