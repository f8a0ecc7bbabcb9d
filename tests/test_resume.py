"""Checkpoints, exact resume and exits on real gloo process groups (one 4-rank, one 2-rank launch).

Scenarios, all with the tiny e2e models and a warm-up + cosine schedule (tests/resume_workers.py):

- TP2xPP2, plain optimizer: an uninterrupted 6-iteration run (saving every 3 iterations and
  at the end); a run that receives SIGTERM on one rank at iteration 2 and is resumed from its
  checkpoint must reproduce iterations 3..6 bitwise (losses, learning rates, weights, RNG).
- TP2xDP2, distributed optimizer: stopped by --exit-interval 3 and resumed, bitwise again.
- Layout changes: the TP2xPP2 checkpoint at iteration 3 resumed at TP2xDP2 (plain optimizer,
  DP 1 -> 2, PP 2 -> 1), and the distributed-optimizer TP2xDP2 checkpoint resumed at TP2xDP1
  (2 ranks), continue the loss curve (same data position and schedule; float reduction order
  differs, so not bitwise).
- --finetune and --no-load-optim; interrupted saves are ignored; mismatched resumes are
  refused naming the flag; --exit-duration-in-mins (2 ranks).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from megakd.configs import ConfigError
from megakd.formats.checkpoints import checkpoint_name, read_tracker
from megakd.formats.model_metadata import MODEL_METADATA_FILENAME, read_model_metadata
from tests import e2e_workers, resume_workers
from tests.dist_harness import Task, run_tasks

ITERS = resume_workers.ITERS
LAST = -1  # the last rank sits on the last pipeline stage and reports the losses
REL = 1e-5  # layout changes: same math, different float reduction order


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def world4(workdir):
    d, teacher = workdir, f"{workdir}/teacher"

    def run(label, tp, pp, flags, sigterm_at=None, save_teacher=False):
        return Task(label, resume_workers.run, (tp, pp, flags, sigterm_at, teacher, save_teacher))

    distributed = ["--use-distributed-optimizer"]
    tasks = [
        run("full", 2, 2, ["--save", f"{d}/full", "--save-interval", "3"], save_teacher=True),
        run("sigterm", 2, 2, ["--save", f"{d}/sig", "--exit-signal-handler"], sigterm_at=2),
        run("resumed", 2, 2, ["--load", f"{d}/sig", "--save", f"{d}/sig", "--exit-signal-handler"]),
        run("dist_full", 2, 1, [*distributed, "--save", f"{d}/dist_full", "--save-interval", "3"]),
        run("dist_exit", 2, 1, [*distributed, "--save", f"{d}/dist", "--exit-interval", "3"]),
        run("dist_resumed", 2, 1, [*distributed, "--load", f"{d}/dist", "--save", f"{d}/dist"]),
        run("to_dp2", 2, 1, ["--load", f"{d}/full/{checkpoint_name(3)}"]),
        Task("interrupted", resume_workers.interrupted_checkpoints,
             (f"{d}/full", f"{d}/interrupted", teacher)),
    ]
    return run_tasks(4, tasks)


@pytest.fixture(scope="module")
def world2(workdir, world4):
    """The distributed optimizer's checkpoint (TP2 x DP2) resumed at TP2 x DP1; --finetune and
    --no-load-optim from the TP2 x PP2 checkpoints; refusals; --exit-duration-in-mins."""
    teacher, dist3 = f"{workdir}/teacher", f"{workdir}/dist_full/{checkpoint_name(3)}"
    distributed = ["--use-distributed-optimizer"]
    full, full3 = f"{workdir}/full", f"{workdir}/full/{checkpoint_name(3)}"
    w = resume_workers
    tasks = [
        Task("dist_to_dp1", w.run, (2, 1, [*distributed, "--load", dist3], None, teacher)),
        Task("finetune", w.run, (2, 1, ["--load", full, "--finetune", "--train-iters", "1"], None,
                                 teacher)),
        Task("no_load_optim", w.run, (2, 1, ["--load", full3, "--no-load-optim",
                                             "--train-iters", "4"], None, teacher)),
        Task("tp_change", w.refused, (1, 2, [*distributed, "--load", dist3], teacher)),
        Task("optimizer_kind", w.refused, (2, 1, ["--load", dist3], teacher)),
        Task("schedule", w.refused, (2, 1, [*distributed, "--load", dist3,
                                            "--global-batch-size", "16"], teacher)),
        Task("exit_duration", w.exit_duration, (teacher,)),
    ]
    return run_tasks(2, tasks)


def _curve(result, name="lm loss"):
    return [losses[name] for losses in result["losses"]]


def test_uninterrupted_run_saves_every_interval_and_at_the_end(world4, workdir):
    full = world4[LAST]["full"]
    assert full["iterations"] == list(range(1, ITERS + 1))
    assert full["end"] == (ITERS, ITERS * e2e_workers.GBS)
    assert read_tracker(f"{workdir}/full") == str(ITERS)
    for iteration in (3, ITERS):
        directory = f"{workdir}/full/{checkpoint_name(iteration)}"
        assert os.path.isfile(f"{directory}/metadata.json")
        metadata = read_model_metadata(directory)
        assert metadata["architecture"]["num_layers"] == 2
        assert metadata["padded_vocab_size"] == 64
    assert not any(name.endswith(".tmp") for name in os.listdir(f"{workdir}/full"))
    assert MODEL_METADATA_FILENAME in os.listdir(f"{workdir}/full/{checkpoint_name(3)}")


def test_sigterm_on_one_rank_stops_every_rank_and_saves(world4, workdir):
    for rank in world4:
        assert rank["sigterm"]["exit_reason"] == "SIGTERM"
        assert rank["sigterm"]["end"] == (2, 2 * e2e_workers.GBS)
    assert read_tracker(f"{workdir}/sig") == str(ITERS)  # the resumed run saved at its end
    assert os.path.isdir(f"{workdir}/sig/{checkpoint_name(2)}")


def test_resume_after_sigterm_is_bitwise_identical(world4):
    for rank, results in enumerate(world4):
        full, resumed = results["full"], results["resumed"]
        assert resumed["start"] == (2, 2 * e2e_workers.GBS)
        assert resumed["iterations"] == list(range(3, ITERS + 1))
        assert resumed["lr"] == full["lr"][2:], f"rank {rank}: learning rates differ"
        assert resumed["losses"] == full["losses"][2:], f"rank {rank}: losses differ"
        assert np.array_equal(resumed["params"], full["params"]), f"rank {rank}: weights differ"
        assert resumed["rng"] == full["rng"], f"rank {rank}: RNG states were not restored"
    assert _curve(world4[LAST]["resumed"])  # the last stage did report losses


def test_distributed_optimizer_resume_is_bitwise_identical(world4):
    for rank, results in enumerate(world4):
        full, stopped, resumed = (results["dist_full"], results["dist_exit"],
                                  results["dist_resumed"])
        assert stopped["exit_reason"] == "exit interval" and stopped["end"][0] == 3
        assert stopped["losses"] == full["losses"][:3]
        assert resumed["iterations"] == [4, 5, 6]
        assert resumed["lr"] == full["lr"][3:]
        assert resumed["losses"] == full["losses"][3:], f"rank {rank}: losses differ"
        assert np.array_equal(resumed["params"], full["params"]), f"rank {rank}: weights differ"


@pytest.mark.parametrize("label, reference", [("to_dp2", "full"), ("dist_to_dp1", "dist_full")])
def test_resume_at_another_data_parallel_size_continues_the_curve(world4, world2, label,
                                                                   reference):
    got = (world2 if label == "dist_to_dp1" else world4)[LAST][label]
    ref = world4[LAST][reference]
    assert got["start"] == (3, 3 * e2e_workers.GBS)
    assert got["iterations"] == [4, 5, 6]
    assert got["lr"] == ref["lr"][3:]  # the schedule counts samples: exact
    for name in ("lm loss", "kd loss"):
        for step, (a, b) in enumerate(zip(_curve(got, name), _curve(ref, name)[3:])):
            assert math.isclose(a, b, rel_tol=REL), f"{label} {name} it. {step + 4}: {a} vs {b}"


def test_finetune_and_no_load_optim(world4, world2):
    full = world4[LAST]["full"]
    finetune = world2[LAST]["finetune"]
    assert finetune["start"] == (0, 0) and finetune["iterations"] == [1]
    # weights of the final checkpoint, a fresh schedule: the first warm-up LR again
    assert finetune["lr"] == full["lr"][:1]
    assert any("weights only" in line for line in world2[0]["finetune"]["logs"])
    no_optim = world2[LAST]["no_load_optim"]
    assert no_optim["start"] == (3, 3 * e2e_workers.GBS) and no_optim["iterations"] == [4]
    assert no_optim["lr"] == full["lr"][3:4]  # the schedule is still restored
    for name in ("lm loss", "kd loss"):  # same weights in (at another layout)
        assert math.isclose(no_optim["losses"][0][name], full["losses"][3][name], rel_tol=REL)


def test_interrupted_saves_are_ignored(world4, workdir):
    result = world4[0]["interrupted"]
    assert result["resumed"]["start"] == (ITERS, ITERS * e2e_workers.GBS)
    assert result["resumed"]["iterations"] == [ITERS + 1]
    assert not any(name.endswith(".tmp") for name in result["listing"])
    assert checkpoint_name(ITERS + 1) in result["listing"]
    assert "not a complete checkpoint" in result["refused"]


def test_exit_duration(world2):
    for rank in world2:
        assert rank["exit_duration"]["iterations"] == [1]
        assert rank["exit_duration"]["exit_reason"] == "exit duration"


def test_mismatched_resumes_are_refused_naming_the_flag(world2):
    refusals = world2[0]
    assert "--tensor-model-parallel-size=2 cannot be loaded at 1" in refusals["tp_change"]
    assert "--no-load-optim" in refusals["tp_change"]
    assert "saved with --use-distributed-optimizer" in refusals["optimizer_kind"]
    assert "--override-opt_param-scheduler" in refusals["schedule"]


# ----------------------------------------------------------------------------------------------
# Flags (no process group)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--save", "x", "--save-interval", "0"], "--save-interval must be positive"),
    (["--exit-interval", "-1"], "--exit-interval must be positive"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be positive"),
    (["--finetune"], "--finetune needs --load"),
    (["--no-load-optim"], "--no-load-optim needs --load"),
    (["--no-load-rng"], "--no-load-rng needs --load"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
     "exclude each other"),
])
def test_bad_checkpoint_flags_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        e2e_workers.make_config(1, 1, 1, flags)


def test_load_may_name_the_save_root_before_the_first_save(tmp_path):
    root = str(tmp_path / "ckpt")
    config = e2e_workers.make_config(1, 1, 1, ["--save", root, "--load", root,
                                               "--save-interval", "2", "--exit-signal-handler",
                                               "--exit-interval", "4"])
    assert config.checkpoint.load == root and config.checkpoint.save_interval == 2
    with pytest.raises(ConfigError, match="--load .*: no such checkpoint directory"):
        e2e_workers.make_config(1, 1, 1, ["--load", str(tmp_path / "missing")])
