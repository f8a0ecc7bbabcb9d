"""Vocab-parallel plumbing shared by every loss: shard bounds, row chunking, reductions, and
accurate log-normalisers.

A tensor-parallel rank ``r`` of a group of size ``tp`` holds the contiguous vocab shard
``[r * Vl, (r + 1) * Vl)`` of the (padded) vocabulary, ``Vl = V_padded / tp``. Megatron pads the
vocabulary at its end, so the *valid* entries of every shard form a prefix of the shard:
``n_valid = clamp(valid_vocab_size - r * Vl, 0, Vl)``. Every loss therefore works on the view
``x[:, :n_valid]`` and never needs a padding mask; a shard that is entirely padding has
``n_valid == 0`` and still takes part in every collective.

Only per-token values cross ranks here: ``[N]`` / ``[N, 2]`` maxima and sums (all-reduce) and
``[N, k]`` candidates (all-gather). Full-vocab temporaries are processed in row chunks of at
most ``CHUNK_ELEMENTS`` elements so that no pass allocates another copy of the ``[N, Vl]``
shard.

Log-probs are computed as ``(x - max) - log_sum`` from a ``Normalizer`` that keeps the row max
and ``log_sum = log1p(mass outside the max, relative to the max's)`` apart. Unlike
``x - logsumexp(x)``, this has relative accuracy everywhere: no rounding of the (large)
log-normaliser, and the log-prob of a saturated token (~ -1e-12) is exact instead of 0. The
``Normalizer`` also flags the rows whose dominant token (softmax > 1/2) is in this shard, where
gradients are completed to sum to zero (``complete_zero_sum_``).

Precision rule of every loss: vocab-sized math (``[N, V/tp]`` chunks) in fp32, per-token
math (``[N]`` scalars, ``[N, k + 1]`` top-k buckets) and its all-reduces in float64; the
latter costs nothing measurable and removes the rounding of every step after the vocab sums.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

# Elements per row chunk of full-vocab temporaries (fp32: 1 MiB). Tests shrink it to exercise
# the chunking; it never changes results (rows are independent).
CHUNK_ELEMENTS: int = 1 << 18
# ... but also at most 1/16 of the tensor, unless that is below this many elements (256 KiB).
MIN_CHUNK_ELEMENTS: int = 1 << 16

NEG_INF = float("-inf")
LOG_2 = 0.6931471805599453  # log_sum < log 2 <=> the max entry's softmax is > 1/2
# Tempered logits are clamped to +-LOGIT_LIMIT: -inf (masked) logits become a finite, vanishing
# log-prob, and no difference of two log-probs can overflow fp32.
LOGIT_LIMIT = 1e30


@contextlib.contextmanager
def chunk_elements(n: int) -> Iterator[None]:
    """Temporarily set the row-chunk budget (elements per temporary)."""
    global CHUNK_ELEMENTS
    old, CHUNK_ELEMENTS = CHUNK_ELEMENTS, max(1, int(n))
    try:
        yield
    finally:
        CHUNK_ELEMENTS = old


def tp_world_and_rank(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(size, rank) of the tensor-parallel group; (1, 0) when ``group`` is None."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_bounds(
    local_vocab: int, valid_vocab_size: Optional[int], group: Optional[dist.ProcessGroup]
) -> Tuple[int, int]:
    """(global id of this shard's first entry, number of valid entries in this shard)."""
    world, rank = tp_world_and_rank(group)
    start = rank * local_vocab
    total = local_vocab * world
    valid = total if valid_vocab_size is None else int(valid_vocab_size)
    if not 0 < valid <= total:
        raise ValueError(
            f"valid_vocab_size={valid_vocab_size} must be in [1, {total}] "
            f"(local vocab {local_vocab} x tp {world})"
        )
    return start, max(0, min(local_vocab, valid - start))


def valid_vocab_total(
    local_vocab: int, valid_vocab_size: Optional[int], group: Optional[dist.ProcessGroup]
) -> int:
    """Global number of valid (non-padding) vocab entries."""
    world, _ = tp_world_and_rank(group)
    return local_vocab * world if valid_vocab_size is None else int(valid_vocab_size)


def row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices whose ``[rows, n_cols]`` temporaries stay within ``CHUNK_ELEMENTS`` and
    within 1/16 of the whole ``[n_rows, n_cols]`` tensor (or ``MIN_CHUNK_ELEMENTS``)."""
    cols = max(1, n_cols)
    lean = max(-(-n_rows // 16), min(MIN_CHUNK_ELEMENTS, CHUNK_ELEMENTS) // cols)
    step = max(1, min(CHUNK_ELEMENTS // cols, lean))
    for begin in range(0, n_rows, step):
        yield slice(begin, min(n_rows, begin + step))


def all_reduce_(
    tensor: torch.Tensor, group: Optional[dist.ProcessGroup], op: str = "sum"
) -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) of a plain (non-autograd) tensor."""
    if tp_world_and_rank(group)[0] > 1:
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate ``[N, k]`` per-rank tensors along the last dim, in rank order."""
    world, _ = tp_world_and_rank(group)
    if world == 1:
        return tensor
    parts: List[torch.Tensor] = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def load_scaled_(dst: torch.Tensor, src: torch.Tensor, temperature: float) -> torch.Tensor:
    """``dst`` (fp32) <- ``clamp(src / temperature, +-LOGIT_LIMIT)``; returns ``dst``.

    The clamp only touches absurd inputs (``-inf`` masks, ``finfo.min``, overflow of ``z / T``)
    and keeps every later difference of log-probs finite.
    """
    limit = LOGIT_LIMIT * temperature
    if src.dtype == dst.dtype:
        torch.clamp(src, -limit, limit, out=dst)  # copy and clamp in one pass
    else:
        dst.copy_(src).clamp_(-limit, limit)
    return dst.div_(temperature) if temperature != 1.0 else dst


def scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new fp32 tensor ``clamp(x / temperature, +-LOGIT_LIMIT)`` (never a view of ``x``)."""
    return load_scaled_(torch.empty(x.shape, dtype=torch.float32, device=x.device), x, temperature)


def local_cols(indices: torch.Tensor, start: int, n_valid: int) -> torch.Tensor:
    """Global ids ``[N, k]`` -> this shard's column (int64), or -1 where not in this shard."""
    loc = indices.to(torch.int64) - start
    return torch.where((loc >= 0) & (loc < n_valid), loc, torch.full_like(loc, -1))


def _set_cols_(t: torch.Tensor, cols: torch.Tensor, value: float) -> None:
    """``t[i, cols[i, j]] = value`` wherever ``cols[i, j] >= 0``."""
    hit = cols >= 0
    if bool(hit.any()):
        rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1).expand_as(cols)
        t[rows[hit], cols[hit]] = value


