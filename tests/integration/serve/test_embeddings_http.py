"""/v1/embeddings over HTTP with the official openai client: the tiny model through 3 stages (direct links)
equals transformers' own model, mean-pooled; many inputs in one request are embedded together."""

import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaModel

from tests.integration.serve.conftest import ServedApp
from tests.integration.serve.test_serving import TINY, model_dir

TEXTS = ["The capital of France is Paris.", "hello", "Embeddings go through the same stages as chat."]


def reference(path, text: str) -> tuple[torch.Tensor, int]:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        hidden = LlamaModel.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0), len(ids)


def test_embeddings_through_three_stages_equal_transformers_mean_pooled(served: ServedApp) -> None:
    client = served.client()
    reply = client.embeddings.create(model=TINY, input=TEXTS)  # base64, decoded by the client
    path = model_dir(served, TINY)
    expected = [reference(path, text) for text in TEXTS]
    assert [d.index for d in reply.data] == [0, 1, 2]
    for data, (vector, _) in zip(reply.data, expected, strict=True):
        assert torch.allclose(torch.tensor(data.embedding), vector, atol=1e-4)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(n for _, n in expected)
    floats = client.embeddings.create(model=TINY, input=[[1, 2, 3]], encoding_format="float")
    assert len(floats.data[0].embedding) == LlamaModel.from_pretrained(path).config.hidden_size


def test_embedding_errors_over_http(served: ServedApp) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=TINY, input="x", dimensions=7)
    assert error.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=TINY, input=[[10**6]])  # outside the vocabulary
    assert error.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=TINY, input=[[1] * 600])  # past the 512-token context
    assert error.value.body["code"] == "context_length_exceeded"
