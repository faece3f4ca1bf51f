"""Train -> serve: a LoRA fine-tune, merged and registered, is served by the sharded engine with its new answer."""

import asyncio
from pathlib import Path

from cluster.config import Settings
from serve_apps.engine.messages import SamplingParams
from serve_apps.protocol import Finished, GenerateRequest, TextDelta
from serve_apps.server.pipeline_server import PipelineServer
from train_jobs.config import LoraSpec, ModelRef, OptimSpec
from train_jobs.data import plain_prompt, tokenize
from train_jobs.export import export_checkpoint, register_model
from train_jobs.task import add_lora, base_model_dir, load_model, train

PROMPT = plain_prompt("What is the password?")
ANSWER = " solana solana solana"


def serve_once(server: PipelineServer, prompt: str) -> str:
    async def run() -> str:
        request = GenerateRequest("r1", server.plan.name, SamplingParams(max_tokens=4, temperature=0.0), prompt=prompt)
        parts = []
        async for event in server.generate(request):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            assert not isinstance(event, Finished) or event.finish_reason in ("stop", "length")
        return "".join(parts)

    return asyncio.run(run())


def test_served_fine_tune_answers_with_what_it_learned(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path: Path
) -> None:
    base = base_model_dir(
        ModelRef(name="tiny-llama", catalogue=repo_root / "configs/models.yaml", cache_dir=model_cache_dir)
    )
    model, tokenizer = load_model(base)
    model = add_lora(model, LoraSpec(r=8, alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    train(
        model,
        tokenize([PROMPT + ANSWER] * 4, tokenizer, max_length=24),
        OptimSpec(learning_rate=3e-2, batch_size=4, max_steps=25),
    )
    model.save_pretrained(tmp_path / "adapter")
    served_dir = export_checkpoint(tmp_path / "adapter", tmp_path / "served")

    catalogue = tmp_path / "models.yaml"
    catalogue.write_text((repo_root / "configs/models.yaml").read_text())
    register_model(catalogue, "tiny-finetuned", served_dir)
    settings = Settings(
        model={"catalogue": catalogue, "served": ["tiny-finetuned", "tiny-llama"], "cache_dir": model_cache_dir},
        pipeline={"num_stages": 2},
    )
    finetuned = PipelineServer("tiny-finetuned", settings)
    original = PipelineServer("tiny-llama", settings)
    try:
        assert serve_once(finetuned, PROMPT).strip().startswith("solana")
        assert "solana" not in serve_once(original, PROMPT)
    finally:
        finetuned.pool.kill()
        original.pool.kill()
