#!/usr/bin/env bash
# Distil FLUX.1-dev into CLEAR on one 4xH100 node (the paper's setup):
# batch 2 per GPU x 4 accumulation x 4 GPUs = 32, Prodigy (lr 1.0), 1024x1024, radius 16, 10K steps,
# DeepSpeed ZeRO-2 in bf16 (deepspeed_config.yaml). Resumes from the latest checkpoint when re-run.
# Override with env vars or extra flags (later flags win), e.g.
#   RADIUS=8 DOWN_FACTOR=4 bash distill.sh --max_train_steps 20000
# SD3 / SD3.5 (family read from the model; L_attn default: every 4th joint block):
#   MODEL=stabilityai/stable-diffusion-3.5-large DATA_ROOT=data/sd35_large_1024 bash distill.sh
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-black-forest-labs/FLUX.1-dev}
DATA_ROOT=${DATA_ROOT:-data/flux_dev_1024}
RADIUS=${RADIUS:-16}
DOWN_FACTOR=${DOWN_FACTOR:-1}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/clear_local_${RADIUS}$([ "$DOWN_FACTOR" = 1 ] || echo "_down_${DOWN_FACTOR}")}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-deepspeed_config.yaml}
# --accelerate_config: checks everything that needs no model here first (one line per refusal, before any worker
# starts), then runs `accelerate launch --config_file "$ACCELERATE_CONFIG"`; a failed run exits 1 without the
# launcher's traceback
python scripts/distill.py --accelerate_config "$ACCELERATE_CONFIG" \
    --pretrained_model_name_or_path "$MODEL" \
    --data_root "$DATA_ROOT" --use_cached_prompt_embed --use_cached_latent \
    --output_dir "$OUTPUT_DIR" \
    --radius "$RADIUS" --down_factor "$DOWN_FACTOR" \
    --mixed_precision bf16 --resolution 1024 \
    --train_batch_size 2 --gradient_accumulation_steps 4 \
    --optimizer prodigy --learning_rate 1.0 --lr_scheduler constant --lr_warmup_steps 0 \
    --max_train_steps 10000 --checkpointing_steps 1000 --checkpoints_total_limit 3 \
    --resume_from_checkpoint latest --gradient_checkpointing --seed 0 \
    --report_to tensorboard \
    --validation_prompt "a photo of a red fox in a snowy forest, highly detailed" \
    --validation_prompt "a city street at night, neon signs reflected in puddles" \
    --validation_steps 500 \
    "$@"
