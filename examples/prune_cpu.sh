#!/usr/bin/env bash
# Prune then distill on CPU (2 processes, gloo): a small teacher trained on toy data is pruned
# (Minitron: heads, MLP neurons, hidden channels and one layer, by activation importance) into
# a student, which is then distilled from the unpruned teacher; the same student architecture
# from random initialisation is distilled with the same flags for the same steps. Both
# held-out CEs are printed at the end. See README "Prune then distill" and docs/pruning.md.
#
#   bash examples/prune_cpu.sh            # writes runs/prune/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/prune}
DATA=$OUT/data
STEPS=${STEPS:-60}
export OMP_NUM_THREADS=1
torchrun() { "$PY" -m torch.distributed.run --nproc-per-node 2 --master-port "${PORT:-29523}" "$@"; }
rm -rf "$OUT"
mkdir -p "$OUT"
step() { echo; echo "=== $* ($(date +%T))"; }
begin=$(date +%s)

step "1. a JSONL corpus (probabilistic grammar), a SentencePiece tokenizer, indexed data"
"$PY" examples/toy_corpus.py --output-dir "$DATA" --documents 4000
"$PY" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --json-keys text \
  --output-prefix "$DATA/corpus" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$DATA/tok.model" --append-eod --workers 2

TOKENS=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tok.model"
  --data-path "$DATA/corpus_text_document" --split 95,5,0 --seq-length 128 --device cpu)
COMMON=("${TOKENS[@]}" --normalization RMSNorm --swiglu --position-embedding-type rope
  --disable-bias-linear --micro-batch-size 4 --global-batch-size 16 --lr-decay-style cosine
  --weight-decay 0.0 --log-interval 20)

step "2. the teacher: 4 layers, hidden 128, 8 heads in 4 query groups, FFN 512 (DP=2)"
torchrun tools/pretrain_kd.py "${COMMON[@]}" --num-layers 4 --hidden-size 128 \
  --num-attention-heads 8 --group-query-attention --num-query-groups 4 \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --train-iters 200 --kd-loss-weight 0 \
  --save "$OUT/teacher"

step "3. prune it (PP=2: each stage measures its own layers) to 3 layers, hidden 96, FFN 256, 4 heads"
t=$(date +%s)
torchrun tools/prune.py --load "$OUT/teacher" --save "$OUT/pruned" \
  --pipeline-model-parallel-size 2 "${TOKENS[@]}" --micro-batch-size 4 --calib-batches 32 \
  --target-num-layers 3 --target-hidden-size 96 --target-ffn-hidden-size 256 \
  --target-num-attention-heads 4
echo "prune: $(( $(date +%s) - t )) s"

# The student's architecture is the pruned one: 3 layers, hidden 96, FFN 256, 4 heads in 4
# query groups of head dim 16 (the teacher's; 96 / 4 would be 24, hence --kv-channels).
STUDENT=(--num-layers 3 --hidden-size 96 --ffn-hidden-size 256 --num-attention-heads 4
  --group-query-attention --num-query-groups 4 --kv-channels 16)
KD=("${COMMON[@]}" "${STUDENT[@]}" --tensor-model-parallel-size 2 --teacher-load "$OUT/teacher"
  --kd-loss fkl --kd-loss-weight 1.0 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 5
  --train-iters "$STEPS" --eval-interval "$STEPS" --eval-iters 8)

step "4. distill the pruned student from the teacher ($STEPS steps, TP=2)"
t=$(date +%s)
torchrun tools/pretrain_kd.py "${KD[@]}" --pretrained-checkpoint "$OUT/pruned" \
  --save "$OUT/pruned_distilled" | tee "$OUT/pruned_distilled.log"
echo "distill (pruned init): $(( $(date +%s) - t )) s"

step "5. the same architecture from random initialisation, same flags and steps"
t=$(date +%s)
torchrun tools/pretrain_kd.py "${KD[@]}" --save "$OUT/scratch_distilled" \
  | tee "$OUT/scratch_distilled.log"
echo "distill (random init): $(( $(date +%s) - t )) s"

step "done in $(( $(date +%s) - begin )) s; held-out CE (lm loss on the validation split):"
held_out() { grep "$2" "$1" | grep -o "lm loss value: [0-9.E+-]*" | tail -1; }
echo "  the teacher (unpruned):       $(held_out "$OUT/pruned_distilled.log" "teacher validation")"
echo "  pruned, then distilled:       $(held_out "$OUT/pruned_distilled.log" "end of training")"
echo "  random init, then distilled:  $(held_out "$OUT/scratch_distilled.log" "end of training")"
