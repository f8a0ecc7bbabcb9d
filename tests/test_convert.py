"""HuggingFace <-> megakd conversion, and loading converted checkpoints at any TP/PP.

Tiny random-init transformers models (no downloads) for every family. World size 1 is launched
once for all conversions, world size 4 once for every layout check (TP=2, PP=2, TP=2xPP=2 and
a mixed-vocab-width distillation at TP=2).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests import convert_workers
from tests.dist_harness import Task, run_distributed, run_tasks

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 100
LOGIT_ATOL = 1e-4  # fp32; measured differences are ~1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert"))


@pytest.fixture(scope="module")
def hf_dirs(workdir):
    dirs = {family: convert_workers.make_hf_model(f"{workdir}/hf_{family}", family, VOCAB)
            for family in FAMILIES}
    # Distillation pair: one tokenizer, different embedding widths (as Qwen2.5-7B vs -1.5B).
    dirs["teacher"] = convert_workers.make_hf_model(f"{workdir}/hf_teacher", "qwen2", 112,
                                                    hidden_size=48, num_layers=2, seed=1)
    dirs["student"] = convert_workers.make_hf_model(f"{workdir}/hf_student", "qwen2", VOCAB,
                                                    hidden_size=32, num_layers=2, seed=2)
    return dirs


@pytest.fixture(scope="module")
def world1(workdir, hf_dirs):
    jobs = []
    for family in FAMILIES:
        jobs.append(("to_megakd", dict(hf_dir=hf_dirs[family], output=f"{workdir}/mk_{family}",
                                       dtype="fp32", make_vocab_size_divisible_by=16,
                                       verify=True, verify_tolerance=LOGIT_ATOL)))
        jobs.append(("to_hf", dict(load=f"{workdir}/mk_{family}", output=f"{workdir}/back_{family}",
                                   max_shard_size="30KB", verify=True,
                                   verify_tolerance=LOGIT_ATOL)))
    jobs.append(("to_hf", dict(load=f"{workdir}/mk_qwen2/release", output=f"{workdir}/back_cfg",
                               hf_config_from=hf_dirs["qwen2"])))
    for name, divisible in (("teacher", 16), ("student", 8)):  # widths 112 and 104
        jobs.append(("to_megakd", dict(hf_dir=hf_dirs[name], output=f"{workdir}/mk_{name}",
                                       dtype="fp32", make_vocab_size_divisible_by=divisible)))
    return run_distributed(1, convert_workers.convert_worker, jobs)[0]


@pytest.fixture(scope="module")
def world4(workdir, hf_dirs, world1):
    cases = [(f"{workdir}/mk_llama", hf_dirs["llama"], VOCAB, [(2, 1), (1, 2), (2, 2)]),
             (f"{workdir}/mk_qwen3", hf_dirs["qwen3"], VOCAB, [(2, 2)])]
    tasks = [
        Task("layouts", convert_workers.layouts_worker, (cases,)),
        Task("mixed_width", convert_workers.mixed_width_worker,
             ((f"{workdir}/mk_teacher", hf_dirs["teacher"]),
              (f"{workdir}/mk_student", hf_dirs["student"]), VOCAB, 112, 2)),
    ]
    return run_tasks(4, tasks)


# ---- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_megakd_logits_equal_transformers_at_tp1(family, world1):
    to_megakd, to_hf = world1[2 * FAMILIES.index(family): 2 * FAMILIES.index(family) + 2]
    assert to_megakd["family"] == family and to_megakd["padded_vocab_size"] == 112
    assert to_megakd["max_logit_diff"] < LOGIT_ATOL
    assert to_hf["max_logit_diff"] < LOGIT_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise_identical(family, workdir, hf_dirs, world1):
    original = convert_workers.hf_tensors(hf_dirs[family])
    back = convert_workers.hf_tensors(f"{workdir}/back_{family}")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert os.path.isfile(f"{workdir}/back_{family}/model.safetensors.index.json")  # sharded
    from transformers import AutoConfig

    config, reference = (AutoConfig.from_pretrained(d) for d in (f"{workdir}/back_{family}",
                                                                 hf_dirs[family]))
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim",
                  "tie_word_embeddings", "rope_parameters", "intermediate_size"):
        assert getattr(config, field, None) == getattr(reference, field, None), field


def test_reverse_from_hf_config_and_checkpoint_layout(workdir, hf_dirs, world1):
    with open(f"{workdir}/mk_qwen2/latest_checkpointed_iteration.txt") as handle:
        assert handle.read() == "release"
    with open(f"{workdir}/mk_qwen2/release/megakd_model.json") as handle:
        meta = json.load(handle)
    assert meta["architecture"]["add_qkv_bias"] and meta["padded_vocab_size"] == 112
    assert meta["hf"]["family"] == "qwen2" and meta["dtype"] == "fp32"
    back = convert_workers.hf_tensors(f"{workdir}/back_cfg")
    for name, tensor in convert_workers.hf_tensors(hf_dirs["qwen2"]).items():
        assert torch.equal(back[name], tensor), name
    assert not [n for n in os.listdir(workdir) if n.endswith(".converting")]


def _edited_copy(source: str, target: str, **changes) -> str:
    shutil.copytree(source, target)
    with open(f"{target}/config.json") as handle:
        config = json.load(handle)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(f"{target}/config.json", "w") as handle:
        json.dump(config, handle)
    return target


@pytest.mark.parametrize("family, changes, named", [
    ("mistral", {"sliding_window": -1}, "sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                   "high_freq_factor": 4.0, "rope_theta": 5e5,
                                   "original_max_position_embeddings": 8192}}, "low_freq_factor"),
    ("qwen2", {"model_type": "gemma"}, "model_type"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"some_new_field": 3}, "some_new_field"),
    ("qwen3", {"num_hidden_layers": 3}, "model.layers.2"),
])
def test_bad_hf_input_names_the_field_and_writes_nothing(family, changes, named, workdir, hf_dirs):
    from megakd.convert import ConversionError
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, convert_hf_to_megakd

    source = _edited_copy(hf_dirs[family], f"{workdir}/bad_{family}_{named}", **changes)
    output = f"{workdir}/bad_out_{family}_{named}"
    with pytest.raises(ConversionError) as error:
        convert_hf_to_megakd(HFToMegakdOptions(hf_dir=source, output=output), log=lambda _: None)
    assert named in str(error.value)
    assert not os.path.exists(output) and not os.path.exists(output + ".converting")


def test_sliding_window_is_dropped_when_it_cannot_bind_and_limits_seq_length_otherwise(
        workdir, hf_dirs, world1):
    """Mistral's config with sliding_window 4096 and max_position_embeddings 128: the window
    never binds, the model converts as full attention. A window of 64 is recorded in
    megakd_model.json; runs up to --seq-length 64 are accepted, longer ones refused naming
    both."""
    from megakd.configs import ConfigError
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, convert_hf_to_megakd
    from megakd.preflight import parse_pretrain_args as parse_args

    quiet = lambda _: None  # noqa: E731
    outputs = {}
    for window in (4096, 64):
        source = _edited_copy(hf_dirs["mistral"], f"{workdir}/window_{window}",
                              sliding_window=window, max_position_embeddings=128)
        outputs[window] = f"{workdir}/mk_window_{window}"
        convert_hf_to_megakd(HFToMegakdOptions(hf_dir=source, output=outputs[window]), log=quiet)
        with open(f"{outputs[window]}/release/megakd_model.json") as handle:
            stored = json.load(handle)["architecture"]["sliding_window"]
        assert stored == (None if window == 4096 else 64)
    long_run = _args("--load", outputs[64], "--seq-length", "128", "--max-position-embeddings",
                     "128")
    parse_args(_args("--load", outputs[4096], "--seq-length", "128",
                     "--max-position-embeddings", "128"), world_size=1)
    parse_args(_args("--load", outputs[64], "--seq-length", "64"), world_size=1)
    with pytest.raises(ConfigError) as error:
        parse_args(long_run, world_size=1)
    assert "--seq-length=128" in str(error.value) and "window (64 tokens" in str(error.value)


def test_existing_output_and_missing_metadata_are_refused(workdir, hf_dirs, world1):
    from megakd.convert import ConversionError
    from megakd.convert.hf_to_megakd import HFToMegakdOptions, plan_hf_to_megakd
    from megakd.convert.megakd_to_hf import MegakdToHFOptions, plan_megakd_to_hf

    with pytest.raises(ConversionError, match="--output"):
        plan_hf_to_megakd(HFToMegakdOptions(hf_dir=hf_dirs["llama"], output=f"{workdir}/mk_llama"))
    with pytest.raises(ConversionError, match="--padded-vocab-size"):
        plan_hf_to_megakd(HFToMegakdOptions(hf_dir=hf_dirs["llama"], output=f"{workdir}/x",
                                            padded_vocab_size=64))
    with pytest.raises(ConversionError, match="qwen3"):  # family cannot express qk-norm
        plan_megakd_to_hf(MegakdToHFOptions(load=f"{workdir}/mk_qwen3", output=f"{workdir}/y",
                                            model_family="llama"))
    with pytest.raises(ConversionError, match="hidden_size"):
        plan_megakd_to_hf(MegakdToHFOptions(load=f"{workdir}/mk_qwen2", output=f"{workdir}/y",
                                            hf_config_from=hf_dirs["teacher"]))


# ---- loading converted checkpoints in training ---------------------------------------------------


@pytest.mark.parametrize("case, layout", [("mk_llama", "tp2pp1"), ("mk_llama", "tp1pp2"),
                                          ("mk_llama", "tp2pp2"), ("mk_qwen3", "tp2pp2")])
def test_converted_checkpoint_loads_at_any_layout(case, layout, world4):
    got = world4[-1]["layouts"][f"{case}/{layout}"]  # last rank: last pipeline stage
    assert got["student_diff"] < LOGIT_ATOL, got
    assert got["teacher_diff"] < LOGIT_ATOL, got
    assert got["padded_width"] == 128 if layout.startswith("tp2") else 112  # run's own width
    assert abs(got["losses"]["kd loss"]) < 1e-6  # student and teacher: the same model


def test_different_padded_widths_distill_at_tp2(world4):
    got = world4[-1]["mixed_width"]
    assert got["padded"] == 112
    assert got["losses"]["kd loss"] == pytest.approx(got["reference_kd"], rel=1e-5, abs=1e-6)
    assert got["reference_kd"] > 1e-3  # the two models really differ
    assert 0 < got["grad_norm"] < float("inf")  # the student learns from the teacher


def _args(*extra):
    return ["--seq-length", "16", "--train-iters", "1", "--lr", "0", "--mock-data",
            "--vocab-size", "99", "--device", "cpu", *extra]


def test_architecture_comes_from_metadata_and_flags_must_agree(workdir, world1):
    from megakd.configs import ConfigError
    from megakd.preflight import parse_pretrain_args as parse_args

    config = parse_args(_args("--load", f"{workdir}/mk_qwen3", "--teacher-load",
                              f"{workdir}/mk_llama", "--num-layers", "2"), world_size=1)
    assert config.student.qk_layernorm and config.student.kv_channels == 16
    assert config.teacher.use_rope_scaling and config.teacher.rotary_base == 500000
    assert config.teacher.num_query_groups == 2 and config.teacher.untie_embeddings_and_output_weights
    for flag, value, loaded in (("--num-layers", "3", "--load"),
                                ("--swiglu", None, None),
                                ("--teacher-hidden-size", "64", "--teacher-load")):
        argv = _args("--load", f"{workdir}/mk_mistral", "--teacher-load", f"{workdir}/mk_qwen2",
                     flag, *([value] if value else []))
        if flag == "--swiglu":  # agrees with the stored architecture: accepted
            parse_args(argv, world_size=1)
            continue
        with pytest.raises(ConfigError) as error:
            parse_args(argv, world_size=1)
        assert flag in str(error.value) and loaded in str(error.value)


def test_mock_data_takes_vocab_size_from_the_checkpoint(workdir, world1):
    """--mock-data with a converted checkpoint: no --vocab-size to type; the NullTokenizer
    covers the HF vocabulary (100 tokens: ids 0..99, 99 the end of document)."""
    from megakd.preflight import parse_pretrain_args as parse_args

    argv = [a for a in _args("--load", f"{workdir}/mk_qwen3") if a not in ("--vocab-size", "99")]
    config = parse_args(argv, world_size=1)
    assert config.data.vocab_size == 99 and config.student.vocab_size == 99


def test_tokenizer_mismatch_is_refused(workdir, world1):
    from megakd.configs import ConfigError
    from megakd.preflight import parse_pretrain_args as parse_args

    paths = {}
    for name, sha in (("tok_a", "a" * 64), ("tok_a2", "a" * 64), ("tok_b", "b" * 64)):
        paths[name] = f"{workdir}/{name}"
        source = f"{workdir}/mk_teacher" if name == "tok_a" else f"{workdir}/mk_student"
        shutil.copytree(source, paths[name])
        meta_path = f"{paths[name]}/release/megakd_model.json"
        with open(meta_path) as handle:
            meta = json.load(handle)
        meta["tokenizer"] = {"vocab_size": 100, "sha256": sha, "special_ids": [0]}
        with open(meta_path, "w") as handle:
            json.dump(meta, handle)
    # Same tokens, different widths (112 vs 104 rows): accepted.
    parse_args(_args("--teacher-load", paths["tok_a"], "--load", paths["tok_a2"]), world_size=1)
    with pytest.raises(ConfigError) as error:
        parse_args(_args("--teacher-load", paths["tok_a"], "--load", paths["tok_b"]), world_size=1)
    assert "--teacher-load" in str(error.value) and "different tokenizers" in str(error.value)


def test_tokenizer_identity():
    from megakd.formats.model_metadata import same_tokenizer, tokenizer_identity

    class Vocab:
        def __init__(self, tokens, special=(0,)):
            self.tokens, self.all_special_ids = tokens, list(special)

        def get_vocab(self):
            return {token: i for i, token in enumerate(self.tokens)}

    a = tokenizer_identity(Vocab(["<s>", "a", "b"]))
    assert a["vocab_size"] == 3 and a["special_ids"] == [0]
    assert same_tokenizer(a, tokenizer_identity(Vocab(["<s>", "a", "b"])))
    assert not same_tokenizer(a, tokenizer_identity(Vocab(["<s>", "b", "a"])))
    assert not same_tokenizer(a, tokenizer_identity(Vocab(["<s>", "a", "b"], special=(1,))))
    assert tokenizer_identity(object()) is None
