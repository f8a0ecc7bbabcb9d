"""Validation (--eval-interval/--eval-iters) and observability (TensorBoard, W&B, timers,
throughput, progress) on real gloo process groups.

World sizes 1 and 4 are each launched once. Every layout loads the same initial weights; the
teacher's validation baseline must equal its CE computed independently (full TP=1 logits and
``torch.nn.functional.cross_entropy``), the student's validation losses at TP=2 x PP=2 must
equal TP=1's, and a run with validation must train bitwise like one without.
"""

from __future__ import annotations

import math
import re
import sys
import types

import pytest

from megakd.configs import ConfigError, KDConfig
from megakd.training import observability
from megakd.training.evaluation import format_validation, validation_scalars
from tests import validation_workers
from tests.dist_harness import Task, run_tasks
from tests.e2e_workers import make_config

EVAL_FLAGS = validation_workers.EVAL_FLAGS
OBSERVE_FLAGS = ("--timing-log-level", "1", "--log-throughput")
RTOL = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("validation"))


@pytest.fixture(scope="module")
def world1(workdir):
    w = validation_workers
    tasks = [
        Task("save", w.save_init_worker, (workdir,)),
        Task("initial", w.initial_validation_worker, (workdir, 1, 1)),
        Task("independent_ce", w.independent_teacher_ce_worker, (workdir,)),
        Task("lm_only", w.train_worker, (workdir, 1, 1, (*EVAL_FLAGS, "--kd-loss-weight", "0"))),
    ]
    return run_tasks(1, tasks)[0]


@pytest.fixture(scope="module")
def world4(workdir, world1):
    """TP=2 x PP=2: initial validation, then the same four iterations with and without
    validation (both with TensorBoard, timers and throughput)."""
    with_eval = (*EVAL_FLAGS, *OBSERVE_FLAGS, "--tensorboard-dir", f"{workdir}/tb")
    without_eval = ("--train-iters", "4", "--log-interval", "1", *OBSERVE_FLAGS,
                    "--tensorboard-dir", f"{workdir}/tb_no_eval")
    w = validation_workers
    tasks = [
        Task("initial", w.initial_validation_worker, (workdir, 2, 2)),
        Task("with_eval", w.train_worker, (workdir, 2, 2, with_eval)),
        Task("without_eval", w.train_worker, (workdir, 2, 2, without_eval)),
    ]
    return run_tasks(4, tasks)


def _lines(logged):
    """What was logged, one printed line each (a log call may print several)."""
    return "\n".join(logged).splitlines()


def _blocks(logged):
    """Validation blocks in the log: ``{title: {name: value}}``, checking the rules."""
    lines, blocks = _lines(logged), {}
    for i, line in enumerate(lines):
        if "validation loss" not in line:
            continue
        rule = "-" * (len(line) + 1)
        assert lines[i - 1] == rule and lines[i + 1] == rule, (lines[i - 1:i + 2])
        title, *fields = [part.strip() for part in line.split("|") if part.strip()]
        blocks[title] = {name: float(value) for name, value in
                         (field.rsplit(": ", 1) for field in fields)}
    return blocks


# -------------------------------------------------------------------------------------------
# Multi-rank
# -------------------------------------------------------------------------------------------


def test_validation_blocks_at_tp2_pp2(world4):
    """Teacher baseline first, then after iteration 2 and at the end, finite, printed by the
    last rank only; PPL = exp(lm loss); the printed values are the recorded ones."""
    run = world4[-1]["with_eval"]
    blocks = _blocks(run["lines"])
    assert list(blocks) == [
        "teacher validation loss (baseline)",
        "validation loss at iteration 2",
        "validation loss at the end of training (iteration 4)",
    ]
    assert set(blocks["teacher validation loss (baseline)"]) == {"lm loss value", "lm loss PPL"}
    for title, values in blocks.items():
        assert all(math.isfinite(v) for v in values.values()), (title, values)
        assert values["lm loss PPL"] == pytest.approx(math.exp(values["lm loss value"]), rel=1e-5)
    recorded = [(it, model, losses) for it, model, losses in run["validations"]]
    assert [(it, model) for it, model, _ in recorded] == [(0, "teacher"), (2, "student"),
                                                         (4, "student")]
    for (_, _, losses), values in zip(recorded, blocks.values()):
        for name, value in losses.items():
            assert values[f"{name} value"] == pytest.approx(value, rel=1e-6)
    for title in list(blocks)[1:]:
        assert set(blocks[title]) == {"lm loss value", "lm loss PPL", "kd loss value"}
    for rank in world4[:-1]:
        assert not any("validation loss" in line for line in rank["with_eval"]["lines"])


