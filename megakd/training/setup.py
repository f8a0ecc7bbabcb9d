"""Build everything one run needs: data, student (DDP), teacher, optimizer, LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from megakd.arguments import KDRunConfig, pad_vocab_size
from megakd.data import build_gpt_datasets, build_tokenizer
from megakd.distill import DistillationLoss, DistillationStep, TeacherRunner
from megakd.models import build_student, build_teacher
from megakd.runtime import RuntimeInfo
from megakd.training.checkpointing import load_model_weights


@dataclass
class TrainingState:
    config: KDRunConfig
    runtime: RuntimeInfo
    student: List[torch.nn.Module]  # DDP-wrapped chunks
    teacher: Optional[List[torch.nn.Module]]
    step: DistillationStep
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    train_dataset: object
    valid_vocab_size: int
    padded_vocab_size: int
    iteration: int = 0
    consumed_samples: int = 0


def _wrap_ddp(chunks: List[torch.nn.Module], config: KDRunConfig) -> List[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        transformer_config = chunk.config
        if config.training.bf16:
            chunk = Float16Module(transformer_config, chunk)
        wrapped.append(DistributedDataParallel(
            transformer_config, ddp_config, chunk,
            disable_bucketing=index > 0,  # megatron: only the first chunk overlaps comms
        ))
    return wrapped


def _build_optimizer(config: KDRunConfig, student: List[torch.nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    train = config.training
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=train.lr,
            min_lr=train.min_lr,
            weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            adam_eps=train.adam_eps,
            clip_grad=train.clip_grad,
            bf16=train.bf16,
            params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        ),
        student,
    )
    # As Megatron-LM: schedule steps are samples, so a changed global batch size keeps the curve.
    gbs = train.global_batch_size
    decay_iters = train.lr_decay_iters or train.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters * gbs,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _wire_schedule_hooks(student: List[torch.nn.Module], optimizer) -> None:
    """What Megatron-LM's loop sets on the model config before using the schedules: loss
    scaling, the DP gradient all-reduce + token scaling, and no-sync for gradient accumulation."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(student[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if len(student) == 1:
        config.no_sync_func = student[0].no_sync
    else:
        config.no_sync_func = [chunk.no_sync for chunk in student]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in student]


def setup(config: KDRunConfig, runtime: RuntimeInfo) -> TrainingState:
    """Everything for :func:`megakd.training.loop.train`, built in dependency order."""
    from megatron.core import parallel_state

    tokenizer = build_tokenizer(config.data)
    valid_vocab = tokenizer.vocab_size
    padded_vocab = pad_vocab_size(valid_vocab, config.data.make_vocab_size_divisible_by,
                                  config.parallel.tensor_model_parallel_size)
    train = config.training
    train_dataset, _, _ = build_gpt_datasets(
        config.data, tokenizer, [train.train_iters * train.global_batch_size, 0, 0], train.seed
    )

    seq, device = config.data.seq_length, runtime.device
    max_positions = config.data.max_position_embeddings
    student_chunks = build_student(config.student, config.parallel, padded_vocab, max_positions,
                                   bf16=train.bf16, device=device)
    if config.checkpoint.load:
        load_model_weights(student_chunks, config.checkpoint.load)
    student = _wrap_ddp(student_chunks, config)

    loss = DistillationLoss(config.kd, valid_vocab, parallel_state.get_tensor_model_parallel_group())
    teacher_chunks, teacher_runner = None, None
    if loss.uses_teacher:
        teacher_chunks = build_teacher(config.teacher, config.parallel, padded_vocab, max_positions,
                                       bf16=train.bf16, device=device)
        if config.checkpoint.teacher_load:
            load_model_weights(teacher_chunks, config.checkpoint.teacher_load)
        teacher_runner = TeacherRunner(teacher_chunks, config.kd, valid_vocab, seq,
                                       train.micro_batch_size)

    optimizer, scheduler = _build_optimizer(config, student)
    _wire_schedule_hooks(student, optimizer)
    step = DistillationStep(student, teacher_runner, loss, seq, train.micro_batch_size,
                            parallel_state.get_data_parallel_group())
    return TrainingState(
        config=config, runtime=runtime, student=student, teacher=teacher_chunks, step=step,
        optimizer=optimizer, scheduler=scheduler, train_dataset=train_dataset,
        valid_vocab_size=valid_vocab, padded_vocab_size=padded_vocab,
    )
