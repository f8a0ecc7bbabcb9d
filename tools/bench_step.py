#!/usr/bin/env python
"""Per-step time breakdown of a megakd training step: SFT, teacher alone, KD dense and top-k.

All variants run in one launch on the same ranks, the same student (DDP + optimizer) and the
same teacher, interleaved over ``--repeats`` repetitions (the order rotates each repetition):

* ``SFT``             ``train_step`` with ``--kd-loss-weight 0``: no teacher pass, CE only
* ``teacher fwd``     the teacher's forward-only schedule alone (dense runner: logits kept)
* ``KD dense``        ``train_step``: teacher pass + student forward-backward with dense KD + CE
* ``KD top-k bf16``   same with ``--kd-topk 64 --kd-topk-dtype bf16`` (teacher pass keeps top-k)
* ``KD top-k fp8``    same with ``--kd-topk-dtype fp8``

The variants share one ``setup()`` (the KD-dense configuration); each variant swaps the
step's :class:`DistillationLoss` and teacher runner (``None`` for SFT), built from that
variant's own parsed flags. What is measured, per rank and step:

* **step**: wall time of the step after a barrier (the table shows the maximum over ranks);
* **phases**: ``train_step``'s timers (``teacher-forward``, ``forward-backward``,
  ``optimizer``), recorded by a Timers-compatible object with ``perf_counter``;
* **loss**: the student's loss function (CE + KD) forward, timed around the call, and its
  backward, from a hook on the returned loss (backward reaches it) to a hook on the student
  logits (their gradient is complete); KD divergence forward alone; teacher top-k selection;
* **comm/wait**: time inside ``torch.distributed`` calls (collectives, p2p ``isend``/``irecv``
  and the ``wait()`` of their requests). It is communication *plus waiting for the peer*:
  pipeline bubbles, load imbalance and, on an oversubscribed CPU, the peer's compute time.

On CUDA (``--device cuda``) every clock reading synchronizes the device; the report adds
tokens/s, MFU (model FLOPs over ``--peak-tflops`` per GPU) and peak memory
(``torch.cuda.max_memory_allocated``, teacher weights resident in every variant).

Usage:
  python tools/bench_step.py                       # CPU preset: TP=2 x PP=2 on 4 gloo ranks
  python tools/bench_step.py --write-docs          # also regenerate docs/performance.md's section
  python tools/bench_step.py --preset gpu-1b-3b --device cuda --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megakd.runtime.launcher import free_local_port  # noqa: E402
from megakd.runtime.machine import cpu_model  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
VARIANTS = ("SFT", "teacher fwd", "KD dense", "KD top-k bf16", "KD top-k fp8",
            "KD dense, no NaN check")
PHASES = ("batch-generator", "teacher-forward", "forward-backward", "optimizer")
COMM_FUNCTIONS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                  "reduce_scatter_tensor", "broadcast", "isend", "irecv", "send", "recv",
                  "batch_isend_irecv")


@dataclass
class Sizes:
    """Model and batch shapes of one benchmark configuration."""

    student_layers: int
    student_hidden: int
    student_ffn: int
    student_heads: int
    student_groups: int
    teacher_layers: int
    teacher_hidden: int
    teacher_ffn: int
    teacher_heads: int
    teacher_groups: int
    vocab: int  # tokenizer entries including EOD (NullTokenizer gets --vocab-size vocab - 1)
    seq: int
    mbs: int
    gbs: int
    tp: int
    pp: int
    bf16: bool


PRESETS: Dict[str, Sizes] = {
    # Big enough that matmuls and the vocab-sized loss dominate launch overhead on a CPU,
    # small enough that the whole run takes a few minutes on 2 cores.
    "cpu": Sizes(4, 256, 1024, 4, 4, 8, 512, 2048, 8, 8, 32000, 256, 2, 8, 2, 2, False),
    # Llama-3.2-1B-like student and Llama-3.2-3B-like teacher, 128k vocab, one GPU, bf16.
    "gpu-1b-3b": Sizes(16, 2048, 8192, 32, 8, 28, 3072, 8192, 24, 8, 128256, 4096, 1, 8, 1, 1,
                       True),
}


# ------------------------------------------------------------------------------- measuring
class Clock:
    """``perf_counter``, after a device synchronize on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class StepMeter:
    """Accumulates one step's measurements on this rank (all times in seconds)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.phase: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        self.phases: Dict[str, float] = {}
        self.comm: Dict[str, float] = {}
        self.loss_fwd = self.loss_bwd = self.kd_fwd = self.topk_select = 0.0
        self._bwd_start: Optional[float] = None

    def add(self, table: Dict[str, float], key: str, seconds: float) -> None:
        table[key] = table.get(key, 0.0) + seconds


class _PhaseTimer:
    def __init__(self, meter: StepMeter, name: str) -> None:
        self.meter, self.name, self.t0 = meter, name, 0.0

    def start(self, barrier: bool = False) -> None:
        self.meter.phase = self.name
        self.t0 = self.meter.clock()

    def stop(self, barrier: bool = False) -> None:
        self.meter.add(self.meter.phases, self.name, self.meter.clock() - self.t0)
        self.meter.phase = None


class PhaseTimers:
    """The part of megatron-core's ``Timers`` interface ``train_step`` uses; also tells the
    communication meter which phase is running."""

    def __init__(self, meter: StepMeter) -> None:
        self.meter = meter
        self.timers: Dict[str, _PhaseTimer] = {}

    def __call__(self, name: str, log_level: int = 0) -> _PhaseTimer:
        return self.timers.setdefault(name, _PhaseTimer(self.meter, name))


class _TimedWork:
    """A ``torch.distributed`` request whose ``wait()`` counts as communication time."""

    def __init__(self, work, record: Callable[[float], None], clock: Clock) -> None:
        self._work, self._record, self._clock = work, record, clock

    def wait(self, *args, **kwargs):
        t0 = self._clock()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._record(self._clock() - t0)

    def __getattr__(self, name: str):
        return getattr(self._work, name)


def install_comm_meter(meter: StepMeter) -> Callable[[], None]:
    """Patch ``torch.distributed``'s communication functions to add their time (and the
    ``wait()`` of returned requests) to ``meter.comm[phase]``. Returns an unpatched barrier."""
    dist = torch.distributed
    depth = [0]  # batch_isend_irecv calls the (patched) isend/irecv: count the outer call only

    def record(seconds: float) -> None:
        meter.add(meter.comm, meter.phase or "other", seconds)

    def wrap(fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            depth[0] += 1
            t0 = meter.clock()
            try:
                result = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    record(meter.clock() - t0)
            if depth[0] > 0 or result is None:
                return result
            if isinstance(result, list):
                return [_TimedWork(w, record, meter.clock) for w in result]
            return _TimedWork(result, record, meter.clock) if hasattr(result, "wait") else result
        return timed

    barrier = dist.barrier
    c10d = dist.distributed_c10d  # P2POp checks its op against c10d's own isend/irecv
    for name in COMM_FUNCTIONS:
        if hasattr(dist, name):
            timed = wrap(getattr(dist, name))
            setattr(dist, name, timed)
            if hasattr(c10d, name):
                setattr(c10d, name, timed)
    return barrier


class TimedLoss:
    """Wraps a :class:`DistillationLoss`: times its forward, its backward (hooks) and the KD
    divergence's forward; everything else is delegated."""

    def __init__(self, loss, meter: StepMeter) -> None:
        self.inner, self.meter = loss, meter
        divergence = loss.divergence

        def timed_divergence(student_logits, teacher):
            t0 = meter.clock()
            out = divergence(student_logits, teacher)
            meter.kd_fwd += meter.clock() - t0
            return out

        loss.divergence = timed_divergence

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, batch, teacher_output, counts, student_logits):
        meter = self.meter

        def backward_start(grad):
            meter._bwd_start = meter.clock()

        def backward_end(grad):
            if meter._bwd_start is not None:
                meter.loss_bwd += meter.clock() - meter._bwd_start
                meter._bwd_start = None

        t0 = meter.clock()
        out = self.inner(batch, teacher_output, counts, student_logits)
        meter.loss_fwd += meter.clock() - t0
        if out[0].requires_grad and student_logits.requires_grad:
            out[0].register_hook(backward_start)
            student_logits.register_hook(backward_end)
        return out


