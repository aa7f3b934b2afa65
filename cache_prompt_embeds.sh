#!/usr/bin/env bash
# Cache the text encoders' prompt embeddings of the training set on one node (resumable; re-run after a crash).
# FLUX: T5 (the model's length: 512 tokens for FLUX.1-dev, 256 for schnell) + CLIP; SD3/SD3.5 (MODEL=stabilityai/stable-diffusion-3.5-large): CLIP-L + CLIP-G + T5 (256).
# Override with env vars (DATA_ROOT, MODEL, NGPUS) or extra flags, e.g. `bash cache_prompt_embeds.sh --batch_size 8`.
set -euo pipefail
cd "$(dirname "$0")"
DATA_ROOT=${DATA_ROOT:-data/flux_dev_1024}
MODEL=${MODEL:-black-forest-labs/FLUX.1-dev}
NGPUS=${NGPUS:-4}
torchrun --standalone --nproc_per_node="$NGPUS" scripts/cache_prompt_embeds.py \
    --pretrained_model_name_or_path "$MODEL" --data_root "$DATA_ROOT" "$@"
