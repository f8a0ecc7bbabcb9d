"""megakd.losses against float64 dense references, at TP = 1, 2, 4 over real gloo groups.

Every check is one parametrized pytest case whose id names it (TP size, vocab layout, path,
kind, temperature, ...). The case list is built statically (``CHECKS``); each world size is
spawned once (module-scoped fixture), its workers run every check of that size and return
per-check failures, and the test functions assert them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(Path(__file__).resolve().parent)):
    if extra not in sys.path:
        sys.path.insert(0, extra)

import _losses_reference as ref  # noqa: E402
from test_losses_precision import check_precision, precision_cases  # noqa: E402

from megakd.losses import (DIVERGENCES, TeacherTopK, make_divergence, teacher_topk,  # noqa: E402
                           topk_bytes_per_token, topk_divergence, vocab_parallel_cross_entropy,
                           vocab_parallel_divergence)
from megakd.losses import _vocab_parallel as vp  # noqa: E402
from tests.dist_harness import run_distributed  # noqa: E402

WORLDS = (1, 2, 4)
KINDS = tuple(DIVERGENCES)
TEMPERATURES = (0.5, 1.0, 2.0)
# Bounds on the top-k divergence error of compressed transfer vs fp32 transfer, relative to
# the fp32 value, over the realistic-logit cases of `check_compression` (measured max in
# docs/losses.md).
FP8_REL_BOUND = 0.06
BF16_REL_BOUND = 0.005
F64 = torch.float64


# --------------------------------------------------------------------------------- report
class Report:
    """The failed assertions of one check on one rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: List[str] = []
        self.notes: dict = {}

    def ok(self, name: str, cond: bool, detail: str = "") -> None:
        if not cond:
            self.failures.append(f"[rank {self.rank}] {name}: {detail}")

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


# --------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Spec:
    """Logits of one case: seed, leading dims (s, b), shard layout and content."""

    seed: int
    s: int
    b: int
    local_vocab: int
    valid: int
    scale: float = 2.0
    garbage_rows: bool = True
    dtype: torch.dtype = torch.float32
    mask_logits: bool = False  # -inf / finfo.min rows and tokens (Case.mask_logits)


class Case:
    """Global logits (same on every rank) and this rank's shards."""

    def __init__(self, spec: Spec, world: int, rank: int) -> None:
        s, b, dtype = spec.s, spec.b, spec.dtype
        g = torch.Generator().manual_seed(spec.seed)
        v = spec.local_vocab * world
        self.valid, self.local_vocab = spec.valid, spec.local_vocab
        self.start = rank * spec.local_vocab
        if dtype == torch.float32:
            self.student = torch.randn(s, b, v, generator=g) * spec.scale
            self.teacher = torch.randn(s, b, v, generator=g) * spec.scale + 0.5 * self.student
        else:  # distinct per row (no ties for top-k / AKL heads), exact in bf16: multiples of 1/16
            def distinct() -> torch.Tensor:
                return torch.argsort(torch.rand(s, b, v, generator=g), dim=-1).float() / 16 - 2.5
            self.student, self.teacher = distinct().to(dtype), (1.5 * distinct()).to(dtype)
        self.mask = (torch.rand(s, b, generator=g) > 0.3).to(torch.float32)
        self.mask[0, 0] = 1.0
        if spec.garbage_rows:  # masked rows carry extreme garbage; padding carries garbage too
            junk = (torch.randn(s, b, v, generator=g).sign() * 1e4).to(dtype)
            rows = self.mask == 0
            self.student[rows] = junk[rows]
            self.teacher[rows] = -junk[rows].roll(1, -1)
        self.student[..., spec.valid:] = 1e4
        self.teacher[..., spec.valid:] = 1e4
        self.ref_student, self.ref_teacher = self.student, self.teacher
        if spec.mask_logits:
            self._mask_logits(spec.seed)
        self._topk: dict = {}

    def _mask_logits(self, seed: int) -> None:
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

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.start:self.start + self.local_vocab].clone()

    def topk(self, k: int, temperature: float, group) -> TeacherTopK:
        """fp32 ``teacher_topk`` of this rank's teacher shard, computed once per case (the
        checks only read it; tested on its own by ``check_teacher_topk``)."""
        if (k, temperature) not in self._topk:
            self._topk[k, temperature] = teacher_topk(
                self.shard(self.teacher), k, temperature=temperature, valid_vocab_size=self.valid,
                tp_group=group, dtype=torch.float32)
        return self._topk[k, temperature]


