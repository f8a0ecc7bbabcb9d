#!/usr/bin/env bash
# The student's own samples on CPU (2 processes, TP=2, gloo): a teacher SFT'd on toy chat
# data, then sequence-level KD (tools/generate.py), GKD, on-policy reverse KL and DistiLLM's
# adaptive off-policy schedule from the same student initialisation. See README "The
# student's own samples" and docs/on_policy.md.
#
#   bash examples/onpolicy_cpu.sh            # writes runs/onpolicy/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/onpolicy}
DATA=$OUT/data
export OMP_NUM_THREADS=1
torchrun() { "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29521}" "$@"; }
rm -rf "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }

step "1. toy chat data (questions about a generated grammar) and a SentencePiece tokenizer"
"$PY" examples/toy_corpus.py --output-dir "$DATA" --documents 1000 --conversations 600

COMMON=(--device cpu --tensor-model-parallel-size 2 --normalization RMSNorm --swiglu
  --position-embedding-type rope --disable-bias-linear --num-attention-heads 4 --seq-length 96
  --micro-batch-size 4 --global-batch-size 16 --lr-decay-style cosine --weight-decay 0.0
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
  --dataset-format chat --split 90,10,0 --log-interval 10)

step "2. the teacher (4 layers, hidden 128): SFT on the chat data, --kd-loss-weight 0"
torchrun tools/pretrain_kd.py "${COMMON[@]}" --num-layers 4 --hidden-size 128 \
  --data-path "$DATA/chat.jsonl" --lr 3e-3 --min-lr 3e-4 --train-iters 80 \
  --kd-loss-weight 0 --save "$OUT/teacher"

step "3. the student's initialisation (2 layers, hidden 64): a short SFT"
torchrun tools/pretrain_kd.py "${COMMON[@]}" --num-layers 2 --hidden-size 64 \
  --data-path "$DATA/chat.jsonl" --lr 3e-3 --min-lr 3e-4 --train-iters 30 \
  --kd-loss-weight 0 --save "$OUT/student_sft"

KD=("${COMMON[@]}" --pretrained-checkpoint "$OUT/student_sft" --teacher-load "$OUT/teacher"
  --lr 1e-3 --min-lr 1e-4 --train-iters 30 --gen-max-new-tokens 24
  --eval-interval 10 --eval-iters 2 --eval-generate 16)

step "4. sequence-level KD: the teacher answers every prompt, the student trains on the answers"
torchrun tools/generate.py --load "$OUT/teacher" --tensor-model-parallel-size 2 \
  --seq-length 96 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model" \
  --prompts "$DATA/chat.jsonl" --output "$OUT/teacher_answers" --gen-max-new-tokens 24 \
  --gen-greedy --device cpu
torchrun tools/pretrain_kd.py "${KD[@]}" --data-path "$OUT/teacher_answers/generated.jsonl" \
  --kd-loss fkl --kd-loss-weight 0.5 --save "$OUT/seqkd"

step "5. GKD: half the microbatches answered by the student, generalized JSD"
torchrun tools/pretrain_kd.py "${KD[@]}" --data-path "$DATA/chat.jsonl" \
  --kd-student-data-fraction 0.5 --kd-loss jsd --kd-loss-weight 0.5 --save "$OUT/gkd"

step "6. on-policy: every answer the student's, reverse KL"
torchrun tools/pretrain_kd.py "${KD[@]}" --data-path "$DATA/chat.jsonl" \
  --kd-student-data-fraction 1 --kd-loss rkl --kd-loss-weight 1 --save "$OUT/onpolicy"

step "7. DistiLLM: skew KL, adaptive off-policy with a replay buffer"
torchrun tools/pretrain_kd.py "${KD[@]}" --data-path "$DATA/chat.jsonl" \
  --kd-adaptive-sgo --kd-sgo-replay-buffer-size 64 --kd-loss skl --kd-loss-weight 0.5 \
  --save "$OUT/distillm"

step "done"