def time_topk_selection(runner, meter: StepMeter) -> None:
    """Time the teacher runner's last-stage reduction (top-k selection; identity when dense)."""
    keep = runner._keep

    def timed_keep(logits, non_loss_data: bool = True):
        t0 = meter.clock()
        out = keep(logits, non_loss_data)
        meter.topk_select += meter.clock() - t0
        return out

    runner._keep = timed_keep


# ---------------------------------------------------------------------------------- worker
def run_argv(sizes: Sizes, variant: str, args: argparse.Namespace, world: int) -> List[str]:
    """megakd flags for ``variant`` (``SFT``/``teacher fwd`` share the KD-dense model flags)."""
    kd = {"SFT": ["--kd-loss-weight", "0"],
          "KD top-k bf16": ["--kd-topk", str(args.topk), "--kd-topk-dtype", "bf16"],
          "KD top-k fp8": ["--kd-topk", str(args.topk), "--kd-topk-dtype", "fp8"],
          "KD dense, no NaN check": ["--no-check-for-nan-in-loss-and-grad"]}.get(variant, [])
    steps = (args.warmup + args.repeats) * len(VARIANTS) + 1
    argv = [
        "--tensor-model-parallel-size", str(sizes.tp),
        "--pipeline-model-parallel-size", str(sizes.pp),
        "--num-layers", str(sizes.student_layers), "--hidden-size", str(sizes.student_hidden),
        "--ffn-hidden-size", str(sizes.student_ffn),
        "--num-attention-heads", str(sizes.student_heads),
        "--teacher-num-layers", str(sizes.teacher_layers),
        "--teacher-hidden-size", str(sizes.teacher_hidden),
        "--teacher-ffn-hidden-size", str(sizes.teacher_ffn),
        "--teacher-num-attention-heads", str(sizes.teacher_heads),
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear",
        "--seq-length", str(sizes.seq), "--micro-batch-size", str(sizes.mbs),
        "--global-batch-size", str(sizes.gbs), "--train-iters", str(steps),
        "--lr", "1e-5", "--lr-decay-style", "constant", "--seed", "1234",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(sizes.vocab - 1),
        "--kd-loss", "fkl", "--kd-loss-weight", str(args.kd_loss_weight),
        "--device", args.device, *kd,
    ]
    if sizes.student_groups != sizes.student_heads or sizes.teacher_groups != sizes.teacher_heads:
        argv += ["--group-query-attention", "--num-query-groups", str(sizes.student_groups),
                 "--teacher-num-query-groups", str(sizes.teacher_groups)]
    if sizes.bf16:
        argv.append("--bf16")
    return argv


