"""Bad flags fail before any process group starts, with a message naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megakd.configs import ConfigError
from megakd.preflight import parse_pretrain_args as parse_args
from megakd.runtime.launcher import discover, first_host

BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", "3", "--lr", "1e-3", "--mock-data", "--vocab-size", "100",
]


def _with(*extra):
    return BASE + list(extra)


@pytest.mark.parametrize(
    "argv, world_size, flag",
    [
        (_with("--tensor-model-parallel-size", "3"), 3, "--num-attention-heads"),
        (_with("--teacher-num-attention-heads", "6", "--tensor-model-parallel-size", "4",
               "--teacher-hidden-size", "96"), 4, "--teacher-num-attention-heads"),
        (_with("--pipeline-model-parallel-size", "3"), 3, "--num-layers"),
        (_with("--teacher-num-layers", "5", "--pipeline-model-parallel-size", "2"), 2,
         "--teacher-num-layers"),
        (_with("--teacher-vocab-size", "120"), 1, "--teacher-vocab-size"),
        (_with("--global-batch-size", "6"), 2, "--global-batch-size"),
        (_with("--tensor-model-parallel-size", "2"), 3, "--tensor-model-parallel-size"),
        (_with("--kd-loss-weight", "1.5"), 1, "--kd-loss-weight"),
        (_with("--kd-temperature", "0"), 1, "--kd-temperature"),
        (_with("--hidden-size", "66"), 1, "--hidden-size"),
        (_with("--group-query-attention", "--num-query-groups", "3"), 1, "--num-query-groups"),
        (_with("--teacher-load", "/nonexistent/ckpt"), 1, "--teacher-load"),
        (_with("--num-layers-per-virtual-pipeline-stage", "1"), 1,
         "--num-layers-per-virtual-pipeline-stage"),
        (_with("--kd-topk-renormalize"), 1, "--kd-topk"),
        (BASE[:-2], 1, "--vocab-size"),
        (_with("--lr-warmup-iters", "3"), 1, "--lr-warmup-iters"),
    ],
)
def test_bad_flags_name_the_flag(argv, world_size, flag):
    with pytest.raises(ConfigError) as error:
        parse_args(argv, world_size=world_size)
    assert flag in str(error.value)


def test_good_flags_and_teacher_defaults():
    config = parse_args(_with("--teacher-num-layers", "8", "--teacher-hidden-size", "128",
                              "--tensor-model-parallel-size", "2"), world_size=4)
    assert config.parallel.data_parallel_size == 2
    assert config.teacher.num_layers == 8 and config.teacher.hidden_size == 128
    assert config.teacher.num_attention_heads == 4  # defaults to the student's
    assert config.teacher.ffn_hidden_size == 512  # 4 x its own hidden size
    assert config.student.ffn_hidden_size == 256
    assert config.training.global_batch_size == 8


def test_command_line_exits_nonzero_naming_the_flag():
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "pretrain_kd.py")
    env = dict(os.environ, RANK="0", WORLD_SIZE="2")
    proc = subprocess.run([sys.executable, tool, *_with("--tensor-model-parallel-size", "3")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "--tensor-model-parallel-size" in proc.stderr


def test_launcher_discovery():
    assert discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}).launcher == "torchrun"
    slurm = discover({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[03-05,09]", "SLURM_NTASKS_PER_NODE": "8"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 16, 1, "gpu03")
    mpi = discover({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"})
    assert (mpi.rank, mpi.world_size, mpi.launcher) == (2, 4, "mpi")
    assert discover({}).world_size == 1
    assert first_host("node7") == "node7"
