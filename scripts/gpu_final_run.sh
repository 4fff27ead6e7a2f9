#!/usr/bin/env bash
# Second device run: CUDA tests (incl. CUDA-graph decoding), the bf16 paper-scale profile with the reference
# paths, and an operator trace of answer-option scoring and decoding.
set -u
OUT=${OUT:-/tmp/fromage-gpu-run}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_generation.py > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests exit $?" >> "$OUT/cuda-tests.log"
PAPER="--random-init --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14"
timeout 90 python3 -m fromage_bench profile $PAPER --precisions bf16 --naive --warmup 1 --repeats 3 \
    --image-batch-sizes 32 --context-lengths 128 --decode-batch-sizes 1,8 --new-tokens 32 --pool-sizes 100000 \
    --out "$OUT/profile" > "$OUT/profile.log" 2>&1
echo "exit $?" >> "$OUT/profile.log"
timeout 60 python3 scripts/trace_scenario.py $PAPER --precision bf16 --out "$OUT/trace.txt" > "$OUT/trace.log" 2>&1
echo "exit $?" >> "$OUT/trace.log"
