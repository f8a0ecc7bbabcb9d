"""Rules between flags, checked before any process group starts and without reading files.

Each function checks one concern and returns a list of messages, each naming its flag; a tool
composes the ones that apply to its command line (:mod:`megakd.preflight`). Bounds of single
values (``--micro-batch-size`` >= 1, ...) are declared on the fields and checked first by
:func:`megakd.configs.fields.check_bounds`, so the rules here may divide by them.
"""

from __future__ import annotations

from typing import List, Optional

from megakd.configs.checkpoint import CheckpointConfig
from megakd.configs.data import DataConfig, parse_blend, parse_split
from megakd.configs.kd import KDConfig
from megakd.configs.model import ModelArchConfig
from megakd.configs.parallel import ParallelConfig
from megakd.configs.run import EvalConfig, LoggingConfig
from megakd.configs.student_data import StudentDataConfig
from megakd.configs.training import TrainingConfig


def _check(condition: bool, message: str) -> List[str]:
    return [] if condition else [message]


def parallel_rules(par: ParallelConfig) -> List[str]:
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    errors = _check(par.world_size % (tp * pp) == 0,
                    f"world size {par.world_size} is not divisible by --tensor-model-parallel-size "
                    f"({tp}) x --pipeline-model-parallel-size ({pp})")
    if par.num_layers_per_virtual_pipeline_stage is not None:
        errors += _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                                 "--pipeline-model-parallel-size > 1")
    if par.sequence_parallel:
        errors += _check(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
    return errors + expert_parallel_rules(par)


def expert_parallel_rules(par: ParallelConfig) -> List[str]:
    """megatron-core lays expert groups over each pipeline stage's TP x DP ranks: EP x expert
    TP must divide them (world % (EP x ETP x PP) == 0)."""
    ep, etp, pp = (par.expert_model_parallel_size, par.expert_tensor_size,
                   par.pipeline_model_parallel_size)
    if ep == 1 and par.expert_tensor_parallel_size is None:
        return []  # the expert layout is the dense one
    return _check(par.world_size % (ep * etp * pp) == 0,
                  f"--expert-model-parallel-size={ep} x --expert-tensor-parallel-size={etp} x "
                  f"--pipeline-model-parallel-size={pp} does not divide world size "
                  f"{par.world_size}")


def arch_rules(arch: ModelArchConfig, par: ParallelConfig, teacher: bool = False) -> List[str]:
    """Shape rules of one architecture at the run's layout (``--teacher-*`` names if teacher)."""
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    prefix = "teacher-" if teacher else ""

    def flag(name: str) -> str:
        return f"--{prefix}{name}"

    errors: List[str] = []
    if arch.kv_channels is None:
        errors += _check(arch.hidden_size % arch.num_attention_heads == 0,
                         f"{flag('hidden-size')}={arch.hidden_size} is not divisible by "
                         f"{flag('num-attention-heads')}={arch.num_attention_heads} (or give "
                         f"{flag('kv-channels')})")
    if arch.use_rope_scaling:
        errors += _check(arch.position_embedding_type == "rope",
                         "--use-rope-scaling needs --position-embedding-type rope")
    for name, value in (("num-attention-heads", arch.num_attention_heads),
                        ("ffn-hidden-size", arch.ffn_hidden_size)):
        errors += _check(value % tp == 0, f"{flag(name)}={value} is not divisible by "
                                          f"--tensor-model-parallel-size={tp}")
    if arch.num_query_groups is not None:
        errors += _check(arch.num_attention_heads % arch.num_query_groups == 0,
                         f"{flag('num-attention-heads')}={arch.num_attention_heads} is not "
                         f"divisible by {flag('num-query-groups')}={arch.num_query_groups}")
        errors += _check(arch.num_query_groups % tp == 0,
                         f"{flag('num-query-groups')}={arch.num_query_groups} is not divisible "
                         f"by --tensor-model-parallel-size={tp}")
    errors += _check(arch.num_layers % pp == 0,
                     f"{flag('num-layers')}={arch.num_layers} is not divisible by "
                     f"--pipeline-model-parallel-size={pp}")
    vpp_layers = par.num_layers_per_virtual_pipeline_stage
    if vpp_layers is not None and arch.num_layers % pp == 0:
        per_rank = arch.num_layers // pp
        errors += _check(per_rank % vpp_layers == 0 and per_rank // vpp_layers > 1,
                         f"--num-layers-per-virtual-pipeline-stage={vpp_layers} must divide the "
                         f"{per_rank} {'teacher ' if teacher else 'student '}layers per pipeline "
                         "stage into 2 or more chunks")
    return errors + moe_rules(arch, par, teacher)


def moe_rules(arch: ModelArchConfig, par: ParallelConfig, teacher: bool = False) -> List[str]:
    """Mixture-of-experts shapes of one architecture at the run's expert layout."""
    prefix = "--teacher-" if teacher else "--"
    experts, topk = arch.num_experts, arch.moe_router_topk
    if experts is None:
        return [f"{prefix}{name} needs {prefix}num-experts" for name, value in (
            ("moe-ffn-hidden-size", arch.moe_ffn_hidden_size),
            ("moe-shared-expert-intermediate-size", arch.moe_shared_expert_intermediate_size))
            if value is not None]
    ep, etp, tp = (par.expert_model_parallel_size, par.expert_tensor_size,
                   par.tensor_model_parallel_size)
    width_flag = "moe-ffn-hidden-size" if arch.moe_ffn_hidden_size else "ffn-hidden-size"
    errors = _check(experts % ep == 0, f"{prefix}num-experts={experts} is not divisible by "
                                       f"--expert-model-parallel-size={ep}")
    errors += _check(topk <= experts, f"{prefix}moe-router-topk={topk} exceeds "
                                      f"{prefix}num-experts={experts}")
    errors += _check(topk > 1 or arch.moe_router_pre_softmax,
                     f"{prefix}moe-router-topk=1 needs --moe-router-pre-softmax (a softmax over "
                     "the one chosen logit is always 1)")
    errors += _check(arch.expert_ffn_hidden_size % etp == 0,
                     f"{prefix}{width_flag}={arch.expert_ffn_hidden_size} is not divisible by "
                     f"--expert-tensor-parallel-size={etp}")
    shared = arch.moe_shared_expert_intermediate_size
    if shared is not None:
        errors += _check(shared % tp == 0, f"{prefix}moe-shared-expert-intermediate-size={shared} "
                                           f"is not divisible by --tensor-model-parallel-size={tp}")
    if arch.add_bias_linear:
        errors += _check(etp == 1, f"{prefix}num-experts with linear biases needs "
                                   "--expert-tensor-parallel-size 1 (or --disable-bias-linear)")
    return errors


def moe_student_rules(student: ModelArchConfig, par: ParallelConfig) -> List[str]:
    """What training a MoE student adds: megatron-core's MoE layer refuses to train at TP > 1
    without sequence parallelism (a frozen teacher or generation does not need it)."""
    if student.num_experts is None or par.tensor_model_parallel_size == 1:
        return []
    return _check(par.sequence_parallel, "a MoE student (--num-experts) at "
                                         "--tensor-model-parallel-size > 1 needs "
                                         "--sequence-parallel")


def data_rules(data: DataConfig, tp: int) -> List[str]:
    """Vocabulary, sequence and data-source rules (files are read by the preflight)."""
    return vocab_rules(data, tp) + data_source_rules(data)


def vocab_rules(data: DataConfig, tp: int) -> List[str]:
    """The tokenizer, the vocabulary widths and the sequence length."""
    errors = _check(data.max_position_embeddings >= data.seq_length,
                    f"--max-position-embeddings={data.max_position_embeddings} is smaller than "
                    f"--seq-length={data.seq_length}")
    if data.tokenizer_type == "NullTokenizer":
        errors += _check(data.vocab_size is not None,
                         "--vocab-size is required with --tokenizer-type NullTokenizer")
    elif data.tokenizer_model is None:
        errors.append(f"--tokenizer-type {data.tokenizer_type} needs --tokenizer-model")
    if data.teacher_vocab_size is not None and data.teacher_vocab_size != data.vocab_size:
        errors.append(f"teacher and student vocab sizes differ: --teacher-vocab-size="
                      f"{data.teacher_vocab_size} vs --vocab-size={data.vocab_size}; "
                      "distillation needs one tokenizer")
    if data.padded_vocab_size is not None:
        errors += _check(data.padded_vocab_size % tp == 0,
                         f"--padded-vocab-size={data.padded_vocab_size} must be divisible by "
                         f"--tensor-model-parallel-size={tp}")
        if data.tokenizer_type == "NullTokenizer" and data.vocab_size is not None:
            errors += _check(data.padded_vocab_size >= data.vocab_size + 1,
                             f"--padded-vocab-size={data.padded_vocab_size} is smaller than the "
                             f"vocabulary (--vocab-size {data.vocab_size} + EOD)")
    return errors


def data_source_rules(data: DataConfig) -> List[str]:
    sources = int(bool(data.mock_data)) + int(data.data_path is not None)
    if sources != 1:
        return ["no data source: pass --data-path (or --mock-data)" if sources == 0 else
                "--mock-data and --data-path are mutually exclusive"]
    errors: List[str] = []
    if data.pack_sequences and data.dataset_format != "chat":
        errors.append("--pack-sequences needs --dataset-format chat")
    if (data.prompt_key is None) != (data.response_key is None):
        errors.append("--prompt-key and --response-key must be given together")
    if data.mock_data:
        return errors
    if data.dataset_format == "chat" and data.tokenizer_type == "NullTokenizer":
        errors.append("--dataset-format chat needs a text tokenizer: --tokenizer-type "
                      "SentencePieceTokenizer or HuggingFaceTokenizer")
    for parse, value in ((parse_split, data.split), (parse_blend, data.data_path)):
        try:
            parse(value)
        except ValueError as error:
            errors.append(str(error))
    return errors


def batch_rules(training: TrainingConfig, dp: int) -> List[str]:
    mbs, gbs = training.micro_batch_size, training.global_batch_size
    return _check(gbs % (mbs * dp) == 0,
                  f"--global-batch-size={gbs} is not a multiple of --micro-batch-size ({mbs}) x "
                  f"data-parallel size ({dp})")


def schedule_rules(training: TrainingConfig) -> List[str]:
    decay = training.decay_iters
    errors = _check(training.lr_warmup_iters == 0 or training.lr_warmup_iters < decay,
                    f"--lr-warmup-iters={training.lr_warmup_iters} must be smaller than "
                    f"--lr-decay-iters (default --train-iters) = {decay}")
    if training.skip_nonfinite_iterations:
        errors += _check(training.check_for_nan_in_loss_and_grad,
                         "--skip-nonfinite-iterations needs the non-finite check: drop "
                         "--no-check-for-nan-in-loss-and-grad")
    return errors


def kd_rules(kd: KDConfig, data: DataConfig) -> List[str]:
    errors: List[str] = []
    if kd.topk is not None and data.tokenizer_type == "NullTokenizer" and data.vocab_size:
        errors += _check(kd.topk <= data.vocab_size + 1,
                         f"--kd-topk={kd.topk} exceeds the vocabulary ({data.vocab_size + 1} "
                         "tokens: --vocab-size + EOD)")
    if kd.topk is None and kd.topk_renormalize:
        errors.append("--kd-topk-renormalize needs --kd-topk")
    return errors


def checkpoint_rules(ckpt: CheckpointConfig) -> List[str]:
    """Save/load/exit flags: intervals need --save, load options need --load."""
    errors: List[str] = []
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


def teacher_cache_rules(ckpt: CheckpointConfig, kd: KDConfig,
                        eval_config: Optional[EvalConfig]) -> List[str]:
    """``--teacher-cache`` replaces the teacher: what it excludes and needs."""
    if ckpt.teacher_cache is None:
        return []
    errors = _check(ckpt.teacher_load is None, "--teacher-cache and --teacher-load exclude each "
                                               "other (the cache replaces the teacher)")
    errors += _check(kd.topk is not None, "--teacher-cache needs --kd-topk (the cache holds the "
                                          "teacher's top-k)")
    errors += _check(kd.loss_weight > 0, "--teacher-cache needs --kd-loss-weight > 0")
    if eval_config is not None:
        errors += _check(eval_config.interval is None,
                         "--teacher-cache covers the train split only: drop --eval-interval "
                         "(or distill with --teacher-load)")
    return errors


def logging_rules(logging_config: LoggingConfig) -> List[str]:
    errors: List[str] = []
    for flag, value in (("--wandb-exp-name", logging_config.wandb_exp_name),
                        ("--wandb-save-dir", logging_config.wandb_save_dir)):
        errors += _check(value is None or logging_config.wandb_project is not None,
                         f"{flag} needs --wandb-project")
    return errors


def student_data_rules(student_data: StudentDataConfig, kd: KDConfig, data: DataConfig,
                       ckpt: CheckpointConfig, eval_config: EvalConfig) -> List[str]:
    """The student's own samples need chat prompts and a live teacher to score them;
    DistiLLM's schedule needs validation. (Room after each prompt: the preflight reads the
    prompts; an answer is cut to the room its prompt leaves in --seq-length.)"""
    errors: List[str] = []
    uses = [(flag, on) for flag, on in (
        ("--kd-student-data-fraction", student_data.fraction > 0),
        ("--kd-adaptive-sgo", student_data.adaptive),
        ("--eval-generate", eval_config.generate > 0)) if on]
    if not uses:
        return errors
    if student_data.fraction > 0 and student_data.adaptive:
        errors.append("--kd-student-data-fraction and --kd-adaptive-sgo exclude each other "
                      "(GKD's mix or DistiLLM's schedule)")
    for flag, _ in uses:
        if data.mock_data or data.dataset_format != "chat":
            errors.append(f"{flag} needs prompts and responses: --dataset-format chat "
                          "(pretraining data has no prompts to answer)")
        if data.pack_sequences:
            errors.append(f"{flag} does not work with --pack-sequences")
    if student_data.enabled:
        errors += _check(kd.loss_weight > 0 and ckpt.teacher_cache is None,
                         "the student's own samples need a live teacher to score them: "
                         "--kd-loss-weight > 0 and --teacher-load, not --teacher-cache")
    if student_data.adaptive:
        errors += _check(eval_config.interval is not None,
                         "--kd-adaptive-sgo needs --eval-interval (phi follows validation CE)")
    if eval_config.generate > 0:
        errors += _check(eval_config.interval is not None, "--eval-generate needs --eval-interval")
    return errors


def prompt_rules(data: DataConfig) -> List[str]:
    """Prompt files are chat JSONL: a prompt key comes with a response key."""
    return _check((data.prompt_key is None) == (data.response_key is None),
                  "--prompt-key and --response-key must be given together")


def teacher_window_rules(kd: KDConfig, training: TrainingConfig, par: ParallelConfig
                         ) -> List[str]:
    """With virtual pipeline stages megatron-core's interleaved schedule needs at least PP
    microbatches per call, so every teacher window must hold that many."""
    pp = par.pipeline_model_parallel_size
    if not kd.teacher_window or par.num_layers_per_virtual_pipeline_stage is None or pp == 1:
        return []
    num_microbatches = training.global_batch_size // (
        training.micro_batch_size * par.data_parallel_size)
    window = min(kd.teacher_window, num_microbatches)
    sizes = [window] * (num_microbatches // window) + (
        [num_microbatches % window] if num_microbatches % window else [])
    return _check(min(sizes) >= pp,
                  f"--kd-teacher-window={kd.teacher_window}: with virtual pipeline stages every "
                  f"window needs at least --pipeline-model-parallel-size ({pp}) microbatches; "
                  f"the {num_microbatches} microbatches per rank would run as windows of {sizes}")


