"""Intermediate-layer (hidden-state) KD on real gloo process groups (one 2-rank launch).

The hidden-state term's value and its gradients (every student weight and the learned
projections) at TP = 2 with sequence parallelism, PP = 2, PP = 2 with two virtual stages and
DP = 2, with the cosine and the MSE loss, equal a float64 single-rank reference computed
independently (tests/intermediate_workers.py). A teacher window of one microbatch changes
nothing; a resume with projections is bitwise; projections live in the checkpoint, start from
their seeded initialisation when a checkpoint lacks them, and stay out of a model built
without them (the HF export's). Bad flags are refused naming the flag.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megakd.configs import ConfigError
from megakd.distill.hidden_loss import HIDDEN_LOSSES
from megakd.preflight.commandline import check_pretrain_config
from megakd.training.loop import IterationRecord, format_log_line
from tests import intermediate_workers as workers
from tests.dist_harness import Task, run_tasks
from tests.e2e_workers import make_config

LAST = -1  # the last rank is on the last pipeline stage, which reports the losses
# float32 model vs float64 reference: relative to the largest reference value (loss, or the
# largest gradient entry of each tensor). Measured: loss <= 6e-8, gradients <= 5e-7.
LOSS_REL = 1e-6
GRAD_REL = 1e-5
COMPARED = [f"{name}-{loss}" for name in ("dp2", *workers.LAYOUTS) for loss in workers.LOSSES]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("intermediate"))
    w = workers
    return run_tasks(2, [Task("init", w.init_worker, (workdir,)),
                         Task("layouts", w.layouts_worker, (workdir,)),
                         Task("resume", w.resume_worker, (workdir,)),
                         Task("compare", w.compare_worker, (workdir,))])


def _reported(world2, label):
    if label.startswith("dp2"):
        return world2[0]["compare"][label]["losses"]
    return world2[LAST]["layouts"][label]["losses"]


@pytest.mark.parametrize("label", COMPARED)
def test_hidden_loss_and_gradients_match_float64_reference(world2, label):
    loss = label.rsplit("-", 1)[1]
    ref_value, ref_grads = world2[0]["compare"]["reference"][loss]
    got = _reported(world2, label)["hidden loss"]
    assert math.isclose(got, ref_value, rel_tol=LOSS_REL), (label, got, ref_value)
    grads = world2[0]["compare"]["grads"][label]
    assert set(grads) == set(ref_grads)
    assert any(name.startswith("kd_projections.") for name in grads)
    worst = 0.0
    for name, ref in ref_grads.items():
        scale = float(np.abs(ref).max())
        diff = float(np.abs(grads[name] - ref).max())
        if scale == 0.0:  # e.g. the final norm: the hidden term does not reach it
            assert diff == 0.0, (label, name, diff)
            continue
        worst = max(worst, diff / scale)
        assert diff <= GRAD_REL * scale, f"{label} {name}: |grad - ref| {diff:.3e} of {scale:.3e}"
    print(f"{label}: hidden loss rel diff {abs(got - ref_value) / ref_value:.2e}, "
          f"max gradient rel diff {worst:.2e}")


def test_reference_gradients_reach_every_paired_layer_and_projection(world2):
    for loss in workers.LOSSES:
        _, grads = world2[0]["compare"]["reference"][loss]
        for layer in (2, 3, 4):
            assert np.abs(grads[f"kd_projections.layer{layer}.weight"]).max() > 0
        assert np.abs(grads["decoder.layers.0.mlp.linear_fc2.weight"]).max() > 0


def test_logit_losses_are_reported_next_to_the_hidden_loss(world2):
    for label in COMPARED:
        assert {"lm loss", "kd loss", "hidden loss"} <= set(_reported(world2, label)), label


def test_teacher_window_of_one_changes_nothing(world2):
    """--kd-teacher-window 1: teacher forward, exchange and student schedule per microbatch;
    the same computations, so the hidden loss and every rank's gradients are bitwise equal."""
    for rank in world2:
        runs = rank["layouts"]
        assert runs["pp2-window1-cosine"]["windows"] == 1
        assert runs["pp2-window1-cosine"]["grads"] == runs["pp2-cosine"]["grads"]
    last = world2[LAST]["layouts"]
    assert last["pp2-window1-cosine"]["losses"] == last["pp2-cosine"]["losses"]


def test_teacher_states_cross_stages_point_to_point(world2):
    for rank in world2:  # (teacher layer, from pipeline rank, to pipeline rank) at PP = 2
        assert rank["init"]["transfers"] == [(1, 0, 1), (3, 1, 0)]


