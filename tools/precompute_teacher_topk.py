#!/usr/bin/env python
"""Precompute the teacher's top-k once, for students trained with ``--teacher-cache DIR``.

    torchrun --nproc-per-node 4 tools/precompute_teacher_topk.py --teacher-cache runs/cache \
        --teacher-load runs/teacher --kd-topk 64 --kd-topk-dtype fp8 ... (the student run's
        data and batch flags)

Format and workflow: docs/teacher_cache.md; flags: docs/flags.md.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def run(config) -> None:
    import torch

    from megakd.distill.precompute import format_summary, precompute
    from megakd.runtime import running

    with running(config.parallel, config.runtime, config.training.seed,
                 config.teacher.num_layers) as runtime:
        summary = precompute(config, runtime.device, log=lambda line: print(line, flush=True))
        if torch.distributed.get_rank() == 0:
            print(format_summary(summary, config.kd.topk, config.kd.topk_dtype), flush=True)


def main(argv=None) -> int:
    from megakd.preflight import parse_precompute_args, run_tool

    return run_tool("precompute_teacher_topk.py", lambda: run(parse_precompute_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
