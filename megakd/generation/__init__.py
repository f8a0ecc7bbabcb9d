"""In-process generation from a megakd model on its own TP/PP layout (docs/generation.md).

A layer between the models and ``distill``: it drives megatron-core's static inference loop
(KV cache) on a model's chunks, with megakd's sampler (temperature, top-k, top-p, greedy;
padded vocab never sampled; per-call seeds; training RNG streams untouched), and a
full-forward reference path for layouts that loop refuses (virtual pipeline, sequence
parallelism).
"""

from megakd.generation.full_forward import decode_full_forward
from megakd.generation.generator import ENGINES, Generator
from megakd.generation.outputs import DecodeTrace, Generated
from megakd.generation.rng import RngStates, preserved_rng_states, sampling_seed
from megakd.generation.sampling import Draw, Sampler, filtered_logits
from megakd.generation.static_engine import decode_with_kv_cache

__all__ = [
    "DecodeTrace",
    "Draw",
    "ENGINES",
    "Generated",
    "Generator",
    "RngStates",
    "Sampler",
    "decode_full_forward",
    "decode_with_kv_cache",
    "filtered_logits",
    "preserved_rng_states",
    "sampling_seed",
]
