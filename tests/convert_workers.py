"""Worker bodies and tiny HF models for tests/test_convert.py (gloo process groups, CPU).

Every model is a random-init transformers model built from a config (no downloads), saved as
sharded fp32 safetensors. Weights are drawn with std 0.1 so logits are O(1) and a wrong
mapping cannot hide in rounding.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

SEQ = 16
MBS = 2
GBS = 4

# family -> (config class name, config kwargs); together they cover GQA, QKV bias, QK-norm
# with head_dim != hidden/heads, tied and untied embeddings and Llama-3 rope scaling.
FAMILY_CONFIGS: Dict[str, Tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, max_position_embeddings=16384,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                      tie_word_embeddings=True, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=False)),
}


def make_hf_model(directory: str, family: str, vocab_size: int = 100, hidden_size: int = 32,
                  num_layers: int = 2, seed: int = 0, **overrides) -> str:
    """Save a random tiny HF model of ``family`` to ``directory`` (sharded safetensors)."""
    import transformers

    class_name, kwargs = FAMILY_CONFIGS[family]
    kwargs = dict(kwargs, vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=48, num_hidden_layers=num_layers, **overrides)
    kwargs.setdefault("max_position_embeddings", 256)
    config = getattr(transformers, class_name)(**kwargs, dtype="float32")
    return save_random_hf_model(config, directory, seed)


def save_random_hf_model(config, directory: str, seed: int) -> str:
    """A transformers model of ``config`` with N(0, 0.1) weights (large enough that a wrong
    mapping shows in the logits), saved as sharded safetensors to ``directory``."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB")
    return directory


def hf_tensors(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


# ---- world size 1: conversions ----------------------------------------------------------------


def convert_worker(rank: int, jobs: Sequence[Tuple[str, dict]]) -> List[dict]:
    """Run converter jobs (``("to_megakd", options)`` / ``("to_hf", options)``) in one process."""
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, convert_hf_to_megakd
    from megakd.convert.megakd_to_hf import MegakdToHFOptions, convert_megakd_to_hf

    results = []
    for kind, options in jobs:
        if kind == "to_megakd":
            results.append(convert_hf_to_megakd(HFToMegakdOptions(**options), log=lambda _: None))
        else:
            results.append(convert_megakd_to_hf(MegakdToHFOptions(**options), log=lambda _: None))
    return results


# ---- world size 4: loading converted checkpoints at TP/PP ----------------------------------------


def _setup(tp: int, pp: int, extra: Sequence[str]):
    from megakd.preflight import parse_pretrain_args
    from megakd.training import setup
    from tests.dist_harness import init_layout

    world = int(os.environ["WORLD_SIZE"])
    config = parse_pretrain_args([
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
        "--train-iters", "1", "--lr", "0", "--mock-data", "--make-vocab-size-divisible-by", "16",
        "--kd-loss", "fkl", "--kd-loss-weight", "1", "--device", "cpu", *extra,
    ], world_size=world)
    return setup(config, init_layout(config))


def _all_microbatches(state):
    """Every microbatch of the first iteration, for all DP ranks (for references)."""
    from megatron.core import parallel_state

    from megakd.data import iteration_microbatches

    dp = parallel_state.get_data_parallel_world_size()
    return [mb for r in range(dp) for mb in iteration_microbatches(
        state.train_dataset, 0, GBS, MBS, r, dp, torch.device("cpu"))]


def _my_microbatches(state):
    from megatron.core import parallel_state

    from megakd.data import iteration_microbatches

    return iteration_microbatches(state.train_dataset, 0, GBS, MBS,
                                  parallel_state.get_data_parallel_rank(),
                                  parallel_state.get_data_parallel_world_size(),
                                  torch.device("cpu"))


def _full_logits(chunks, microbatches) -> Optional[torch.Tensor]:
    """Logits ``[n_mb, b, s, V]`` of ``chunks`` on the last stage (TP shards gathered: test only)."""
    from tests.e2e_workers import full_logits

    return full_logits(chunks, microbatches, SEQ, MBS)


def _hf_logits(hf_dir: str, microbatches) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.stack([model(input_ids=mb.tokens).logits for mb in microbatches])


def layouts_worker(rank: int, cases: Sequence[Tuple[str, str, int, Sequence[Tuple[int, int]]]]
                   ) -> Dict[str, dict]:
    """For each (checkpoint, HF dir, vocab, [(tp, pp), ...]): student (--load) and teacher
    (--teacher-load) from the same converted checkpoint, architecture from its metadata only.
    Returns, on the last stage, max |logits - HF logits| for both and the losses."""
    from megatron.core import parallel_state

    from megakd.distill import reduce_reported

    results = {}
    for checkpoint, hf_dir, vocab, layouts in cases:
        for tp, pp in layouts:
            state = _setup(tp, pp, ["--vocab-size", str(vocab - 1), "--load", checkpoint,
                                    "--teacher-load", checkpoint])
            microbatches = _my_microbatches(state)
            losses = reduce_reported(state.step.run(microbatches, forward_only=True),
                                     parallel_state.get_data_parallel_group())
            student = _full_logits(state.student, microbatches)
            teacher = _full_logits(state.teacher.chunks, microbatches)
            if student is None:
                continue
            reference = _hf_logits(hf_dir, microbatches)
            results[f"{os.path.basename(checkpoint)}/tp{tp}pp{pp}"] = {
                "student_diff": (student[..., :vocab] - reference).abs().max().item(),
                "teacher_diff": (teacher[..., :vocab] - reference).abs().max().item(),
                "padded_width": student.shape[-1],
                "losses": losses,
            }
    return results


def _reference_fkl(teacher_dir: str, student_dir: str, microbatches, valid: int) -> float:
    """Forward KL token mean from the HF models themselves, over the first ``valid`` entries."""
    teacher = _hf_logits(teacher_dir, microbatches)[..., :valid].double()
    student = _hf_logits(student_dir, microbatches)[..., :valid].double()
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = torch.stack([mb.loss_mask for mb in microbatches]).double()
    return ((per_token * mask).sum() / mask.sum()).item()


def mixed_width_worker(rank: int, teacher: Tuple[str, str], student: Tuple[str, str],
                       valid: int, padded: int, tp: int) -> Optional[dict]:
    """Teacher and student converted with different padded widths distill at one width: the
    KD loss must equal the HF reference, and one training step must run."""
    from megatron.core import parallel_state

    from megakd.distill import reduce_reported

    state = _setup(tp, 1, ["--vocab-size", str(valid - 1), "--padded-vocab-size", str(padded),
                           "--load", student[0], "--teacher-load", teacher[0]])
    losses = reduce_reported(state.step.run(_my_microbatches(state), forward_only=True),
                             parallel_state.get_data_parallel_group())
    state.step.run(_my_microbatches(state))  # forward-backward: gradients of the KD loss
    grads = [p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
             for chunk in state.student for p in chunk.parameters()]
    grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item()
    if not parallel_state.is_pipeline_last_stage():
        return None
    return {"losses": losses, "reference_kd": _reference_fkl(teacher[1], student[1],
                                                               _all_microbatches(state), valid),
            "grad_norm": grad_norm, "padded": state.vocab.padded}
