"""`solanalm status`'s stage rows: layers, dense and low-bit bytes, and the stage's `weights` description."""

import json
from dataclasses import dataclass, field

from rich.console import Console

from cluster.status import stage_row, stage_weights, stages_table, weights_summary

MIB = 2**20
WEIGHTS = {
    "gguf_types": {"Q4_K": 84, "Q6_K": 12, "F32": 25},
    "low_bit": {"int4": 84, "int8": 12},
    "dense_fallback": ["blk.0.ffn_down (Q5_K)", "blk.1.ffn_down (Q5_K)", "blk.2.ffn_down (Q5_K)", "output (Q6_K)"],
}


@dataclass
class Info:  # the fields of serve_apps.engine.messages.StageInfo that status reads
    stage_index: int = 1
    layer_start: int = 10
    layer_end: int = 20
    has_embedding: bool = False
    has_lm_head: bool = True
    param_bytes: int = 48 * MIB
    rss_bytes: int = 300 * MIB
    pid: int = 4242
    node_id: str = "abcdef0123456789abcdef"
    extra: dict[str, str] = field(default_factory=dict)


def test_a_stage_row_shows_layers_bytes_and_weights() -> None:
    info = Info(extra={"low_bit_bytes": str(12 * MIB), "weights": json.dumps(WEIGHTS)})
    row = stage_row("qwen2.5-0.5b", "replica0123456789", info)
    assert row[:6] == ("qwen2.5-0.5b", "replica01234", "1", "10-20 +head", "abcdef012345", "4242")
    assert row[6:8] == ("48.0", "12.0") and row[9] == "300"
    assert row[8] == (
        "GGUF F32:25 Q4_K:84 Q6_K:12; low-bit int4:84 int8:12; "
        "dense fallback: blk.0.ffn_down (Q5_K), blk.1.ffn_down (Q5_K), blk.2.ffn_down (Q5_K) +1"
    )


def test_weights_as_an_attribute_and_nothing_to_say() -> None:
    @dataclass
    class WithWeights(Info):
        weights: dict = field(default_factory=lambda: {"gguf_types": {"Q8_0": 7}, "low_bit": {}, "dense_fallback": []})

    assert weights_summary(stage_weights(WithWeights())) == "GGUF Q8_0:7"
    assert weights_summary(stage_weights(Info())) == "-"
    assert stage_weights(Info(extra={"weights": "{not json"})) == {}


def test_provider_stage_hosts_and_unreachable_stages() -> None:
    first = Info(stage_index=0, layer_start=0, has_embedding=True, has_lm_head=False, node_id="provider-7f3a")
    row = stage_row("m", "r", Info(**{**first.__dict__, "extra": {"weights_digest": "ab12"}}))
    assert row[3] == "0-20 +embed" and row[4] == "provider provider-7f3a" and row[7] == "-"
    assert stage_row("m", "r", None)[-1] == "unreachable"


def test_the_table_renders_every_stage() -> None:
    console = Console(width=250, record=True)
    console.print(stages_table([("m", "rep", [Info(stage_index=0), Info(stage_index=1)]), ("n", "rep2", [None])]))
    text = console.export_text()
    assert text.count("4242") == 2 and "unreachable" in text and "low-bit MiB" in text
