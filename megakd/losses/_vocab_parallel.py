"""Vocab-parallel plumbing shared by every loss: shard bounds, row chunking, reductions.

A tensor-parallel rank ``r`` of a group of size ``tp`` holds the contiguous vocab shard
``[r * Vl, (r + 1) * Vl)`` of the (padded) vocabulary, ``Vl = V_padded / tp``. Megatron pads the
vocabulary at its end, so the *valid* entries of every shard form a prefix of the shard:
``n_valid = clamp(valid_vocab_size - r * Vl, 0, Vl)``. Every loss therefore works on the view
``x[:, :n_valid]`` and never needs a padding mask; a shard that is entirely padding has
``n_valid == 0`` and still takes part in every collective.

Only per-token values cross ranks here: ``[N]`` maxima and sums (all-reduce) and ``[N, k]``
candidates (all-gather). Full-vocab temporaries are processed in row chunks of at most
``CHUNK_ELEMENTS`` elements so that no pass allocates another copy of the ``[N, Vl]`` shard.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

# Elements per row chunk of full-vocab temporaries (fp32: 1 MiB). Tests shrink it to exercise
# the chunking; it never changes results (rows are independent).
CHUNK_ELEMENTS: int = 1 << 18
# ... but also at most 1/16 of the tensor, unless that is below this many elements (256 KiB).
MIN_CHUNK_ELEMENTS: int = 1 << 16

NEG_INF = float("-inf")
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


def local_logsumexp_stats(
    x: torch.Tensor,
    temperature: float = 1.0,
    exclude_cols: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row local (max m, sum of exp(x'/T - m)) of ``x`` ``[N, n]`` (x' = clamped x).

    ``exclude_cols`` (``[N, k]`` local columns, -1 = none) are left out of both. A row with
    no entries gives ``m = -inf, s = 0``. Works chunk by chunk on fp32 temporaries; ``x`` is
    never modified. Nothing is communicated.
    """
    n_rows, n_cols = x.shape
    m = torch.full((n_rows,), NEG_INF, dtype=torch.float32, device=x.device)
    s = torch.zeros((n_rows,), dtype=torch.float32, device=x.device)
    if n_cols == 0:
        return m, s
    for sl in row_chunks(n_rows, n_cols):
        t = scaled_fp32(x[sl], temperature)
        if exclude_cols is not None:
            _set_cols_(t, exclude_cols[sl], NEG_INF)
        m_c = t.amax(dim=-1)
        m_safe = torch.where(torch.isfinite(m_c), m_c, torch.zeros_like(m_c))
        m[sl] = m_c
        s[sl] = t.sub_(m_safe.unsqueeze(-1)).exp_().sum(dim=-1)
    return m, s


def combine_logsumexp(
    m: torch.Tensor, s: torch.Tensor, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Global per-row logsumexp from per-rank ``(m, s)``; all-reduces ``[N]`` max and sum.

    Returns ``-inf`` for rows with no entries on any rank.
    """
    g_max = all_reduce_(m.clone(), group, op="max")
    g_safe = torch.where(torch.isfinite(g_max), g_max, torch.zeros_like(g_max))
    scaled = torch.where(s > 0, s * torch.exp(m - g_safe), torch.zeros_like(s))
    all_reduce_(scaled, group, op="sum")
    return g_safe + torch.log(scaled)


def vocab_parallel_logsumexp(
    x: torch.Tensor, temperature: float, group: Optional[dist.ProcessGroup]
) -> torch.Tensor:
    """Per-row log-normalizer ``[N]`` of ``x / T`` over the valid columns of all shards.

    ``x`` is the ``[N, n_valid]`` view of this rank's logits (any float dtype; not modified).
    Communicates two ``[N]`` all-reduces.
    """
    return combine_logsumexp(*local_logsumexp_stats(x, temperature), group)


def log_probs_chunk(
    x: torch.Tensor, rows: slice, temperature: float, lse: torch.Tensor
) -> torch.Tensor:
    """fp32 log-probs ``x[rows] / T - lse[rows]`` of one row chunk (a new tensor)."""
    return scaled_fp32(x[rows], temperature).sub_(lse[rows].unsqueeze(-1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (``-inf -> 0``)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )
