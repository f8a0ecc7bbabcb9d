"""A diverged run is caught at the first non-finite value and never checkpoints it
(TP=2 x PP=2, one 4-rank launch; tests/divergence_workers.py)."""

from __future__ import annotations

import math
import os

import pytest

from megakd.formats.checkpoints import checkpoint_name, read_tracker
from tests import divergence_workers as w
from tests.dist_harness import Task, run_tasks
from tests.tool_launcher import launch

LAST = -1  # the last rank sits on the last pipeline stage


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("divergence"))


@pytest.fixture(scope="module")
def world4(workdir):
    return run_tasks(4, [
        Task("save", w.save_models, (workdir,)),
        Task("huge_lr", w.huge_lr, (workdir,)),
        Task("reference", w.huge_lr_reference, (workdir,)),
        Task("resumed", w.resume_huge_lr, (workdir,)),
        Task("same_weights", w.compare_checkpoints, (f"{workdir}/huge",
                                                     f"{workdir}/huge_reference")),
        Task("broken_teacher", w.broken_teacher, (workdir,)),
        Task("skipping", w.skipping, (workdir,)),
        Task("skipping_limit", w.skipping_limit, (workdir,)),
        Task("unchecked_save", w.unchecked_save, (workdir,)),
    ])


def test_huge_lr_stops_at_the_first_nonfinite_iteration_on_every_rank(world4, workdir):
    stopped = world4[0]["huge_lr"]["iteration"]
    assert stopped >= 2, "lr 1e5 should survive its first update"
    for rank in world4:
        run = rank["huge_lr"]
        assert run["iteration"] == stopped
        assert run["error"].startswith(f"iteration {stopped}: non-finite")
        assert "the student diverged" in run["error"]
        assert f"last good checkpoint: {workdir}/huge/{checkpoint_name(stopped - 1)}" in run["error"]
        assert run["params_finite"]  # the non-finite step was never applied
    assert read_tracker(f"{workdir}/huge") == str(stopped - 1)
    assert not os.path.exists(f"{workdir}/huge/{checkpoint_name(stopped)}")


def test_last_good_checkpoint_equals_the_uninterrupted_run_and_resumes(world4):
    assert world4[0]["same_weights"] == 0.0  # bitwise: iteration k-1 of both runs
    stopped = world4[0]["huge_lr"]["iteration"]
    for rank in world4:
        resumed = rank["resumed"]
        assert resumed["iteration"] == stopped and resumed["error"] == rank["huge_lr"]["error"]
    reference = world4[LAST]["reference"]["losses"]
    assert world4[LAST]["huge_lr"]["losses"] == reference  # iterations 1 .. k-1, bitwise


def test_teacher_with_a_nan_weight_is_blamed_not_the_student(world4):
    for rank in world4:
        run = rank["broken_teacher"]
        assert run["iteration"] == 1 and run["params_finite"]
        assert run["error"].startswith("iteration 1: the KD loss is non-finite while the "
                                       "student's own CE is finite")
        assert "--teacher-load" in run["error"]


def test_skip_mode_skips_exactly_the_injected_iterations(world4, workdir):
    for rank in world4:
        run = rank["skipping"]
        assert run["error"] is None and run["iteration"] == w.ITERS
        assert run["skipped"] == 2
        assert run["params_finite"]
    last = world4[LAST]["skipping"]
    assert last["skipped_iterations"] == [2, 4]
    assert all(math.isfinite(losses["lm loss"]) for losses in last["losses"])
    kd = [losses["kd loss"] for losses in last["losses"]]
    assert [i + 1 for i, v in enumerate(kd) if not math.isfinite(v)] == [2, 4]
    skipped_lines = [line for line in last["lines"] if line.startswith(" iteration ")]
    assert "number of skipped iterations:   2" in skipped_lines[-1]
    assert read_tracker(f"{workdir}/skipping") == str(w.ITERS)


def test_skip_mode_stops_after_too_many_consecutive_skips(world4):
    for rank in world4:
        run = rank["skipping_limit"]
        assert run["iteration"] == 4
        assert "3 skipped iterations reach --max-consecutive-skipped-iterations=3" in run["error"]


def test_nonfinite_weights_are_never_saved(world4, workdir):
    for rank in world4:
        run = rank["unchecked_save"]
        assert not run["params_finite"]
        assert run["error"].startswith("refusing to save a checkpoint")
    assert read_tracker(f"{workdir}/unchecked") is None


def test_the_tool_exits_nonzero_with_one_line(tmp_path):
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "6", "--mock-data", "--vocab-size", "60", "--kd-loss-weight", "0",
            "--device", "cpu", "--lr", "1e5", "--lr-decay-style", "constant",
            "--save", str(tmp_path / "ckpt"), "--save-interval", "1"]
    (result,) = launch("tools/pretrain_kd.py", argv, world_size=1)
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.error_lines if "error:" in line]
    assert len(errors) == 1 and "non-finite" in errors[0] and "Traceback" not in result.stderr