def _worker(local_rank: int, world: int, port: int, sizes: Sizes, args: argparse.Namespace,
            out_dir: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"
    warnings.filterwarnings("ignore")

    from megatron.core import parallel_state

    from megakd.data import iteration_microbatches
    from megakd.distill import DistillationLoss, LiveTeacher
    from megakd.preflight import parse_pretrain_args
    from megakd.runtime import initialize_for
    from megakd.training import setup
    from megakd.training.loop import train_step

    configs = {v: parse_pretrain_args(run_argv(sizes, v, args, world), world_size=world)
               for v in VARIANTS}
    base = configs["KD dense"]
    runtime = initialize_for(base.parallel, base.runtime, base.training.seed,
                             base.student.num_layers)
    cuda = runtime.device.type == "cuda"
    meter = StepMeter(Clock(cuda))
    barrier = install_comm_meter(meter)
    state = setup(base, runtime, log=lambda *a, **k: None)
    timers = PhaseTimers(meter)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    losses, runners = {}, {}
    for variant, config in configs.items():
        losses[variant] = TimedLoss(DistillationLoss(config.kd, state.vocab.valid, tp_group),
                                    meter)
        if variant != "SFT":
            runners[variant] = LiveTeacher(state.teacher.chunks, config.kd, state.vocab.valid,
                                           sizes.seq, sizes.mbs)
            time_topk_selection(runners[variant], meter)

    def one_step(variant: str) -> None:
        if variant == "teacher fwd":  # the teacher's forward-only schedule alone
            microbatches = iteration_microbatches(
                state.train_dataset, state.consumed_samples, sizes.gbs, sizes.mbs,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(), runtime.device)
            with_timer = timers("teacher-forward", log_level=1)
            with_timer.start()
            runners[variant].outputs(microbatches)
            with_timer.stop()
            return
        state.step.loss = losses[variant]
        state.step.teacher = runners.get(variant)
        state.config.training.check_for_nan_in_loss_and_grad = \
            configs[variant].training.check_for_nan_in_loss_and_grad
        train_step(state, timers)

    records = []
    for rep in range(-args.warmup, args.repeats):
        shift = rep % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:  # rotate: no fixed position
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            barrier()
            meter.reset()
            t0 = meter.clock()
            one_step(variant)
            step_s = meter.clock() - t0
            if rep < 0:
                continue
            records.append({
                "variant": variant, "rep": rep, "step": step_s, "phases": dict(meter.phases),
                "comm": dict(meter.comm), "loss_fwd": meter.loss_fwd, "loss_bwd": meter.loss_bwd,
                "kd_fwd": meter.kd_fwd, "topk_select": meter.topk_select,
                "peak_mem": torch.cuda.max_memory_allocated() if cuda else None,
            })
    barrier()
    Path(out_dir, f"rank{local_rank}.json").write_text(json.dumps(records))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()



def run_benchmark(sizes: Sizes, args: argparse.Namespace) -> List[List[dict]]:
    """Launch ``tp * pp`` ranks; returns each rank's list of per-step records."""
    world = sizes.tp * sizes.pp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, free_local_port(), sizes, args, tmp), nprocs=world,
                           join=True, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


