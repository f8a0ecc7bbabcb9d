#!/usr/bin/env python
"""Distill a teacher GPT into a student GPT with megatron-core.

    torchrun --nproc-per-node 4 tools/pretrain_kd.py --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --num-layers 2 --hidden-size 64 ... --mock-data

See the README for every flag. The entry must stay under ``if __name__ == "__main__"``:
megatron-core's checkpoint writer spawns helper processes that re-import this file.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core announces each missing optional accelerator (apex, TE) once per rank.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")

if __name__ == "__main__":
    from megakd.training import main

    sys.exit(main())
