"""Mixture-of-experts models: conversion HF <-> megakd for Qwen3-MoE and Mixtral, loading at
TP / PP / EP layouts, distillation from a MoE teacher, a MoE student with its router loss, and
the MoE flags refused with exit status 2.

World size 1 is launched once for every conversion, world size 2 once for every layout and
training check (TP=2, PP=2, EP=2 with both token dispatchers, TP=2 x EP=2 with whole experts).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests import convert_workers, moe_workers
from tests.dist_harness import Task, run_distributed, run_tasks
from tests.tool_launcher import launch

FAMILIES = ("qwen3_moe", "mixtral")
LOGIT_ATOL = 1e-4  # fp32
LAYOUT_CASES = [("qwen3_moe", layout) for layout in ("tp2", "pp2", "ep2", "ep2_alltoall",
                                                     "tp2ep2")] + \
               [("mixtral", layout) for layout in ("tp2", "pp2", "ep2")]
STUDENT_LAYOUTS = ("dp2", "ep2", "tp2ep2")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def hf_dirs(workdir):
    return {family: moe_workers.make_hf_moe(f"{workdir}/hf_{family}", family, seed=i)
            for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def world1(workdir, hf_dirs):
    jobs = []
    for family in FAMILIES:
        jobs.append(("to_megakd", dict(hf_dir=hf_dirs[family], output=f"{workdir}/mk_{family}",
                                       dtype="fp32", make_vocab_size_divisible_by=16,
                                       verify=True, verify_tolerance=LOGIT_ATOL)))
        jobs.append(("to_hf", dict(load=f"{workdir}/mk_{family}",
                                   output=f"{workdir}/back_{family}", max_shard_size="30KB",
                                   verify=True, verify_tolerance=LOGIT_ATOL)))
    results = run_distributed(1, convert_workers.convert_worker, jobs)[0]
    return {family: results[2 * i: 2 * i + 2] for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def world2(workdir, hf_dirs, world1):
    cases = [(f"{workdir}/mk_{family}", hf_dirs[family],
              [layout for name, layout in LAYOUT_CASES if name == family]) for family in FAMILIES]
    per_rank = run_tasks(2, [
        Task("layouts", moe_workers.layouts_worker, (cases,)),
        Task("dense_student", moe_workers.dense_student_worker,
             (f"{workdir}/mk_qwen3_moe", ("tp2", "ep2"), 4)),
        Task("moe_student", moe_workers.moe_student_worker,
             (f"{workdir}/mk_qwen3_moe", f"{workdir}/mk_mixtral", STUDENT_LAYOUTS, 2)),
    ])
    merged = {"layouts": {}, "dense_student": {}}
    for results in per_rank:  # the last stage of every layout reports, each DP rank its own data
        for name, got in results["layouts"].items():
            seen = merged["layouts"].setdefault(name, got)
            for key in ("student_diff", "teacher_diff"):
                seen[key] = max(seen[key], got[key])
        merged["dense_student"].update({k: v for k, v in results["dense_student"].items() if v})
    merged["moe_student"] = per_rank[-1]["moe_student"]
    return merged


# ---- conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_logits_equal_transformers_at_tp1(family, world1):
    to_megakd, to_hf = world1[family]
    assert to_megakd["family"] == family and to_megakd["padded_vocab_size"] == 112
    assert to_megakd["max_logit_diff"] < LOGIT_ATOL
    assert to_hf["max_logit_diff"] < LOGIT_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_round_trip_is_bitwise_identical(family, workdir, hf_dirs, world1):
    original = convert_workers.hf_tensors(hf_dirs[family])
    back = convert_workers.hf_tensors(f"{workdir}/back_{family}")
    assert sorted(back) == sorted(original)
    assert any(".experts.3." in name for name in original)  # per-expert tensors
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    from transformers import AutoConfig

    config, reference = (AutoConfig.from_pretrained(d) for d in (f"{workdir}/back_{family}",
                                                                 hf_dirs[family]))
    for field in ("num_local_experts", "num_experts_per_tok", "norm_topk_prob",
                  "moe_intermediate_size", "intermediate_size", "router_aux_loss_coef",
                  "tie_word_embeddings", "head_dim"):
        assert getattr(config, field, None) == getattr(reference, field, None), field


def test_moe_architecture_is_stored_with_the_checkpoint(workdir, world1):
    with open(f"{workdir}/mk_qwen3_moe/release/megakd_model.json") as handle:
        qwen = json.load(handle)["architecture"]
    assert (qwen["num_experts"], qwen["moe_router_topk"], qwen["moe_ffn_hidden_size"]) == (4, 2, 24)
    assert qwen["moe_router_pre_softmax"] and qwen["moe_aux_loss_coeff"] == 0.001
    with open(f"{workdir}/mk_mixtral/release/megakd_model.json") as handle:
        mixtral = json.load(handle)["architecture"]
    assert mixtral["num_experts"] == 4 and mixtral["ffn_hidden_size"] == 40
    assert mixtral["moe_ffn_hidden_size"] is None and not mixtral["moe_router_pre_softmax"]


def _edited_copy(source: str, target: str, **changes) -> str:
    shutil.copytree(source, target)
    with open(f"{target}/config.json") as handle:
        config = json.load(handle)
    config.update(changes)
    with open(f"{target}/config.json", "w") as handle:
        json.dump(config, handle)
    return target


@pytest.mark.parametrize("family, changes, named", [
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 8}, "shared_expert_intermediate_size"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok=1"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"num_local_experts": 3}, "block_sparse_moe.experts.3"),
])
def test_bad_moe_hf_config_names_the_field(family, changes, named, workdir, hf_dirs):
    from megakd.convert import ConversionError
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, plan_hf_to_megakd

    key = "_".join(changes)
    source = _edited_copy(hf_dirs[family], f"{workdir}/bad_{family}_{key}", **changes)
    with pytest.raises(ConversionError) as error:
        plan_hf_to_megakd(HFToMegakdOptions(hf_dir=source, output=f"{workdir}/bad_out_{key}"))
    assert named in str(error.value)


def test_dense_and_moe_families_do_not_mix(workdir, world1):
    from megakd.convert import ConversionError
    from megakd.convert.megakd_to_hf import MegakdToHFOptions, plan_megakd_to_hf

    with pytest.raises(ConversionError, match="mixture of experts cannot be written as qwen3"):
        plan_megakd_to_hf(MegakdToHFOptions(load=f"{workdir}/mk_qwen3_moe", output=f"{workdir}/y",
                                            model_family="qwen3"))
    from megakd.configs import ModelArchConfig
    from megakd.convert.families import family_by_name
    from megakd.convert.moe_config import check_moe_arch

    arch = ModelArchConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=4,
                           moe_router_pre_softmax=True)
    with pytest.raises(ConversionError, match="moe_router_pre_softmax"):  # Mixtral renormalises
        check_moe_arch(arch, family_by_name("mixtral"), "x")
    with pytest.raises(ConversionError, match="shared_expert"):
        check_moe_arch(ModelArchConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_experts=4, moe_shared_expert_intermediate_size=8),
                       family_by_name("qwen3_moe"), "x")


# ---- layouts and distillation (world size 2) ------------------------------------------------------


@pytest.mark.parametrize("family, layout", LAYOUT_CASES)
def test_converted_moe_loads_at_any_layout(family, layout, world2):
    got = world2["layouts"][f"mk_{family}/{layout}"]
    assert got["student_diff"] < LOGIT_ATOL, got
    assert got["teacher_diff"] < LOGIT_ATOL, got
    assert abs(got["kd_loss"]) < 1e-6, got  # the student is a copy of the MoE teacher


@pytest.mark.parametrize("layout", ("tp2", "ep2"))
def test_kd_from_a_moe_teacher_into_a_dense_student_lowers_the_loss(layout, world2):
    got = world2["dense_student"][layout]
    assert got["after"] < 0.8 * got["before"], got
    assert got["curve"][-1] < got["curve"][0], got


def test_moe_student_trains_the_same_at_every_expert_layout(world2):
    runs = world2["moe_student"]
    reference = runs["dp2"]["curve"]
    for layout in STUDENT_LAYOUTS:
        run = runs[layout]
        for got, want in zip(run["curve"], reference):
            for name in ("lm loss", "kd loss"):
                assert got[name] == pytest.approx(want[name], rel=1e-4), (layout, name)
        assert run["experts_moved"] > 0 and run["routers_moved"] > 0, (layout, run)
        for step, report in enumerate(run["router"]):  # balanced routing gives about 1
            want = runs["dp2"]["router"][step]["load_balancing_loss"]
            assert 0.5 < report["load_balancing_loss"] < 2.0, (layout, report)
            assert report["load_balancing_loss"] == pytest.approx(want, rel=1e-4), layout


def test_report_logit_differences(world1, world2):
    """The figures of docs/moe.md (``pytest -s tests/test_moe.py -k report``): max |logits -
    transformers logits| per family and layout, fp32."""
    rows = [f"{family:10s} tp1 (convert --verify)  {world1[family][0]['max_logit_diff']:.1e}"
            for family in FAMILIES]
    for name, got in sorted(world2["layouts"].items()):
        rows.append(f"{name[3:]:34s}  {max(got['student_diff'], got['teacher_diff']):.1e}")
    print("\n" + "\n".join(rows))
    assert all(float(row.split()[-1]) < LOGIT_ATOL for row in rows)
    for layout, got in sorted(world2["dense_student"].items()):
        print(f"dense student of qwen3_moe at {layout}: KD loss {got['before']:.4f} -> "
              f"{got['after']:.4f} on the first batch")


# ---- flags ----------------------------------------------------------------------------------------

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--vocab-size", "60",
        "--make-vocab-size-divisible-by", "16", "--kd-loss-weight", "0", "--device", "cpu",
        "--disable-bias-linear"]


@pytest.mark.parametrize("extra, world, needle", [
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2,
     "--num-experts=3 is not divisible by --expert-model-parallel-size=2"),
    (["--num-experts", "4", "--moe-router-topk", "5"], 1, "--moe-router-topk=5 exceeds"),
    (["--num-experts", "4", "--moe-router-topk", "1"], 1, "--moe-router-pre-softmax"),
    (["--moe-ffn-hidden-size", "16"], 1, "--moe-ffn-hidden-size needs --num-experts"),
    (["--num-experts", "4", "--expert-model-parallel-size", "4"], 2,
     "--expert-model-parallel-size=4 x --expert-tensor-parallel-size=1"),
    (["--teacher-num-experts", "6", "--expert-model-parallel-size", "4"], 4,
     "--teacher-num-experts=6 is not divisible"),
    (["--num-experts", "4", "--moe-ffn-hidden-size", "15", "--tensor-model-parallel-size",
      "2", "--sequence-parallel"], 2, "--moe-ffn-hidden-size=15 is not divisible by "
                                      "--expert-tensor-parallel-size=2"),
    (["--num-experts", "4", "--moe-router-load-balancing-type", "sinkhorn"], 1,
     "--moe-router-load-balancing-type"),
])
def test_bad_moe_flags_are_refused_naming_the_flag(extra, world, needle, capsys):
    from megakd.configs import ConfigError
    from megakd.preflight import parse_pretrain_args

    with pytest.raises((ConfigError, SystemExit)) as error:
        parse_pretrain_args([*BASE, *extra], world_size=world)
    message = str(error.value) if error.type is ConfigError else capsys.readouterr().err
    assert needle in message, message


def test_moe_fields_reach_megatron_and_a_dense_model_keeps_ep_1():
    from megakd.configs import ModelArchConfig, ParallelConfig
    from megakd.models import transformer_config_from_arch

    parallel = ParallelConfig(expert_model_parallel_size=2, world_size=2,
                              moe_token_dispatcher_type="alltoall")
    moe = ModelArchConfig(num_layers=2, hidden_size=32, num_attention_heads=4, swiglu=True,
                          add_bias_linear=False, num_experts=4, moe_router_topk=2,
                          moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=32,
                          moe_router_pre_softmax=True, moe_aux_loss_coeff=0.01)
    config = transformer_config_from_arch(moe, parallel)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 24)
    assert config.moe_shared_expert_intermediate_size == 32 and config.moe_router_pre_softmax
    assert config.moe_aux_loss_coeff == 0.01 and config.expert_model_parallel_size == 2
    assert config.moe_token_dispatcher_type == "alltoall" and not config.moe_grouped_gemm
    dense = transformer_config_from_arch(ModelArchConfig(num_layers=2, hidden_size=32,
                                                         num_attention_heads=4), parallel)
    assert dense.num_moe_experts is None and dense.expert_model_parallel_size == 1


@pytest.mark.parametrize("extra, world, needle", [
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], 1,
     "--num-experts=3 is not divisible by --expert-model-parallel-size=2"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], 2, "--sequence-parallel"),
])
def test_bad_moe_input_exits_2_on_every_rank(extra, world, needle):
    """Found by the preflight (experts / EP) or when the student is built (TP without SP)."""
    results = launch("tools/pretrain_kd.py", [*BASE, *extra], world_size=world)
    for result in results:
        assert result.returncode == 2, (result.rank, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.error_lines if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], (result.rank, result.error_lines)
