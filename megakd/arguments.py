"""Megatron-style command-line flags parsed into typed, validated dataclasses.

Every flag keeps Megatron-LM's name and meaning. ``parse_args`` returns a :class:`KDRunConfig`;
nothing else in megakd reads ``argparse`` results. Validation that needs only the flags and the
world size (:func:`validate`) runs before any process group starts and raises
:class:`ConfigError` naming the offending flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

KD_LOSS_KINDS = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "akl")
# --attention-backend: auto = Transformer Engine when it imports on a GPU, else sdpa;
# sdpa / unfused = megatron-core's local spec with megakd's SDPA core attention / megatron's
# DotProductAttention (unfused; `local` is Megatron-LM's name for it).
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused", "local")


class ConfigError(ValueError):
    """A flag, or a combination of flags, that cannot work. The message names the flag."""


@dataclass
class ModelArchConfig:
    """Architecture of one GPTModel (student or teacher)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    num_query_groups: Optional[int] = None  # None: multi-head attention
    swiglu: bool = False
    normalization: str = "LayerNorm"
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    vocab_size: Optional[int] = None  # true vocabulary size, before padding
    kv_channels: Optional[int] = None  # head dim; None: hidden_size // num_attention_heads
    use_rope_scaling: bool = False  # Llama-3.x RoPE frequency scaling (megatron's fixed form)
    rope_scaling_factor: float = 8.0

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    world_size: int = 1  # filled in by the runtime from the launcher's environment

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        )

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline rank for a model of ``num_layers`` layers (None: no VPP)."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_rank = num_layers // self.pipeline_model_parallel_size
        return per_rank // self.num_layers_per_virtual_pipeline_stage


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default: micro_batch_size * DP
    train_iters: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234
    log_interval: int = 1


@dataclass
class DataConfig:
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    mock_data: bool = False
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: Optional[int] = None  # None: pad the tokenizer's vocab (Megatron's rule)
    # Real data (docs/data.md): megatron indexed .bin/.idx prefixes or chat JSONL files,
    # optionally weighted as Megatron's --data-path ("0.3 A 0.7 B").
    data_path: Optional[List[str]] = None
    split: str = "969, 30, 1"  # train, valid, test weights over documents
    data_cache_path: Optional[str] = None
    dataset_format: str = "indexed"  # indexed (.bin/.idx) | chat (JSONL)
    messages_key: str = "messages"
    prompt_key: Optional[str] = None
    response_key: Optional[str] = None
    pack_sequences: bool = False


@dataclass
class KDConfig:
    """Which divergence, on which tokens, how it is weighted against the student's CE."""

    loss: str = "fkl"
    temperature: float = 1.0
    loss_weight: float = 1.0  # total = (1 - w) * CE + w * KD
    temperature_scaling: bool = False  # multiply KD by T^2 (Hinton et al.)
    on_prompt: bool = False
    skew_alpha: float = 0.1
    jsd_beta: float = 0.5
    akl_mu: float = 0.5
    topk: Optional[int] = None  # None: dense divergence over the whole vocab
    topk_dtype: str = "bf16"
    topk_renormalize: bool = False


@dataclass
class CheckpointConfig:
    """What to load, where and when to save, and when to save and stop (docs/checkpoints.md)."""

    teacher_load: Optional[str] = None
    teacher_cache: Optional[str] = None  # precomputed teacher top-k instead of a teacher (megakd/cache)
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None  # iterations between saves (None: only at the end/exit)
    finetune: bool = False  # --load weights only; iteration 0, fresh optimizer and scheduler
    # Weights to start from while --load holds no checkpoint yet (a resumable job's first launch)
    pretrained_checkpoint: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    override_opt_param_scheduler: bool = False  # LR schedule from the flags, not the checkpoint
    use_checkpoint_opt_param_scheduler: bool = False  # LR schedule from the checkpoint
    exit_interval: Optional[int] = None  # save and stop when iteration % N == 0
    exit_duration_in_mins: Optional[float] = None  # save and stop after M minutes of the process
    exit_signal_handler: bool = False  # save and stop on SIGTERM


