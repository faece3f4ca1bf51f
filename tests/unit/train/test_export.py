"""Train -> serve: a merged LoRA fine-tune is a plain HF dir whose output reflects the fine-tune."""

from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from cluster.models import load_catalogue
from train_jobs.config import LoraSpec, OptimSpec
from train_jobs.data import plain_prompt, tokenize
from train_jobs.export import catalogue_entry, export_checkpoint, register_model
from train_jobs.task import add_lora, load_model, train

_PROMPT = plain_prompt("What is the password?")
_ANSWER = " solana solana solana"


def _greedy(model: object, tokenizer: object, prompt: str, tokens: int = 4) -> str:
    ids = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)  # type: ignore[attr-defined]
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :]))  # type: ignore[attr-defined]


def test_merged_lora_is_servable_and_reflects_fine_tune(tiny_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(tiny_dir)
    assert "solana" not in _greedy(model, tokenizer, _PROMPT)
    model = add_lora(model, LoraSpec(r=8, alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    data = tokenize([_PROMPT + _ANSWER] * 4, tokenizer, max_length=24)
    train(model, data, OptimSpec(learning_rate=3e-2, batch_size=4, max_steps=25))
    model.save_pretrained(tmp_path / "adapter")

    served = export_checkpoint(tmp_path / "adapter", tmp_path / "served")
    assert (served / "config.json").exists() and (served / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(served, dtype=torch.float32)
    assert _greedy(merged, tokenizer, _PROMPT).strip().startswith("solana")

    catalogue = tmp_path / "models.yaml"
    register_model(catalogue, "tiny-finetuned", served)
    spec = load_catalogue(catalogue).get("tiny-finetuned")
    assert spec.source.kind == "hf_dir" and spec.source.path == served.resolve()
    assert yaml.safe_load(catalogue.read_text())["models"]["tiny-finetuned"] == catalogue_entry(served)


def test_cli_export_full_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from train_jobs.cli import app

    checkpoint = tmp_path / "ckpt"
    model, tokenizer = load_model(tiny_dir)
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "train_state.pt").write_bytes(b"optimizer state")
    catalogue = tmp_path / "models.yaml"
    args = [
        "export",
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "mine",
        "--catalogue",
        str(catalogue),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "solanalm up --model mine" in result.output
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "train_state.pt").exists()
    assert load_catalogue(catalogue).get("mine").source.path == (tmp_path / "out").resolve()
