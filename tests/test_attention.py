"""SDPA core attention (megakd.models.attention) against megatron-core's DotProductAttention.

Each world size is launched once (gloo on CPU, tests/dist_harness). Its worker runs every check
and returns the measured maximum differences, which the tests below assert:

* the module alone, forward and input gradients, float32 and float64, MHA / GQA / MQA with
  ``kv_channels != hidden / heads``, causal, packed (block-diagonal causal) and key-padding
  masks, an explicit softmax scale with ``apply_query_key_layer_scaling``, at TP=1 and TP=2
  (each TP rank holds its slice of the heads; a float64 reference on all heads checks the
  slices);
* whole ``GPTModel``s built with ``--attention-backend sdpa`` and ``unfused`` from the same seed:
  same parameters, logits and parameter gradients, causal and packed, at TP=1 and TP=2;
* attention dropout in training, fully-masked rows, and the unsupported-input errors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from tests.dist_harness import run_distributed

SEQ, BATCH = 24, 2
DOCS = (0, 7, 16)  # packed documents start at these positions
# (name, heads, query groups, hidden, kv_channels); kv_channels != hidden / heads throughout.
HEAD_LAYOUTS = (("mha", 4, 4, 32, 12), ("gqa", 4, 2, 32, 12), ("mqa", 4, 1, 32, 6))
MASKS = ("causal", "packed", "padding")
TOL = {torch.float32: 5e-6, torch.float64: 1e-13}
MODEL_TOL = 2e-6  # whole GPTModel in float32 (logits and parameter gradients)


# ------------------------------------------------------------------------------ helpers
def packed_mask(seq: int, batch: int, starts=DOCS) -> torch.Tensor:
    """Megatron's mask for packed documents: ``[b, 1, s, s]`` bool, True = masked out
    (a query sees earlier keys of its own document only)."""
    doc = torch.zeros(seq, dtype=torch.long)
    for start in starts[1:]:
        doc[start:] += 1
    same_doc = doc[:, None] == doc[None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (~(same_doc & causal)).expand(batch, 1, seq, seq).contiguous()


def padding_mask(seq: int, batch: int) -> torch.Tensor:
    """Key padding ``[b, 1, 1, s]``: the last 5 keys of sample 1 are padding."""
    mask = torch.zeros(batch, 1, 1, seq, dtype=torch.bool)
    mask[1, ..., seq - 5:] = True
    return mask


def reference_attention(q, k, v, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Plain float64 attention: q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, h]``, mask True = masked
    out (None: causal). Returns ``[sq, b, np*h]``."""
    sq, b, heads, _ = q.shape
    rep = heads // k.shape[2]
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is None:
        mask = torch.ones(sq, sq, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _config(heads: int, groups: int, hidden: int, kv_channels: int, dtype: torch.dtype,
            tp: int, **overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(attention_dropout=0.0, hidden_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(
        num_layers=2, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=kv_channels, tensor_model_parallel_size=tp, params_dtype=dtype, **fields)


def _init(tp: int):
    from megakd.configs import ParallelConfig, RuntimeConfig
    from megakd.runtime import initialize_for

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_for(ParallelConfig(tensor_model_parallel_size=tp), RuntimeConfig(device="cpu"),
                   seed=1234, num_layers=2)


def _pair(config, layer_number: int = 1, softmax_scale: Optional[float] = None,
          mask_type=None):
    """(SDPA module, megatron DotProductAttention), same arguments."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megakd.models.attention import SDPADotProductAttention

    kwargs = dict(config=config, layer_number=layer_number,
                  attn_mask_type=mask_type or AttnMaskType.causal, attention_type="self",
                  softmax_scale=softmax_scale)
    return SDPADotProductAttention(**kwargs), DotProductAttention(**kwargs)


def _run(module, q, k, v, mask, grad_out, mask_type=None):
    """Forward + backward; returns (output, (dq, dk, dv))."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = module(*inputs, mask, attn_mask_type=mask_type)
    out.backward(grad_out)
    return out.detach(), tuple(t.grad for t in inputs)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------ module checks
def module_checks(tp: int) -> Dict[str, float]:
    """SDPA vs DotProductAttention (and a float64 reference) on this TP rank's heads."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    rank = parallel_state.get_tensor_model_parallel_rank()
    diffs: Dict[str, float] = {}
    for dtype in (torch.float32, torch.float64):
        for name, heads, groups, hidden, kv in HEAD_LAYOUTS:
            if groups % tp:
                continue  # megatron replicates k/v upstream when groups < TP
            config = _config(heads, groups, hidden, kv, dtype, tp)
            sdpa, unfused = _pair(config)
            gen = torch.Generator().manual_seed(17)  # same full tensors on every rank
            full_q = torch.randn(SEQ, BATCH, heads, kv, generator=gen, dtype=dtype)
            full_k = torch.randn(SEQ, BATCH, groups, kv, generator=gen, dtype=dtype)
            full_v = torch.randn(SEQ, BATCH, groups, kv, generator=gen, dtype=dtype)
            grad_out = torch.randn(SEQ, BATCH, heads * kv // tp, generator=gen, dtype=dtype)
            hp, gp = heads // tp, groups // tp  # this rank's query heads and k/v groups
            q = full_q[:, :, rank * hp:(rank + 1) * hp]
            k = full_k[:, :, rank * gp:(rank + 1) * gp]
            v = full_v[:, :, rank * gp:(rank + 1) * gp]
            for mask_name in MASKS:
                mask, mask_type = {
                    "causal": (None, None),
                    "packed": (packed_mask(SEQ, BATCH), None),
                    "padding": (padding_mask(SEQ, BATCH), AttnMaskType.padding),
                }[mask_name]
                out, grads = _run(sdpa, q, k, v, mask, grad_out, mask_type)
                ref_out, ref_grads = _run(unfused, q, k, v, mask, grad_out, mask_type)
                key = f"{str(dtype)[6:]}/{name}/{mask_name}"
                diffs[f"out/{key}"] = _maxdiff(out, ref_out)
                diffs[f"grad/{key}"] = max(_maxdiff(a, b) for a, b in zip(grads, ref_grads))
                if dtype == torch.float64 and mask_name != "padding":
                    # This rank's output must be its slice of attention over all heads.
                    full = reference_attention(full_q, full_k, full_v, mask, 1 / math.sqrt(kv))
                    width = hp * kv
                    diffs[f"out_vs_full_heads/{name}/{mask_name}"] = _maxdiff(
                        out, full[..., rank * width:(rank + 1) * width])

    # Explicit softmax scale and query-key layer scaling (megatron divides by the layer number
    # and multiplies back in the softmax): the net scale is the same.
    config = _config(4, 2, 32, 12, torch.float64, tp, apply_query_key_layer_scaling=True)
    sdpa, unfused = _pair(config, layer_number=3, softmax_scale=0.37)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(SEQ, BATCH, 4 // tp, 12, generator=gen, dtype=torch.float64)
    k = torch.randn(SEQ, BATCH, 2 // tp, 12, generator=gen, dtype=torch.float64)
    v = torch.randn(SEQ, BATCH, 2 // tp, 12, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(SEQ, BATCH, 4 // tp * 12, generator=gen, dtype=torch.float64)
    out, grads = _run(sdpa, q, k, v, packed_mask(SEQ, BATCH), grad_out)
    ref_out, ref_grads = _run(unfused, q, k, v, packed_mask(SEQ, BATCH), grad_out)
    diffs["out/float64/scaled"] = _maxdiff(out, ref_out)
    diffs["grad/float64/scaled"] = max(_maxdiff(a, b) for a, b in zip(grads, ref_grads))
    return diffs


def behaviour_checks() -> Dict[str, object]:
    """Dropout, fully-masked rows, errors (TP=1)."""
    from megatron.core import tensor_parallel
    from megatron.core.packed_seq_params import PackedSeqParams

    results: Dict[str, object] = {}
    config = _config(4, 2, 32, 8, torch.float32, 1, attention_dropout=0.5)
    sdpa, _ = _pair(config)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(64, BATCH, 4, 8, generator=gen)
    k = torch.randn(64, BATCH, 2, 8, generator=gen)
    ones = torch.ones(64, BATCH, 2, 8)  # value rows of ones: output = kept prob mass / (1 - p)

    def dropped(seed: int) -> torch.Tensor:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return sdpa(q, k, ones, None)

    sdpa.train()
    first, again, other = dropped(11), dropped(11), dropped(12)
    sdpa.eval()
    results["eval_vs_ones"] = _maxdiff(sdpa(q, k, ones, None), torch.ones(1))
    results["train_mean"] = first.mean().item()
    results["train_max_dev"] = _maxdiff(first, torch.ones(1))
    results["same_seed_diff"] = _maxdiff(first, again)
    results["other_seed_diff"] = _maxdiff(first, other)

    # A query whose keys are all masked: zeros and finite gradients (megatron: uniform average).
    mask = packed_mask(SEQ, BATCH).clone()
    mask[:, :, 3, :] = True
    config = _config(4, 2, 32, 8, torch.float32, 1)
    sdpa, _ = _pair(config)
    v = torch.randn(SEQ, BATCH, 2, 8)
    out, grads = _run(sdpa, torch.randn(SEQ, BATCH, 4, 8), torch.randn(SEQ, BATCH, 2, 8), v,
                      mask, torch.ones(SEQ, BATCH, 32))
    results["masked_row_abs_max"] = out[3].abs().max().item()
    results["all_finite"] = bool(torch.isfinite(out).all()) and all(
        bool(torch.isfinite(g).all()) for g in grads)

    errors: List[str] = []
    qkv = (torch.randn(SEQ, 1, 4, 8), torch.randn(SEQ, 1, 2, 8), torch.randn(SEQ, 1, 2, 8))
    for kwargs, expected in (
        (dict(packed_seq_params=PackedSeqParams(qkv_format="thd")), NotImplementedError),
        (dict(attention_bias=torch.zeros(1)), NotImplementedError),
    ):
        try:
            sdpa(*qkv, None, **kwargs)
            errors.append(f"{list(kwargs)} did not raise")
        except expected as exc:
            errors.append(f"ok: {type(exc).__name__}")
    try:
        sdpa(*qkv, torch.zeros(1, 1, SEQ, SEQ))
        errors.append("float mask did not raise")
    except TypeError:
        errors.append("ok: TypeError")
    results["errors"] = errors
    return results


# ------------------------------------------------------------------------------ GPTModel checks
def _gpt(backend: str, tp: int, kv_channels: Optional[int]):
    """A 2-layer GQA GPTModel (RMSNorm, SwiGLU, RoPE) built from seed 1234."""
    from megatron.core.models.gpt import GPTModel

    from megakd.configs import ModelArchConfig, ParallelConfig
    from megakd.models.builder import _layer_spec, transformer_config_from_arch
    from megakd.runtime import set_seed

    arch = ModelArchConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                           num_query_groups=2, swiglu=True, normalization="RMSNorm",
                           position_embedding_type="rope", add_bias_linear=False)
    config = transformer_config_from_arch(arch, ParallelConfig(tensor_model_parallel_size=tp))
    if kv_channels is not None:
        config = dataclasses.replace(config, kv_channels=kv_channels)
    set_seed(1234)
    return GPTModel(config=config, transformer_layer_spec=_layer_spec(arch, backend),
                    vocab_size=128, max_sequence_length=SEQ, parallel_output=True,
                    position_embedding_type="rope")


def model_checks(tp: int) -> Dict[str, float]:
    """GPTModel with SDPA vs unfused attention: same weights, logits and parameter gradients."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megakd.models.attention import SDPADotProductAttention

    diffs: Dict[str, float] = {}
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    doc_positions = torch.cat([torch.arange(e - s) for s, e in zip(DOCS, DOCS[1:] + (SEQ,))])
    for kv in (None, 24):
        models = {b: _gpt(b, tp, kv) for b in ("sdpa", "unfused")}
        kinds = {b: {type(m.self_attention.core_attention) for m in models[b].decoder.layers}
                 for b in models}
        assert kinds == {"sdpa": {SDPADotProductAttention}, "unfused": {DotProductAttention}}, kinds
        sd = {b: models[b].state_dict() for b in models}
        assert sd["sdpa"].keys() == sd["unfused"].keys()
        diffs[f"params/kv{kv}"] = max(_maxdiff(sd["sdpa"][n], sd["unfused"][n])
                                      for n in sd["sdpa"] if torch.is_tensor(sd["sdpa"][n]))
        for mask_name in ("causal", "packed"):
            mask = None if mask_name == "causal" else packed_mask(SEQ, BATCH)
            pos = positions if mask is None else doc_positions.expand(BATCH, SEQ)
            out = {}
            for b, model in models.items():
                model.zero_grad()
                logits = model(tokens, pos, mask)  # [b, s, V/tp]
                (logits.float().square().mean()).backward()
                out[b] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
            key = f"kv{kv}/{mask_name}"
            diffs[f"logits/{key}"] = _maxdiff(out["sdpa"][0], out["unfused"][0])
            diffs[f"param_grads/{key}"] = max(_maxdiff(g, out["unfused"][1][n])
                                              for n, g in out["sdpa"][1].items())
    return diffs


def worker(rank: int, tp: int) -> Dict[str, object]:
    import warnings

    warnings.filterwarnings("ignore")
    _init(tp)
    result: Dict[str, object] = {"module": module_checks(tp), "model": model_checks(tp)}
    if tp == 1:
        result["behaviour"] = behaviour_checks()
    return result


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tp1():
    return run_distributed(1, worker, 1)[0]


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(2, worker, 2)


def _assert_module(diffs: Dict[str, float]) -> None:
    bad = {k: v for k, v in diffs.items()
           if not v <= TOL[torch.float64 if "float64" in k or "full_heads" in k else torch.float32]}
    assert not bad, bad


def test_module_matches_megatron_tp1(tp1):
    diffs = tp1["module"]
    assert len(diffs) == 2 * 3 * 3 * 2 + 2 * 3 + 2  # every case ran
    _assert_module(diffs)


def test_module_matches_megatron_tp2(tp2):
    for rank_result in tp2:
        # MQA (1 group) is skipped at TP=2: megatron replicates k/v before core attention.
        assert len(rank_result["module"]) == 2 * 2 * 3 * 2 + 2 * 2 + 2
        _assert_module(rank_result["module"])


@pytest.mark.parametrize("tp", [1, 2])
def test_gpt_model_same_logits_both_backends(tp, request):
    results = [request.getfixturevalue("tp1")] if tp == 1 else request.getfixturevalue("tp2")
    for result in results:
        diffs = result["model"]
        assert diffs["params/kvNone"] == 0.0 and diffs["params/kv24"] == 0.0, diffs
        bad = {k: v for k, v in diffs.items() if not v <= MODEL_TOL}
        assert not bad, bad


def test_dropout_in_training_only(tp1):
    b = tp1["behaviour"]
    assert b["eval_vs_ones"] < 1e-6
    assert b["same_seed_diff"] == 0.0  # drawn from megatron's RNG tracker
    assert b["other_seed_diff"] > 0.5 and b["train_max_dev"] > 0.5  # masks really applied
    assert abs(b["train_mean"] - 1.0) < 0.1  # inverted dropout keeps the expectation


def test_fully_masked_rows_and_errors(tp1):
    b = tp1["behaviour"]
    assert b["all_finite"] and b["masked_row_abs_max"] == 0.0
    assert b["errors"] == ["ok: NotImplementedError"] * 2 + ["ok: TypeError"], b["errors"]


# ------------------------------------------------------------------------------ flag and spec
def _argv(*extra: str) -> List[str]:
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "8", "--train-iters", "1", "--lr", "1e-3", "--mock-data",
            "--vocab-size", "60", "--device", "cpu", *extra]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "unfused", "local"])
def test_flag_selects_core_attention(backend):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megakd.models.attention import SDPADotProductAttention
    from megakd.models.builder import _layer_spec

    from megakd.preflight import parse_pretrain_args as parse_args

    config = parse_args(_argv("--attention-backend", backend), world_size=1)
    assert config.runtime.attention_backend == backend
    spec = _layer_spec(config.student, config.runtime.attention_backend)
    expected = DotProductAttention if backend in ("unfused", "local") else SDPADotProductAttention
    assert spec.submodules.self_attention.submodules.core_attention is expected  # no TE on CPU


def test_flag_default_and_validation():
    from megakd.configs import ConfigError
    from megakd.preflight import check_pretrain_config as validate
    from megakd.preflight import parse_pretrain_args as parse_args
    from megakd.models.builder import _layer_spec

    config = parse_args(_argv(), world_size=1)
    assert config.runtime.attention_backend == "auto"
    with pytest.raises(SystemExit):
        parse_args(_argv("--attention-backend", "flash"), world_size=1)
    config.runtime.attention_backend = "flash"
    with pytest.raises(ConfigError, match="--attention-backend"):
        validate(config)
    with pytest.raises(ValueError, match="attention backend"):
        _layer_spec(config.student, "flash")
