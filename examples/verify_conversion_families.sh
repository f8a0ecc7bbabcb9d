#!/usr/bin/env bash
# Convert a random-init tiny HF model of each family (tests/convert_workers.make_hf_model) to
# megakd and back with --verify; prints the max |logit difference| of each direction
# (the figures in docs/conversion.md). CPU, no downloads, about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tests.convert_workers builds the models
OUT=${OUT:-runs/verify_conversion}
rm -rf "$OUT"; mkdir -p "$OUT"
for family in llama mistral qwen2 qwen3; do
  "$PY" -c "from tests.convert_workers import make_hf_model; make_hf_model('$OUT/hf_$family', '$family')"
  "$PY" tools/convert_hf_to_megakd.py --hf-dir "$OUT/hf_$family" --output "$OUT/megakd_$family" --verify \
    | grep -- "--verify" | sed "s/^/$family: /"
  "$PY" tools/convert_megakd_to_hf.py --load "$OUT/megakd_$family" --output "$OUT/back_$family" --verify \
    | grep -- "--verify" | sed "s/^/$family: /"
done
