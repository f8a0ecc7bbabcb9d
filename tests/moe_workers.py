"""Worker bodies and tiny HF mixture-of-experts models for tests/test_moe.py (gloo, CPU).

Models are random-init transformers Qwen3-MoE and Mixtral models built from configs (no
downloads): 2 layers, hidden 32, 4 experts, top-2, weights drawn with std 0.1 so logits are O(1)
and a wrong expert or router mapping cannot hide in rounding. Qwen3-MoE keeps its router
weights unnormalised (``norm_topk_prob=False``: megatron's pre-softmax router), Mixtral
renormalises them (megatron's softmax over the top-k logits) and ties its embeddings.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch

from tests.convert_workers import _hf_logits, _my_microbatches, save_random_hf_model

SEQ = 16
MBS = 2
GBS = 4
VOCAB = 100  # HF rows; runs use --vocab-size 99 (+ EOD)

# layout name -> flags; world size 2 holds each of them
LAYOUTS: Dict[str, Tuple[str, ...]] = {
    "tp2": ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
    "pp2": ("--pipeline-model-parallel-size", "2"),
    "ep2": ("--expert-model-parallel-size", "2"),
    "ep2_alltoall": ("--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                     "alltoall"),
    "tp2ep2": ("--tensor-model-parallel-size", "2", "--sequence-parallel",
               "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
               "--moe-token-dispatcher-type", "alltoall"),
    "dp2": (),
}


def make_hf_moe(directory: str, family: str, seed: int = 0) -> str:
    """Save a random tiny HF MoE model of ``family`` (qwen3_moe | mixtral) to ``directory``."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  dtype="float32")
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=48,
                                             moe_intermediate_size=24, num_experts=4,
                                             head_dim=16, norm_topk_prob=False)
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=40, num_local_experts=4,
                                            tie_word_embeddings=True)
    return save_random_hf_model(config, directory, seed)


def _setup(flags: Sequence[str], train_iters: int = 1, lr: str = "0"):
    from megakd.preflight import parse_pretrain_args
    from megakd.training.setup import setup
    from tests.dist_harness import init_layout

    config = parse_pretrain_args([
        "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size",
        str(GBS), "--train-iters", str(train_iters), "--lr", lr, "--lr-decay-style", "constant",
        "--weight-decay", "0", "--clip-grad", "0", "--mock-data", "--vocab-size", str(VOCAB - 1),
        "--make-vocab-size-divisible-by", "16", "--kd-loss", "fkl", "--device", "cpu", *flags,
    ], world_size=int(os.environ["WORLD_SIZE"]))
    return setup(config, init_layout(config), log=lambda _: None)


def _forward_losses(state, microbatches) -> Dict[str, float]:
    from megatron.core import parallel_state

    from megakd.distill import reduce_reported

    return reduce_reported(state.step.run(microbatches, forward_only=True),
                           parallel_state.get_data_parallel_group())


# ---- world size 2: converted MoE checkpoints at every layout ----------------------------------


def layouts_worker(rank: int, cases: Sequence[Tuple[str, str, Sequence[str]]]
                   ) -> Dict[str, dict]:
    """For each (checkpoint, HF dir, [layout names]): student (--load) and teacher
    (--teacher-load) from the same converted checkpoint. On the last stage: max |logits - HF
    logits| over this rank's microbatches, for both, and the KD loss (student = teacher)."""
    from tests.e2e_workers import full_logits

    results = {}
    for checkpoint, hf_dir, layouts in cases:
        for layout in layouts:
            state = _setup(["--load", checkpoint, "--teacher-load", checkpoint,
                            "--kd-loss-weight", "1", *LAYOUTS[layout]])
            microbatches = _my_microbatches(state)
            losses = _forward_losses(state, microbatches)
            student = full_logits(state.student, microbatches, SEQ, MBS)
            teacher = full_logits(state.teacher.chunks, microbatches, SEQ, MBS)
            if student is None:
                continue
            reference = _hf_logits(hf_dir, microbatches)
            results[f"{os.path.basename(checkpoint)}/{layout}"] = {
                "student_diff": (student[..., :VOCAB] - reference).abs().max().item(),
                "teacher_diff": (teacher[..., :VOCAB] - reference).abs().max().item(),
                "kd_loss": losses["kd loss"],
            }
    return results


# ---- world size 2: distillation from a MoE teacher --------------------------------------------

DENSE_STUDENT = ("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                 "--num-query-groups", "2", "--group-query-attention", "--swiglu",
                 "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                 "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seed", "3")


def dense_student_worker(rank: int, teacher: str, layouts: Sequence[str], iters: int
                         ) -> Dict[str, Optional[dict]]:
    """A random dense student distils from the MoE ``teacher`` for ``iters`` iterations at
    each layout; the KD loss on the first iteration's microbatches before and after."""
    from megakd.training.loop import train_step

    results = {}
    for layout in layouts:
        state = _setup([*DENSE_STUDENT, "--teacher-load", teacher, "--kd-loss-weight", "1",
                        *LAYOUTS[layout]], train_iters=iters, lr="1e-2")
        microbatches = _my_microbatches(state)
        before = _forward_losses(state, microbatches)
        curve = [train_step(state).losses for _ in range(iters)]
        after = _forward_losses(state, microbatches)
        results[layout] = ({"before": before["kd loss"], "after": after["kd loss"],
                            "curve": [losses["kd loss"] for losses in curve]}
                           if before else None)
    return results


def moe_student_worker(rank: int, student: str, teacher: str, layouts: Sequence[str],
                       iters: int) -> Dict[str, dict]:
    """The converted Qwen3-MoE trains as a student of the Mixtral teacher (KD + CE, router
    load-balancing loss 0.001 from its config) for ``iters`` iterations at each layout: the
    loss curve, the router loss megatron-core tracked, and whether the experts and routers of
    this rank received gradients and moved."""
    from megakd.training.loop import train_step

    results = {}
    for layout in layouts:
        state = _setup(["--load", student, "--teacher-load", teacher, "--kd-loss-weight", "0.5",
                        *LAYOUTS[layout]], train_iters=iters, lr="1e-2")
        start = {name: param.detach().clone() for chunk in state.student
                 for name, param in chunk.named_parameters()}
        curve, router = [], []
        for _ in range(iters):  # the step reports the router loss (models.moe.router_loss_report)
            losses = train_step(state).losses
            curve.append(losses)
            router.append({"load_balancing_loss": losses["load_balancing_loss"]})
        moved = {name: (param.detach() - start[name]).abs().max().item()
                 for chunk in state.student for name, param in chunk.named_parameters()}
        results[layout] = {
            "curve": curve, "router": router,
            "experts_moved": min(v for n, v in moved.items() if ".local_experts." in n),
            "routers_moved": min(v for n, v in moved.items() if ".router." in n),
        }
    return results
