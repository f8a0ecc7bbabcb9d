"""The auto choice of --kd-teacher-window (megakd/distill/window.py); equality of windowed and
unwindowed training is in tests/test_e2e.py and tests/test_teacher_cache.py."""

from __future__ import annotations

from megakd.configs import KDConfig
from megakd.distill import resolve_teacher_window, teacher_output_bytes

GIB = 2**30


def test_auto_window_bounds_the_issue_example():
    """Llama-3.1-8B -> 3.2-1B, TP = 2, seq 4096, 64 microbatches, vocab 128256, bf16 logits:
    0.5 GB per microbatch, so 8 fit in the 4 GiB budget (34 GB unwindowed)."""
    kd = KDConfig()
    per_mb = teacher_output_bytes(kd, 1, 4096, 128256 // 2, logits_bytes=2, topk_token_bytes=0)
    assert per_mb == 4096 * 64128 * 2
    assert round(64 * per_mb / 1e9, 1) == 33.6
    assert resolve_teacher_window(kd, 64, per_mb) == 8


def test_auto_window_keeps_everything_that_fits():
    kd = KDConfig(topk=64)
    per_mb = teacher_output_bytes(kd, 1, 4096, 64128, logits_bytes=2, topk_token_bytes=388)
    assert per_mb == 4096 * 388
    assert resolve_teacher_window(kd, 64, per_mb) == 64
    assert resolve_teacher_window(KDConfig(loss_weight=0.0), 64, 10 * GIB) == 64  # no teacher


def test_explicit_window_is_capped_at_the_iteration():
    assert resolve_teacher_window(KDConfig(teacher_window=3), 8, GIB) == 3
    assert resolve_teacher_window(KDConfig(teacher_window=30), 8, GIB) == 8


def test_auto_window_with_interleaving_leaves_no_short_window():
    """PP = 4 with virtual stages: every window, the last included, holds >= 4 microbatches."""
    kd = KDConfig()
    assert resolve_teacher_window(kd, 10, GIB // 2, budget_bytes=7 * GIB // 2) == 7
    # 7 fit, but 10 = 7 + 3 leaves a window of 3 < 4: 6 + 4 instead
    assert resolve_teacher_window(kd, 10, GIB // 2, min_window=4, budget_bytes=7 * GIB // 2) == 6
    # nothing from 4 down fits the rule's bounds: fall back to one window
    assert resolve_teacher_window(kd, 6, GIB, min_window=4, budget_bytes=GIB) == 6