@dataclass
class EvalConfig:
    """Validation on the held-out split (``--eval-interval``, ``--eval-iters``)."""

    interval: Optional[int] = None  # iterations between validations; None: no validation
    iters: int = 100  # global batches per validation


@dataclass
class LoggingConfig:
    """Where metrics go besides stdout, and which timings are reported."""

    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    timing_log_level: int = 0  # 0: no timers; 1: teacher/student/optimizer/data timers
    timing_log_option: str = "minmax"  # max | minmax | all (over ranks)
    log_throughput: bool = False  # global tokens per second in the log line


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cuda | cpu
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    distributed_timeout_minutes: int = 10


@dataclass
class KDRunConfig:
    """Everything one distillation run needs, as parsed from the command line."""

    student: ModelArchConfig
    teacher: ModelArchConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: the next multiple of make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------

_ARCH_FLAGS = (
    # (flag suffix, type, help)
    ("num-layers", int, "number of transformer layers"),
    ("hidden-size", int, "transformer hidden size"),
    ("ffn-hidden-size", int, "MLP hidden size (default 4 x hidden size)"),
    ("num-attention-heads", int, "number of attention heads"),
    ("num-query-groups", int, "key/value head groups for grouped-query attention"),
    ("kv-channels", int, "attention head dim (default hidden size / attention heads)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_kd.py",
        description="Distill a teacher GPT into a student GPT with megatron-core.",
        allow_abbrev=False,
    )

    g = parser.add_argument_group("student model")
    for suffix, typ, text in _ARCH_FLAGS:
        g.add_argument(f"--{suffix}", type=typ, default=None, help=f"student {text}")
    g.add_argument("--group-query-attention", action="store_true",
                   help="use grouped-query attention (with --num-query-groups)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated SiLU)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.x RoPE scaling (low/high freq factors 1/4, original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="RoPE scaling factor with --use-rope-scaling")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no bias in linear layers")
    g.add_argument("--add-qkv-bias", action="store_true", help="bias on QKV only (Qwen2)")
    g.add_argument("--qk-layernorm", action="store_true", help="normalise Q and K (Qwen3)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--seq-length", type=int, default=None, help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=int, default=None)

    g = parser.add_argument_group("teacher model (unspecified fields default to the student's)")
    for suffix, typ, text in _ARCH_FLAGS:
        g.add_argument(f"--teacher-{suffix}", type=typ, default=None, help=f"teacher {text}")
    g.add_argument("--teacher-vocab-size", type=int, default=None,
                   help="teacher vocabulary size (must equal the student's)")
    g.add_argument("--teacher-load", type=str, default=None,
                   help="teacher weights (a directory written by --save, any TP/PP layout)")
    g.add_argument("--teacher-cache", type=str, default=None, metavar="DIR",
                   help="read the teacher's top-k from this cache (tools/precompute_teacher_topk.py) "
                        "instead of running a teacher")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=100)

    g = parser.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="megatron-core's synthetic dataset")
    g.add_argument("--tokenizer-type", default="NullTokenizer",
                   choices=["NullTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size for NullTokenizer (EOD is appended, as in Megatron)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help="embedding/output rows of teacher and student (default: the vocab padded "
                        "to --make-vocab-size-divisible-by x TP); checkpoints of another width load "
                        "into it, rows beyond the tokenizer's vocabulary are masked")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes (or chat JSONL files), optionally weighted: "
                        "'0.3 A 0.7 B' or 'A B'")
    g.add_argument("--split", default="969, 30, 1",
                   help="train, valid, test weights over documents, e.g. '98,2,0'")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches its sample indices (default: next to data)")
    g.add_argument("--dataset-format", choices=["indexed", "chat"], default="indexed",
                   help="indexed: megatron .bin/.idx from tools/preprocess_data.py; "
                        "chat: JSONL conversations, loss on responses only")
    g.add_argument("--messages-key", default="messages",
                   help="chat JSONL key of the OpenAI-style message list")
    g.add_argument("--prompt-key", default=None,
                   help="chat JSONL prompt key (with --response-key, instead of messages)")
    g.add_argument("--response-key", default=None, help="chat JSONL response key")
    g.add_argument("--pack-sequences", action="store_true",
                   help="chat: pack conversations into each sample (block-diagonal attention)")

    g = parser.add_argument_group("knowledge distillation")
    g.add_argument("--kd-loss", choices=KD_LOSS_KINDS, default="fkl",
                   help="divergence between teacher p and student q")
    g.add_argument("--kd-temperature", type=float, default=1.0)
    g.add_argument("--kd-loss-weight", type=float, default=1.0,
                   help="w in (1-w)*CE + w*KD; 0 is plain SFT, 1 pure KD")
    g.add_argument("--kd-temperature-scaling", action="store_true",
                   help="multiply the KD term by T^2")
    g.add_argument("--kd-on-prompt", action="store_true",
                   help="distill on prompt tokens too (default: CE's loss mask)")
    g.add_argument("--kd-skew-alpha", type=float, default=0.1)
    g.add_argument("--kd-jsd-beta", type=float, default=0.5)
    g.add_argument("--kd-akl-mu", type=float, default=0.5)
    g.add_argument("--kd-topk", type=int, default=None,
                   help="distill on the teacher's top-k tokens plus the exact tail mass")
    g.add_argument("--kd-topk-dtype", choices=["bf16", "fp8"], default="bf16")
    g.add_argument("--kd-topk-renormalize", action="store_true",
                   help="renormalise over the top-k, dropping the tail (ROLL/ModelOpt variant)")

    g = parser.add_argument_group("checkpoints")
    g.add_argument("--load", default=None,
                   help="resume from this checkpoint root (or load weights from a checkpoint "
                        "directory written by --save or the HF converter)")
    g.add_argument("--save", default=None,
                   help="checkpoint root: training checkpoints (iter_%%07d) are written here")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (also saved at the end and on exit)")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="initial student weights (e.g. a converted HF model) used while --load "
                        "holds no checkpoint yet; later launches resume from --load")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only from --load: iteration 0, fresh optimizer and schedule")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state from --load")
    g.add_argument("--no-load-rng", action="store_true",
                   help="do not load the RNG states from --load")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="take the LR schedule from the flags, ignoring the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="take the LR schedule from the checkpoint, ignoring the flags")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit when the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit after this many minutes since the process started")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="save and exit when SIGTERM arrives (checked on all ranks every iteration)")

    g = parser.add_argument_group("validation and logging")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="iterations between validations on the held-out split (default: none)")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per validation")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard event files here")
    g.add_argument("--wandb-project", default=None, help="log metrics to this W&B project")
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    g.add_argument("--wandb-save-dir", default=None, help="local directory for W&B files")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="1 or 2: print (and write to TensorBoard) teacher forward, student "
                        "forward-backward, optimizer and data-loading times")
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"], default="minmax",
                   help="how timers are reported across ranks")
    g.add_argument("--log-throughput", action="store_true",
                   help="global tokens per second in the log line")

    g = parser.add_argument_group("runtime")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cpu runs megatron-core over gloo without a GPU (auto: cpu iff no CUDA)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="core attention: auto (Transformer Engine if available, else sdpa), "
                        "sdpa (torch scaled_dot_product_attention in the local spec), "
                        "unfused or local (megatron-core's DotProductAttention)")
    return parser


