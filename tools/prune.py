#!/usr/bin/env python
"""Prune a trained or converted megakd model (Minitron: width and depth by activation
importance on calibration data) into a smaller one, at any TP/PP layout.

    torchrun --nproc-per-node 8 tools/prune.py --load /ckpt/llama31-8b \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 8 \
        --target-hidden-size 3072 --target-ffn-hidden-size 9216 \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /ckpt/llama31-8b/tokenizer \
        --data-path /data/corpus_text_document --seq-length 4096 --calib-batches 1024 \
        --save /ckpt/llama31-4b-width

Writes SAVE/release (megakd_model.json, pruning.json) and SAVE's tracker: a release checkpoint
that loads at any layout, e.g. as tools/pretrain_kd.py --pretrained-checkpoint. Flags:
docs/flags.md; docs/pruning.md.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def run(config) -> None:
    from megakd.prune import run_prune
    from megakd.runtime import processes, running

    with running(config.parallel, config.runtime, config.training.seed,
                 config.model.num_layers) as runtime:
        processes.start()  # megatron's checkpoint-write helper dies with this rank
        run_prune(config, runtime.device, log=lambda line: print(line, flush=True))


def main(argv=None) -> int:
    from megakd.preflight import parse_prune_args, run_tool

    return run_tool("prune.py", lambda: run(parse_prune_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
