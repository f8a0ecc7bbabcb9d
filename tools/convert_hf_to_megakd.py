#!/usr/bin/env python
"""Convert a HuggingFace causal LM (Llama 3.x, Mistral, Qwen2/2.5, Qwen3) to a megakd checkpoint.

    python tools/convert_hf_to_megakd.py --hf-dir Llama-3.2-1B --output ckpt/llama-3.2-1b \
        [--dtype bf16] [--make-vocab-size-divisible-by 128] [--padded-vocab-size N] [--verify]

The output is a megatron distributed checkpoint root (loads at any TP/PP with --load or
--teacher-load). Exit status: 0 done, 1 --verify failed, 2 bad input (nothing written).
See docs/conversion.md.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_hf_to_megakd.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json, "
                        "*.safetensors, tokenizer files)")
    parser.add_argument("--output", required=True, help="checkpoint root to create")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default: config.json's dtype, else bf16)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--padded-vocab-size", type=int, default=None,
                        help="embedding/output rows (default: vocab_size padded to "
                             "--make-vocab-size-divisible-by)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers on random sequences")
    parser.add_argument("--verify-tolerance", type=float, default=None,
                        help="max abs logit difference for --verify (default 1e-3 fp32, "
                             "0.1 fp16, 0.5 bf16)")
    return parser


def main(argv=None) -> int:
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, convert_hf_to_megakd
    from megakd.preflight import run_tool

    options = HFToMegakdOptions(**vars(build_parser().parse_args(argv)))

    def convert() -> None:
        convert_hf_to_megakd(options, log=lambda line: print(line, flush=True))

    return run_tool("convert_hf_to_megakd.py", convert)


if __name__ == "__main__":
    sys.exit(main())
