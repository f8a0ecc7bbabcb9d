"""megakd.losses against float64 dense references, at TP = 1, 2, 4 over real gloo groups.

Each world size is spawned once; its workers run every check (values and gradients of every
divergence, dense and top-k, cross entropy, top-k selection and compression) and report all
failures, which the parent asserts with the full list.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, List

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(Path(__file__).resolve().parent)):
    if extra not in sys.path:
        sys.path.insert(0, extra)

import _losses_reference as ref  # noqa: E402

from megakd.losses import (  # noqa: E402
    DIVERGENCE_KINDS,
    TeacherTopK,
    teacher_topk,
    topk_bytes_per_token,
    topk_divergence,
    vocab_parallel_cross_entropy,
    vocab_parallel_divergence,
)
from megakd.losses import _vocab_parallel as vp  # noqa: E402
from tests.dist_harness import run_distributed  # noqa: E402

TEMPERATURES = (0.5, 1.0, 2.0)
PARAMS = dict(alpha=0.1, beta=0.5, mu=0.5)  # reference names of the defaults
KW = dict(skew_alpha=0.1, jsd_beta=0.5, akl_mu=0.5)
# Bounds on the top-k divergence error of compressed transfer vs fp32 transfer, relative to
# the fp32 value, over the realistic-logit cases of `check_compression` (measured max in
# docs/losses.md).
FP8_REL_BOUND = 0.06
BF16_REL_BOUND = 0.005
F64 = torch.float64


# --------------------------------------------------------------------------------- harness
class Checker:
    """Collects every failed check instead of stopping at the first."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.failures: List[str] = []
        self.count = 0
        self.notes: dict = {}

    def ok(self, name: str, cond: bool, detail: str = "") -> None:
        self.count += 1
        if not cond:
            self.failures.append(f"[tp={self.world} rank={self.rank}] {name}: {detail}")

    def close(self, name: str, actual: torch.Tensor, expected: torch.Tensor,
              rtol: float, atol: float = 0.0) -> None:
        """|a - e| <= atol + rtol * |e| elementwise, both finite."""
        a, e = actual.detach().to(F64), expected.detach().to(F64)
        if a.shape != e.shape:
            self.ok(name, False, f"shape {tuple(a.shape)} != {tuple(e.shape)}")
            return
        if not bool(torch.isfinite(a).all()):
            self.ok(name, False, "non-finite values")
            return
        err = (a - e).abs()
        allowed = atol + rtol * e.abs()
        worst = int(torch.argmax(err - allowed)) if err.numel() else 0
        good = bool((err <= allowed).all())
        detail = "" if good else (
            f"max violation at flat {worst}: got {a.flatten()[worst].item():.9g} "
            f"expected {e.flatten()[worst].item():.9g} (rtol={rtol}, atol={atol})")
        self.ok(name, good, detail)

    def close_grad(self, name: str, actual: torch.Tensor, expected: torch.Tensor,
                   rtol: float, atol: float = 0.0) -> None:
        """Gradient check: error relative to the largest reference entry of the shard."""
        scale = max(expected.detach().abs().max().item() if expected.numel() else 0.0, 1e-12)
        self.close(name, actual, expected, rtol=rtol, atol=atol + rtol * scale)

    def run(self, label: str, check: Callable[..., None], *args, **kwargs) -> None:
        """``check(self, *args, **kwargs)``; an exception is recorded as a failure."""
        try:
            check(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - report and go on with the other checks
            self.failures.append(f"[tp={self.world} rank={self.rank}] {label} "
                                 f"{check.__name__} raised:\n" + traceback.format_exc())


def _worker(rank: int, world: int) -> dict:
    """Runs every check on this rank (launched by tests.dist_harness); returns its report."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=90))
    checker = Checker(rank, world)
    group = None if world == 1 else dist.group.WORLD
    try:
        run_all_checks(checker, group)
    except Exception:  # noqa: BLE001
        checker.failures.append(
            f"[tp={world} rank={rank}] harness raised:\n" + traceback.format_exc())
    dist.barrier()
    dist.destroy_process_group()
    return {"failures": checker.failures, "count": checker.count, "notes": checker.notes}


# --------------------------------------------------------------------------------- cases
class Case:
    """Global logits (same on every rank) and this rank's shards."""

    def __init__(self, seed: int, s: int, b: int, local_vocab: int, valid: int, world: int,
                 rank: int, scale: float = 2.0, garbage_rows: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        v = local_vocab * world
        self.valid, self.local_vocab, self.start = valid, local_vocab, rank * local_vocab
        if dtype == torch.float32:
            self.student = torch.randn(s, b, v, generator=g) * scale
            self.teacher = torch.randn(s, b, v, generator=g) * scale + 0.5 * self.student
        else:  # distinct per row (no ties for top-k / AKL heads), exact in bf16: multiples of 1/16
            def distinct() -> torch.Tensor:
                return torch.argsort(torch.rand(s, b, v, generator=g), dim=-1).float() / 16 - 2.5
            self.student, self.teacher = distinct().to(dtype), (1.5 * distinct()).to(dtype)
        self.mask = (torch.rand(s, b, generator=g) > 0.3).to(torch.float32)
        self.mask[0, 0] = 1.0
        if garbage_rows:  # masked rows carry extreme garbage; padding carries garbage too
            junk = (torch.randn(s, b, v, generator=g).sign() * 1e4).to(dtype)
            rows = self.mask == 0
            self.student[rows] = junk[rows]
            self.teacher[rows] = -junk[rows].roll(1, -1)
        self.student[..., valid:] = 1e4
        self.teacher[..., valid:] = 1e4
        self.ref_student, self.ref_teacher = self.student, self.teacher

    def mask_logits(self, seed: int) -> "Case":
        """Masked rows: student all -inf, teacher all finfo.min; unmasked rows: the same 3
        valid tokens at -inf on both sides. The reference sees masked rows as zeros."""
        rows = (self.mask == 0).unsqueeze(-1)
        cols = torch.randperm(self.valid, generator=torch.Generator().manual_seed(seed))[:3]
        self.ref_student, self.ref_teacher = self.student.clone(), self.teacher.clone()
        for x in (self.ref_student, self.ref_teacher):
            x.masked_fill_(rows, 0.0)
        self.student.masked_fill_(rows, float("-inf"))
        self.teacher.masked_fill_(rows, torch.finfo(self.teacher.dtype).min)
        for x in (self.student, self.teacher, self.ref_student, self.ref_teacher):
            x[..., cols] = torch.where(rows, x[..., cols], float("-inf"))
        return self

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.start:self.start + self.local_vocab].clone()

    def ref_grad_shard(self, full_grad: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a reference gradient over the padded vocab (padding: 0)."""
        return self.shard(full_grad)


def _vocab_configs(world: int):
    """(local_vocab, valid) per world size: no padding, partial last shard, empty last shard."""
    if world == 1:
        return [(61, 61), (64, 53)]
    if world == 2:
        return [(40, 80), (40, 71), (24, 23)]
    return [(20, 80), (20, 67), (20, 55)]


def _cancellation_floor(v_ref: torch.Tensor, keep: torch.Tensor) -> float:
    """Absolute gradient error fp32 cannot avoid: gradients such as q (lq - lp - R) subtract
    log-ratios as large as the value itself (~1e4 for +-1e4 logits), so their rounding is a
    few ulps of max |value|. Negligible (< 1e-6) for the ordinary cases."""
    return 8 * torch.finfo(torch.float32).eps * float(v_ref.detach()[keep].abs().max())


def _ref_student(case: Case) -> torch.Tensor:
    return case.ref_student.to(F64).requires_grad_(True)


# --------------------------------------------------------------------------------- checks
def check_dense(ck: Checker, case: Case, group, kind: str, temperature: float, tag: str,
                rtol: float = 1e-5, grad_rtol: float = 2e-5) -> None:
    student = case.shard(case.student).requires_grad_(True)
    teacher = case.shard(case.teacher).requires_grad_(True)  # must still get no gradient
    student_before, teacher_before = student.detach().clone(), teacher.detach().clone()
    value = vocab_parallel_divergence(student, teacher, kind, temperature=temperature,
                                      valid_vocab_size=case.valid, tp_group=group, **KW)
    (value * case.mask).sum().backward()
    ck.ok(f"{tag} dense {kind} inputs untouched", torch.equal(teacher.detach(), teacher_before)
          and torch.equal(student.detach(), student_before))
    ck.ok(f"{tag} dense {kind} no teacher grad", teacher.grad is None)
    s_ref = _ref_student(case)
    v_ref = ref.dense(s_ref, case.ref_teacher, kind, temperature, case.valid, **PARAMS)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    ck.close(f"{tag} dense {kind} T={temperature} value", value[keep], v_ref[keep], rtol, atol=1e-6)
    ck.ok(f"{tag} dense {kind} T={temperature} finite", bool(torch.isfinite(value).all()),
          "masked rows gave non-finite values")
    ck.close_grad(f"{tag} dense {kind} T={temperature} grad", student.grad,
                  case.ref_grad_shard(s_ref.grad), grad_rtol, _cancellation_floor(v_ref, keep))


def check_topk(ck: Checker, case: Case, group, kind: str, temperature: float, k: int,
               renormalize: bool, tag: str) -> None:
    teacher = case.shard(case.teacher)
    tk = teacher_topk(teacher, k, temperature=temperature, valid_vocab_size=case.valid,
                      tp_group=group, dtype=torch.float32)
    student = case.shard(case.student).requires_grad_(True)
    value = topk_divergence(student, tk, kind, temperature=temperature, renormalize=renormalize,
                            valid_vocab_size=case.valid, tp_group=group, **KW)
    (value * case.mask).sum().backward()
    s_ref = _ref_student(case)
    if k == case.valid and not renormalize:
        v_ref = ref.dense(s_ref, case.ref_teacher, kind, temperature, case.valid, **PARAMS)
    else:
        v_ref = ref.topk(s_ref, case.ref_teacher, kind, k, temperature, case.valid,
                         renormalize=renormalize, **PARAMS)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    name = f"{tag} topk k={k}{' renorm' if renormalize else ''} {kind} T={temperature}"
    ck.close(f"{name} value", value[keep], v_ref[keep], 1e-5, atol=1e-6)
    ck.ok(f"{name} finite", bool(torch.isfinite(value).all()))
    ck.close_grad(f"{name} grad", student.grad, case.ref_grad_shard(s_ref.grad), 2e-5,
                  _cancellation_floor(v_ref, keep))
    if not renormalize and kind != "akl" and k < case.valid:  # merging buckets: lower bound
        with torch.no_grad():
            dense = vocab_parallel_divergence(case.shard(case.student), teacher, kind,
                                              temperature=temperature, valid_vocab_size=case.valid,
                                              tp_group=group, **KW)
        slack = (value - dense)[keep]
        ck.ok(f"{name} <= dense", bool((slack <= 1e-6 + 1e-6 * dense[keep].abs()).all()),
              f"top-k exceeds dense by {slack.max().item():.3g}")


def check_teacher_topk(ck: Checker, case: Case, group, k: int, temperature: float,
                       tag: str) -> None:
    lp_full = ref.log_probs(case.teacher, temperature, case.valid)
    ref_v, ref_i = torch.topk(lp_full, k, dim=-1)
    outside = torch.ones_like(lp_full, dtype=torch.bool).scatter(-1, ref_i, False)
    ref_tail = torch.logsumexp(lp_full.masked_fill(~outside, float("-inf")), -1)
    keep = case.mask > 0
    for dtype, vtol in ((torch.float32, 1e-5), (torch.bfloat16, None), (torch.float8_e4m3fn, None)):
        tk = teacher_topk(case.shard(case.teacher), k, temperature=temperature,
                          valid_vocab_size=case.valid, tp_group=group, dtype=dtype)
        name = f"{tag} teacher_topk k={k} T={temperature} {dtype}"
        ck.ok(f"{name} dtypes", tk.logprobs.dtype == dtype and tk.indices.dtype == torch.int32
              and tk.tail_logprob.dtype == torch.float32 and tk.scale is None)
        ck.ok(f"{name} indices", torch.equal(tk.indices[keep].long(), ref_i[keep]),
              "indices differ from torch.topk of the gathered vocab")
        ck.ok(f"{name} sorted, top-1 relative value 0",
              bool((tk.logprobs.float()[..., 0] == 0).all()))
        if k < case.valid:
            ck.close(f"{name} tail", tk.tail_logprob[keep], ref_tail[keep], 1e-5, atol=1e-6)
        else:
            ck.ok(f"{name} empty tail", bool(torch.isneginf(tk.tail_logprob).all()))
        values = tk.values_fp32()
        # compressed or not, the k buckets hold exactly the teacher's top-k mass
        mass = torch.logsumexp(values.to(F64), -1)
        ck.close(f"{name} top-k mass", mass[keep], torch.log(-torch.expm1(ref_tail))[keep]
                 if k < case.valid else torch.zeros_like(mass[keep]), 1e-5, atol=1e-6)
        if vtol is not None:
            ck.close(f"{name} values", values[keep], ref_v[keep], vtol, atol=1e-6)
        ck.ok(f"{name} same on all ranks", _same_on_all_ranks(
            torch.cat([tk.logprobs.float().flatten(), tk.indices.float().flatten(),
                       tk.tail_logprob.flatten()]), group))
    ck.ok(f"{tag} bytes/token", topk_bytes_per_token(k, torch.bfloat16) == 6 * k + 4
          and topk_bytes_per_token(k, torch.float8_e4m3fn) == 5 * k + 4
          and tk.bytes_per_token() == 5 * k + 4)


def _same_on_all_ranks(x: torch.Tensor, group) -> bool:
    if group is None:
        return True
    x = torch.nan_to_num(x, neginf=-1e38)
    lo, hi = x.clone(), x.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return torch.equal(lo, hi)


def check_compression(ck: Checker, group, world: int, rank: int) -> None:
    """FP8 / BF16 transfer error on every divergence, relative to fp32 transfer."""
    worst = {torch.bfloat16: 0.0, torch.float8_e4m3fn: 0.0}
    for seed, scale in ((11, 2.0), (12, 4.0), (13, 1.0)):
        case = Case(seed, 6, 3, 48 // world if world < 4 else 12, 48, world, rank,
                    scale=scale, garbage_rows=False)
        teacher = case.shard(case.teacher)
        exact = teacher_topk(teacher, 8, valid_vocab_size=case.valid, tp_group=group,
                             dtype=torch.float32)
        for dtype in worst:
            tk = teacher_topk(teacher, 8, valid_vocab_size=case.valid, tp_group=group, dtype=dtype)
            for kind in DIVERGENCE_KINDS:
                args = dict(valid_vocab_size=case.valid, tp_group=group, **KW)
                a = topk_divergence(case.shard(case.student), tk, kind, **args)
                e = topk_divergence(case.shard(case.student), exact, kind, **args)
                rel = ((a - e).abs() / e.abs().clamp_min(1e-3)).max().item()
                worst[dtype] = max(worst[dtype], rel)
    ck.notes["fp8_rel_err"] = worst[torch.float8_e4m3fn]
    ck.notes["bf16_rel_err"] = worst[torch.bfloat16]
    ck.ok("fp8 transfer error", worst[torch.float8_e4m3fn] <= FP8_REL_BOUND,
          f"max relative error {worst[torch.float8_e4m3fn]:.4g} > {FP8_REL_BOUND}")
    ck.ok("bf16 transfer error", worst[torch.bfloat16] <= BF16_REL_BOUND,
          f"max relative error {worst[torch.bfloat16]:.4g} > {BF16_REL_BOUND}")


def check_identical(ck: Checker, case: Case, group, temperature: float, tag: str) -> None:
    shard = case.shard(case.teacher)
    tk = teacher_topk(shard, 5, temperature=temperature, valid_vocab_size=case.valid,
                      tp_group=group, dtype=torch.float32)
    tk_all = teacher_topk(shard, case.valid, temperature=temperature, valid_vocab_size=case.valid,
                          tp_group=group, dtype=torch.float32)
    for kind in DIVERGENCE_KINDS:
        student = shard.clone().requires_grad_(True)
        args = dict(temperature=temperature, valid_vocab_size=case.valid, tp_group=group, **KW)
        values = [vocab_parallel_divergence(student, shard, kind, **args),
                  topk_divergence(student, tk, kind, **args),
                  topk_divergence(student, tk, kind, renormalize=True, **args),
                  topk_divergence(student, tk_all, kind, **args)]
        keep = case.mask > 0
        for name, v in zip(("dense", "topk", "topk renorm", "topk k=V"), values):
            name = f"{tag} student==teacher {name} {kind} T={temperature}"
            ck.ok(f"{name} finite", bool(torch.isfinite(v).all()))
            ck.ok(name, bool((v[keep].abs() <= 2e-6).all()),
                  f"max |value| {v[keep].abs().max().item():.3g}")
            grad, = torch.autograd.grad((v * case.mask).sum(), student)
            if kind == "tvd":  # |p - q| has no gradient at p == q; rounding picks a subgradient
                continue
            ck.ok(f"{name} grad", bool((grad.abs() <= 1e-5).all()),
                  f"max |grad| {grad.abs().max().item():.3g}")


def check_cross_entropy(ck: Checker, case: Case, group, tag: str, dtype=torch.float32) -> None:
    g = torch.Generator().manual_seed(case.valid)
    target = torch.randint(0, case.valid, case.mask.shape, generator=g)
    logits = case.shard(case.student).to(dtype).requires_grad_(True)
    before = logits.detach().clone()
    loss = vocab_parallel_cross_entropy(logits, target, valid_vocab_size=case.valid, tp_group=group)
    ck.ok(f"{tag} CE input untouched after forward", torch.equal(logits.detach(), before))
    (loss * case.mask).sum().backward()
    ck.ok(f"{tag} CE input untouched after backward", torch.equal(logits.detach(), before))
    full = case.student.to(dtype).to(F64).requires_grad_(True)
    l_ref = ref.cross_entropy(full, target, case.valid)
    (l_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    ck.close(f"{tag} CE {dtype} value", loss[keep], l_ref[keep], 1e-5, atol=1e-6)
    ck.ok(f"{tag} CE finite", bool(torch.isfinite(loss).all()))
    ck.ok(f"{tag} CE grad dtype", logits.grad.dtype == dtype)
    ck.close_grad(f"{tag} CE {dtype} grad", logits.grad,
                  case.ref_grad_shard(full.grad),
                  2e-5 if dtype == torch.float32 else 1e-2)


def check_bf16(ck: Checker, case: Case, group, kind: str, tag: str) -> None:
    """bf16 logits: fp32 compute gives fp32-accurate values; gradients come back in bf16."""
    student = case.shard(case.student).requires_grad_(True)
    teacher = case.shard(case.teacher)
    value = vocab_parallel_divergence(student, teacher, kind, temperature=2.0,
                                      valid_vocab_size=case.valid, tp_group=group, **KW)
    ck.ok(f"{tag} bf16 {kind} fp32 result", value.dtype == torch.float32)
    (value * case.mask).sum().backward()
    s_ref = _ref_student(case)
    v_ref = ref.dense(s_ref, case.teacher, kind, 2.0, case.valid, **PARAMS)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    ck.close(f"{tag} bf16 {kind} value", value[keep], v_ref[keep], 1e-5, atol=1e-6)
    ck.ok(f"{tag} bf16 {kind} grad dtype", student.grad.dtype == torch.bfloat16)
    ck.close_grad(f"{tag} bf16 {kind} grad", student.grad, case.ref_grad_shard(s_ref.grad), 1e-2)
    tk = teacher_topk(teacher, 6, temperature=2.0, valid_vocab_size=case.valid, tp_group=group,
                      dtype=torch.float32)
    v_top = topk_divergence(student.detach(), tk, kind, temperature=2.0,
                            valid_vocab_size=case.valid, tp_group=group, **KW)
    v_top_ref = ref.topk(case.student.to(F64), case.teacher, kind, 6, 2.0, case.valid, **PARAMS)
    ck.close(f"{tag} bf16 topk {kind} value", v_top[keep], v_top_ref[keep], 1e-5, atol=1e-6)


def run_all_checks(ck: Checker, group) -> None:
    world, rank = ck.world, ck.rank
    seed = 1000 * world
    for ci, (local_vocab, valid) in enumerate(_vocab_configs(world)):
        where = f"V={local_vocab}x{world} valid={valid}"
        for ti, temperature in enumerate(TEMPERATURES):
            seed += 1
            case = Case(seed, 3 + seed % 4, 2 + seed % 3, local_vocab, valid, world, rank)
            tag = f"{where} seed={seed}"
            # alternate between one-chunk and many-chunk execution
            with vp.chunk_elements(7 if (ci + ti) % 2 else 1 << 20):
                for kind in DIVERGENCE_KINDS:
                    ck.run(tag, check_dense, case, group, kind, temperature, tag)
                    for k, renormalize in ((5, False), (5, True), (valid, False)):
                        ck.run(tag, check_topk, case, group, kind, temperature, k, renormalize, tag)
                for k in (7, valid):
                    ck.run(tag, check_teacher_topk, case, group, k, temperature, tag)
                ck.run(tag, check_identical, case, group, temperature, tag)
                ck.run(tag, check_cross_entropy, case, group, tag)
        # extreme logits (+-1e4) on every row: finite, and still matching the reference
        for temperature in TEMPERATURES:
            seed += 1
            case = Case(seed, 3, 2, local_vocab, valid, world, rank, scale=1e4)
            tag = f"extreme {where} seed={seed}"
            for kind in DIVERGENCE_KINDS:
                ck.run(tag, check_dense, case, group, kind, temperature, tag,
                       rtol=1e-4, grad_rtol=1e-4)
                ck.run(tag, check_topk, case, group, kind, temperature, 4, False, tag)
        # -inf / finfo.min logits: masked rows entirely, 3 tokens of every other row
        for temperature in (0.5, 2.0):
            seed += 1
            case = Case(seed, 3, 3, local_vocab, valid, world, rank, garbage_rows=False)
            case.mask_logits(seed)
            tag = f"-inf {where} seed={seed}"
            for kind in DIVERGENCE_KINDS:
                ck.run(tag, check_dense, case, group, kind, temperature, tag)
                ck.run(tag, check_topk, case, group, kind, temperature, 4, False, tag)
        # bf16 logits
        seed += 1
        case = Case(seed, 4, 3, local_vocab, valid, world, rank, dtype=torch.bfloat16)
        tag = f"bf16 {where} seed={seed}"
        for kind in DIVERGENCE_KINDS:
            ck.run(tag, check_bf16, case, group, kind, tag)
        ck.run(tag, check_cross_entropy, case, group, tag, dtype=torch.bfloat16)
    ck.run("", check_compression, group, world, rank)


# --------------------------------------------------------------------------------- pytest
@pytest.mark.parametrize("world", [1, 2, 4])
def test_losses_match_float64_reference(world: int) -> None:
    reports = run_distributed(world, _worker, world, timeout=600)
    failures = [f for rep in reports for f in rep["failures"]]
    total = sum(rep["count"] for rep in reports)
    notes = reports[0]["notes"]
    print(f"tp={world}: {total} checks, compression errors {notes}")
    assert total > 100 * world, f"only {total} checks ran"
    assert not failures, (f"{len(failures)} of {total} checks failed at tp={world}:\n"
                          + "\n".join(failures[:40]))


def test_api_surface() -> None:
    import megakd.losses as losses

    for name in ("vocab_parallel_divergence", "teacher_topk", "TeacherTopK", "topk_divergence",
                 "vocab_parallel_cross_entropy", "DIVERGENCE_KINDS"):
        assert hasattr(losses, name), name
    assert losses.DIVERGENCE_KINDS == ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "akl")
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError):
        vocab_parallel_divergence(x, x, "kl")
    with pytest.raises(ValueError):
        topk_divergence(x, teacher_topk(x, 3, temperature=2.0), "fkl", temperature=1.0)
    with pytest.raises(ValueError):
        teacher_topk(x, 11)
    assert isinstance(teacher_topk(x, 3), TeacherTopK)
