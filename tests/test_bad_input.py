"""Bad input ends every rank with one line naming the flag or file and exit status 2 -- also
when it is found after the process groups started, and also when only one rank sees it.

Each case launches real processes of ``tools/pretrain_kd.py`` (2 ranks, gloo) and checks every
rank's exit status and stderr: the ``pretrain_kd.py: error: ...`` line, no traceback.
"""

from __future__ import annotations

import glob
import os

import pytest

from megakd.configs import ConfigError
from megakd.preflight import parse_pretrain_args
from tests.tool_launcher import launch

TOOL = "tools/pretrain_kd.py"
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "1e-3", "--mock-data", "--vocab-size", "60", "--make-vocab-size-divisible-by",
        "16", "--kd-loss-weight", "0", "--device", "cpu", "--log-interval", "1"]


def _assert_one_line_everywhere(results, *needles):
    for result in results:
        assert result.returncode == 2, (result.rank, result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.error_lines if "error:" in line]
        assert len(errors) == 1, (result.rank, result.error_lines)
        for needle in needles:
            assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    """A 2-rank run of two iterations saved at iteration 2 (TP=2)."""
    root = str(tmp_path_factory.mktemp("bad_input") / "ckpt")
    results = launch(TOOL, [*BASE, "--tensor-model-parallel-size", "2", "--train-iters", "2",
                            "--save", root], world_size=2)
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    return root


def test_lr_schedule_mismatch_on_resume_is_one_line_on_every_rank(checkpoint_root):
    results = launch(TOOL, [*BASE, "--tensor-model-parallel-size", "2", "--train-iters", "3",
                            "--load", checkpoint_root, "--global-batch-size", "8"], world_size=2)
    _assert_one_line_everywhere(results, "--load", "--override-opt_param-scheduler")


def test_truncated_checkpoint_shard_is_one_line_on_every_rank(checkpoint_root, tmp_path):
    import shutil

    damaged = str(tmp_path / "damaged")
    shutil.copytree(checkpoint_root, damaged)
    shards = sorted(glob.glob(os.path.join(damaged, "iter_0000002", "*.distcp")))
    assert shards
    with open(shards[-1], "r+b") as handle:
        handle.truncate(16)
    results = launch(TOOL, [*BASE, "--tensor-model-parallel-size", "2", "--train-iters", "3",
                            "--lr-decay-iters", "2", "--load", damaged], world_size=2)
    _assert_one_line_everywhere(results, "--load", "cannot read the checkpoint")


def test_an_error_seen_by_one_rank_ends_every_rank_with_its_line():
    """Only rank 1 raises; rank 0 is waiting in a collective and must not wait for the
    timeout: its watchdog prints rank 1's line and exits 2 too."""
    results = launch("tests/one_rank_error.py", [], world_size=2, timeout=120)
    _assert_one_line_everywhere(results, "--teacher-cache /data/cache: sample 7")


@pytest.mark.parametrize("extra, needle", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be positive"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/nonexistent/tok.model"],
     "--tokenizer-model /nonexistent/tok.model"),
    (["--kd-topk", "100", "--kd-loss-weight", "1"], "--kd-topk=100 exceeds the vocabulary"),
    (["--device", "cuda"], "--device cuda"),
    (["--kd-skew-alpha", "1.0"], "--kd-skew-alpha must be in [0, 1)"),
    (["--kd-teacher-window", "-1"], "--kd-teacher-window must be"),
])
def test_bad_flags_found_before_any_process_group(extra, needle):
    if extra[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args([*BASE, "--train-iters", "1", *extra], world_size=1)
    assert needle in str(error.value)


def test_teacher_window_too_small_for_interleaving_is_refused():
    """PP = 2 with virtual stages, 4 microbatches: W = 3 would leave a last window of 1."""
    argv = [*BASE, "--train-iters", "1", "--num-layers", "4", "--pipeline-model-parallel-size",
            "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8",
            "--kd-loss-weight", "0.5", "--kd-teacher-window", "3"]
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args(argv, world_size=2)
    assert "--kd-teacher-window=3" in str(error.value) and "[3, 1]" in str(error.value)
