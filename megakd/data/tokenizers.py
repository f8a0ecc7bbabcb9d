"""Tokenizers from ``megatron.core.tokenizers``, chosen by Megatron-LM's ``--tokenizer-type``."""

from __future__ import annotations

from typing import Optional

from megakd.configs.data import TOKENIZER_LIBRARIES


def load_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                   vocab_size: Optional[int] = None):
    """A megatron-core tokenizer (``MegatronTokenizerBase``).

    ``NullTokenizer`` (ids are the text, space separated) has ``vocab_size`` + 1 tokens: Megatron
    appends EOD. SentencePiece takes a ``.model`` file; HuggingFace a directory or hub name
    that ``AutoTokenizer`` resolves (its chat template, if any, comes with it).
    """
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type not in TOKENIZER_LIBRARIES:
        raise ValueError(f"--tokenizer-type {tokenizer_type}: expected one of "
                         f"{', '.join(TOKENIZER_LIBRARIES)}")
    library = TOKENIZER_LIBRARIES[tokenizer_type]
    if library == "null":
        if not vocab_size:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"},
                                                 vocab_size=vocab_size)
    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    return MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer_model,
                                             metadata_path={"library": library})