def _required(ns: argparse.Namespace, name: str) -> object:
    value = getattr(ns, name)
    if value is None:
        raise ConfigError(f"--{name.replace('_', '-')} is required")
    return value


def _arch_from_namespace(ns: argparse.Namespace, prefix: str,
                         base: Optional[ModelArchConfig]) -> ModelArchConfig:
    """Student architecture (``prefix=""``), or the teacher's (``prefix="teacher_"``), whose
    unspecified fields default to the student's ``base``."""

    def pick(name: str):
        value = getattr(ns, prefix + name)
        if value is None and base is not None:
            value = getattr(base, name)
        return value

    if base is None:
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            _required(ns, name)
    # Fields without a --teacher-* flag: the teacher takes the student's (which may come from
    # the student's checkpoint metadata rather than from these flags).
    shared = {name: getattr(ns, name) for name in _SHARED_ARCH_FIELDS} if base is None else {
        name: getattr(base, name) for name in _SHARED_ARCH_FIELDS}
    kv_channels = getattr(ns, prefix + "kv_channels")
    if (kv_channels is None and base is not None and getattr(ns, prefix + "hidden_size") is None
            and getattr(ns, prefix + "num_attention_heads") is None):
        kv_channels = base.kv_channels
    use_gqa = ns.group_query_attention or getattr(ns, prefix + "num_query_groups") is not None
    query_groups = pick("num_query_groups") if use_gqa else None
    if use_gqa and query_groups is None:
        raise ConfigError(f"--group-query-attention needs --{prefix.replace('_', '-')}num-query-groups")
    ffn = getattr(ns, prefix + "ffn_hidden_size")
    if ffn is None and base is not None and getattr(ns, prefix + "hidden_size") is None:
        ffn = base.ffn_hidden_size  # same width as the student unless the teacher is wider
    return ModelArchConfig(
        num_layers=pick("num_layers"),
        hidden_size=pick("hidden_size"),
        num_attention_heads=pick("num_attention_heads"),
        ffn_hidden_size=ffn,
        num_query_groups=query_groups,
        kv_channels=kv_channels,
        add_bias_linear=not ns.disable_bias_linear if base is None else base.add_bias_linear,
        init_method_std=ns.init_method_std,
        vocab_size=ns.vocab_size if base is None else (ns.teacher_vocab_size or ns.vocab_size),
        **shared,
    )


