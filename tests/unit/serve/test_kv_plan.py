"""KV-cache planning: slots sized from the model config and the memory budget."""

import pytest

from serve_apps.engine.kv_cache import kv_bytes_per_token, plan_kv_slots


def test_smollm2_stage_bytes_per_token() -> None:
    # 15 of SmolLM2's 30 layers, 3 KV heads of 64 dims, bfloat16: 11,520 bytes per token.
    assert kv_bytes_per_token(15, 3, 64, 2) == 11_520


def test_slots_are_capped_by_the_budget() -> None:
    per_token = kv_bytes_per_token(15, 3, 64, 2)
    plenty = plan_kv_slots(32, 2048, per_token, 8 * 2**30)
    assert plenty.slots == 32 and plenty.bytes_per_stage == 32 * 2048 * per_token
    tight = plan_kv_slots(32, 2048, per_token, 10 * 2048 * per_token + 1)
    assert tight.slots == 10


def test_not_even_one_sequence_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lower max_model_len"):
        plan_kv_slots(4, 2048, kv_bytes_per_token(30, 3, 64, 4), 2**20)
