"""A 2-rank job in which only rank 1 finds bad input while rank 0 waits in a collective
(tests/test_bad_input.py). Run by tests.tool_launcher."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def body() -> None:
    import torch

    from megakd.configs import ConfigError, ParallelConfig, RuntimeConfig
    from megakd.runtime import running

    runtime = RuntimeConfig(device="cpu", distributed_timeout_minutes=5)
    with running(ParallelConfig(world_size=2), runtime, seed=1, num_layers=1):
        if torch.distributed.get_rank() == 1:
            raise ConfigError("--teacher-cache /data/cache: sample 7 holds other tokens than "
                              "the ones the cached teacher saw")
        torch.distributed.barrier()  # rank 0 would wait here for the collective timeout


if __name__ == "__main__":
    from megakd.preflight import run_tool

    sys.exit(run_tool("pretrain_kd.py", body))
