#!/usr/bin/env bash
# megakd CPU demo: 4 processes, TP=2 x PP=2, megatron-core over gloo, no GPU needed.
#  1. train a small teacher (4 layers, hidden 128) with plain LM loss (--kd-loss-weight 0);
#  2. distill it into a smaller student (2 layers, hidden 64) with forward KL.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
NPROC=4
COMMON=(
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
  --seq-length 64 --micro-batch-size 4 --global-batch-size 16
  --mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --make-vocab-size-divisible-by 64
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
  --lr-decay-style cosine --min-lr 1e-5 --weight-decay 0.01 --clip-grad 1.0 --log-interval 5
  --device cpu
)
start=$(date +%s)
echo "== 1/2: train the teacher (4 layers, hidden 128) with LM loss only"
torchrun --nproc-per-node $NPROC --master-port ${PORT:-29510} tools/pretrain_kd.py "${COMMON[@]}" \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
  --train-iters 30 --lr 3e-3 --lr-warmup-iters 3 --kd-loss-weight 0 --save "$OUT/teacher"
echo "== 2/2: distill it into the student (2 layers, hidden 64), forward KL, T=1"
torchrun --nproc-per-node $NPROC --master-port ${PORT:-29511} tools/pretrain_kd.py "${COMMON[@]}" \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
  --teacher-num-layers 4 --teacher-hidden-size 128 --teacher-num-attention-heads 4 \
  --teacher-load "$OUT/teacher" --kd-loss fkl --kd-loss-weight 1.0 --kd-temperature 1.0 \
  --train-iters 40 --lr 3e-3 --lr-warmup-iters 3
echo "demo wall time: $(( $(date +%s) - start )) s"
