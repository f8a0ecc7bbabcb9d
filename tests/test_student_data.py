"""The student's own samples as training data (GKD, DistiLLM's adaptive off-policy schedule
with a replay buffer), tools/generate.py, and their refusals."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from megakd.configs import ConfigError, StudentDataConfig
from megakd.distill.student_data import (
    FRESH,
    REFERENCE,
    REPLAY,
    AdaptiveSchedule,
    ReplayBuffer,
    choose,
)
from megakd.preflight import parse_pretrain_args
from tests import data_workers
from tests import student_data_workers as w
from tests.dist_harness import Task, run_tasks
from tests.tool_launcher import collect, launch, start

LAST = -1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_workers.make_corpus(str(tmp_path_factory.mktemp("student_data")))


@pytest.fixture(scope="module")
def world4(corpus, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("student_data_runs"))
    sig = ["--exit-signal-handler"]
    return run_tasks(4, [
        Task("save", w.save_models, (corpus, d)),
        Task("plain", w.run, (corpus, d, [])),
        Task("lambda0", w.run, (corpus, d, [], None, True)),
        Task("gkd", w.run, (corpus, d, w.GKD)),
        Task("gkd_sig", w.run, (corpus, d, [*w.GKD, *sig, "--save", f"{d}/gkd"], 3)),
        Task("gkd_res", w.run, (corpus, d, [*w.GKD, *sig, "--load", f"{d}/gkd",
                                            "--save", f"{d}/gkd"])),
        Task("ada", w.run, (corpus, d, w.ADAPTIVE)),
        Task("ada_sig", w.run, (corpus, d, [*w.ADAPTIVE, *sig, "--save", f"{d}/ada"], 3)),
        Task("ada_res", w.run, (corpus, d, [*w.ADAPTIVE, *sig, "--load", f"{d}/ada",
                                            "--save", f"{d}/ada"])),
    ], timeout=1500)


def test_lambda_zero_equals_the_plain_off_policy_run_bitwise(world4):
    for rank in world4:
        assert rank["lambda0"]["losses"] == rank["plain"]["losses"]
        assert np.array_equal(rank["lambda0"]["params"], rank["plain"]["params"])


def test_gkd_mixes_student_samples_and_lowers_the_kd_loss(world4):
    run = world4[LAST]["gkd"]
    fresh = [int(d.get("fresh microbatches", 0)) for d in run["data"]]
    reference = [int(d.get("reference microbatches", 0)) for d in run["data"]]
    assert sum(fresh) > 0 and sum(reference) > 0  # lambda = 0.5 per microbatch
    assert all(d["generated tokens"] > 0 for d in run["data"] if d.get("fresh microbatches"))
    assert all(np.isfinite(losses["kd loss"]) for losses in run["losses"])
    (iteration, final), = run["validations"]  # at the end, on the same held-out window
    assert iteration == w.ITERS
    assert final["kd loss"] < run["kd_before"], (final["kd loss"], run["kd_before"])


@pytest.mark.parametrize("name", ["gkd", "ada"])
def test_resume_after_sigterm_is_bitwise(world4, name):
    for rank in world4:
        full, stopped, resumed = rank[name], rank[f"{name}_sig"], rank[f"{name}_res"]
        assert stopped["exit_reason"] == "SIGTERM" and stopped["iterations"] == [1, 2, 3]
        assert resumed["iterations"] == [4, 5, 6]
        assert resumed["losses"] == full["losses"][3:], f"rank {rank}: losses differ"
        assert np.array_equal(resumed["params"], full["params"])
    if name == "ada":
        assert world4[0]["ada_res"]["start"] == (3, 3)  # resumed with a full buffer
        assert world4[0]["ada"]["buffer"] == 3


def test_adaptive_run_replays_once_its_buffer_is_full(world4):
    data = world4[LAST]["ada"]["data"]
    assert int(data[0].get("fresh microbatches", 0)) > 0
    assert sum(int(d.get("replay microbatches", 0)) for d in data) > 0
    assert [i for i, _ in world4[LAST]["ada"]["validations"]][0] == 0  # before training


def _distillm_reference(losses, init=0.0, step=0.1, eps=0.1):
    """DistiLLM's finetune.py rule, transcribed: prev_avg_loss from the first evaluation;
    threshold += 0.1 (capped at 1) and prev = curr when curr >= prev + eps."""
    threshold, prev, out = init, None, []
    for loss in losses:
        if prev is None:
            prev = loss
        elif loss >= prev + eps:
            threshold = min(threshold + step, 1.0)
            prev = loss
        out.append(threshold)
    return out


def test_phi_follows_distillms_rule_on_a_scripted_sequence():
    losses = [2.0, 2.05, 2.2, 2.25, 2.31, 2.0, 2.5, 2.61, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1,
              4.3, 4.5, 4.7]
    schedule = AdaptiveSchedule(StudentDataConfig(adaptive=True))
    got = []
    for loss in losses:
        schedule.observe(loss)
        got.append(schedule.phi)
    assert got == pytest.approx(_distillm_reference(losses))
    assert got[-1] == 1.0 and got[2] == pytest.approx(0.1) and got[4] == pytest.approx(0.2)


def test_choices_follow_the_thresholds():
    config = StudentDataConfig(adaptive=True)
    schedule, buffer = AdaptiveSchedule(config), ReplayBuffer(2)
    schedule.phi = 0.8
    # not full: everything under phi is a fresh sample (it fills the buffer)
    assert choose(0.7, config, schedule, buffer, progress=0.5) == FRESH
    buffer.add([([1], [2]), ([3], [4])])
    assert choose(0.3, config, schedule, buffer, progress=0.5) == FRESH  # < 0.8 * 0.5
    assert choose(0.5, config, schedule, buffer, progress=0.5) == REPLAY
    assert choose(0.9, config, schedule, buffer, progress=0.5) == REFERENCE
    gkd = StudentDataConfig(fraction=0.25)
    assert choose(0.2, gkd, None, None, 0.0) == FRESH
    assert choose(0.3, gkd, None, None, 0.0) == REFERENCE


def _argv(corpus, *extra):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "96", "--train-iters", "2", "--lr", "1e-3", "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"],
            "--data-path", corpus["chat"], "--dataset-format", "chat", "--device", "cpu",
            *extra]


@pytest.mark.parametrize("extra, needle", [
    (("--kd-student-data-fraction", "1.5"), "--kd-student-data-fraction must be in [0, 1]"),
    (("--kd-student-data-fraction", "0.5", "--kd-adaptive-sgo", "--eval-interval", "1"),
     "exclude each other"),
    (("--kd-adaptive-sgo",), "--kd-adaptive-sgo needs --eval-interval"),
    (("--kd-student-data-fraction", "0.5", "--pack-sequences"), "--pack-sequences"),
    (("--kd-student-data-fraction", "0.5", "--kd-loss-weight", "0"), "live teacher"),
    (("--kd-student-data-fraction", "0.5", "--seq-length", "12"),
     "--seq-length 12 leaves no room for new tokens after the prompt"),
    (("--eval-generate", "4"), "--eval-generate needs --eval-interval"),
])
def test_refusals_name_the_flag(corpus, extra, needle):
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args(_argv(corpus, *extra), world_size=1)
    assert needle in str(error.value)


def test_student_data_with_pretraining_data_is_refused():
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--train-iters", "2", "--lr", "1e-3", "--mock-data",
            "--vocab-size", "60", "--kd-student-data-fraction", "0.5", "--device", "cpu"]
    with pytest.raises(ConfigError, match="--kd-student-data-fraction needs prompts"):
        parse_pretrain_args(argv, world_size=1)


def test_generate_tool_killed_and_rerun_writes_the_same_bytes(corpus, tmp_path):
    """An uninterrupted run at DP=1, and a DP=2 run SIGKILLed after its first part and
    rerun: generated.jsonl is byte for byte the same."""
    student = str(tmp_path / "student")
    (trained,) = launch("tools/pretrain_kd.py", [*_argv(corpus, "--save", student,
                                                        "--kd-loss-weight", "0")], 1)
    assert trained.returncode == 0, trained.stderr[-2000:]
    flags = ["--load", student, "--seq-length", "96", "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"], "--prompts",
             corpus["chat"], "--prompts-per-part", "8", "--gen-max-new-tokens", "6",
             "--device", "cpu"]
    (whole,) = launch("tools/generate.py", [*flags, "--output", str(tmp_path / "whole")], 1)
    assert whole.returncode == 0, whole.stderr[-2000:]
    parts = tmp_path / "killed" / "parts"
    procs = start("tools/generate.py", [*flags, "--output", str(tmp_path / "killed")], 2)
    deadline = time.monotonic() + 240
    while not (parts.is_dir() and any(p.suffix == ".jsonl" for p in parts.iterdir())):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    for proc in procs:
        os.kill(proc.pid, signal.SIGKILL)
    collect(procs)
    assert not (tmp_path / "killed" / "generated.jsonl").exists()
    rerun = launch("tools/generate.py", [*flags, "--output", str(tmp_path / "killed")], 2)
    assert all(r.returncode == 0 for r in rerun), rerun[0].stderr[-2000:]
    expected = (tmp_path / "whole" / "generated.jsonl").read_bytes()
    assert (tmp_path / "killed" / "generated.jsonl").read_bytes() == expected
    records = [json.loads(line) for line in expected.decode().splitlines()]
    assert len(records) == 60 and records[0]["messages"][-1]["role"] == "assistant"
    assert [r["prompt_index"] for r in records] == list(range(60))