# -------------------------------------------------------------------------------- analysis
def forward_flops_per_token(layers: int, hidden: int, ffn: int, heads: int, groups: int,
                            vocab: int, seq: int) -> float:
    """Matmul FLOPs of one token's forward pass (SwiGLU MLP, GQA, full s x s attention
    scores, output layer; embeddings and norms not counted)."""
    head_dim = hidden // heads
    qkv_o = 2 * hidden * (heads * head_dim + 2 * groups * head_dim) + 2 * heads * head_dim * hidden
    attention = 2 * 2 * seq * heads * head_dim
    mlp = 2 * 3 * hidden * ffn
    return layers * (qkv_o + attention + mlp) + 2 * hidden * vocab


def step_flops(sizes: Sizes, variant: str) -> float:
    """Model FLOPs of one step: 3x forward for the student's training, 1x for the teacher."""
    tokens = sizes.gbs * sizes.seq
    student = forward_flops_per_token(sizes.student_layers, sizes.student_hidden,
                                      sizes.student_ffn, sizes.student_heads,
                                      sizes.student_groups, sizes.vocab, sizes.seq)
    teacher = forward_flops_per_token(sizes.teacher_layers, sizes.teacher_hidden,
                                      sizes.teacher_ffn, sizes.teacher_heads,
                                      sizes.teacher_groups, sizes.vocab, sizes.seq)
    if variant == "SFT":
        return 3 * student * tokens
    if variant == "teacher fwd":
        return teacher * tokens
    return (3 * student + teacher) * tokens


