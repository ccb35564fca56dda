#!/usr/bin/env bash
# One node of the 2 × 8 H100 run (run it on both nodes; NODE_RANK 0 and 1, MASTER_ADDR = node 0).
# Layout EP=8 × PP=2 (see qwen3_30b_a3b_sara.yaml). For the FFT baseline use qwen3_30b_a3b_fft.yaml.
set -euo pipefail
CONFIG=${CONFIG:-examples/qwen3_30b_a3b_sara.yaml}
# `python -m sara_megatron.torchrun` is torchrun with torchrun's arguments; a user error or Ctrl-C
# ends the job in the tool's one line (exit 2 or 130) instead of torchrun's traceback and summary.
python -m sara_megatron.torchrun --nnodes 2 --nproc-per-node 8 --node-rank "${NODE_RANK:?}" \
    --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}" \
    tools/train.py --config "$CONFIG" "$@"
