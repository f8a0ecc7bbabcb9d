"""Minitron-style pruning (megakd.prune, tools/prune.py) on real gloo process groups.

One world of 4 ranks (a module-scoped fixture) saves a random source model at TP=2 x PP=2,
measures importance at TP=1 (x DP=4), TP=2 (x DP=2), PP=2 (x DP=2) and TP=2 x PP=2 (the
lm-loss layer ranking at TP=1 and TP=2 x PP=2), prunes through the tool's code path at TP=2 x PP=2 (and a keep-everything and
a width-without-hidden prune), and loads the results at TP=1 and TP=2 x PP=2. One process
compares megakd's choices with ModelOpt 0.43's ``mcore_minitron`` on the same model and data.

Tolerances (fp32 models, logits of magnitude ~5): the same pruned checkpoint at TP=2 x PP=2 vs
TP=1, and megakd's vs ModelOpt's pruned model (ModelOpt reorders the kept channels), differ
only by summation order: <= 2e-5. Keep-everything vs the source: <= 1e-6. Importance scores
across layouts: relative 1e-5; the kept indices: exactly equal.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megakd.configs import ConfigError, PruneConfig
from megakd.preflight import parse_prune_args
from tests import prune_workers as workers
from tests.dist_harness import Task, run_tasks
from tests.tool_launcher import launch

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
NO_HIDDEN = ["--target-num-layers", "3", "--target-ffn-hidden-size", "40",
             "--target-num-attention-heads", "4"]


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    work = tmp_path_factory.mktemp("prune")
    paths = {name: str(work / name) for name in ("source", "pruned", "keep", "no_hidden")}
    runs = [workers.prune_argv(paths["source"], paths["pruned"], 2, 2),
            workers.prune_argv(paths["source"], paths["keep"], 2, 2, extra=[]),
            workers.prune_argv(paths["source"], paths["no_hidden"], 1, 2, extra=NO_HIDDEN)]
    tasks = [
        Task("source", workers.make_source, (paths["source"], workers.SOURCE, 2, 2)),
        Task("importance", workers.importance_task, (paths["source"], [
            (tp, pp, ("cosine", "lm-loss") if tp == pp else ("cosine",)) for tp, pp in LAYOUTS])),
        Task("prune", workers.prune_task, (runs,)),
        Task("logits", workers.logits_task, ([paths["source"], paths["pruned"], paths["keep"]],
                                             [(1, 1), (2, 2)])),
        Task("masked", workers.masked_reference_task, (paths["source"], paths["no_hidden"])),
    ]
    return run_tasks(4, tasks), paths


def _logits(world4, path, tp, pp):
    results, _ = world4
    found = [r["logits"][f"{path}|tp{tp}pp{pp}"] for r in results
             if r["logits"][f"{path}|tp{tp}pp{pp}"] is not None]
    assert found
    return torch.tensor(found[0])


def _importance(world4, tp, pp, ranking="cosine"):
    return [r["importance"][f"tp{tp}pp{pp}"][ranking] for r in world4[0]]


# --- importance on any layout ----------------------------------------------------------------


@pytest.mark.parametrize("tp,pp,ranking", [(2, 1, "cosine"), (1, 2, "cosine"),
                                            (2, 2, "cosine"), (2, 2, "lm-loss")])
def test_importance_at_tp_pp_dp_equals_tp1(world4, tp, pp, ranking):
    reference = _importance(world4, 1, 1, ranking)[0]
    for scores in _importance(world4, tp, pp, ranking) + _importance(world4, 1, 1, ranking):
        assert scores["plan"] == reference["plan"]
        for key in ("hidden", "heads", "ffn", "layers"):
            got, want = scores[key], reference[key]
            if isinstance(want, dict):
                got, want = [got[k] for k in sorted(want)], [want[k] for k in sorted(want)]
            assert torch.allclose(torch.tensor(got, dtype=torch.float64),
                                  torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)


def test_plan_keeps_whole_query_groups_and_the_targets(world4):
    plan = _importance(world4, 2, 2)[0]["plan"]
    assert len(plan["layers"]) == 2 and len(plan["hidden"]) == 24
    for layer in plan["layers"]:
        heads = plan["heads"][str(layer)]
        assert len(heads) == 4 and len(plan["ffn"][str(layer)]) == 48
        assert sorted(h // 2 for h in heads) == [0, 1, 2, 3]  # one kept head in each group


def test_lm_loss_ranking_keeps_the_layers_whose_removal_costs_most(world4):
    scores = _importance(world4, 1, 1, "lm-loss")[0]
    losses = scores["layers"]  # layer -> calibration LM loss with that layer left out
    assert sorted(losses) == [0, 1, 2, 3]
    assert len(set(losses.values())) == 4 and scores["lm_loss"] not in losses.values()
    assert scores["plan"]["layers"] == sorted(sorted(losses, key=losses.get)[-2:])


# --- the pruned checkpoint --------------------------------------------------------------------


def test_tool_path_plan_equals_importance_plan(world4):
    results, _ = world4
    assert all(r["prune"] == results[0]["prune"] for r in results)
    assert results[0]["prune"][0] == _importance(world4, 2, 2)[0]["plan"]


def test_pruned_checkpoint_describes_itself(world4):
    _, paths = world4
    release = os.path.join(paths["pruned"], "release")
    with open(os.path.join(release, "megakd_model.json")) as handle:
        arch = json.load(handle)["architecture"]
    assert (arch["num_layers"], arch["hidden_size"], arch["ffn_hidden_size"],
            arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]) == \
        (2, 24, 48, 4, 4, 4)  # kv_channels: the source's head dim (32 / 8)
    with open(os.path.join(release, "pruning.json")) as handle:
        report = json.load(handle)
    assert report["source_architecture"]["num_attention_heads"] == 8
    assert open(os.path.join(paths["pruned"], "latest_checkpointed_iteration.txt")).read() \
        == "release"


def test_pruned_checkpoint_loads_at_tp2_pp2_with_the_tp1_logits(world4):
    _, paths = world4
    tp1 = _logits(world4, paths["pruned"], 1, 1)
    assert tp1.shape == (2, workers.SEQ, workers.PADDED)
    assert (_logits(world4, paths["pruned"], 2, 2) - tp1).abs().max() <= 2e-5


def test_keep_everything_changes_no_logit(world4):
    _, paths = world4
    for tp, pp in ((1, 1), (2, 2)):
        source = _logits(world4, paths["source"], tp, pp)
        assert (_logits(world4, paths["keep"], tp, pp) - source).abs().max() <= 1e-6


def test_pruned_heads_neurons_layers_equal_masking_them_in_the_source(world4):
    masked = world4[0][0]["masked"]
    difference = torch.tensor(masked["pruned"]) - torch.tensor(masked["masked"])
    assert difference.abs().max() <= 2e-5


# --- ModelOpt ---------------------------------------------------------------------------------


def test_choices_agree_with_modelopt_mcore_minitron(tmp_path):
    missing = workers.modelopt_missing()
    if missing:
        pytest.skip(missing)
    cases = {"gqa_swiglu_rmsnorm_untied": (workers.SOURCE, PruneConfig(
                 target_num_layers=3, target_hidden_size=24, target_ffn_hidden_size=48,
                 target_num_attention_heads=4)),
             "mha_gelu_layernorm_bias_tied": (workers.SOURCE_B, PruneConfig(
                 target_num_layers=2, target_hidden_size=20, target_ffn_hidden_size=40))}
    tasks = [Task(name, workers.modelopt_task, (str(tmp_path / name), arch, prune))
             for name, (arch, prune) in cases.items()]
    results = run_tasks(1, tasks)[0]
    for name, result in results.items():
        ours, theirs = result["megakd"], result["modelopt"]
        assert ours["layers"] == theirs["layers"], name
        assert ours["hidden"] == theirs["hidden"], name
        assert {int(k): v for k, v in ours["heads"].items()} == theirs["heads"], name
        assert {int(k): v for k, v in ours["ffn"].items()} == theirs["ffn"], name
        assert result["logit_diff"] <= 2e-5, name


# --- bad input ---------------------------------------------------------------------------------


def _refused(argv, world_size=2):
    with pytest.raises(ConfigError) as error:
        parse_prune_args(argv, world_size=world_size)
    return str(error.value)


def test_bad_targets_are_refused_naming_the_flag(world4, tmp_path):
    _, paths = world4
    source, save = paths["source"], str(tmp_path / "out")
    base = lambda *extra, tp=1: workers.prune_argv(source, save, tp, 1, extra=list(extra))  # noqa
    assert "--target-hidden-size=64 is larger than the source's 32" in _refused(
        base("--target-hidden-size", "64"))
    assert "--target-ffn-hidden-size=80 is larger" in _refused(base("--target-ffn-hidden-size",
                                                                     "80"))
    assert "--target-num-layers=5 is larger than the source's 4" in _refused(
        base("--target-num-layers", "5"))
    assert "--target-num-layers must be positive" in _refused(base("--target-num-layers", "0"))
    message = _refused(base("--target-num-attention-heads", "6", tp=4), world_size=4)
    assert "--target-num-attention-heads=6 is not a multiple of the source's 4 query groups" \
        in message
    assert "--target-num-attention-heads=6 is not divisible by --tensor-model-parallel-size=4" \
        in message
    assert "--target-ffn-hidden-size=47 is not divisible by --tensor-model-parallel-size=2" in \
        _refused(base("--target-ffn-hidden-size", "47", tp=2))


def test_bad_checkpoints_are_refused_naming_the_flag(world4, tmp_path):
    _, paths = world4
    missing = str(tmp_path / "missing")
    assert f"--load {missing}: no such checkpoint directory" in _refused(
        workers.prune_argv(missing, str(tmp_path / "out")))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("x")
    assert "--save" in _refused(workers.prune_argv(paths["source"], str(occupied)))
    assert "--save is required" in _refused(["--load", paths["source"], *workers.DATA])


def test_bad_input_ends_every_rank_with_one_line_and_status_2(world4, tmp_path):
    _, paths = world4
    argv = workers.prune_argv(paths["source"], str(tmp_path / "out"), 2, 1,
                              extra=["--target-num-attention-heads", "16"])
    results = launch("tools/prune.py", argv, world_size=2)
    for result in results:
        assert result.returncode == 2, (result.rank, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        errors = [line for line in result.error_lines if "error:" in line]
        assert errors == ["prune.py: error: --target-num-attention-heads=16 is larger than the "
                          "source's 8 (--load)"], result.error_lines
    assert not os.path.exists(tmp_path / "out")