@dataclass
class Normalizer:
    """Per-row log-normaliser of ``x = clamp(z / T)`` over the valid columns of all shards,
    ``logsumexp = max + log_sum``, kept in two parts for accuracy (module docstring)."""

    max: torch.Tensor  # [N] fp32 global row max (-inf: the row has no columns anywhere)
    log_sum: torch.Tensor  # [N] float64 log(Sum exp(x - max)) >= 0 (-inf: no columns)
    # [N] bool: this shard holds the row's max and its softmax is > 1/2 (a dominant token)
    dominant: Optional[torch.Tensor] = None

    def log_probs(self, x: torch.Tensor, rows: slice, temperature: float) -> torch.Tensor:
        """fp32 log-probs ``(x[rows] / T - max) - log_sum`` of a row chunk (a new tensor)."""
        t = scaled_fp32(x[rows], temperature).sub_(self.max[rows].unsqueeze(-1))
        return t.sub_(self.log_sum[rows].float().unsqueeze(-1))


def _local_stats(
    x: torch.Tensor, temperature: float, exclude_cols: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row local max ``m`` (fp32) and ``s = Sum exp(x - m)`` accumulated in float64, of
    ``x`` ``[N, n]``, chunk by chunk on fp32 temporaries; nothing communicated. The max's own
    term is exactly 1, so ``s - 1`` keeps the other terms to float64 rounding."""
    n_rows, n_cols = x.shape
    m = torch.full((n_rows,), NEG_INF, dtype=torch.float32, device=x.device)
    s = torch.zeros((n_rows,), dtype=torch.float64, device=x.device)
    for sl in row_chunks(n_rows, n_cols) if n_cols > 0 else ():
        t = scaled_fp32(x[sl], temperature)
        if exclude_cols is not None:
            _set_cols_(t, exclude_cols[sl], NEG_INF)
        m_c = t.amax(dim=-1)
        m[sl] = m_c
        t.sub_(torch.where(torch.isfinite(m_c), m_c, torch.zeros_like(m_c)).unsqueeze(-1))
        s[sl] = t.exp_().sum(dim=-1, dtype=torch.float64)
    return m, s


def normalizer(
    x: torch.Tensor,
    temperature: float,
    group: Optional[dist.ProcessGroup],
    exclude_cols: Optional[torch.Tensor] = None,
) -> Normalizer:
    """The ``Normalizer`` of ``x / T`` ``[N, n_valid]`` (any float dtype; not modified).

    ``exclude_cols`` (``[N, k]`` local columns, -1 = none) are left out. Communicates one
    ``[N]`` fp32 MAX and one ``[N, 2]`` float64 SUM all-reduce: the number of shards holding
    the max, and the rescaled sums with the max's own 1 taken out, so that ``log_sum`` is
    ``log1p`` of the mass outside the max (exact where the max saturates).
    """
    m, s = _local_stats(x, temperature, exclude_cols)
    g_max = all_reduce_(m.clone(), group, op="max")
    here = (m == g_max) & (s > 0)
    safe = torch.where(torch.isfinite(g_max), g_max, torch.zeros_like(g_max))
    others = torch.exp((m - safe).double()).mul_(s)  # this shard's mass relative to exp(max)
    sums = torch.stack([here.double(), torch.where(here, s - 1.0, others)], dim=-1)
    all_reduce_(sums, group, op="sum")
    n_here, rest = sums.unbind(-1)
    log_sum = torch.log1p((n_here - 1.0) + rest)  # -inf for rows without columns
    return Normalizer(g_max, log_sum, here & (log_sum < LOG_2))


def log_softmax_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Accurate ``log_softmax`` of complete float64 rows ``[N, c]`` (at least one finite entry
    per row) and each row's column of its dominant entry (softmax > 1/2; -1 if none)."""
    m, col = x.max(dim=-1)
    t = x - m.unsqueeze(-1)
    log_sum = torch.log1p(t.exp().sum(-1) - 1.0)  # the max's term is exactly 1
    top = torch.where(log_sum < LOG_2, col, torch.full_like(col, -1))
    return t.sub_(log_sum.unsqueeze(-1)), top


def complete_zero_sum_(grad: torch.Tensor, top_col: torch.Tensor) -> torch.Tensor:
    """``grad[i, top_col[i]] = -(sum of the row's other entries)`` where ``top_col >= 0``.

    The gradient of any function of softmax(x) sums to zero over the row. At a dominant
    token (q_c > 1/2) analytic formulas ``a_c - q_c Sum_j a_j`` cancel, by a factor that grows
    as 1 / (1 - q_c) when the student saturates; the other entries carry no such cancellation.
    """
    rows = torch.nonzero(top_col >= 0, as_tuple=True)[0]
    if rows.numel():
        cols = top_col[rows]
        grad[rows, cols] = 0.0
        grad[rows, cols] = -grad[rows].sum(-1)
    return grad


class ShardLogProbs:
    """Log-probs ``log softmax(z / T)`` of one side on this rank's valid columns, produced row
    chunk by row chunk (never whole), and the all-reduce of its tensor-parallel group."""

    def __init__(self, logits: torch.Tensor, temperature: float,
                 group: Optional[dist.ProcessGroup], norm: Optional[Normalizer] = None) -> None:
        self.logits = logits  # [N, n_valid] view of the caller's shard (not modified)
        self.temperature = temperature
        self.group = group
        self.norm = normalizer(logits, temperature, group) if norm is None else norm

    @property
    def n_rows(self) -> int:
        return self.logits.shape[0]

    @property
    def n_cols(self) -> int:
        return self.logits.shape[1]

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def chunks(self) -> Iterator[slice]:
        """Row slices covering all rows; none when this shard has no valid columns."""
        return row_chunks(self.n_rows, self.n_cols) if self.n_cols > 0 else iter(())

    def log_probs(self, rows: slice) -> torch.Tensor:
        """fp32 ``[rows, n_valid]`` log-probs (a new tensor)."""
        return self.norm.log_probs(self.logits, rows, self.temperature)

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce_(tensor, self.group, op=op)
