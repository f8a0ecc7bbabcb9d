"""In-process generation (megakd.generation) on real gloo process groups, and its sampler.

One world of 4 ranks is launched once (a module-scoped fixture) and runs every layout:
TP=1 (DP=4), TP=2 (x DP=2), PP=2 (x DP=2), TP=2 x PP=2, and the full-forward fallback at
PP=2 x VPP=2 and TP=2 x PP=2 x VPP=2 with sequence parallelism. The KV-cache path
(megatron-core's static loop) must equal the full-forward reference: greedy tokens exactly,
log-probs within 1e-5. The sampler's filters are checked on hand-made logits in-process.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from megakd.configs import GenerationConfig, check_bounds
from megakd.configs.cli import Section, build_parser, section_values
from megakd.generation import Sampler, filtered_logits, sampling_seed
from megakd.runtime import cpu_runtime
from tests import generation_workers as workers
from tests.dist_harness import Task, run_tasks

ATOL = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("generation"))
    tasks = [
        Task("layouts", workers.layouts_task, (LAYOUTS,)),
        Task("stop", workers.stop_task, (1, 2)),
        Task("padding", workers.padding_task, (2, 1)),
        Task("rng", workers.rng_and_mode_task, (2, 2)),
        Task("refusals", workers.refusals_task, ()),
        Task("fallback", workers.fallback_task, (workdir,)),
        Task("training", workers.training_task, (2, 2)),
    ]
    return run_tasks(4, tasks)


def _layout(world4, tp, pp):
    return [rank["layouts"][f"tp{tp}pp{pp}"] for rank in world4]


def _tokens(results):
    return [result["tokens"] for result in results]


def _max_diff(a, b, key):
    return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra[key], rb[key])),
               default=0.0)


# --- the distributed checks -------------------------------------------------------------


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_kv_cache_greedy_equals_full_forward(world4, tp, pp):
    for record in _layout(world4, tp, pp):
        assert _tokens(record["greedy"]) == _tokens(record["greedy_full"])
        assert all(len(r["tokens"]) == workers.GREEDY.max_new_tokens or r["finished"]
                   for r in record["greedy"])
        for key in ("logprobs", "full_logprobs"):
            assert _max_diff(record["greedy"], record["greedy_full"], key) < ATOL
        # temperature 1, no filter: the sampling distribution is the model's own
        assert all(r["logprobs"] == r["full_logprobs"] for r in record["greedy"])


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_tokens_are_the_argmax_of_a_plain_forward(world4, tp):
    for record in _layout(world4, tp, 1):
        assert record["teacher_forced"]["argmax_mismatches"] == 0
        assert record["teacher_forced"]["logprob_diff"] < ATOL


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_every_rank_of_a_replica_returns_the_same_generations(world4, tp, pp):
    replicas = defaultdict(list)
    for record in _layout(world4, tp, pp):
        replicas[record["ranks"]["dp"]].append(record)
    assert len(replicas) == 4 // (tp * pp)
    for records in replicas.values():
        assert len(records) == tp * pp  # every TP rank and every pipeline stage
        for record in records[1:]:
            for key in ("greedy", "sampled", "sampled_full"):
                assert record[key] == records[0][key]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_sampling_is_fixed_by_the_seed_and_differs_between_dp_replicas(world4, tp, pp):
    records = _layout(world4, tp, pp)
    for record in records:
        assert record["sampled"] == record["sampled_again"]
        assert _tokens(record["sampled"]) != _tokens(record["sampled_other_seed"])
        # same seed, same sampler consumption: the reference path draws the same tokens
        assert _tokens(record["sampled"]) == _tokens(record["sampled_full"])
        assert _max_diff(record["sampled"], record["sampled_full"], "logprobs") < ATOL
    by_replica = {r["ranks"]["dp"]: (r["seed"], _tokens(r["sampled"])) for r in records}
    seeds = [seed for seed, _ in by_replica.values()]
    samples = [tokens for _, tokens in by_replica.values()]
    assert len(set(seeds)) == len(seeds)
    assert all(a != b for i, a in enumerate(samples) for b in samples[i + 1:])
    # greedy needs no seed: identical on every replica
    assert len({str(_tokens(r["greedy"])) for r in records}) == 1


def test_generation_stops_after_the_end_of_document_token(world4):
    for rank in world4:
        stop = rank["stop"]
        expected = []
        for reference in stop["reference"]:
            tokens = reference["tokens"]
            cut = tokens.index(stop["stop"]) + 1 if stop["stop"] in tokens else len(tokens)
            expected.append((tokens[:cut], stop["stop"] in tokens))
        assert stop["stop_index"] >= 1
        assert expected[0] == (stop["reference"][0]["tokens"][:stop["stop_index"] + 1], True)
        assert any(not finished for _, finished in expected)  # some row runs to its budget
        for engine in ("static", "full-forward"):
            assert [(r["tokens"], r["finished"]) for r in stop[engine]] == expected
            assert all(len(r["logprobs"]) == len(r["tokens"]) for r in stop[engine])


def test_padded_vocab_entries_are_never_sampled(world4):
    for rank in world4:
        padding = rank["padding"]
        # the boosted padded rows dominate: a sampler over the padded width picks them
        assert all(token >= workers.VALID for row in padding["unmasked"] for token in row)
        for key in ("static_greedy", "static_hot", "full-forward_greedy", "full-forward_hot"):
            tokens = [token for row in padding[key] for token in row]
            assert tokens and max(tokens) < workers.VALID, key
        assert padding["static_hot"] == padding["full-forward_hot"]
        for engine in ("static", "full-forward"):
            assert padding[f"{engine}_greedy_batches_of_5"] == padding[f"{engine}_greedy"]


def test_training_rng_streams_and_module_modes_are_untouched(world4):
    for rank in world4:
        assert rank["rng"]["with"] == rank["rng"]["without"]
        assert rank["rng"]["modes_kept"]


def test_training_after_generation_is_bitwise_unchanged(world4):
    for rank in world4:
        training = rank["training"]
        assert training["losses"][0] == training["losses"][1]
        assert training["grad_norms"][0] == training["grad_norms"][1]
        assert training["weights_equal"]


def test_refusals_name_the_flag(world4):
    refusals = world4[0]["refusals"]
    assert refusals["fits"] is None
    assert "ConfigError" in refusals["too_long"]
    assert "--gen-max-new-tokens" in refusals["too_long"]
    assert "--seq-length" in refusals["too_long"]
    assert "--gen-top-p" in refusals["top_p"] and "--gen-temperature" in refusals["temperature"]
    assert "ConfigError" in refusals["static_sp"] and "--sequence-parallel" in refusals["static_sp"]
    assert "--num-layers-per-virtual-pipeline-stage" in refusals["static_vpp"]
    assert refusals["auto_vpp_engine"] == "full-forward"
    for key in ("empty_prompt", "bad_token", "bad_eod", "bad_vocab"):
        assert refusals[key] and refusals[key].startswith("ValueError"), key


@pytest.mark.parametrize("layout", ["pp2vpp2", "tp2pp2vpp2sp"])
def test_vpp_and_sequence_parallel_decode_with_full_forwards(world4, layout):
    for rank in world4:
        fallback = rank["fallback"]
        assert fallback[layout]["engine"] == "full-forward"
        reference, got = fallback["reference"]["greedy"], fallback[layout]["greedy"]
        assert _tokens(got) == _tokens(reference)
        assert _max_diff(got, reference, "full_logprobs") < 1e-4  # another layout's rounding


# --- the sampler, in-process ------------------------------------------------------------


def _logits(probs, padded=2, pad_value=1e4):
    """``[1, V + padded]`` logits of ``probs`` with huge padded entries."""
    values = [math.log(p) for p in probs] + [pad_value] * padded
    return torch.tensor([values])


def _kept(probs, **config):
    scores = filtered_logits(_logits(probs, padded=0), GenerationConfig(**config))
    return torch.isfinite(scores[0]).nonzero().view(-1).tolist()


def test_filters_keep_the_documented_sets():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert _kept(probs) == [0, 1, 2, 3]
    assert _kept(probs, top_k=3) == [0, 1, 2]
    assert _kept(probs, top_p=0.7) == [0, 1]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert _kept(probs, top_p=0.8) == [0, 1]  # reaches p exactly
    assert _kept(probs, top_p=0.81) == [0, 1, 2]
    assert _kept(probs, top_p=1e-6) == [0]  # the most likely token always stays
    # top-p applies to the renormalised top-3 (0.526, 0.316, 0.158): 0.842 >= 0.82
    assert _kept(probs, top_p=0.82) == [0, 1, 2]
    assert _kept(probs, top_k=3, top_p=0.82) == [0, 1]
    assert _kept(probs, top_k=3, top_p=0.82, temperature=0.01) == [0]


def test_sampler_never_draws_padding_and_follows_the_filtered_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    sampler = Sampler(GenerationConfig(top_k=3), vocab_size=4, seed=0)
    logits = _logits(probs).expand(4000, -1)
    draw = sampler(logits)
    assert int(draw.tokens.max()) < 3  # top-3 of the 4 valid ids; padding never
    frequencies = torch.bincount(draw.tokens, minlength=4).double() / len(draw.tokens)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(frequencies, expected.double(), atol=0.03)
    assert torch.allclose(draw.logprobs, expected[draw.tokens].log(), atol=1e-5)
    assert torch.allclose(draw.full_logprobs, torch.tensor(probs)[draw.tokens].log(), atol=1e-5)
    greedy = Sampler(GenerationConfig(greedy=True), vocab_size=4, seed=0)(logits[:1])
    assert greedy.tokens.tolist() == [0]


def test_sampler_draws_depend_only_on_the_seed_and_leave_global_rng_alone():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    before = torch.get_rng_state()
    first = Sampler(GenerationConfig(), vocab_size=48, seed=5)(logits).tokens
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(Sampler(GenerationConfig(), vocab_size=48, seed=5)(logits).tokens, first)
    assert not torch.equal(Sampler(GenerationConfig(), vocab_size=48, seed=6)(logits).tokens,
                           first)


def test_sampling_seed_is_stable_and_separates_ranks_and_iterations():
    seeds = {sampling_seed(1234, it, dp) for it in range(20) for dp in range(8)}
    assert len(seeds) == 160 and all(0 <= s < 2 ** 63 for s in seeds)
    assert sampling_seed(1234, 3, 1) == sampling_seed(1234, 3, 1)


def test_generation_flags_declared_once_on_the_config():
    parser = build_parser("generate", "", [Section("generation", GenerationConfig)])
    section = Section("generation", GenerationConfig)
    values = section_values(section, parser.parse_args(
        ["--gen-temperature", "0.7", "--gen-top-k", "5", "--gen-top-p", "0.9",
         "--gen-max-new-tokens", "8", "--gen-greedy"]))
    assert values == dict(temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8, greedy=True)
    defaults = GenerationConfig()
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_new_tokens,
            defaults.greedy) == (1.0, 0, 1.0, 64, False)
    assert check_bounds(defaults) == []
    assert len(check_bounds(GenerationConfig(top_k=-1, top_p=1.5, max_new_tokens=0))) == 3


def test_cpu_timing_event_measures_wall_time():
    start, end = cpu_runtime._WallClockEvent(enable_timing=True), cpu_runtime._WallClockEvent()
    start.record()
    end.record()
    assert 0.0 <= start.elapsed_time(end) < 1000.0