# ModelArchConfig fields set by one flag of the same name for student and teacher alike.
_SHARED_ARCH_FIELDS = (
    "swiglu", "normalization", "position_embedding_type", "rotary_base", "rotary_percent",
    "untie_embeddings_and_output_weights", "add_qkv_bias", "qk_layernorm", "norm_epsilon",
    "use_rope_scaling", "rope_scaling_factor",
)


def _checkpoint_or_flag_archs(ns: argparse.Namespace, explicit: frozenset):
    """Student and teacher architectures: from ``megakd_model.json`` of ``--load`` /
    ``--teacher-load`` when the checkpoint has one (explicitly given model flags must then
    agree with it), from the model flags otherwise."""
    from megakd.models.metadata import (  # lazy: metadata imports this module
        arch_with_flags, check_same_tokenizer, stored_model_metadata)

    student_flag = "--load"
    stored_student = stored_model_metadata(ns.load, "--load")
    if stored_student is None and ns.pretrained_checkpoint is not None:
        student_flag = "--pretrained-checkpoint"
        stored_student = stored_model_metadata(ns.pretrained_checkpoint, student_flag)
    stored_teacher = stored_model_metadata(ns.teacher_load, "--teacher-load")
    if stored_student is None:
        student = _arch_from_namespace(ns, "", None)
    else:
        student = arch_with_flags(stored_student, ns, explicit, "", student_flag, ns.vocab_size)
    if stored_teacher is None:
        teacher = _arch_from_namespace(ns, "teacher_", student)
    else:
        teacher = arch_with_flags(stored_teacher, ns, explicit, "teacher_", "--teacher-load",
                                  ns.teacher_vocab_size or ns.vocab_size)
    if stored_student is not None and stored_teacher is not None:
        check_same_tokenizer(stored_student, student_flag, stored_teacher, "--teacher-load")
    return student, teacher


