#!/usr/bin/env bash
# GPU figures in one script (about 8 minutes on one GPU; the tables go into docs/scaling.md):
#
#   bash benchmarks/gpu.sh                 # PYTHON=... picks the interpreter (default: python)
#   WORKDIR=bench-slides bash benchmarks/gpu.sh   # where the generated 40k x 40k slide is kept (built once, ~1-2 min)
#
# 1. encoder crops/s: a UNI-sized ViT-L/16 (timm, random weights: same cost), fp32 / bf16 / fp16,
#    batch 64-512, eager and channels_last, torch.compile at bf16 batch 256;
# 2. whole-slide prediction on a generated 40k x 40k pyramidal TIFF (0.5 um/px, Visium geometry):
#    the fair reference (the original's batching: 3 encoder calls per spot, neighbours re-encoded)
#    against ours, standard and fast mode, interleaved, bf16; then predict_slide on the first spots;
# 3. model-only spots/s from cached features (the fused heads against the unfused computation).
#
# Without a GPU it says so and runs a tiny CPU version of the same three steps (a few minutes), which
# proves the script runs; its figures are not GPU figures.
set -euo pipefail
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-${TMPDIR:-/tmp}/deepspot-bench-gpu}
mkdir -p "$WORKDIR"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
    echo "== 1. encoder crops/s (UNI-sized ViT-L/16, random init)"
    timeout 200 "$PY" benchmarks/gpu_encoders.py --device cuda --crops 1024 --batches 64 128 256 512 \
        --compile-batches 256 || echo "(encoder sweep stopped: exit $?)"
    echo "== 2. whole slide, 40k x 40k px, against the fair reference (bf16)"
    timeout 240 "$PY" benchmarks/fair_predict.py --workdir "$WORKDIR" --synthetic 40000 --mpp 0.5 \
        --spot-px 110 --spacing-px 200 --encoder uni --random-init --device cuda --autocast bf16 \
        --spots 64 --reps 2 --batch 32 --workers 8 --sweep --full-slide 1000 \
        || echo "(whole-slide step stopped: exit $?)"
    echo "== 3. model only, cached features"
    timeout 60 "$PY" benchmarks/model_only.py --device cuda --spots 32768 --batch 4096 --reps 3 \
        || echo "(model-only step stopped: exit $?)"
else
    echo "No CUDA GPU here: running the tiny CPU version of each step (its figures are NOT GPU figures)."
    echo "== 1. encoder crops/s (UNI-sized ViT-L/16, random init), CPU, tiny"
    "$PY" benchmarks/gpu_encoders.py --device cpu --crops 2 --batches 2 --dtypes fp32 bf16 --repeats 1 --no-compile
    echo "== 2. whole slide against the fair reference, CPU, tiny (2k x 2k generated slide, efficientnet-lite0)"
    "$PY" benchmarks/fair_predict.py --workdir "$WORKDIR" --synthetic 2000 --mpp 0.5 --spot-px 110 \
        --spacing-px 200 --device cpu --spots 3 --reps 1 --batch 4 --workers 1 --sweep --full-slide 6 --genes 50
    echo "== 3. model only, cached features, CPU, tiny"
    "$PY" benchmarks/model_only.py --device cpu --spots 256 --batch 128 --reps 1
fi
