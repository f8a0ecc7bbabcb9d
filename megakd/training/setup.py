"""Build everything one run needs: data, student (DDP), teacher source, optimizer, schedule."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from megakd.configs import ConfigError, KDRunConfig
from megakd.data import DatasetMicrobatches, MicrobatchSource, build_tokenizer_and_vocabulary
from megakd.distill import (
    DistillationLoss,
    DistillationStep,
    HiddenStateKD,
    StudentDataMicrobatches,
    build_datasets,
    build_hidden_kd,
    build_loaded_teacher,
    build_projections,
    build_teacher_source,
    resolve_teacher_window,
    teacher_output_bytes,
)
from megakd.formats.cache import TeacherCache
from megakd.formats.topk import TOPK_VALUE_DTYPES, topk_bytes_per_token
from megakd.formats.model_metadata import tokenizer_identity
from megakd.generation import Generator
from megakd.models import build_student, transformer_engine_available
from megakd.runtime import RuntimeInfo
from megakd.training.checkpointing import load_checkpoint
from megakd.training.nonfinite import SkipPolicy
from megakd.training.state import TrainingHooks, TrainingState


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
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters * gbs,
        lr_decay_steps=train.decay_iters * gbs,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.decay_iters * gbs,  # constant wd: tied to the LR schedule
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
    # No grad_sync_func: gradients are not reduced while the backward runs
    # (overlap_grad_reduce is off), so finalize_model_grads reduces them once; a chunk's
    # start_grad_sync on top of that would all-reduce its gradients twice.
    if len(student) == 1:
        config.no_sync_func = student[0].no_sync
    else:
        config.no_sync_func = [chunk.no_sync for chunk in student]


def _teacher_window(config: KDRunConfig, padded_vocab_size: int, log: Callable[[str], None]
                    ) -> int:
    """Microbatches per teacher window (``--kd-teacher-window``, or its auto choice), logged
    when it splits the iteration."""
    from megatron.core import parallel_state

    train, kd = config.training, config.kd
    dp = parallel_state.get_data_parallel_world_size()
    num_microbatches = train.global_batch_size // (train.micro_batch_size * dp)
    per_microbatch = teacher_output_bytes(
        kd, train.micro_batch_size, config.data.seq_length,
        padded_vocab_size // config.parallel.tensor_model_parallel_size,
        logits_bytes=2 if train.bf16 else 4,
        topk_token_bytes=topk_bytes_per_token(kd.topk, TOPK_VALUE_DTYPES[kd.topk_dtype])
        if kd.topk else 0)
    # held teacher hidden states (--kd-intermediate-pairs), at most every pair on one stage
    tokens = config.data.seq_length // (config.parallel.tensor_model_parallel_size
                                        if config.parallel.sequence_parallel else 1)
    per_microbatch += (len(kd.layer_pairs) * train.micro_batch_size * tokens
                       * config.teacher.hidden_size * (2 if train.bf16 else 4))
    vpp = config.parallel.num_layers_per_virtual_pipeline_stage is not None
    window = resolve_teacher_window(
        kd, num_microbatches, per_microbatch,
        min_window=config.parallel.pipeline_model_parallel_size if vpp else 1)
    if window < num_microbatches:
        log(f"teacher window: {window} of {num_microbatches} microbatches per schedule call "
            f"({window * per_microbatch / 2**20:.0f} MiB of teacher outputs held instead of "
            f"{num_microbatches * per_microbatch / 2**20:.0f} MiB)")
    return window


def _hidden_state_kd(config: KDRunConfig, student_chunks: List[torch.nn.Module],
                     teacher_chunks: Optional[List[torch.nn.Module]], projections: Dict
                     ) -> Optional[HiddenStateKD]:
    """``--kd-intermediate-pairs``: hooks on both models' paired layers (collective over the
    pipeline group: which rank owns which layer); None without pairs."""
    if not config.kd.layer_pairs or teacher_chunks is None:
        return None
    return build_hidden_kd(config.kd, student_chunks, teacher_chunks, projections,
                           config.data.seq_length, config.training.micro_batch_size,
                           config.parallel.sequence_parallel)


def validation_samples(config: KDRunConfig) -> int:
    """Samples the validation split must hold (as Megatron-LM): each validation reads the next
    ``--eval-iters`` global batches; one validation per ``--eval-interval`` plus one at the end."""
    if not config.eval.interval:
        return 0
    train = config.training
    evaluations = train.train_iters // config.eval.interval + 1
    evaluations += int(config.student_data.adaptive)  # DistiLLM's validation before training
    return evaluations * config.eval.iters * train.global_batch_size


def _check_packing_support(config: KDRunConfig, runtime: RuntimeInfo) -> None:
    """``--pack-sequences`` relies on the block-diagonal ``attention_mask`` being honoured:
    megakd's SDPA attention and megatron's unfused softmax on CPU do; Transformer Engine and
    the fused causal-softmax kernels on CUDA ignore it for causal layers."""
    backend = config.runtime.attention_backend
    if not config.data.pack_sequences or runtime.device.type != "cuda":
        return
    if backend == "sdpa" or (backend == "auto" and not transformer_engine_available()):
        return
    raise ConfigError("--pack-sequences on CUDA needs --attention-backend sdpa (Transformer "
                      "Engine and megatron's fused causal softmax ignore the packed-sequence "
                      "attention mask)")


def _microbatch_source(config: KDRunConfig, reference: DatasetMicrobatches,
                       generator: Optional[Generator], device: torch.device
                       ) -> Tuple[MicrobatchSource, TrainingHooks]:
    """The reference data, or (with the student-data flags) the mix of reference data and the
    student's own samples, with the hook that feeds DistiLLM's schedule its validation CE."""
    if not config.student_data.enabled:
        return reference, TrainingHooks()
    source = StudentDataMicrobatches(reference, generator, config.student_data,
                                     config.generation, config.data.seq_length,
                                     config.training.train_iters, config.training.seed)

    def observe(state: TrainingState, record) -> None:
        # validation losses live on the last pipeline stage: every rank needs the same value
        value = torch.tensor([record.losses.get("lm loss", 0.0)], dtype=torch.float64,
                             device=device)
        torch.distributed.broadcast(value, src=torch.distributed.get_world_size() - 1)
        source.observe_validation(value.item())

    return source, TrainingHooks(after_validation=[observe])


def setup(config: KDRunConfig, runtime: RuntimeInfo, log: Callable[[str], None] = print
          ) -> TrainingState:
    """Everything for :func:`megakd.training.loop.train`, built in dependency order; ends by
    restoring ``--load`` (weights, optimizer, scheduler, RNG, iteration, consumed samples)."""
    from megatron.core import parallel_state

    _check_packing_support(config, runtime)
    train, data, device = config.training, config.data, runtime.device
    tokenizer, vocab = build_tokenizer_and_vocabulary(
        data, config.parallel.tensor_model_parallel_size)
    # --teacher-cache: the train split is built for the cache's sample request, so that sample i
    # is the one the cached teacher saw (megatron's sample order depends on the request).
    cache = TeacherCache(config.checkpoint.teacher_cache) if config.checkpoint.teacher_cache else None
    train_dataset, valid_dataset = build_datasets(
        data, tokenizer, train.seed,
        cache.train_samples_requested if cache else train.train_samples,
        validation_samples(config))
    if cache is not None:
        cache.check_run(data, train.seed, tokenizer, train_dataset)
        cache.verify(train.train_samples)  # checksums of the shards this run reads

    student_chunks = build_student(config.student, config.parallel, vocab.padded,
                                   data.max_position_embeddings, bf16=train.bf16, device=device,
                                   attention_backend=config.runtime.attention_backend)
    # the learned hidden-state projections (--kd-intermediate-pairs) join the student's chunks
    # before DDP and the optimizer: trained, and saved with the student
    projections = build_projections(config.kd, student_chunks, config.student.hidden_size,
                                    config.teacher.hidden_size, train.seed, device)
    student = _wrap_ddp(student_chunks, config)  # --load is restored once the optimizer exists
    teacher_chunks = None
    if cache is None and config.kd.uses_teacher:
        teacher_chunks = build_loaded_teacher(config.teacher, config.parallel, data,
                                              config.runtime, vocab, train.bf16, device,
                                              config.checkpoint.teacher_load,
                                              fp8=config.teacher_fp8)
    hidden = _hidden_state_kd(config, student_chunks, teacher_chunks, projections)
    teacher = build_teacher_source(config.kd, teacher_chunks, cache, vocab.valid,
                                   data.seq_length, train.micro_batch_size,
                                   hidden.teacher_microbatch if hidden else None)
    loss = DistillationLoss(config.kd, vocab.valid,
                            parallel_state.get_tensor_model_parallel_group())
    optimizer, scheduler = _build_optimizer(config, student)
    _wire_schedule_hooks(student, optimizer)
    reference = DatasetMicrobatches(train_dataset, train.global_batch_size,
                                    train.micro_batch_size,
                                    parallel_state.get_data_parallel_rank(),
                                    parallel_state.get_data_parallel_world_size(), device)
    generator = None
    if config.student_data.enabled or config.eval.generate:
        generator = Generator(student, vocab.valid, tokenizer.eod, data.seq_length)
    source, hooks = _microbatch_source(config, reference, generator, device)
    state = TrainingState(
        config=config, runtime=runtime, student=student, teacher=teacher,
        step=DistillationStep(student, teacher, loss, data.seq_length, train.micro_batch_size,
                              parallel_state.get_data_parallel_group(),
                              window=_teacher_window(config, vocab.padded, log),
                              hidden=hidden),
        source=source, optimizer=optimizer, scheduler=scheduler, train_dataset=train_dataset,
        vocab=vocab, skips=SkipPolicy(train, config.checkpoint), valid_dataset=valid_dataset,
        tokenizer=tokenizer, tokenizer_identity=tokenizer_identity(tokenizer),
        generator=generator, hooks=hooks,
    )
    if config.checkpoint.load or config.checkpoint.pretrained_checkpoint:
        load_checkpoint(state, log=log)
    return state