def config_from_namespace(ns: argparse.Namespace, explicit: frozenset = frozenset()) -> KDRunConfig:
    """Turn parsed flags into a :class:`KDRunConfig` (flag-local checks only). ``explicit``
    holds the destinations of the flags given on the command line."""
    student, teacher = _checkpoint_or_flag_archs(ns, explicit)
    seq_length = _required(ns, "seq_length")
    return KDRunConfig(
        student=student,
        teacher=teacher,
        parallel=ParallelConfig(
            tensor_model_parallel_size=ns.tensor_model_parallel_size,
            pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
            num_layers_per_virtual_pipeline_stage=ns.num_layers_per_virtual_pipeline_stage,
            sequence_parallel=ns.sequence_parallel,
            use_distributed_optimizer=ns.use_distributed_optimizer,
        ),
        training=TrainingConfig(
            micro_batch_size=ns.micro_batch_size,
            global_batch_size=ns.global_batch_size,
            train_iters=_required(ns, "train_iters"),
            lr=_required(ns, "lr"),
            min_lr=ns.min_lr,
            lr_decay_style=ns.lr_decay_style,
            lr_warmup_iters=ns.lr_warmup_iters,
            lr_decay_iters=ns.lr_decay_iters,
            weight_decay=ns.weight_decay,
            adam_beta1=ns.adam_beta1,
            adam_beta2=ns.adam_beta2,
            adam_eps=ns.adam_eps,
            clip_grad=ns.clip_grad,
            bf16=ns.bf16,
            seed=ns.seed,
            log_interval=ns.log_interval,
        ),
        data=DataConfig(
            seq_length=seq_length,
            max_position_embeddings=ns.max_position_embeddings or seq_length,
            mock_data=ns.mock_data,
            tokenizer_type=ns.tokenizer_type,
            tokenizer_model=ns.tokenizer_model,
            vocab_size=ns.vocab_size,
            make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
            padded_vocab_size=ns.padded_vocab_size,
            data_path=ns.data_path,
            split=ns.split,
            data_cache_path=ns.data_cache_path,
            dataset_format=ns.dataset_format,
            messages_key=ns.messages_key,
            prompt_key=ns.prompt_key,
            response_key=ns.response_key,
            pack_sequences=ns.pack_sequences,
        ),
        kd=KDConfig(
            loss=ns.kd_loss,
            temperature=ns.kd_temperature,
            loss_weight=ns.kd_loss_weight,
            temperature_scaling=ns.kd_temperature_scaling,
            on_prompt=ns.kd_on_prompt,
            skew_alpha=ns.kd_skew_alpha,
            jsd_beta=ns.kd_jsd_beta,
            akl_mu=ns.kd_akl_mu,
            topk=ns.kd_topk,
            topk_dtype=ns.kd_topk_dtype,
            topk_renormalize=ns.kd_topk_renormalize,
        ),
        checkpoint=CheckpointConfig(
            teacher_load=ns.teacher_load, teacher_cache=ns.teacher_cache, load=ns.load, save=ns.save,
            save_interval=ns.save_interval, finetune=ns.finetune,
            pretrained_checkpoint=ns.pretrained_checkpoint,
            no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng,
            override_opt_param_scheduler=ns.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=ns.use_checkpoint_opt_param_scheduler,
            exit_interval=ns.exit_interval, exit_duration_in_mins=ns.exit_duration_in_mins,
            exit_signal_handler=ns.exit_signal_handler,
        ),
        eval=EvalConfig(interval=ns.eval_interval, iters=ns.eval_iters),
        logging=LoggingConfig(
            tensorboard_dir=ns.tensorboard_dir,
            wandb_project=ns.wandb_project,
            wandb_exp_name=ns.wandb_exp_name,
            wandb_save_dir=ns.wandb_save_dir,
            timing_log_level=ns.timing_log_level,
            timing_log_option=ns.timing_log_option,
            log_throughput=ns.log_throughput,
        ),
        runtime=RuntimeConfig(device=ns.device, attention_backend=ns.attention_backend,
                              distributed_timeout_minutes=ns.distributed_timeout_minutes),
    )


