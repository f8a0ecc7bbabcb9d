#!/usr/bin/env python
"""Answer every prompt of a chat JSONL file with a megakd model, at any TP/PP/DP layout.

    torchrun --nproc-per-node 8 tools/generate.py --load /ckpt/teacher \
        --tensor-model-parallel-size 2 --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model /ckpt/teacher/tokenizer --seq-length 4096 --bf16 \
        --prompts prompts.jsonl --output /data/teacher_answers --gen-temperature 0.7

Writes OUTPUT/generated.jsonl (chat JSONL, trainable with --dataset-format chat:
sequence-level KD); an interrupted run resumes. Flags: docs/flags.md; docs/generation.md.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def run(config) -> None:
    from megakd.generation.batch import run_batch_generation
    from megakd.runtime import running

    with running(config.parallel, config.runtime, config.training.seed,
                 config.model.num_layers) as runtime:
        run_batch_generation(config, runtime.device, log=lambda line: print(line, flush=True))


def main(argv=None) -> int:
    from megakd.preflight import parse_generate_args, run_tool

    return run_tool("generate.py", lambda: run(parse_generate_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
