#!/usr/bin/env python
"""Convert a megakd checkpoint (any TP/PP) to HuggingFace safetensors + config.json.

    python tools/convert_megakd_to_hf.py --load runs/student --output student-hf \
        (--hf-config-from Llama-3.2-1B | --model-family llama) [--dtype bf16] [--verify]

Vocab padding rows are removed. Exit status: 0 done, 1 --verify failed, 2 bad input
(nothing written). See docs/conversion.md.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def build_parser() -> argparse.ArgumentParser:
    from megakd.convert import FAMILIES

    parser = argparse.ArgumentParser(prog="convert_megakd_to_hf.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True,
                        help="checkpoint root (tracker) or one checkpoint directory")
    parser.add_argument("--output", required=True, help="HF model directory to create")
    parser.add_argument("--hf-config-from", default=None,
                        help="HF model directory whose config.json (and tokenizer) to reuse; its "
                             "architecture fields must match the checkpoint")
    parser.add_argument("--model-family", choices=sorted(FAMILIES), default=None,
                        help="generate config.json for this family (default: the family the "
                             "checkpoint was converted from)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="dtype of the written weights (default: the converted checkpoint's, "
                             "else bf16)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    parser.add_argument("--max-position-embeddings", type=int, default=None,
                        help="config.json max_position_embeddings (default: the original "
                             "config's, else 4096)")
    parser.add_argument("--verify", action="store_true",
                        help="load the result with transformers and compare logits")
    parser.add_argument("--verify-tolerance", type=float, default=None)
    return parser


def main(argv=None) -> int:
    from megakd.convert.megakd_to_hf import MegakdToHFOptions, convert_megakd_to_hf
    from megakd.preflight import run_tool

    options = MegakdToHFOptions(**vars(build_parser().parse_args(argv)))

    def convert() -> None:
        convert_megakd_to_hf(options, log=lambda line: print(line, flush=True))

    return run_tool("convert_megakd_to_hf.py", convert)


if __name__ == "__main__":
    sys.exit(main())