def intermediate_kd_rules(kd: KDConfig, student: ModelArchConfig, teacher: ModelArchConfig,
                          ckpt: CheckpointConfig) -> List[str]:
    """``--kd-intermediate-pairs``: well-formed 1-based layer numbers within each model, one
    teacher layer per student layer, and a live teacher (a ``--teacher-cache`` holds only the
    top-k of the teacher's logits, no hidden states)."""
    if kd.intermediate_pairs is None:
        return []
    try:
        pairs = kd.layer_pairs
    except ValueError as error:
        return [str(error)]
    if not pairs:
        return ["--kd-intermediate-pairs is empty: give STUDENT_LAYER:TEACHER_LAYER pairs, "
                "e.g. 3:7,5:15"]
    errors: List[str] = []
    for student_layer, teacher_layer in pairs:
        for role, layer, arch, flag in (("student", student_layer, student, "--num-layers"),
                                        ("teacher", teacher_layer, teacher,
                                         "--teacher-num-layers")):
            errors += _check(1 <= layer <= arch.num_layers,
                             f"--kd-intermediate-pairs {student_layer}:{teacher_layer}: the "
                             f"{role} has no layer {layer} (layers are numbered 1.."
                             f"{arch.num_layers}, {flag}={arch.num_layers})")
    students = [s for s, _ in pairs]
    duplicates = sorted({s for s in students if students.count(s) > 1})
    errors += _check(not duplicates, f"--kd-intermediate-pairs names student layer(s) "
                                     f"{', '.join(map(str, duplicates))} more than once (one "
                                     "teacher layer per student layer)")
    errors += _check(ckpt.teacher_cache is None,
                     "--kd-intermediate-pairs needs a live teacher (--teacher-load), not "
                     "--teacher-cache (the cache holds only the teacher's top-k logits)")
    errors += _check(kd.loss_weight > 0, "--kd-intermediate-pairs needs --kd-loss-weight > 0 "
                                         "(with 0 no teacher is built)")
    return errors


def sliding_window_rules(arch: ModelArchConfig, seq_length: int, teacher: bool = False
                         ) -> List[str]:
    """A model converted with an attention window (Mistral/Mixtral ``sliding_window``) runs
    with full causal attention, which is the same function only up to the window."""
    window = arch.sliding_window
    which = "the teacher's" if teacher else "the model's"
    return _check(window is None or seq_length <= window,
                  f"--seq-length={seq_length} exceeds {which} sliding attention window "
                  f"({window} tokens, from its megakd_model.json): megatron's GPTModel attends "
                  "to the whole causal context, so longer sequences would not compute what the "
                  f"model was trained to; use --seq-length <= {window}")
