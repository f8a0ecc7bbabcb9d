"""The KV-cache path: megatron-core's static inference loop on one model chunk.

This is what ``StaticInferenceEngine(..., legacy=True)`` runs for each batch:
``GPTInferenceWrapper`` (forward with a ``StaticInferenceContext`` KV cache, p2p between
pipeline stages) driven by ``TextGenerationController.generate_all_output_tokens_static_batch``
(prefill up to the shortest prompt, then one position per step; the last stage's logits,
gathered over TP, are broadcast to every pipeline stage, so every rank of the replica holds
``[b, V_padded]`` logits each step). megakd calls the controller directly (no scheduler, no
progress bar, no reseeding of torch's global generator) and replaces its sampler, which would
sample padded vocab ids, cannot combine top-k with top-p, draws from a generator seeded once
per process, and whose log-probs are those of the raw logits: :class:`_RecordingController`
asks megakd's :class:`~megakd.generation.sampling.Sampler` instead and records every step.
Every rank samples the same tokens from bitwise identical logits with the same seed.

megatron-core's static loop refuses sequence parallelism (without MoE) and virtual pipeline
chunks; :mod:`megakd.generation.full_forward` serves those layouts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.utils import get_model_config

from megakd.generation.outputs import DecodeTrace
from megakd.generation.sampling import Sampler


class _TokenIds:
    """The part of a tokenizer the static loop uses: the stop id, and detokenization (megakd
    works on token ids, so there is no text)."""

    bos = None

    def __init__(self, eod: int) -> None:
        self.eod = eod

    def detokenize(self, tokens: List[int]) -> str:
        return ""


class _RecordingController(TextGenerationController):
    """megatron-core's static-batch loop with megakd's sampler; records each step's draw and
    which rows had started generating (``generation_started``, ``[b]`` bool)."""

    def __init__(self, wrapper: GPTInferenceWrapper, eod: int, sampler: Sampler) -> None:
        super().__init__(wrapper, _TokenIds(eod), pp_group=wrapper.pp_group)
        self.sampler = sampler
        self.trace = DecodeTrace()

    def sample_from_logits(self, last_token_logits: torch.Tensor,
                           sampling_params: Optional[SamplingParams] = None,
                           vocab_size: Optional[int] = None,
                           generation_started: Optional[torch.Tensor] = None,
                           **kwargs: Any) -> torch.Tensor:
        """``[b]`` next tokens from ``[b, V_padded]`` last-position logits."""
        draw = self.sampler(last_token_logits)
        self.trace.record(draw, generation_started)
        return draw.tokens


def decode_with_kv_cache(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                         sampler: Sampler, max_new_tokens: int, eod: int) -> DecodeTrace:
    """Decode one batch on this rank's single (unwrapped) GPTModel chunk.

    Every rank of the TP x PP replica calls this with the same arguments; nothing crosses
    data-parallel replicas. Communication per step: TP all-reduces inside the model and an
    all-gather of the ``[b, 1, V/tp]`` logits, a p2p send of ``[s, b, h]`` activations per
    stage, and a broadcast of the ``[b, 1, V_padded]`` logits from the last stage.
    """
    config = get_model_config(model)
    total_length = max(len(p) for p in prompts) + max_new_tokens
    wrapper_config = InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # one pass per step, no pipelined split
        padded_vocab_size=model.vocab_size,
        inference_max_requests=len(prompts),
        inference_max_seq_length=total_length,
        fp32_residual_connection=config.fp32_residual_connection,
    )
    context = StaticInferenceContext(len(prompts), total_length)
    controller = _RecordingController(GPTInferenceWrapper(model, wrapper_config, context),
                                      eod, sampler)
    params = SamplingParams(num_tokens_to_generate=max_new_tokens, termination_id=eod)
    requests = OrderedDict(
        (str(i), InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(prompt),
                                  sampling_params=params))
        for i, prompt in enumerate(prompts))
    controller.generate_all_output_tokens_static_batch(requests)
    return controller.trace
