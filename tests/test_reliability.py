"""Ranks die with their launcher, a checkpoint root has one writer, a kill during the first
save can be resumed, and random SIGKILLs with relaunches reproduce the uninterrupted run.

Real processes of tools/pretrain_kd.py (gloo, tiny models): under torchrun for the launcher
kill, with torchrun's environment (tests/tool_launcher.py) otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megakd.formats.checkpoints import read_tracker
from megakd.formats.root_lock import read_owner
from megakd.runtime.launcher import free_local_port
from tests.tool_launcher import ROOT, collect, launch, start

sys.path.insert(0, os.path.join(ROOT, "tools"))
import chaos_kill  # noqa: E402

TOOL = "tools/pretrain_kd.py"
LONG = [*chaos_kill.FLAGS, "--train-iters", "100000", "--save-interval", "1"]
SHORT = [*chaos_kill.FLAGS, "--train-iters", "3"]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _iteration_dirs(root: str):
    return {name for name in os.listdir(root)
            if name.startswith("iter_") and not name.endswith(".tmp")}


def test_workers_die_with_their_launcher(tmp_path):
    """SIGKILL the torchrun agent of a 2-rank run: every worker is gone within 10 s and no
    checkpoint is committed after the kill."""
    root = str(tmp_path / "ckpt")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_local_port()), os.path.join(ROOT, TOOL), *LONG,
         "--save", root], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    try:
        _wait_for(lambda: os.path.isdir(root) and read_tracker(root) is not None, 180,
                  "the first checkpoint")
        workers = psutil.Process(agent.pid).children()  # the ranks (their helpers end with them)
        assert len(workers) == 2
        killed_at = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()  # reaped: its children are re-parented, so each rank can see it is gone
        # (a save whose launcher check ran in the milliseconds before may still commit)
        before = _iteration_dirs(root)
        _wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                  for w in workers), 10, "the workers to exit")
        gone_after = time.monotonic() - killed_at
        print(f"launcher SIGKILL -> last worker gone in {gone_after:.2f} s")
        time.sleep(2)
        assert _iteration_dirs(root) <= before  # nothing committed after the kill
        assert gone_after < 10
    finally:
        for proc in psutil.Process().children(recursive=True):
            proc.kill()


def test_killing_one_rank_ends_the_others_naming_it(tmp_path):
    root = str(tmp_path / "ckpt")
    procs = start(TOOL, [*LONG, "--save", root], world_size=2)
    try:
        _wait_for(lambda: os.path.isdir(root) and read_tracker(root) is not None, 180,
                  "the first checkpoint")
        os.kill(procs[1].pid, signal.SIGKILL)
        (survivor,) = collect(procs[:1], timeout=60)
    finally:
        for proc in procs:
            proc.kill()
    assert survivor.returncode == 1, survivor.stderr[-2000:]
    assert "Traceback" not in survivor.stderr
    errors = [line for line in survivor.error_lines if "error:" in line]
    assert len(errors) == 1 and f"rank 1 (pid {procs[1].pid}) is gone" in errors[0], errors


def test_one_writer_per_root_and_stale_locks_are_taken_over(tmp_path):
    """A second job saving into a root a live job owns is refused naming both; once the owner
    is SIGKILLed its lock is stale, and a relaunch takes the root over and resumes."""
    root = str(tmp_path / "ckpt")
    owner = start(TOOL, [*LONG, "--save", root], world_size=1)
    try:
        _wait_for(lambda: read_owner(root) is not None and read_tracker(root) is not None, 180,
                  "the owner's first checkpoint")
        (second,) = launch(TOOL, [*SHORT, "--save", root], world_size=1)
        assert second.returncode == 2
        errors = [line for line in second.error_lines if "error:" in line]
        assert len(errors) == 1 and f"--save {root}: saved into by another live job" in errors[0]
        assert f"pid {owner[0].pid}" in errors[0]
        os.kill(owner[0].pid, signal.SIGKILL)
        owner[0].wait()
    finally:
        owner[0].kill()
    resumed_from = int(read_tracker(root))
    (relaunch,) = launch(TOOL, [*SHORT, "--train-iters", str(resumed_from + 2), "--load", root,
                                "--save", root], world_size=1)
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert f"starting at iteration {resumed_from}" in relaunch.stdout
    assert read_tracker(root) == str(resumed_from + 2)
    assert read_owner(root) is None  # released at the end


@pytest.mark.parametrize("leftover", ["empty root", "staging directory of a first save"])
def test_a_root_without_a_checkpoint_starts_from_scratch(tmp_path, leftover):
    root = tmp_path / "ckpt"
    root.mkdir()
    if leftover != "empty root":
        (root / "iter_0000002.tmp").mkdir()
        (root / "iter_0000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (result,) = launch(TOOL, [*SHORT, "--load", str(root), "--save", str(root)], world_size=1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "starting from scratch" in result.stdout
    assert read_tracker(str(root)) == "3"
    assert not (root / "iter_0000002.tmp").exists()


def test_random_sigkills_with_relaunches_reproduce_the_uninterrupted_run(tmp_path):
    """Two SIGKILLs of the whole 2-rank job at random times in its steps and saves
    (tools/chaos_kill.py runs ten and more): the final weights equal an uninterrupted run's,
    bitwise."""
    result = chaos_kill.run_chaos(kills=2, iters=12, ranks=2, workdir=str(tmp_path), seed=3)
    assert result["kills"] == 2
    assert result["orphans"] == []  # no forked helper of a killed rank lives on
    assert result["tracker"] == result["reference_tracker"] == "12"
    assert result["difference"] == 0.0
