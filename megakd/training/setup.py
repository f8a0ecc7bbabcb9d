"""Build everything one run needs: data, student (DDP), teacher, optimizer, LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from megakd.arguments import ConfigError, KDRunConfig, pad_vocab_size
from megakd.cache import CachedTeacher, TeacherCache
from megakd.data import build_gpt_datasets, build_tokenizer
from megakd.distill import DistillationLoss, DistillationStep, TeacherRunner
from megakd.models import build_student, build_teacher
from megakd.models.metadata import check_run_tokenizer, tokenizer_identity
from megakd.runtime import RuntimeInfo
from megakd.training.checkpointing import load_checkpoint, load_model_weights


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
    valid_dataset: object = None  # held-out split; None without --eval-interval
    tokenizer_identity: Optional[dict] = None  # stored in every checkpoint's megakd_model.json
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
        wd_incr_steps=decay_iters * gbs,  # constant wd: tied to the LR schedule, not --train-iters
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=config.checkpoint.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=config.checkpoint.override_opt_param_scheduler,
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


def validation_samples(config: KDRunConfig) -> int:
    """Samples the validation split must hold (as Megatron-LM): each validation reads the next
    ``--eval-iters`` global batches; one validation per ``--eval-interval`` plus one at the end."""
    if not config.eval.interval:
        return 0
    train = config.training
    evaluations = train.train_iters // config.eval.interval + 1
    return evaluations * config.eval.iters * train.global_batch_size


def _check_packing_support(config: KDRunConfig, runtime: RuntimeInfo) -> None:
    """``--pack-sequences`` relies on the block-diagonal ``attention_mask`` being honoured:
    megakd's SDPA attention and megatron's unfused softmax on CPU do; Transformer Engine and
    the fused causal-softmax kernels on CUDA ignore it for causal layers."""
    from megakd.arguments import ConfigError
    from megakd.models.builder import transformer_engine_available

    backend = config.runtime.attention_backend
    if not config.data.pack_sequences or runtime.device.type != "cuda":
        return
    if backend == "sdpa" or (backend == "auto" and not transformer_engine_available()):
        return
    raise ConfigError("--pack-sequences on CUDA needs --attention-backend sdpa (Transformer "
                      "Engine and megatron's fused causal softmax ignore the packed-sequence "
                      "attention mask)")


def setup(config: KDRunConfig, runtime: RuntimeInfo, log: Callable[[str], None] = print
          ) -> TrainingState:
    """Everything for :func:`megakd.training.loop.train`, built in dependency order; ends by
    restoring ``--load`` (weights, optimizer, scheduler, RNG, iteration, consumed samples)."""
    from megatron.core import parallel_state

    _check_packing_support(config, runtime)
    tokenizer = build_tokenizer(config.data)
    valid_vocab = tokenizer.vocab_size
    padded_vocab = config.data.padded_vocab_size or pad_vocab_size(
        valid_vocab, config.data.make_vocab_size_divisible_by,
        config.parallel.tensor_model_parallel_size)
    if padded_vocab < valid_vocab:
        raise ConfigError(f"--padded-vocab-size={padded_vocab} is smaller than the tokenizer's "
                          f"vocabulary ({valid_vocab})")
    # Checkpoints store their own embedding width; megatron loads them into `padded_vocab` rows
    # (allow_shape_mismatch), so only the tokens themselves must agree.
    check_run_tokenizer(tokenizer, {"--teacher-load": config.checkpoint.teacher_load,
                                    "--load": config.checkpoint.load,
                                    "--pretrained-checkpoint": config.checkpoint.pretrained_checkpoint},
                        "--tokenizer-model")
    train = config.training
    # --teacher-cache: the train split is built for the cache's sample request, so that sample i
    # is the one the cached teacher saw (megatron's sample order depends on the request).
    cache = TeacherCache(config.checkpoint.teacher_cache) if config.checkpoint.teacher_cache else None
    train_samples = train.train_iters * train.global_batch_size
    train_dataset, valid_dataset, _ = build_gpt_datasets(
        config.data, tokenizer,
        [cache.manifest.data["train_samples_requested"] if cache else train_samples,
         validation_samples(config), 0], train.seed
    )
    if cache is not None:
        cache.check_run(config, tokenizer, train_dataset)  # tokenizer and data identity
        cache.verify(train_samples)  # checksums of the shards this run reads, split over ranks

    seq, device = config.data.seq_length, runtime.device
    max_positions = config.data.max_position_embeddings
    student_chunks = build_student(config.student, config.parallel, padded_vocab, max_positions,
                                   bf16=train.bf16, device=device,
                                   attention_backend=config.runtime.attention_backend)
    student = _wrap_ddp(student_chunks, config)  # --load is restored once the optimizer exists

    loss = DistillationLoss(config.kd, valid_vocab, parallel_state.get_tensor_model_parallel_group())
    teacher_chunks, teacher_runner = None, None
    if cache is not None:  # no teacher is built
        teacher_runner = CachedTeacher(cache)
    elif loss.uses_teacher:
        teacher_chunks = build_teacher(config.teacher, config.parallel, padded_vocab, max_positions,
                                       bf16=train.bf16, device=device,
                                       attention_backend=config.runtime.attention_backend)
        if config.checkpoint.teacher_load:
            load_model_weights(teacher_chunks, config.checkpoint.teacher_load)
        teacher_runner = TeacherRunner(teacher_chunks, config.kd, valid_vocab, seq,
                                       train.micro_batch_size)

    optimizer, scheduler = _build_optimizer(config, student)
    _wire_schedule_hooks(student, optimizer)
    step = DistillationStep(student, teacher_runner, loss, seq, train.micro_batch_size,
                            parallel_state.get_data_parallel_group())
    state = TrainingState(
        config=config, runtime=runtime, student=student, teacher=teacher_chunks, step=step,
        optimizer=optimizer, scheduler=scheduler, train_dataset=train_dataset,
        valid_vocab_size=valid_vocab, padded_vocab_size=padded_vocab,
        valid_dataset=valid_dataset if config.eval.interval else None,
        tokenizer_identity=tokenizer_identity(tokenizer),
    )
    if config.checkpoint.load or config.checkpoint.pretrained_checkpoint:
        load_checkpoint(state, log=log)
    return state