def summarize(per_rank: List[List[dict]], sizes: Sizes, args: argparse.Namespace) -> dict:
    """Medians over repetitions: step time (max over ranks), the last rank's breakdown, each
    rank's comm/wait, and the per-repetition ratios KD / (SFT + teacher fwd)."""
    last = per_rank[-1]
    steps: Dict[str, Dict[int, float]] = {v: {} for v in VARIANTS}
    for records in per_rank:
        for r in records:
            steps[r["variant"]][r["rep"]] = max(steps[r["variant"]].get(r["rep"], 0.0), r["step"])
    rows = {}
    for variant in VARIANTS:
        mine = [r for r in last if r["variant"] == variant]

        def med(fn: Callable[[dict], float]) -> float:
            return statistics.median(fn(r) for r in mine)

        row = {
            "step": statistics.median(steps[variant].values()),
            "teacher": med(lambda r: r["phases"].get("teacher-forward", 0.0)),
            "topk_select": med(lambda r: r["topk_select"]),
            "fwd_bwd": med(lambda r: r["phases"].get("forward-backward", 0.0)),
            "student": med(lambda r: r["phases"].get("forward-backward", 0.0)
                           - r["loss_fwd"] - r["loss_bwd"]),
            "loss": med(lambda r: r["loss_fwd"] + r["loss_bwd"]),
            "loss_fwd": med(lambda r: r["loss_fwd"]),
            "loss_bwd": med(lambda r: r["loss_bwd"]),
            "kd_fwd": med(lambda r: r["kd_fwd"]),
            "optimizer": med(lambda r: r["phases"].get("optimizer", 0.0)),
            "comm_by_rank": [statistics.median(sum(r["comm"].values()) for r in records
                                               if r["variant"] == variant)
                             for records in per_rank],
            "comm_by_phase": {p: med(lambda r: r["comm"].get(p, 0.0))
                              for p in PHASES + ("other",)},
            "tokens_per_s": sizes.gbs * sizes.seq / statistics.median(steps[variant].values()),
        }
        peaks = [r["peak_mem"] for records in per_rank for r in records
                 if r["variant"] == variant and r["peak_mem"] is not None]
        row["peak_mem_gib"] = max(peaks) / 2**30 if peaks else None
        if args.peak_tflops:
            row["mfu"] = step_flops(sizes, variant) / row["step"] / (
                args.peak_tflops * 1e12 * sizes.tp * sizes.pp)
        rows[variant] = row
    ratios = {}
    for variant in ("KD dense", "KD top-k bf16", "KD top-k fp8"):
        per_rep = [steps[variant][rep] / (steps["SFT"][rep] + steps["teacher fwd"][rep])
                   for rep in sorted(steps[variant])]
        base = rows["SFT"]["step"] + rows["teacher fwd"]["step"]
        # Work a KD step does beyond SFT + teacher, all on the last stage (critical path):
        # the KD part of the loss (vs. the SFT row's CE) and the teacher's top-k selection.
        extra = rows[variant]["loss"] - rows["SFT"]["loss"] + rows[variant]["topk_select"]
        ratios[variant] = {"median": statistics.median(per_rep), "min": min(per_rep),
                           "max": max(per_rep), "of_medians": rows[variant]["step"] / base,
                           "extra": extra, "expected": 1.0 + extra / base}
    # The non-finite check's cost (issue 17): KD dense with / without it, per repetition.
    unchecked = "KD dense, no NaN check"
    check_per_rep = [steps["KD dense"][rep] / steps[unchecked][rep]
                     for rep in sorted(steps[unchecked])]
    ratios["nan_check"] = {"median": statistics.median(check_per_rep),
                           "min": min(check_per_rep), "max": max(check_per_rep)}
    return {"rows": rows, "ratios": ratios}


# -------------------------------------------------------------------------------- report

def machine_line(device: str) -> str:
    import megatron.core

    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ", no GPU"
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{cpu_model()}, {os.cpu_count()} cores{mem}{gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}, megatron-core {megatron.core.__version__}")


