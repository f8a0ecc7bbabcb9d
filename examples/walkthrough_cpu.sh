#!/usr/bin/env bash
# JSONL -> preprocessed data -> trained teacher -> distilled student that is stopped, resumed
# and validated, on CPU at TP=2 x PP=2 (4 processes over gloo). See README "Walk-through".
#
#   bash examples/walkthrough_cpu.sh            # writes runs/walkthrough/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/walkthrough}
DATA=$OUT/data
export OMP_NUM_THREADS=1
torchrun() { "$PY" -m torch.distributed.run --nproc-per-node 4 --master-port "${PORT:-29517}" "$@"; }
rm -rf "$OUT"

step() { echo; echo "=== $* ($(date +%T))"; }

step "1. a JSONL corpus (probabilistic grammar) and a SentencePiece tokenizer trained on it"
"$PY" examples/toy_corpus.py --output-dir "$DATA" --documents 4000

step "2. preprocess: JSONL -> megatron-core indexed dataset (.bin/.idx)"
"$PY" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --json-keys text \
  --output-prefix "$DATA/corpus" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$DATA/tok.model" --append-eod --workers 2

COMMON=(--device cpu --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear
  --num-attention-heads 4 --seq-length 128 --micro-batch-size 4 --global-batch-size 16
  --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.0
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
  --data-path "$DATA/corpus_text_document" --split 95,5,0 --log-interval 10)

step "3. train the teacher (4 layers, hidden 128): plain LM loss, --kd-loss-weight 0"
torchrun tools/pretrain_kd.py "${COMMON[@]}" --num-layers 4 --hidden-size 128 \
  --lr 3e-3 --min-lr 3e-4 --train-iters 60 --kd-loss-weight 0 --save "$OUT/teacher"

# The student run as a SLURM job would run it: --load and --save name the same root, so every
# launch resumes from the last checkpoint (the first one starts from scratch).
STUDENT=("${COMMON[@]}" --num-layers 2 --hidden-size 64 --lr 3e-3 --min-lr 3e-4
  --teacher-load "$OUT/teacher" --kd-loss fkl --kd-loss-weight 0.5 --train-iters 60
  --save "$OUT/student" --load "$OUT/student" --save-interval 20
  --eval-interval 20 --eval-iters 4 --log-throughput)

step "4. distill the student (2 layers, hidden 64); --exit-interval 30 stops it like a time limit"
torchrun tools/pretrain_kd.py "${STUDENT[@]}" --exit-interval 30

step "5. relaunch the same command: it resumes from iteration 30 and finishes"
torchrun tools/pretrain_kd.py "${STUDENT[@]}"

step "done"
cat "$OUT/student/latest_checkpointed_iteration.txt"; echo " <- $OUT/student/latest_checkpointed_iteration.txt"