def _cancellation_floor(v_ref: torch.Tensor, keep: torch.Tensor) -> float:
    """Absolute gradient error fp32 cannot avoid: gradients such as q (lq - lp - R) subtract
    log-ratios as large as the value itself (~1e4 for +-1e4 logits), so their rounding is a
    few ulps of max |value|. Negligible (< 1e-6) for the ordinary cases."""
    return 8 * torch.finfo(torch.float32).eps * float(v_ref.detach()[keep].abs().max())


# --------------------------------------------------------------------------------- checks
def check_dense(r: Report, case: Case, group, kind: str, temperature: float,
                rtol: float = 1e-5, grad_rtol: float = 2e-5) -> None:
    student = case.shard(case.student).requires_grad_(True)
    teacher = case.shard(case.teacher).requires_grad_(True)  # must still get no gradient
    student_before, teacher_before = student.detach().clone(), teacher.detach().clone()
    div = make_divergence(kind)
    value = vocab_parallel_divergence(student, teacher, div, temperature=temperature,
                                      valid_vocab_size=case.valid, tp_group=group)
    (value * case.mask).sum().backward()
    r.ok("inputs untouched", torch.equal(teacher.detach(), teacher_before)
         and torch.equal(student.detach(), student_before))
    r.ok("no teacher grad", teacher.grad is None)
    s_ref = case.ref_student.to(F64).requires_grad_(True)
    v_ref = ref.dense(s_ref, case.ref_teacher, kind, temperature, case.valid, div.values)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    r.close("value", value[keep], v_ref[keep], rtol, atol=1e-6)
    r.ok("finite", bool(torch.isfinite(value).all()), "masked rows gave non-finite values")
    r.close_grad("grad", student.grad, case.shard(s_ref.grad), grad_rtol,
                 _cancellation_floor(v_ref, keep))


def check_topk(r: Report, case: Case, group, kind: str, temperature: float, k: int,
               renormalize: bool) -> None:
    teacher = case.shard(case.teacher)
    tk = case.topk(k, temperature, group)
    student = case.shard(case.student).requires_grad_(True)
    div = make_divergence(kind)
    value = topk_divergence(student, tk, div, temperature=temperature, renormalize=renormalize,
                            valid_vocab_size=case.valid, tp_group=group)
    (value * case.mask).sum().backward()
    s_ref = case.ref_student.to(F64).requires_grad_(True)
    if k == case.valid and not renormalize:
        v_ref = ref.dense(s_ref, case.ref_teacher, kind, temperature, case.valid, div.values)
    else:
        v_ref = ref.topk(s_ref, case.ref_teacher, kind, k, temperature, case.valid, div.values,
                         renormalize=renormalize)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    r.close("value", value[keep], v_ref[keep], 1e-5, atol=1e-6)
    r.ok("finite", bool(torch.isfinite(value).all()))
    r.close_grad("grad", student.grad, case.shard(s_ref.grad), 2e-5,
                 _cancellation_floor(v_ref, keep))
    if not renormalize and div.f_divergence and k < case.valid:  # merging buckets: lower bound
        with torch.no_grad():
            dense = vocab_parallel_divergence(case.shard(case.student), teacher, div,
                                              temperature=temperature, valid_vocab_size=case.valid,
                                              tp_group=group)
        slack = (value - dense)[keep]
        r.ok("<= dense", bool((slack <= 1e-6 + 1e-6 * dense[keep].abs()).all()),
             f"top-k exceeds dense by {slack.max().item():.3g}")


