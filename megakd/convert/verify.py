"""``--verify``: the HuggingFace model (transformers) and the megatron model on the same
random token sequences; the max abs difference of their logits over the true vocabulary."""

from __future__ import annotations

import torch

# Default --verify-tolerance per dtype: fp32 differs by summation order only; half precision
# by rounding of every activation.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.5, "fp16": 0.1}


def random_tokens(vocab_size: int, num_sequences: int = 2, seq_length: int = 24,
                  seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_length), generator=generator)


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[b, s, vocab_size]`` fp32 logits of a TP=1/PP=1 megatron GPTModel (padding dropped)."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None)[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=tokens).logits.float()


def load_hf_model(hf_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()


def max_logit_difference(model: torch.nn.Module, hf_dir: str, dtype: torch.dtype,
                         vocab_size: int) -> float:
    """Load the HF model in ``hf_dir`` and compare it with ``model`` on random sequences."""
    hf_model = load_hf_model(hf_dir, dtype)
    tokens = random_tokens(vocab_size)
    difference = (megatron_logits(model, tokens, vocab_size) - hf_logits(hf_model, tokens))
    del hf_model
    return difference.abs().max().item()
