"""Turn ``study.py``'s ``results.json`` into ``docs/quality.md`` and the validation-CE plot.

Every number in the page comes from ``results.json``; the prose around the table only says
which methods beat SFT by comparing those numbers.

    python examples/cpu_study/report.py runs/study/results.json \\
        --markdown docs/quality.md --plot docs/quality_validation_ce.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from typing import Dict, List, Sequence, Tuple

COMMAND = "make study"


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def by_method(runs: List[dict]) -> Dict[str, List[dict]]:
    """Runs grouped by method, in the order the study ran them."""
    groups: Dict[str, List[dict]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    return groups


def paired_gain(runs: List[dict], sft: Dict[int, dict], key: str) -> Tuple[float, float, int]:
    """SFT minus method on ``key``, paired by seed (same init, same data order): mean, std,
    and in how many seeds the method was better."""
    gains = [sft[r["seed"]]["final"][key] - r["final"][key] for r in runs if r["seed"] in sft]
    mean, std = mean_std(gains)
    return mean, std, sum(g > 0 for g in gains)


def plot(results: dict, path: str) -> None:
    """Validation CE over iterations per method (mean over seeds), teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in by_method(results["runs"]).items():
        iterations = [point["iteration"] for point in runs[0]["curve"]]
        curve = [statistics.fmean(r["curve"][i]["lm loss"] for r in runs)
                 for i in range(len(iterations))]
        style = dict(color="black", linewidth=2.2) if name == "sft" else dict(linewidth=1.2)
        if "top-" in name or "w=" in name:
            style["linestyle"] = "--"
        for axis in (full, zoom):
            axis.plot(iterations, curve, label=name, marker=".", **style)
    teacher = results["teacher"]["lm loss"]
    full.axhline(teacher, color="grey", linestyle=":", label="teacher (final eval)")
    for axis in (full, zoom):
        axis.set_xlabel("student iteration")
        axis.grid(alpha=0.3)
    full.set_ylabel("held-out CE (validation windows, mean over seeds)")
    full.set_title("validation CE during training")
    last = max(p["iteration"] for r in results["runs"] for p in r["curve"])
    zoom.set_xlim(last * 0.45, last * 1.03)
    tail = [p["lm loss"] for r in results["runs"] for p in r["curve"] if p["iteration"] >= last * 0.45]
    zoom.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    zoom.set_title(f"second half, zoomed (teacher: {teacher:.3f}, below)")
    full.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict, plot_name: str) -> str:
    cfg, runs = results["config"], results["runs"]
    groups = by_method(runs)
    if "sft" not in groups:
        raise ValueError("results.json has no sft runs to compare against")
    sft = {r["seed"]: r for r in groups["sft"]}
    seeds = sorted({r["seed"] for r in runs})
    sft_ce = mean_std([r["final"]["lm loss"] for r in groups["sft"]])
    kd_weight = cfg["kd_weight"]

    rows, better, worse, undecided = [], [], [], []
    for name, method_runs in groups.items():
        ce = mean_std([r["final"]["lm loss"] for r in method_runs])
        fkl = mean_std([r["final"]["fkl"] for r in method_runs])
        own = [r["curve"][-1].get("kd loss") for r in method_runs]
        own_text = ("–" if name == "sft" or None in own
                    else "{:.4f} ± {:.4f}".format(*mean_std(own)))
        if name == "sft":
            gain_text = "–"
        else:
            gain, gain_std, wins = paired_gain(method_runs, sft, "lm loss")
            rel = 100 * gain / sft_ce[0]
            gain_text = f"{gain:+.4f} ± {gain_std:.4f} ({rel:+.1f} %), {wins}/{len(method_runs)}"
            # "beats SFT": better on average by more than the paired spread, and in every seed.
            (better if gain > gain_std and wins == len(method_runs) else
             worse if gain < -gain_std and wins == 0 else undecided).append((name, gain, rel))
        rows.append(f"| {name} | {ce[0]:.4f} ± {ce[1]:.4f} | {gain_text} | "
                    f"{fkl[0]:.4f} ± {fkl[1]:.4f} | {own_text} | "
                    f"{statistics.fmean(r['seconds'] for r in method_runs):.0f} |")

    better.sort(key=lambda item: -item[1])
    def names(items):
        return ", ".join(f"**{n}** ({g:+.4f} nats, {r:+.1f} %)" for n, g, r in items) or "none"

    minutes = results["seconds"] / 60
    machine = results["machine"]
    today = datetime.date.today().isoformat()
    teacher = results["teacher"]["lm loss"]
    within_noise = (f" Within seed noise of SFT: {names(undecided)}." if undecided else "")
    return f"""# Quality study: does megakd's distillation beat plain fine-tuning?

Regenerated by **`{COMMAND}`** (creates `.venv` like the other targets, installs the `study`
extra, runs `examples/cpu_study/study.py --output-dir runs/study`, then
`examples/cpu_study/report.py`, which writes this page and
[`{plot_name}`]({plot_name}) from `runs/study/results.json`). Nothing on this page is typed in
by hand: the prose below compares the table's numbers.

**Read this first: the regime.** Students here start from **random weights** and train on
pretraining text with pure KD, scored by held-out CE. No published distillation result uses
that regime: DistiLLM, GKD, MiniLLM and on-policy distillation start from an SFT'd student,
train on instruction data and score generated answers. The mode-seeking divergences (rkl,
srkl) and the interpolated ones (skl, jsd) are at a disadvantage on this metric from this
start; the table does not say they are broken. The study in the users' regime (SFT'd
students, generated-answer metrics, on-policy methods) is not built yet.

**Machine and time.** {machine['cpus']} CPU cores ({machine['machine']}), no GPU, torch
{machine['torch']} ({machine['threads']} threads), Python {machine['python']}, megatron-core
0.16.1; one process at world size 1 (gloo), every run in-process through
`megakd.training.pretrain_kd`. The study took **{minutes:.1f} minutes** end to end (data,
teacher, {len(runs)} student runs with their evaluations), on {today}, on a machine shared
with other jobs.

## Setup

* **Data** (`examples/cpu_study/corpus.py`, extending `examples/toy_corpus.py`): {cfg['documents']}
  short stories from a probabilistic grammar with long-range structure — a named character
  with a trade and a setting, the character's pronoun and per-story favourite objects reused
  across sentences, background sentences from the toy grammar, and a closing sentence that
  repeats name and trade. The last {cfg['heldout_fraction']:.0%} of the documents are the
  held-out split (`--split` = document counts; held-out texts that also occur in training are
  dropped). SentencePiece BPE ({cfg['vocab_size']} tokens) trained on the training documents;
  preprocessed with `megakd.data.preprocess.preprocess_jsonl` (what `tools/preprocess_data.py`
  runs) with `--append-eod`.
* **Models**: RMSNorm, SwiGLU, RoPE, 4 heads, no biases, sequence {cfg['seq_length']}, global
  batch {cfg['global_batch_size']} ({cfg['global_batch_size'] * cfg['seq_length']} tokens per
  step). Teacher: {cfg['teacher_layers']} layers, hidden {cfg['teacher_hidden']}, trained by
  megakd with `--kd-loss-weight 0` for {cfg['teacher_iters']} steps (lr {cfg['teacher_lr']},
  cosine). Student: {cfg['student_layers']} layers, hidden {cfg['student_hidden']}.
* **Students**: {cfg['student_iters']} steps each (lr {cfg['student_lr']} → {cfg['student_lr'] / 10:g},
  cosine, 10 warm-up steps, no weight decay), same data and steps for every method. Per seed
  ({', '.join(map(str, seeds))}) one initialisation is saved (`--seed` = that seed) and every
  method of that seed starts from it (`--load init --finetune`); the seed also sets the data
  order, so within a seed the methods differ only in their loss. KD methods use
  `--kd-loss-weight {kd_weight:g}` (`{"pure KD" if kd_weight == 1 else "(1 − w)·CE + w·KD"}`)
  and temperature 1; top-k rows are `--kd-loss fkl --kd-topk k` (top-k plus exact tail mass).
  The last row is fkl at the other weight, the ablation behind the choice of weight.
* **Evaluation**: during training, `--eval-interval {cfg['eval_interval']} --eval-iters
  {cfg['eval_iters']}` (the curves in the plot; each validation reads the next held-out
  windows, the same ones for every method of a seed). For the table, every final student is
  evaluated forward-only on the same fixed {cfg['final_eval_batches']} held-out batches
  ({cfg['final_eval_batches'] * cfg['global_batch_size'] * cfg['seq_length']} tokens, data seed
  {cfg['final_eval_seed']}, identical for all methods and seeds) with `--kd-loss fkl`: its CE and
  **fkl = KL(teacher ‖ student)**, the common divergence column for every method (SFT
  included). "own KD loss" is each method's own divergence (its `--kd-loss`, top-k for top-k
  rows) at the last validation, for reference; it is not comparable across rows.

## Results

Teacher held-out CE: **{teacher:.4f}** (same fixed evaluation). Mean ± std over {len(seeds)}
seeds. "Δ CE vs SFT" is SFT's CE minus the method's, paired by seed (positive = better than
SFT), its std over seeds, relative to SFT's mean, and in how many seeds the method was better.

| method | held-out CE | Δ CE vs SFT (paired), seeds better | fkl to teacher | own KD loss | s / run |
|---|---|---|---|---|---|
{chr(10).join(rows)}

![validation CE over steps]({plot_name})

**Which methods beat SFT** (better in every seed, mean paired gain larger than its std):
{names(better)}.
**Worse than SFT** by the same rule: {names(worse)}.{within_noise}

SFT's held-out CE is {sft_ce[0]:.4f} against the teacher's {teacher:.4f}: the gap that
distillation can close in {cfg['student_iters']} steps.

## Reading the results

* The students start from random weights and train with `--kd-loss-weight {kd_weight:g}`
  {"(no CE term)" if kd_weight == 1 else ""}, so held-out CE measures how well each divergence
  transfers the teacher's *whole* next-token distribution. fkl's gradient, q − p, is the CE
  gradient with the teacher's soft labels in place of the one-hot target: a lower-variance
  version of what SFT optimises, which is why it is the one expected to win on CE.
* rkl's gradient, q·(log q − log p − RKL), is scaled by the student's own probabilities (jsd,
  srkl and akl's rkl part partly so; tvd's is bounded by ½ per token), so a near-uniform random
  student (q ≈ 1/{cfg['vocab_size']}) gets little signal towards tokens it does not yet predict, and mode-seeking solutions put near-zero mass where the
  teacher has some — which held-out CE punishes. They are normally applied to an
  SFT-initialised student (on-policy distillation, GKD, DistiLLM); this study does not test
  that setting.
* Top-k keeps the teacher's k most likely tokens plus one bucket for the exact tail mass: with
  k = 64 of {cfg['vocab_size']} tokens the student sees nearly the whole distribution; with k = 8 the
  tail's shape is lost.
* Scale: {cfg['student_iters']} steps of {cfg['global_batch_size'] * cfg['seq_length']} tokens, a
  {cfg['student_layers']}-layer student on a synthetic grammar, {len(seeds)} seeds. Differences of a few
  hundredths of a nat are resolved here because every seed pairs the methods on one
  initialisation and one data order; they say nothing yet about LLM-scale runs.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results")
    parser.add_argument("--markdown", default="docs/quality.md")
    parser.add_argument("--plot", default="docs/quality_validation_ce.png")
    args = parser.parse_args()
    with open(args.results) as handle:
        results = json.load(handle)
    plot(results, args.plot)
    plot_name = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
    with open(args.markdown, "w") as handle:
        handle.write(markdown(results, plot_name))
    print(f"wrote {args.markdown} and {args.plot}")


if __name__ == "__main__":
    main()
