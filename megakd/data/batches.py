"""The microbatches one rank processes in one iteration, and where the loop gets them.

Sample order follows Megatron-LM's pretraining sampler: the global batch of iteration ``i``
holds samples ``[consumed, consumed + global_batch_size)``; within it, microbatch ``m`` of
data-parallel rank ``r`` holds ``micro_batch_size`` samples starting at
``consumed + m * micro_batch_size * dp + r * micro_batch_size``. Position in the data is therefore
fully described by the number of consumed samples, which is what a resumed run continues from.

The training loop asks a :class:`MicrobatchSource` for each iteration's microbatches:
:class:`DatasetMicrobatches` reads fixed data in that order; a source that mixes in the
student's own generations (on-policy distillation) wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol

import torch

from megakd.data.packing import block_causal_attention_mask


@dataclass
class Microbatch:
    """One microbatch, ``[b, s]`` tensors, with its index within the iteration."""

    index: int
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # 1.0 where the student's CE applies (response tokens)
    position_ids: torch.Tensor
    prompt_mask: Optional[torch.Tensor] = None  # 1.0 where the label is a prompt token
    # [b, 1, s, s] bool, True = masked out: block-diagonal causal mask of packed sequences
    # (megatron's convention; None = plain causal attention)
    attention_mask: Optional[torch.Tensor] = None
    # [b] int64: each sample's index in its dataset (what consumed_samples counts; the key of
    # an offline teacher cache, megakd/formats/cache); None for student-generated samples
    sample_ids: Optional[torch.Tensor] = None
    # 1.0 where the KD term applies when it differs from loss_mask: the student's own
    # response tokens, which carry no CE (None: KD follows loss_mask)
    kd_mask: Optional[torch.Tensor] = None


def kd_loss_mask(batch: Microbatch, on_prompt: bool) -> torch.Tensor:
    """Tokens the KD term covers: the response tokens (CE's loss mask, or the student's own
    response of a generated sample), plus prompt tokens with ``--kd-on-prompt``."""
    responses = batch.loss_mask if batch.kd_mask is None else batch.kd_mask
    if not on_prompt or batch.prompt_mask is None:
        return responses
    return torch.clamp(responses + batch.prompt_mask, max=1.0)


def collate(samples: List[dict], index: int, device: torch.device) -> Microbatch:
    """Stack samples (dicts of ``[s]`` tensors, see :func:`megakd.data.packing.build_sample`)
    into microbatch ``index``."""
    def stack(key: str) -> Optional[torch.Tensor]:
        if key not in samples[0]:
            return None
        return torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)

    document_ids = stack("document_ids")
    return Microbatch(
        index=index,
        tokens=stack("tokens"),
        labels=stack("labels"),
        loss_mask=stack("loss_mask").float(),
        position_ids=stack("position_ids"),
        prompt_mask=stack("prompt_mask"),
        attention_mask=None if document_ids is None else block_causal_attention_mask(document_ids),
        kd_mask=stack("kd_mask"),
    )


def iteration_microbatches(
    dataset,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    device: torch.device,
) -> List[Microbatch]:
    """This DP rank's microbatches for the iteration starting at ``consumed_samples``."""
    per_step = micro_batch_size * data_parallel_size
    num_microbatches = global_batch_size // per_step
    microbatches = []
    for m in range(num_microbatches):
        start = consumed_samples + m * per_step + data_parallel_rank * micro_batch_size
        sample_ids = [(start + j) % len(dataset) for j in range(micro_batch_size)]
        microbatch = collate([dataset[i] for i in sample_ids], m, device)
        microbatch.sample_ids = torch.tensor(sample_ids, dtype=torch.int64)
        microbatches.append(microbatch)
    return microbatches


class MicrobatchSource(Protocol):
    """What the training loop draws each iteration's microbatches from."""

    def microbatches(self, consumed_samples: int) -> List[Microbatch]:
        """This DP rank's microbatches of the global batch that starts at ``consumed_samples``."""
        ...

    def report(self) -> Dict[str, float]:
        """Figures about the last call (e.g. generated tokens), for the log line."""
        ...

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly ({} when stateless)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


class DatasetMicrobatches:
    """Fixed data: this DP rank's share of each global batch of ``dataset``, in order."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, device: torch.device) -> None:
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.device = device

    def microbatches(self, consumed_samples: int) -> List[Microbatch]:
        return iteration_microbatches(self.dataset, consumed_samples, self.global_batch_size,
                                      self.micro_batch_size, self.data_parallel_rank,
                                      self.data_parallel_size, self.device)

    def report(self) -> Dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}  # the position in the data is the checkpoint's consumed samples

    def load_state_dict(self, state: dict) -> None:
        pass