def check_teacher_topk(r: Report, case: Case, group, k: int, temperature: float) -> None:
    lp_full = ref.log_probs(case.teacher, temperature, case.valid)
    ref_v, ref_i = torch.topk(lp_full, k, dim=-1)
    outside = torch.ones_like(lp_full, dtype=torch.bool).scatter(-1, ref_i, False)
    ref_tail = torch.logsumexp(lp_full.masked_fill(~outside, float("-inf")), -1)
    keep = case.mask > 0
    for dtype, vtol in ((torch.float32, 1e-5), (torch.bfloat16, None), (torch.float8_e4m3fn, None)):
        tk = teacher_topk(case.shard(case.teacher), k, temperature=temperature,
                          valid_vocab_size=case.valid, tp_group=group, dtype=dtype)
        name = f"{dtype}"
        r.ok(f"{name} dtypes", tk.logprobs.dtype == dtype and tk.indices.dtype == torch.int32
             and tk.tail_logprob.dtype == torch.float32 and not hasattr(tk, "scale"))
        r.ok(f"{name} indices", torch.equal(tk.indices[keep].long(), ref_i[keep]),
             "indices differ from torch.topk of the gathered vocab")
        r.ok(f"{name} sorted, top-1 relative value 0",
             bool((tk.logprobs.float()[..., 0] == 0).all()))
        if k < case.valid:
            r.close(f"{name} tail", tk.tail_logprob[keep], ref_tail[keep], 1e-5, atol=1e-6)
        else:
            r.ok(f"{name} empty tail", bool(torch.isneginf(tk.tail_logprob).all()))
        values = tk.values_fp32()
        # compressed or not, the k buckets hold exactly the teacher's top-k mass
        mass = torch.logsumexp(values.to(F64), -1)
        r.close(f"{name} top-k mass", mass[keep], torch.log(-torch.expm1(ref_tail))[keep]
                if k < case.valid else torch.zeros_like(mass[keep]), 1e-5, atol=1e-6)
        if vtol is not None:
            r.close(f"{name} values", values[keep], ref_v[keep], vtol, atol=1e-6)
        r.ok(f"{name} same on all ranks", _same_on_all_ranks(
            torch.cat([tk.logprobs.float().flatten(), tk.indices.float().flatten(),
                       tk.tail_logprob.flatten()]), group))
    r.ok("bytes/token", topk_bytes_per_token(k, torch.bfloat16) == 6 * k + 4
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


def check_compression(r: Report, group, world: int, rank: int) -> None:
    """FP8 / BF16 transfer error on every divergence, relative to fp32 transfer."""
    worst = {torch.bfloat16: 0.0, torch.float8_e4m3fn: 0.0}
    for seed, scale in ((11, 2.0), (12, 4.0), (13, 1.0)):
        local = 48 // world if world < 4 else 12
        case = Case(Spec(seed, 6, 3, local, 48, scale=scale, garbage_rows=False), world, rank)
        teacher = case.shard(case.teacher)
        exact = teacher_topk(teacher, 8, valid_vocab_size=case.valid, tp_group=group,
                             dtype=torch.float32)
        for dtype in worst:
            tk = teacher_topk(teacher, 8, valid_vocab_size=case.valid, tp_group=group, dtype=dtype)
            for kind in KINDS:
                args = dict(valid_vocab_size=case.valid, tp_group=group)
                a = topk_divergence(case.shard(case.student), tk, make_divergence(kind), **args)
                e = topk_divergence(case.shard(case.student), exact, make_divergence(kind), **args)
                rel = ((a - e).abs() / e.abs().clamp_min(1e-3)).max().item()
                worst[dtype] = max(worst[dtype], rel)
    r.notes["fp8_rel_err"] = worst[torch.float8_e4m3fn]
    r.notes["bf16_rel_err"] = worst[torch.bfloat16]
    r.ok("fp8 transfer error", worst[torch.float8_e4m3fn] <= FP8_REL_BOUND,
         f"max relative error {worst[torch.float8_e4m3fn]:.4g} > {FP8_REL_BOUND}")
    r.ok("bf16 transfer error", worst[torch.bfloat16] <= BF16_REL_BOUND,
         f"max relative error {worst[torch.bfloat16]:.4g} > {BF16_REL_BOUND}")


def check_identical(r: Report, case: Case, group, kind: str, temperature: float) -> None:
    shard = case.shard(case.teacher)
    tk, tk_all = case.topk(5, temperature, group), case.topk(case.valid, temperature, group)
    div = make_divergence(kind)
    student = shard.clone().requires_grad_(True)
    args = dict(temperature=temperature, valid_vocab_size=case.valid, tp_group=group)
    values = [vocab_parallel_divergence(student, shard, div, **args),
              topk_divergence(student, tk, div, **args),
              topk_divergence(student, tk, div, renormalize=True, **args),
              topk_divergence(student, tk_all, div, **args)]
    keep = case.mask > 0
    for name, v in zip(("dense", "topk", "topk renorm", "topk k=V"), values):
        r.ok(f"{name} finite", bool(torch.isfinite(v).all()))
        r.ok(name, bool((v[keep].abs() <= 2e-6).all()),
             f"max |value| {v[keep].abs().max().item():.3g}")
        grad, = torch.autograd.grad((v * case.mask).sum(), student)
        if not div.smooth:  # e.g. |p - q| has no gradient at p == q; rounding picks one
            continue
        r.ok(f"{name} grad", bool((grad.abs() <= 1e-5).all()),
             f"max |grad| {grad.abs().max().item():.3g}")


def check_cross_entropy(r: Report, case: Case, group, dtype=torch.float32) -> None:
    g = torch.Generator().manual_seed(case.valid)
    target = torch.randint(0, case.valid, case.mask.shape, generator=g)
    logits = case.shard(case.student).to(dtype).requires_grad_(True)
    before = logits.detach().clone()
    loss = vocab_parallel_cross_entropy(logits, target, valid_vocab_size=case.valid, tp_group=group)
    r.ok("input untouched after forward", torch.equal(logits.detach(), before))
    (loss * case.mask).sum().backward()
    r.ok("input untouched after backward", torch.equal(logits.detach(), before))
    full = case.student.to(dtype).to(F64).requires_grad_(True)
    l_ref = ref.cross_entropy(full, target, case.valid)
    (l_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    r.close("value", loss[keep], l_ref[keep], 1e-5, atol=1e-6)
    r.ok("finite", bool(torch.isfinite(loss).all()))
    r.ok("grad dtype", logits.grad.dtype == dtype)
    r.close_grad("grad", logits.grad, case.shard(full.grad),
                 2e-5 if dtype == torch.float32 else 1e-2)


def check_bf16(r: Report, case: Case, group, kind: str) -> None:
    """bf16 logits: fp32 compute gives fp32-accurate values; gradients come back in bf16."""
    student = case.shard(case.student).requires_grad_(True)
    teacher = case.shard(case.teacher)
    div = make_divergence(kind)
    value = vocab_parallel_divergence(student, teacher, div, temperature=2.0,
                                      valid_vocab_size=case.valid, tp_group=group)
    r.ok("fp32 result", value.dtype == torch.float32)
    (value * case.mask).sum().backward()
    s_ref = case.ref_student.to(F64).requires_grad_(True)
    v_ref = ref.dense(s_ref, case.teacher, kind, 2.0, case.valid, div.values)
    (v_ref * case.mask.to(F64)).sum().backward()
    keep = case.mask > 0
    r.close("value", value[keep], v_ref[keep], 1e-5, atol=1e-6)
    r.ok("grad dtype", student.grad.dtype == torch.bfloat16)
    r.close_grad("grad", student.grad, case.shard(s_ref.grad), 1e-2)
    tk = case.topk(6, 2.0, group)
    v_top = topk_divergence(student.detach(), tk, div, temperature=2.0,
                            valid_vocab_size=case.valid, tp_group=group)
    v_top_ref = ref.topk(case.student.to(F64), case.teacher, kind, 6, 2.0, case.valid, div.values)
    r.close("topk value", v_top[keep], v_top_ref[keep], 1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- case list
@dataclass(frozen=True)
class Check:
    """One pytest case: ``fn(report, <inputs>, group, *args)`` on every rank of ``world``."""

    id: str
    world: int
    fn: Callable[..., None]
    spec: Optional[Spec] = None  # None: fn takes (report, group, world, rank, *args)
    args: tuple = ()
    kwargs: Tuple[Tuple[str, object], ...] = ()
    chunk: Optional[int] = None  # vp.chunk_elements for this check (None: the default)


def _vocab_configs(world: int):
    """(local_vocab, valid) per world size: no padding, partial last shard, empty last shard."""
    if world == 1:
        return [(61, 61), (64, 53)]
    if world == 2:
        return [(40, 80), (40, 71), (24, 23)]
    return [(20, 80), (20, 67), (20, 55)]


def _world_checks(world: int) -> List[Check]:
    out: List[Check] = []
    seed = 1000 * world
    for ci, (local_vocab, valid) in enumerate(_vocab_configs(world)):
        where = f"tp{world}-V{local_vocab}x{world}-valid{valid}"
        for ti, t in enumerate(TEMPERATURES):
            seed += 1
            spec = Spec(seed, 3 + seed % 4, 2 + seed % 3, local_vocab, valid)
            chunk = 7 if (ci + ti) % 2 else 1 << 20  # one-chunk and many-chunk execution
            common = dict(world=world, spec=spec, chunk=chunk)
            for kind in KINDS:
                out.append(Check(f"{where}-dense-{kind}-T{t}", fn=check_dense, args=(kind, t),
                                 **common))
                for k, renorm in ((5, False), (5, True), (valid, False)):
                    label = f"topk{k}{'-renorm' if renorm else ''}"
                    out.append(Check(f"{where}-{label}-{kind}-T{t}", fn=check_topk,
                                     args=(kind, t, k, renorm), **common))
                out.append(Check(f"{where}-identical-{kind}-T{t}", fn=check_identical,
                                 args=(kind, t), **common))
            for k in (7, valid):
                out.append(Check(f"{where}-teacher_topk{k}-T{t}", fn=check_teacher_topk,
                                 args=(k, t), **common))
            out.append(Check(f"{where}-ce-T{t}", fn=check_cross_entropy, **common))
        for t in TEMPERATURES:  # extreme logits (+-1e4) on every row
            seed += 1
            spec = Spec(seed, 3, 2, local_vocab, valid, scale=1e4)
            for kind in KINDS:
                out.append(Check(f"{where}-extreme-dense-{kind}-T{t}", world, check_dense, spec,
                                 (kind, t), (("rtol", 1e-4), ("grad_rtol", 1e-4))))
                out.append(Check(f"{where}-extreme-topk4-{kind}-T{t}", world, check_topk, spec,
                                 (kind, t, 4, False)))
        for t in (0.5, 2.0):  # -inf / finfo.min logits: masked rows entirely, 3 tokens elsewhere
            seed += 1
            spec = Spec(seed, 3, 3, local_vocab, valid, garbage_rows=False, mask_logits=True)
            for kind in KINDS:
                out.append(Check(f"{where}-neginf-dense-{kind}-T{t}", world, check_dense, spec,
                                 (kind, t)))
                out.append(Check(f"{where}-neginf-topk4-{kind}-T{t}", world, check_topk, spec,
                                 (kind, t, 4, False)))
        seed += 1
        spec = Spec(seed, 4, 3, local_vocab, valid, dtype=torch.bfloat16)
        for kind in KINDS:
            out.append(Check(f"{where}-bf16-{kind}", world, check_bf16, spec, (kind,)))
        out.append(Check(f"{where}-bf16-ce", world, check_cross_entropy, spec,
                         kwargs=(("dtype", torch.bfloat16),)))
    out.append(Check(f"tp{world}-compression", world, check_compression))
    out += [Check(f"tp{world}-precision-{path}-{kind}-T{t}", world, check_precision,
                  args=(path, kind, t)) for path, kind, t in precision_cases(world)]
    return out


CHECKS: List[Check] = [check for world in WORLDS for check in _world_checks(world)]


# --------------------------------------------------------------------------------- workers
def _run(check: Check, rank: int, group, case_of: Callable[[Spec], Case]) -> Report:
    report = Report(rank)
    try:
        with vp.chunk_elements(check.chunk) if check.chunk else contextlib.nullcontext():
            if check.spec is None:
                check.fn(report, group, check.world, rank, *check.args)
            else:
                check.fn(report, case_of(check.spec), group, *check.args, **dict(check.kwargs))
    except Exception:  # noqa: BLE001 - reported as this check's failure
        report.failures.append(f"[rank {rank}] raised:\n" + traceback.format_exc())
    return report


def _worker(rank: int, world: int) -> dict:
    """Runs every check of this world size on this rank; returns {check id: (failures, notes)}."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=90))
    group = None if world == 1 else dist.group.WORLD
    case_of = lru_cache(maxsize=None)(lambda spec: Case(spec, world, rank))
    results = {}
    for check in _world_checks(world):
        report = _run(check, rank, group, case_of)
        results[check.id] = (report.failures, report.notes)
    dist.barrier()
    dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def tp_results() -> Callable[[int], Dict[str, tuple]]:
    """``get(world)``: {check id: (failures of all ranks, rank 0's notes)}; each world size is
    launched once, on first use."""
    cache: Dict[int, object] = {}

    def get(world: int) -> Dict[str, tuple]:
        if world not in cache:
            try:
                reports = run_distributed(world, _worker, world, timeout=600)
                cache[world] = {cid: ([f for rep in reports for f in rep[cid][0]],
                                      reports[0][cid][1]) for cid in reports[0]}
            except AssertionError as exc:  # a crashed launch fails every case of that size
                cache[world] = exc
        if isinstance(cache[world], Exception):
            raise cache[world]  # type: ignore[misc]
        return cache[world]  # type: ignore[return-value]

    return get


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_loss(check: Check, tp_results) -> None:
    failures, notes = tp_results(check.world)[check.id]
    if notes:
        print(f"{check.id}: {notes}")
    assert not failures, f"{check.id}: {len(failures)} failed:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("world", WORLDS)
def test_every_check_ran(world: int, tp_results) -> None:
    expected = {c.id for c in CHECKS if c.world == world}
    assert set(tp_results(world)) == expected
    assert len(expected) > 100
