#!/usr/bin/env bash
# The GPU check (issue 22): one command on a machine with an NVIDIA GPU. It installs what it needs (the
# project's venv; PyPI's CUDA torch wheel of the pinned version in place of a CPU wheel; vLLM in its own
# environment, .venv-vllm, since vllm==0.32.0 would move the main venv's fastapi), runs the `gpu`-marked
# tests, then a short serving run of the sharded engine on the GPU (1 and 2 stages, pipeline.device=cuda), and
# writes one JSON. Without a GPU it says so, writes that JSON and exits 0 at once (nothing is installed).
#
#   bench/gpu_check.sh                  # JSON to $OUT/gpu-check.json, else bench-results/gpu-check.json
#
# Needs the package index (pip) on the GPU machine. vLLM's own serving figures are not part of this yet:
# the vLLM backend has not answered a request on this project's machines (docs/backends.md).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-bench-results}"
mkdir -p "$DIR"
JSON="$DIR/gpu-check.json"
PY=.venv/bin/python

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU: nvidia-smi finds none; nothing installed or run"
    python3 -c 'import json, sys; json.dump({"gpu": None, "reason": "no GPU (nvidia-smi finds none)"}, open(sys.argv[1], "w"))' "$JSON"
    echo "$JSON"
    exit 0
fi
GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
echo "GPU: $GPU"

make install || exit 1
TORCH="$($PY -c 'import torch; print(torch.__version__.split("+")[0])')"
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    # The dev machines install a CPU wheel from a local wheel dir; PyPI's Linux wheel of the same version is CUDA's.
    $PY -m pip -q install --force-reinstall --no-deps --index-url https://pypi.org/simple "torch==${TORCH}" || exit 1
fi
make vllm-cpu VLLM_SPEC=vllm==0.32.0 VLLM_VENV=.venv-vllm || echo "vLLM environment failed; gpu tests needing it skip"

$PY -m pytest -m gpu tests/unit tests/integration -q -p no:cacheprovider --junitxml="$DIR/gpu-tests.xml" \
    > "$DIR/gpu-tests.log" 2>&1
TESTS_RC=$?
tail -3 "$DIR/gpu-tests.log"

SOLANALM_PIPELINE__DEVICE=cuda timeout 1200 $PY bench/serving_bench.py --systems solanalm --stages 1,2 \
    --concurrency 1,16 --decode-runs 2 --ttft-requests 5 --out "$DIR/gpu-serving.json" > "$DIR/gpu-serving.log" 2>&1
BENCH_RC=$?

$PY - "$JSON" "$GPU" "$TESTS_RC" "$BENCH_RC" "$DIR" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, gpu, tests_rc, bench_rc, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
suite = ET.parse(d / "gpu-tests.xml").getroot() if (d / "gpu-tests.xml").exists() else None
node = suite.find("testsuite") if suite is not None and suite.tag == "testsuites" else suite
tests = {k: int(node.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if node is not None else None
serving = json.loads((d / "gpu-serving.json").read_text()) if (d / "gpu-serving.json").exists() else None
result = {"gpu": gpu, "tests_rc": tests_rc, "tests": tests, "serving_rc": bench_rc, "serving": serving}
Path(out).write_text(json.dumps(result, indent=2))
print(out)
EOF
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