def test_teacher_baseline_equals_independent_cross_entropy(world1, world4):
    expected = world1["independent_ce"]
    baselines = {
        "TP1 validator": world1["initial"]["teacher"]["lm loss"],
        "TP2xPP2 validator": world4[-1]["initial"]["teacher"]["lm loss"],
        "TP2xPP2 training run": world4[-1]["with_eval"]["validations"][0][2]["lm loss"],
    }
    for label, value in baselines.items():
        assert value == pytest.approx(expected, rel=RTOL), label


def test_student_validation_at_tp2_pp2_matches_tp1(world1, world4):
    ref, got = world1["initial"]["student"], world4[-1]["initial"]["student"]
    assert set(ref) == set(got) == {"lm loss", "kd loss"}
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=RTOL), name
    assert ref["kd loss"] > 0 and ref["lm loss"] > 1.0


def test_validation_does_not_change_training(world4):
    """Same losses and grad norms, bitwise, with and without validation, on every rank."""
    for rank, run in enumerate(world4):
        with_eval, without_eval = run["with_eval"], run["without_eval"]
        assert with_eval["losses"] == without_eval["losses"], f"rank {rank}"
        assert with_eval["grad_norms"] == without_eval["grad_norms"], f"rank {rank}"
    assert len(world4[-1]["with_eval"]["losses"]) == 4


def test_validation_without_teacher_reports_lm_loss_only(world1):
    run = world1["lm_only"]
    blocks = _blocks(run["lines"])
    assert list(blocks) == ["validation loss at iteration 2",
                            "validation loss at the end of training (iteration 4)"]
    for values in blocks.values():
        assert set(values) == {"lm loss value", "lm loss PPL"}
    assert [model for _, model, _ in run["validations"]] == ["student", "student"]


def test_timers_throughput_and_progress_in_log(world4):
    lines = _lines(world4[-1]["with_eval"]["lines"])
    log_lines = [line for line in lines if line.startswith(" iteration ")]
    assert len(log_lines) == 4
    for line in log_lines:
        tokens_per_s = float(re.search(r"throughput \(tokens/s\): ([\d.]+)", line).group(1))
        assert tokens_per_s > 0
    timer_block = lines[lines.index(log_lines[0]) + 1:lines.index(log_lines[0]) + 6]
    assert timer_block[0] == "(min, max) time across ranks (ms):"
    assert [t.split()[0] for t in timer_block[1:]] == list(observability.TRAINING_TIMERS)
    progress = [line for line in lines if line.startswith(" progress:")]
    assert len(progress) == 4 and progress[-1].startswith(" progress: 100.0% (4/4 iterations)")
    assert all("ETA: " in line for line in progress)


def test_tensorboard_event_files(world4, workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"{workdir}/tb")
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}
    expected = {"lm loss", "kd loss", "total loss", "learning-rate", "grad-norm",
                "tokens-per-sec", "iteration-time", "lm loss validation",
                "lm loss validation ppl", "kd loss validation", "teacher lm loss validation",
                "teacher lm loss validation ppl", "skipped-iterations"}
    expected |= {f"{name}-time" for name in observability.TRAINING_TIMERS}
    assert set(scalars) == expected
    run = world4[-1]["with_eval"]
    for step, losses in enumerate(run["losses"], start=1):
        assert scalars["lm loss"][step] == pytest.approx(losses["lm loss"], rel=1e-6)
        assert scalars["total loss"][step] == pytest.approx(
            0.5 * losses["lm loss"] + 0.5 * losses["kd loss"], rel=1e-6)
    (_, _, teacher), (_, _, at_2), (_, _, at_4) = run["validations"]
    assert scalars["lm loss validation"] == pytest.approx({2: at_2["lm loss"], 4: at_4["lm loss"]})
    assert scalars["kd loss validation"] == pytest.approx({2: at_2["kd loss"], 4: at_4["kd loss"]})
    assert scalars["teacher lm loss validation"] == pytest.approx(
        {0: teacher["lm loss"], 2: teacher["lm loss"], 4: teacher["lm loss"]})