def render(result: dict, sizes: Sizes, args: argparse.Namespace, command: str,
           load: Sequence[float], wall_s: float) -> str:
    """The markdown report (also what ``--write-docs`` puts between the markers)."""
    rows, ratios = result["rows"], result["ratios"]
    world = sizes.tp * sizes.pp
    cuda = args.device == "cuda"
    ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
    lines = [
        f"Machine: {machine_line(args.device)}.",
        f"Load average (1 min) before / after the run: {load[0]:.1f} / {load[1]:.1f}; "
        f"the run took {wall_s / 60:.1f} min.",
        "",
        f"Shapes: TP={sizes.tp} × PP={sizes.pp} ({world} rank{'s' * (world > 1)}, DP=1), "
        f"student {sizes.student_layers} layers × hidden {sizes.student_hidden} "
        f"(FFN {sizes.student_ffn}, {sizes.student_heads} heads), teacher "
        f"{sizes.teacher_layers} layers × hidden {sizes.teacher_hidden} (FFN {sizes.teacher_ffn}, "
        f"{sizes.teacher_heads} heads), RMSNorm, SwiGLU, RoPE, vocab {sizes.vocab} "
        f"(V/tp = {sizes.vocab // sizes.tp}), seq {sizes.seq}, micro-batch {sizes.mbs}, "
        f"global batch {sizes.gbs} ({sizes.gbs // sizes.mbs} microbatches), "
        f"{'bf16' if sizes.bf16 else 'fp32'}; fkl, T = 1, --kd-loss-weight "
        f"{args.kd_loss_weight} (KD rows: KD and CE both back-propagated), top-k k = {args.topk}. "
        f"{args.repeats} repetitions after {args.warmup} warm-up, variants interleaved "
        f"(order rotated each repetition); medians.",
        "",
        "| variant | step ms | teacher fwd ms (top-k select) | student fwd+bwd ms excl. loss "
        "| loss fwd+bwd ms (fwd / bwd; KD fwd) | optimizer ms | comm/wait ms, last rank "
        "| comm/wait ms, ranks 0..N-1 |" + (" tokens/s | MFU | peak GiB |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if cuda else ""),
    ]
    for variant in VARIANTS:
        r = rows[variant]
        teacher = (f"{ms(r['teacher'])} ({ms(r['topk_select'])})" if variant != "SFT" else "–")
        student = ms(r["student"]) if r["fwd_bwd"] else "–"
        loss = (f"{ms(r['loss'])} ({ms(r['loss_fwd'])} / {ms(r['loss_bwd'])}; "
                f"{ms(r['kd_fwd'])})" if r["fwd_bwd"] else "–")
        optimizer = ms(r["optimizer"]) if r["optimizer"] else "–"
        comm_last = ms(sum(r["comm_by_phase"].values()))
        comm_ranks = " / ".join(ms(c) for c in r["comm_by_rank"])
        line = (f"| {variant} | **{ms(r['step'])}** | {teacher} | {student} | {loss} "
                f"| {optimizer} | {comm_last} | {comm_ranks} |")
        if cuda:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–"
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "–"
            line += f" {r['tokens_per_s']:.0f} | {mfu} | {peak} |"
        lines.append(line)
    lines += ["", "KD step / (SFT step + teacher forward-only step), median of the per-repetition "
              "ratios [min – max] (ratio of the medians); then the KD-only work on the last stage "
              "(KD loss fwd+bwd = loss column minus SFT's, plus top-k select) and the ratio it "
              "alone would give, 1 + work / (SFT + teacher fwd):", ""]
    for variant, q in ratios.items():
        if variant == "nan_check":
            continue
        lines.append(f"* **{variant}: {q['median']:.3f}** [{q['min']:.3f} – {q['max']:.3f}] "
                     f"({q['of_medians']:.3f}); KD-only work {ms(q['extra'])} ms → "
                     f"{q['expected']:.3f}")
    q = ratios["nan_check"]
    lines += ["", f"The non-finite check (one asynchronous 2-value all-reduce overlapping the "
              f"gradient norm): KD dense step with / without it, median of the per-repetition "
              f"ratios **{q['median']:.3f}** [{q['min']:.3f} – {q['max']:.3f}].",
              "", f"Command: `{command}`"]
    return "\n".join(lines)


def write_docs(body: str, device: str) -> None:
    """Replace the text between this device's markers in docs/performance.md (appended with
    its markers when absent)."""
    begin, end = f"<!-- bench_step:{device}:begin -->", f"<!-- bench_step:{device}:end -->"
    text = DOC.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="shapes (default: cpu, or gpu-1b-3b with --device cuda)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    for field in Sizes.__dataclass_fields__:
        if field != "bf16":
            parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                                help="override the preset")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--kd-loss-weight", type=float, default=0.5)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak (e.g. 989 for H100 SXM dense bf16) for MFU")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace the '{{device}}' section of {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron-core's apex/TE fallback notes

    preset = PRESETS[args.preset or ("gpu-1b-3b" if args.device == "cuda" else "cpu")]
    overrides = {k: getattr(args, k) for k in Sizes.__dataclass_fields__
                 if getattr(args, k) is not None}
    sizes = Sizes(**{**asdict(preset), **overrides})
    command = "python tools/bench_step.py " + " ".join(sys.argv[1:])
    print(f"machine: {machine_line(args.device)}", flush=True)
    print(f"sizes: {sizes}", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    per_rank = run_benchmark(sizes, args)
    body = render(summarize(per_rank, sizes, args), sizes, args, command.strip(),
                  (load0, os.getloadavg()[0]), time.perf_counter() - t0)
    print(body)
    if args.write_docs:
        write_docs(body, args.device)
        print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
