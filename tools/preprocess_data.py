#!/usr/bin/env python
"""Tokenize a JSONL corpus into megatron-core indexed datasets (Megatron-LM's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \
        --workers 2

writes ``data/corpus_text_document.bin/.idx`` (one ``{prefix}_{key}_document`` per
``--json-keys`` entry), readable with ``--data-path data/corpus_text_document``.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core announces each missing optional accelerator (apex, TE) on import.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def build_parser() -> argparse.ArgumentParser:
    from megakd.data.tokenizers import TOKENIZER_LIBRARIES

    parser = argparse.ArgumentParser(prog="preprocess_data.py", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to tokenize; each gets its own dataset")
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZER_LIBRARIES))
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file or HuggingFace tokenizer directory")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary")
    g.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document token to every document")
    g = parser.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return parser


def main(argv=None) -> int:
    from megakd.data.preprocess import TokenizerSpec, preprocess_jsonl

    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print(f"preprocess_data.py: error: --workers must be >= 1, got {args.workers}",
              file=sys.stderr)
        return 2
    spec = TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    try:
        stats = preprocess_jsonl(args.input, args.output_prefix, spec, args.json_keys,
                                 args.append_eod, args.workers)
    except ValueError as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    mib = stats.input_bytes / 2**20
    print(f"preprocess_data.py: {stats.documents} documents, {stats.tokens} tokens from "
          f"{mib:.2f} MiB in {stats.seconds:.2f} s ({mib / max(stats.seconds, 1e-9):.2f} MiB/s, "
          f"{stats.tokens / max(stats.seconds, 1e-9):.0f} tokens/s) -> "
          f"{', '.join(p + '.bin/.idx' for p in stats.output_prefixes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