def _explicit_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> frozenset:
    """Destinations of the flags given on the command line (not left at their defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> KDRunConfig:
    """Parse and validate flags. ``world_size`` (default: from the launcher's environment)
    is needed for the data-parallel checks."""
    from megakd.runtime.launcher import discover_world_size

    parser = build_parser()
    ns = parser.parse_args(argv)
    config = config_from_namespace(ns, _explicit_flags(parser, argv))
    config.parallel.world_size = world_size if world_size is not None else discover_world_size()
    validate(config)
    return config


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check(condition: bool, message: str) -> List[str]:
    return [] if condition else [message]


def _validate_arch(arch: ModelArchConfig, prefix: str, parallel: ParallelConfig) -> List[str]:
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    flag = lambda name: f"--{prefix}{name}"  # noqa: E731
    errors: List[str] = []
    for name, value in (("num-layers", arch.num_layers), ("hidden-size", arch.hidden_size),
                        ("num-attention-heads", arch.num_attention_heads),
                        ("ffn-hidden-size", arch.ffn_hidden_size)):
        errors += _check(value > 0, f"{flag(name)} must be positive, got {value}")
    if errors:
        return errors
    if arch.kv_channels is None:
        errors += _check(arch.hidden_size % arch.num_attention_heads == 0,
                         f"{flag('hidden-size')}={arch.hidden_size} is not divisible by "
                         f"{flag('num-attention-heads')}={arch.num_attention_heads} (or give "
                         f"{flag('kv-channels')})")
    else:
        errors += _check(arch.kv_channels > 0,
                         f"{flag('kv-channels')} must be positive, got {arch.kv_channels}")
    if arch.use_rope_scaling:
        errors += _check(arch.position_embedding_type == "rope",
                         "--use-rope-scaling needs --position-embedding-type rope")
        errors += _check(arch.rope_scaling_factor > 0, "--rope-scaling-factor must be positive, "
                                                       f"got {arch.rope_scaling_factor}")
    errors += _check(arch.num_attention_heads % tp == 0,
                     f"{flag('num-attention-heads')}={arch.num_attention_heads} is not divisible by "
                     f"--tensor-model-parallel-size={tp}")
    errors += _check(arch.ffn_hidden_size % tp == 0,
                     f"{flag('ffn-hidden-size')}={arch.ffn_hidden_size} is not divisible by "
                     f"--tensor-model-parallel-size={tp}")
    if arch.num_query_groups is not None:
        errors += _check(arch.num_attention_heads % arch.num_query_groups == 0,
                         f"{flag('num-attention-heads')}={arch.num_attention_heads} is not divisible by "
                         f"{flag('num-query-groups')}={arch.num_query_groups}")
        errors += _check(arch.num_query_groups % tp == 0,
                         f"{flag('num-query-groups')}={arch.num_query_groups} is not divisible by "
                         f"--tensor-model-parallel-size={tp}")
    errors += _check(arch.num_layers % pp == 0,
                     f"{flag('num-layers')}={arch.num_layers} is not divisible by "
                     f"--pipeline-model-parallel-size={pp}")
    vpp_layers = parallel.num_layers_per_virtual_pipeline_stage
    if vpp_layers is not None and arch.num_layers % pp == 0:
        per_rank = arch.num_layers // pp
        errors += _check(per_rank % vpp_layers == 0 and per_rank // vpp_layers > 1,
                         f"--num-layers-per-virtual-pipeline-stage={vpp_layers} must divide the "
                         f"{per_rank} {prefix or 'student '}layers per pipeline stage into 2 or more chunks")
    return errors


def _validate_eval_and_logging(eval_config: EvalConfig, logging_config: LoggingConfig) -> List[str]:
    """Validation flags, and the optional packages the logging flags need (checked here so a
    missing package fails at startup, not at the first log line)."""
    import importlib.util

    errors: List[str] = []
    if eval_config.interval is not None:
        errors += _check(eval_config.interval > 0,
                         f"--eval-interval must be positive, got {eval_config.interval}")
        errors += _check(eval_config.iters > 0,
                         f"--eval-iters must be positive with --eval-interval, got {eval_config.iters}")
    errors += _check(logging_config.timing_log_level in (0, 1, 2),
                     f"--timing-log-level must be 0, 1 or 2, got {logging_config.timing_log_level}")
    for flag, value in (("--wandb-exp-name", logging_config.wandb_exp_name),
                        ("--wandb-save-dir", logging_config.wandb_save_dir)):
        errors += _check(value is None or logging_config.wandb_project is not None,
                         f"{flag} needs --wandb-project")
    if logging_config.tensorboard_dir is not None:
        errors += _check(importlib.util.find_spec("tensorboard") is not None,
                         "--tensorboard-dir needs the tensorboard package: pip install tensorboard")
    if logging_config.wandb_project is not None:
        errors += _check(importlib.util.find_spec("wandb") is not None,
                         "--wandb-project needs the wandb package: pip install wandb "
                         "(or pip install megakd[wandb])")
    return errors


def _validate_checkpoint_flags(ckpt: CheckpointConfig) -> List[str]:
    """Save/load/exit flags: intervals positive, load options only with --load."""
    errors: List[str] = []
    for flag, value in (("--save-interval", ckpt.save_interval),
                        ("--exit-interval", ckpt.exit_interval),
                        ("--exit-duration-in-mins", ckpt.exit_duration_in_mins)):
        if value is not None:
            errors += _check(value > 0, f"{flag} must be positive, got {value}")
    if ckpt.save_interval is not None:
        errors += _check(ckpt.save is not None, "--save-interval needs --save")
    for flag, given in (("--finetune", ckpt.finetune), ("--no-load-optim", ckpt.no_load_optim),
                        ("--no-load-rng", ckpt.no_load_rng)):
        if given:
            errors += _check(ckpt.load is not None, f"{flag} needs --load")
    errors += _check(not (ckpt.override_opt_param_scheduler
                          and ckpt.use_checkpoint_opt_param_scheduler),
                     "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                     "exclude each other")
    return errors


def validate(config: KDRunConfig) -> None:
    """Check every flag combination that can be checked before process groups start.

    Raises ConfigError listing every problem found, each naming its flag.
    """
    par, train, data, kd = config.parallel, config.training, config.data, config.kd
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    errors: List[str] = []
    errors += _check(tp >= 1, f"--tensor-model-parallel-size must be >= 1, got {tp}")
    errors += _check(pp >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if errors:
        raise ConfigError("; ".join(errors))
    errors += _check(par.world_size % (tp * pp) == 0,
                     f"world size {par.world_size} is not divisible by --tensor-model-parallel-size "
                     f"({tp}) x --pipeline-model-parallel-size ({pp})")
    errors += _validate_arch(config.student, "", par)
    errors += _validate_arch(config.teacher, "teacher-", par)
    if par.num_layers_per_virtual_pipeline_stage is not None:
        errors += _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                                 "--pipeline-model-parallel-size > 1")

    errors += _check(data.seq_length > 0, f"--seq-length must be positive, got {data.seq_length}")
    errors += _check(data.max_position_embeddings >= data.seq_length,
                     f"--max-position-embeddings={data.max_position_embeddings} is smaller than "
                     f"--seq-length={data.seq_length}")
    if data.tokenizer_type == "NullTokenizer":
        errors += _check(data.vocab_size is not None and data.vocab_size > 0,
                         "--vocab-size is required (and positive) with --tokenizer-type NullTokenizer")
    if data.padded_vocab_size is not None:
        errors += _check(data.padded_vocab_size > 0 and data.padded_vocab_size % tp == 0,
                         f"--padded-vocab-size={data.padded_vocab_size} must be positive and "
                         f"divisible by --tensor-model-parallel-size={tp}")
        if data.tokenizer_type == "NullTokenizer" and data.vocab_size is not None:
            errors += _check(data.padded_vocab_size >= data.vocab_size + 1,
                             f"--padded-vocab-size={data.padded_vocab_size} is smaller than the "
                             f"vocabulary (--vocab-size {data.vocab_size} + EOD)")
    if config.teacher.vocab_size != config.student.vocab_size:
        errors.append(f"teacher and student vocab sizes differ: --teacher-vocab-size="
                      f"{config.teacher.vocab_size} vs --vocab-size={config.student.vocab_size}; "
                      "distillation needs one tokenizer")
    from megakd.data.sources import check_data_flags  # reads chat JSONL: bad lines fail here

    errors += check_data_flags(data)

    dp = par.data_parallel_size if par.world_size % (tp * pp) == 0 else 1
    if train.global_batch_size is None:
        train.global_batch_size = train.micro_batch_size * dp
    errors += _check(train.micro_batch_size > 0, "--micro-batch-size must be positive")
    errors += _check(train.global_batch_size % (train.micro_batch_size * dp) == 0,
                     f"--global-batch-size={train.global_batch_size} is not a multiple of "
                     f"--micro-batch-size ({train.micro_batch_size}) x data-parallel size ({dp})")
    errors += _check(train.train_iters > 0, f"--train-iters must be positive, got {train.train_iters}")
    errors += _check(train.lr >= 0, f"--lr must be non-negative, got {train.lr}")
    decay_iters = train.lr_decay_iters or train.train_iters
    errors += _check(train.lr_warmup_iters == 0 or train.lr_warmup_iters < decay_iters,
                     f"--lr-warmup-iters={train.lr_warmup_iters} must be smaller than "
                     f"--lr-decay-iters (default --train-iters) = {decay_iters}")
    errors += _check(train.log_interval > 0, "--log-interval must be positive")

    errors += _check(0.0 <= kd.loss_weight <= 1.0,
                     f"--kd-loss-weight must be in [0, 1], got {kd.loss_weight}")
    errors += _check(kd.temperature > 0, f"--kd-temperature must be positive, got {kd.temperature}")
    errors += _check(0.0 <= kd.skew_alpha < 1.0, f"--kd-skew-alpha must be in [0, 1), got {kd.skew_alpha}")
    errors += _check(0.0 < kd.jsd_beta < 1.0, f"--kd-jsd-beta must be in (0, 1), got {kd.jsd_beta}")
    errors += _check(0.0 < kd.akl_mu < 1.0, f"--kd-akl-mu must be in (0, 1), got {kd.akl_mu}")
    if kd.topk is not None:
        errors += _check(kd.topk > 0, f"--kd-topk must be positive, got {kd.topk}")
        if data.vocab_size is not None:
            errors += _check(kd.topk <= data.vocab_size,
                             f"--kd-topk={kd.topk} exceeds the vocabulary ({data.vocab_size})")
    elif kd.topk_renormalize:
        errors.append("--kd-topk-renormalize needs --kd-topk")
    if par.sequence_parallel:
        errors += _check(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
    errors += _check(config.runtime.device in ("auto", "cuda", "cpu"), "--device must be auto, cuda or cpu")
    errors += _validate_eval_and_logging(config.eval, config.logging)
    errors += _check(config.runtime.attention_backend in ATTENTION_BACKENDS,
                     f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                     f"got {config.runtime.attention_backend!r}")
    for flag, path in (("--teacher-load", config.checkpoint.teacher_load),
                       ("--load", config.checkpoint.load),
                       ("--pretrained-checkpoint", config.checkpoint.pretrained_checkpoint)):
        resumable_first_launch = (flag == "--load" and config.checkpoint.save is not None
                                  and os.path.abspath(path or "") ==
                                  os.path.abspath(config.checkpoint.save))
        if path is not None and not resumable_first_launch:
            errors += _check(os.path.isdir(path), f"{flag} {path}: no such checkpoint directory")
    errors += _validate_checkpoint_flags(config.checkpoint)
    if config.checkpoint.teacher_cache is not None:
        from megakd.cache.manifest import check_cache_flags  # reads DIR/manifest.json

        errors += check_cache_flags(config)
    if errors:
        raise ConfigError("; ".join(errors))


def as_dict(config: KDRunConfig) -> dict:
    """Plain-dict view (for logging and checkpoint metadata)."""
    return dataclasses.asdict(config)