def test_missing_projections_start_from_their_seeded_init(world2):
    """--pretrained-checkpoint without projections (a plain or pruned student) loads; each
    stage's projections keep the seeded initialisation, and rank 0 says so."""
    assert world2[0]["init"]["projection_layers"] == [2]  # PP = 2: layers 1, 2 on stage 0
    assert world2[1]["init"]["projection_layers"] == [3, 4]
    assert all(rank["init"]["projections_fresh"] for rank in world2)
    assert world2[0]["init"]["absent_logged"]


def test_resume_with_projections_is_bitwise(world2):
    for rank, results in enumerate(world2):
        resume = results["resume"]
        assert len(resume["full"]) == 3 and len(resume["resumed"]) == 1
        assert resume["resumed"] == resume["full"][2:], f"rank {rank}: losses differ"
        assert resume["same_params"], f"rank {rank}: weights differ after the resume"
    assert world2[LAST]["resume"]["full"][-1]["hidden loss"] > 0
    keys = world2[0]["resume"]["projection_keys"]
    assert keys == [f"kd_projections.layer{n}.weight" for n in (2, 3, 4)]


def test_model_without_projections_loads_a_checkpoint_that_has_them(world2):
    """What megakd_to_hf does: a plain model's request is a subset of the checkpoint."""
    keys = world2[0]["compare"]["plain_keys"]
    assert keys and not any(key.startswith("kd_projections") for key in keys)


def test_log_line_reports_hidden_loss_separately():
    record = IterationRecord(iteration=1, consumed_samples=8, learning_rate=1e-3,
                             losses={"lm loss": 4.0, "kd loss": 0.5, "hidden loss": 1.25},
                             grad_norm=1.0, skipped=False, elapsed_ms=10.0)
    line = format_log_line(record, 10, 8, 0)
    assert "kd loss: 5.000000E-01" in line and "hidden loss: 1.250000E+00" in line


def test_objective_adds_the_weighted_hidden_term():
    kd = make_config(1, 1, 1, ["--kd-intermediate-pairs", "1:2",
                               "--kd-intermediate-weight", "0.5"]).kd
    assert kd.layer_pairs == [(1, 2)]
    assert kd.objective(4.0, 2.0, 3.0) == pytest.approx(0.5 * 4.0 + 0.5 * 2.0 + 0.5 * 3.0)


# ----------------------------------------------------------------------------------------------
# Flags (no process group): the e2e student has 2 layers, the teacher 4
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--kd-intermediate-pairs", "3:1"],
     r"--kd-intermediate-pairs 3:1: the student has no layer 3 \(layers are numbered 1..2, "
     r"--num-layers=2\)"),
    (["--kd-intermediate-pairs", "1:5"],
     r"the teacher has no layer 5 .*--teacher-num-layers=4"),
    (["--kd-intermediate-pairs", "0:1"], "the student has no layer 0"),
    (["--kd-intermediate-pairs", "1:2,1:3"], "names student layer.* 1 more than once"),
    (["--kd-intermediate-pairs", "1-2"], "--kd-intermediate-pairs: '1-2' is not"),
    (["--kd-intermediate-pairs", "1:x"], "--kd-intermediate-pairs: '1:x' is not"),
    (["--kd-intermediate-pairs", " "], "--kd-intermediate-pairs is empty"),
    (["--kd-intermediate-pairs", "1:2", "--kd-loss-weight", "0"],
     "--kd-intermediate-pairs needs --kd-loss-weight > 0"),
    (["--kd-intermediate-pairs", "1:2", "--kd-intermediate-weight", "-1"],
     "--kd-intermediate-weight must be non-negative"),
])
def test_bad_intermediate_flags_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        make_config(1, 1, 1, flags)


def test_teacher_cache_is_refused_with_pairs():
    config = make_config(1, 1, 1, ["--kd-intermediate-pairs", "1:2"])
    config.checkpoint.teacher_cache = "/nonexistent"
    config.kd.topk = 8
    with pytest.raises(ConfigError, match="--kd-intermediate-pairs needs a live teacher .*not "
                                          "--teacher-cache"):
        check_pretrain_config(config)


def test_unknown_loss_is_refused():
    with pytest.raises(SystemExit):  # argparse's choices: "invalid choice", exit 2
        make_config(1, 1, 1, ["--kd-intermediate-pairs", "1:2", "--kd-intermediate-loss", "l1"])
    config = make_config(1, 1, 1, ["--kd-intermediate-pairs", "1:2"])
    config.kd.intermediate_loss = "l1"
    with pytest.raises(ConfigError, match="--kd-intermediate-loss must be one of cosine, mse"):
        check_pretrain_config(config)


def test_hidden_losses_per_token():
    x = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # [s=2, b=1, h=2]
    y = torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]])
    assert torch.allclose(HIDDEN_LOSSES["cosine"](x, y), torch.tensor([[1.0], [0.0]]))
    assert torch.allclose(HIDDEN_LOSSES["mse"](x, y), torch.tensor([[2.5], [4.0]]))
