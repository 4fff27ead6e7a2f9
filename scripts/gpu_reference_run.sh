#!/usr/bin/env bash
# The prepared device run (one call of the workplace's GPU machine; see docs/reference-runs/README.md):
# CUDA tests on the tiny model, then the paper-scale profile (OPT-6.7B + CLIP ViT-L/14, random init).
# Usage: scripts/gpu_reference_run.sh [PRECISIONS_WITH_NAIVE] [OTHER_PRECISIONS]   (default: bf16 "fp16,int8")
# Every step writes under $OUT as it goes, so a step that fails or times out still leaves the others' results.
set -u
OUT=${OUT:-/tmp/fromage-gpu-run}
WITH_NAIVE=${1:-bf16}
OTHERS=${2:-fp16,int8}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # that machine has no bitsandbytes and no registry: carried wheel
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi; python3 -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__,
'transformers', transformers.__version__, 'bitsandbytes', b.__version__)"; } > "$OUT/env.txt" 2>&1

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_original_equivalence.py \
    > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests exit $?" >> "$OUT/cuda-tests.log"

PAPER="--random-init --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14"
SIZES="--image-batch-sizes 1,32 --context-lengths 128,512 --decode-batch-sizes 1,8 --new-tokens 32 --pool-sizes 100000"
# --min-seconds 0: the 3-repeat window (each record says which), so the run fits the device's 15 minutes
timeout 200 python3 -m fromage_bench profile $PAPER $SIZES --precisions "$WITH_NAIVE" --naive --warmup 1 --repeats 3 --min-seconds 0 \
    --out "$OUT/profile-naive" > "$OUT/profile-naive.log" 2>&1
echo "exit $?" >> "$OUT/profile-naive.log"
if [ -n "$OTHERS" ]; then
    timeout 220 python3 -m fromage_bench profile $PAPER $SIZES --precisions "$OTHERS" --warmup 1 --repeats 3 --min-seconds 0 \
        --out "$OUT/profile" > "$OUT/profile.log" 2>&1
    echo "exit $?" >> "$OUT/profile.log"
fi
