"""task.py on the tiny Llama: the loss goes down; only adapters train under LoRA."""

from pathlib import Path

import torch

from train_jobs.config import DataSpec, LoraSpec, OptimSpec
from train_jobs.data import load_examples
from train_jobs.task import (
    add_lora,
    evaluate,
    load_model,
    load_trainable_state,
    train,
    trainable_state,
)

_DATA = DataSpec(max_length=20, max_examples=40)


def test_full_fine_tune_lowers_held_out_loss(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    train_set, held_out = load_examples(_DATA, tokenizer)
    before = evaluate(model, held_out)
    result = train(model, train_set, OptimSpec(learning_rate=5e-3, batch_size=4, max_steps=6))
    assert evaluate(model, held_out) < before
    assert result.losses[-1] < result.losses[0]
    assert result.examples == 24 and result.epsilon is None


def test_lora_trains_only_adapters(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    model = add_lora(model, LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    state = trainable_state(model)
    assert state and all("lora_" in name for name in state)
    frozen = model.get_input_embeddings().weight.detach().clone()
    train_set, _ = load_examples(_DATA, tokenizer)
    train(model, train_set, OptimSpec(learning_rate=1e-2, batch_size=4, max_steps=3))
    assert torch.equal(frozen, model.get_input_embeddings().weight)
    assert any(not torch.equal(state[name], value) for name, value in trainable_state(model).items())
    load_trainable_state(model, state)
    assert all(torch.equal(state[name], value) for name, value in trainable_state(model).items())


def test_simulated_crash_raises(tiny_dir: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    train_set, _ = load_examples(_DATA, tokenizer)
    try:
        train(model, train_set, OptimSpec(batch_size=4, max_steps=4), stop_after=1)
    except RuntimeError as exc:
        assert "simulated client crash" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected a simulated crash")
