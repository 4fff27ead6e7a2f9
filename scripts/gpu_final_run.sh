#!/usr/bin/env bash
# One device run for issue 6's GPU targets and issue 14's memory check: CUDA tests (CUDA-graph and compiled
# decoding; fp32, bf16, fp16 and int8 loaded one after another in one process, each precision's allocated and
# peak memory printed, -rP, as issue 14 asks for docs/reference-runs), the bf16
# paper-scale profile (batch-1 decode on the graph and compiled paths against the roofline; VisDial option
# scoring, packed, against the original's per-option way, projected to val), and an operator trace.
# Budget: at most 8 minutes (timeouts 120 + 300 + 60 s), about 5 expected; compiling the two layer halves for
# batch 1 takes a minute or two of it. Each measured item is printed to profile.log as it finishes.
# Run it with the device tool: command `bash scripts/gpu_final_run.sh`, carry [".whl"] (the bitsandbytes
# wheel, for the int8 CUDA test; see ../.library/device/README.md), timeout_s 560; commit $OUT's files under
# docs/reference-runs/.
set -u
OUT=${OUT:-/tmp/fromage-gpu-run}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/env.txt" 2>&1
timeout 120 python3 -m pytest -q -x -rP -p no:cacheprovider tests/test_cuda.py tests/test_generation.py \
    tests/test_static_decode.py > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests exit $?" >> "$OUT/cuda-tests.log"
PAPER="--random-init --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14"
# --min-seconds 0: the 3-repeat window (each record says which), so the run fits the device's 15 minutes
timeout 300 python3 -m fromage_bench profile $PAPER --precisions bf16 --naive --warmup 1 --repeats 3 --min-seconds 0 \
    --scenarios decode,option_scoring --decode-paths auto,compiled --decode-batch-sizes 1 --new-tokens 32 \
    --out "$OUT/profile" > "$OUT/profile.log" 2>&1
echo "exit $?" >> "$OUT/profile.log"
timeout 60 python3 scripts/trace_scenario.py $PAPER --precision bf16 --out "$OUT/trace.txt" > "$OUT/trace.log" 2>&1
echo "exit $?" >> "$OUT/trace.log"
