"""--teacher-fp8-*: Megatron-LM's FP8 flags reach the teacher's TransformerConfig; without
Transformer Engine's spec on a GPU the run is refused naming the flag, before any work.
(FP8 execution itself needs TE on a GPU: not here.)"""

from __future__ import annotations

import pytest

from megakd.configs import ConfigError, ModelArchConfig, ParallelConfig, TeacherFP8Config
from megakd.models import build_gpt_chunks, transformer_engine_available
from megakd.models.builder import transformer_config_from_arch
from megakd.preflight import parse_pretrain_args

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "1",
        "--mock-data", "--vocab-size", "60", "--device", "cpu"]
ARCH = ModelArchConfig(num_layers=2, hidden_size=32, num_attention_heads=4)


def test_flags_reach_the_teacher_transformer_config():
    fp8 = TeacherFP8Config(format="hybrid", recipe="tensorwise", margin=1, amax_history_len=16,
                           amax_compute_algo="max")
    config = transformer_config_from_arch(ARCH, ParallelConfig(), bf16=True, fp8=fp8)
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo) == ("hybrid", "tensorwise", 1, 16, "max")
    plain = transformer_config_from_arch(ARCH, ParallelConfig(), bf16=True)
    assert plain.fp8 is None


def test_parsed_flags_and_defaults():
    argv = [*BASE, "--teacher-fp8-format", "e4m3", "--teacher-fp8-amax-history-len", "1024"]
    if transformer_engine_available():
        config = parse_pretrain_args(argv, world_size=1)
        assert config.teacher_fp8.transformer_config_fields()["fp8_amax_history_len"] == 1024
    with pytest.raises(SystemExit):  # argparse: not a format
        parse_pretrain_args([*BASE, "--teacher-fp8-format", "e5m2"], world_size=1)


@pytest.mark.parametrize("extra, needle", [
    (["--kd-loss-weight", "0"], "no live teacher"),
    (["--attention-backend", "sdpa"], "--attention-backend sdpa"),
    ([], "Transformer Engine"),
])
def test_refused_before_any_work_naming_the_flag(extra, needle):
    if not extra and transformer_engine_available():
        pytest.skip("Transformer Engine is available here")
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args([*BASE, "--teacher-fp8-format", "e4m3", *extra], world_size=1)
    assert str(error.value).startswith("--teacher-fp8-format e4m3") and needle in str(error.value)


def test_builder_refuses_fp8_on_the_local_spec():
    with pytest.raises(ConfigError, match="--teacher-fp8-format e4m3"):
        build_gpt_chunks(ARCH, ParallelConfig(), 64, 16, attention_backend="sdpa",
                         fp8=TeacherFP8Config(format="e4m3"))
