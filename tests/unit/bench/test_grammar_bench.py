"""bench/grammar_bench.py and grammar_decode_bench.py: every library walks the same valid answer; the decode
bench's schema fixes the answer's length."""

import json
from pathlib import Path
from types import ModuleType

import pytest
from transformers import AutoTokenizer

from cluster.models.materialize import tokenizer_dir
from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def grammar_bench() -> ModuleType:
    return load_bench("grammar_bench")


def test_xgrammar_walks_the_answer_and_reports_each_figure(grammar_bench: ModuleType, model_cache_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(model_cache_dir))
    answer = tokenizer.encode(json.dumps(grammar_bench.ANSWER), add_special_tokens=False) + [2]
    tokens = {name: answer for name in grammar_bench.GRAMMARS}
    result = grammar_bench.bench_library(lambda: grammar_bench.XGrammar(tokenizer, 49152), tokens, repeats=2)
    for row in result["grammars"].values():
        assert row["tokens"] == len(answer) and row["mask_us"] > 0 and row["compile_ms"] > 0


def test_the_decode_benchs_schema_has_exactly_its_digits() -> None:
    import jsonschema

    schema = load_bench("grammar_decode_bench").digits_schema(3)
    jsonschema.validate({"digits": [1, 2, 3]}, schema)
    for bad in ({"digits": [1, 2]}, {"digits": [1, 2, 3, 4]}, {"digits": [10, 2, 3]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