# -------------------------------------------------------------------------------------------
# Single process
# -------------------------------------------------------------------------------------------


def test_format_validation_is_megatron_style():
    text = format_validation("validation loss at iteration 10",
                             {"lm loss": 4.5, "kd loss": 0.125})
    line = (" validation loss at iteration 10 | lm loss value: 4.500000E+00 | "
            "lm loss PPL: 9.001713E+01 | kd loss value: 1.250000E-01 | ")
    assert text == "\n".join(["-" * (len(line) + 1), line, "-" * (len(line) + 1)])
    assert validation_scalars({"lm loss": 1.0}, "teacher ") == pytest.approx(
        {"teacher lm loss validation": 1.0, "teacher lm loss validation ppl": math.e})


def combined_loss(kd: KDConfig, means):
    """The logged "total loss": ``KDConfig.objective`` of the reported token means."""
    return kd.objective(means.get("lm loss"), means.get("kd loss"))


def test_combined_loss_follows_kd_weight_and_temperature_scaling():
    means = {"lm loss": 2.0, "kd loss": 0.5}
    assert combined_loss(KDConfig(loss_weight=0.25), means) == pytest.approx(0.75 * 2 + 0.25 * 0.5)
    scaled = KDConfig(loss_weight=1.0, temperature=2.0, temperature_scaling=True)
    assert combined_loss(scaled, means) == pytest.approx(4 * 0.5)
    assert combined_loss(KDConfig(loss_weight=0.0), {"lm loss": 2.0}) == 2.0
    assert combined_loss(KDConfig(), {}) is None


class _FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_metrics_writers_fan_out_and_skip_missing_values():
    a, b = _FakeWriter(), _FakeWriter()
    writers = observability.MetricsWriters([a, b])
    writers.add_scalars({"lm loss": 1.5, "kd loss": None}, step=3)
    writers.close()
    assert a.scalars == b.scalars == [("lm loss", 1.5, 3)] and a.closed and b.closed
    assert not observability.MetricsWriters()


def test_wandb_writer_uses_megatron_flags(monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, values, step):
            calls.setdefault("log", []).append((values, step))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = make_config(1, 1, 1).logging
    config.wandb_project, config.wandb_exp_name, config.wandb_save_dir = "kd", "run-1", "/tmp/w"
    writer = observability.WandbWriter(config, {"kd": {"loss": "fkl"}})
    writer.add_scalar("lm loss", 2.0, 7)
    writer.close()
    assert calls["init"] == {"project": "kd", "name": "run-1", "dir": "/tmp/w",
                             "config": {"kd": {"loss": "fkl"}}}
    assert calls["log"] == [({"lm loss": 2.0}, 7)] and calls["finished"]


def test_throughput_and_progress_arithmetic(monkeypatch):
    assert observability.tokens_per_second(1024, [500.0, 1500.0]) == pytest.approx(1024.0)
    clock = iter([100.0, 130.0])
    monkeypatch.setattr(observability.time, "perf_counter", lambda: next(clock))
    meter = observability.ProgressMeter(train_iters=40, start_iteration=10)
    assert meter.line(20) == (" progress:  50.0% (20/40 iterations) | elapsed: 0:00:30 | "
                              "ETA: 0:01:00")


@pytest.mark.parametrize("flags, message", [
    (["--eval-interval", "0"], "--eval-interval must be positive"),
    (["--eval-interval", "5", "--eval-iters", "0"], "--eval-iters must be positive"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
    (["--wandb-save-dir", "x"], "--wandb-save-dir needs --wandb-project"),
])
def test_bad_eval_and_logging_flags_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(1, 1, 1, flags)


@pytest.mark.parametrize("flags, package", [
    (["--wandb-project", "kd"], "wandb"),
    (["--tensorboard-dir", "/tmp/tb"], "tensorboard"),
])
def test_missing_optional_package_fails_at_startup(monkeypatch, flags, package):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=re.escape(f"{flags[0]} needs the {package} package: "
                                                    f"pip install {package}")):
        make_config(1, 1, 1, flags)
