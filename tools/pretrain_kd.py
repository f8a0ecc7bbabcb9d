#!/usr/bin/env python
"""Distill a teacher GPT into a student GPT with megatron-core.

    torchrun --nproc-per-node 4 tools/pretrain_kd.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --num-layers 2 --hidden-size 64 ... --mock-data

Every flag: README "Flags" (``python tools/pretrain_kd.py --help``). Bad input ends every rank
with one line naming the flag or file and exit status 2. The entry must stay under
``if __name__ == "__main__"``: megatron-core's checkpoint writer spawns helper processes that
re-import this file.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core announces each missing optional accelerator (apex, TE) once per rank.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def main(argv=None) -> int:
    from megakd.preflight import parse_pretrain_args, run_tool
    from megakd.training import pretrain_kd

    def log(line: str) -> None:
        print(line, flush=True)

    return run_tool("pretrain_kd.py", lambda: pretrain_kd(parse_pretrain_args(argv), log=log))


if __name__ == "__main__":
    sys.exit(main())
