#!/usr/bin/env bash
# Cache VAE latent mean/std of the training images on one node (resumable; re-run after a crash).
# Override with env vars (DATA_ROOT, MODEL, NGPUS, RESOLUTION) or extra flags.
set -euo pipefail
cd "$(dirname "$0")"
DATA_ROOT=${DATA_ROOT:-data/flux_dev_1024}
MODEL=${MODEL:-black-forest-labs/FLUX.1-dev}
NGPUS=${NGPUS:-4}
RESOLUTION=${RESOLUTION:-1024}
torchrun --standalone --nproc_per_node="$NGPUS" scripts/cache_latent_codes.py \
    --pretrained_model_name_or_path "$MODEL" --data_root "$DATA_ROOT" --resolution "$RESOLUTION" "$@"
