#!/usr/bin/env python
"""Precompute the teacher's top-k once, for students trained with ``--teacher-cache DIR``.

    torchrun --nproc-per-node 4 tools/precompute_teacher_topk.py --teacher-cache runs/cache \
        --teacher-load runs/teacher --kd-topk 64 --kd-topk-dtype fp8 ... (the student run's flags)

Format and workflow: docs/teacher_cache.md.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")

if __name__ == "__main__":
    from megakd.cache.precompute import main

    sys.exit(main())
