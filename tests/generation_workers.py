"""Worker bodies for tests/test_generation.py (run on real gloo process groups by dist_harness).

Tiny random students (hidden 32, untied embeddings, init std 0.2 so greedy continuations are
not degenerate); vocabulary 61 valid ids padded to 64, so every layout has padded vocab
entries. Each task switches layouts with ``init_layout`` inside the running process group and
returns plain lists, compared by the test across ranks.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megakd.configs import ConfigError, GenerationConfig, KDRunConfig
from megakd.generation import Generated, Generator, RngStates, sampling_seed
from megakd.models import build_student
from megakd.preflight import parse_pretrain_args
from tests.dist_harness import init_layout

SEQ = 16
VALID = 61  # mock tokenizer: 60 ids + EOD
PADDED = 64
EOD = 60
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9], [10, 11, 12, 13]]
GREEDY = GenerationConfig(greedy=True, max_new_tokens=6)
SAMPLING = GenerationConfig(temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=6)


def make_config(tp: int, pp: int, extra: Sequence[str] = (), layers: int = 2) -> KDRunConfig:
    argv = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-layers", str(layers), "--hidden-size", "32", "--num-attention-heads", "4",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--init-method-std", "0.2",
        "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "4", "--lr", "1e-2", "--lr-decay-style", "constant",
        "--weight-decay", "0.0", "--clip-grad", "0", "--seed", "7",
        "--mock-data", "--vocab-size", "60", "--make-vocab-size-divisible-by", "16",
        "--kd-loss-weight", "0", "--device", "cpu", *extra,
    ]
    return parse_pretrain_args(argv, world_size=int(os.environ["WORLD_SIZE"]))


def _ranks() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank()}


def _model(tp: int, pp: int, extra: Sequence[str] = (), layers: int = 2) -> List[torch.nn.Module]:
    config = make_config(tp, pp, extra, layers)
    init_layout(config)
    return build_student(config.student, config.parallel, PADDED, SEQ)


def _plain(results: List[Generated]) -> List[dict]:
    return [vars(result) for result in results]


def _teacher_forced(model: torch.nn.Module, results: List[Generated]) -> Dict[str, float]:
    """PP=1 only: one plain forward over prompt + continuation; each greedy token must be the
    argmax of the valid logits before it, and its full log-prob the log-softmax there."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    worst = {"argmax_mismatches": 0, "logprob_diff": 0.0}
    with torch.no_grad():
        for result in results:
            sequence = torch.tensor([result.prompt + result.tokens])
            positions = torch.arange(sequence.size(1)).unsqueeze(0)
            shard = model(sequence, positions, None)[0]  # [s, V/tp]
            shards = [torch.empty_like(shard) for _ in range(group.size())]
            torch.distributed.all_gather(shards, shard.contiguous(), group=group)
            logp = torch.cat(shards, -1)[:, :VALID].float().log_softmax(-1)
            for i, token in enumerate(result.tokens):
                row = logp[len(result.prompt) + i - 1]
                worst["argmax_mismatches"] += int(row.argmax().item() != token)
                worst["logprob_diff"] = max(worst["logprob_diff"],
                                            abs(row[token].item() - result.full_logprobs[i]))
    return worst


def layouts_task(rank: int, layouts: Sequence[tuple]) -> Dict[str, dict]:
    """Per (tp, pp): greedy and sampling with the KV cache and the full-forward reference,
    the same seed twice, and (PP=1) a teacher-forced check of the greedy continuation."""
    out = {}
    for tp, pp in layouts:
        chunks = _model(tp, pp)
        static = Generator(chunks, VALID, EOD, SEQ, engine="static")
        full = Generator(chunks, VALID, EOD, SEQ, engine="full-forward")
        seed = sampling_seed(7, 3, _ranks()["dp"])
        record = {"ranks": _ranks(), "seed": seed,
                  "greedy": _plain(static.generate(PROMPTS, GREEDY, seed)),
                  "greedy_full": _plain(full.generate(PROMPTS, GREEDY, seed)),
                  "sampled": _plain(static.generate(PROMPTS, SAMPLING, seed)),
                  "sampled_again": _plain(static.generate(PROMPTS, SAMPLING, seed)),
                  "sampled_full": _plain(full.generate(PROMPTS, SAMPLING, seed)),
                  "sampled_other_seed": _plain(static.generate(PROMPTS, SAMPLING, seed + 1))}
        if pp == 1:
            record["teacher_forced"] = _teacher_forced(
                chunks[0], static.generate(PROMPTS, GREEDY, seed))
        out[f"tp{tp}pp{pp}"] = record
    return out


def stop_task(rank: int, tp: int, pp: int) -> Dict[str, list]:
    """Stopping: a token the greedy continuation of prompt 0 produces for the first time
    after step 1 becomes the end-of-document id; both engines must stop right after it."""
    chunks = _model(tp, pp)
    reference = Generator(chunks, VALID, EOD, SEQ).generate(PROMPTS, GREEDY, 0)
    tokens = reference[0].tokens
    index = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    out = {"reference": _plain(reference), "stop": tokens[index], "stop_index": index}
    for engine in ("static", "full-forward"):
        generator = Generator(chunks, VALID, tokens[index], SEQ, engine=engine)
        out[engine] = _plain(generator.generate(PROMPTS, GREEDY, 0))
    return out


def _boost_padding(model: torch.nn.Module, boost: float = 60.0):
    """Forward hook making the padded vocab entries' logits the largest (full logits in the
    inference path, this rank's vocab shard in the training-style forward)."""
    from megatron.core import parallel_state as ps

    def hook(module, inputs, output):
        logits, bias = output
        width = logits.size(-1)
        offset = 0 if width == PADDED else ps.get_tensor_model_parallel_rank() * width
        padded = (torch.arange(offset, offset + width) >= VALID).to(logits.dtype)
        return logits + boost * padded, bias

    return model.output_layer.register_forward_hook(hook)


def padding_task(rank: int, tp: int, pp: int) -> Dict[str, list]:
    """Padded ids dominate the logits: a sampler over the padded width picks them, megakd's
    never does (greedy and hot sampling, both engines). Greedy does not depend on how the
    prompts are split into batches."""
    chunks = _model(tp, pp)
    hot = GenerationConfig(temperature=3.0, max_new_tokens=8)
    handles = [_boost_padding(chunk) for chunk in chunks if hasattr(chunk, "output_layer")]
    out: Dict[str, list] = {}
    try:
        unmasked = Generator(chunks, PADDED, EOD, SEQ)  # as if every row were a real token
        out["unmasked"] = [r.tokens for r in unmasked.generate(PROMPTS, GREEDY, 1)]
        for engine in ("static", "full-forward"):
            generator = Generator(chunks, VALID, EOD, SEQ, engine=engine)
            for name, config in (("greedy", GREEDY), ("hot", hot)):
                out[f"{engine}_{name}"] = [r.tokens for r in generator.generate(
                    PROMPTS * 4, config, 11)]
            small_batches = Generator(chunks, VALID, EOD, SEQ, engine=engine, max_batch_size=5)
            out[f"{engine}_greedy_batches_of_5"] = [
                r.tokens for r in small_batches.generate(PROMPTS * 4, GREEDY, 11)]
    finally:
        for handle in handles:
            handle.remove()
    return out


def _draws() -> list:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(), tracked]


def rng_and_mode_task(rank: int, tp: int, pp: int) -> Dict[str, object]:
    """Draws from every training RNG stream after generating equal the draws without it;
    every module's train/eval mode is restored."""
    chunks = _model(tp, pp)
    for chunk in chunks:
        chunk.train()
    frozen = [m for m in chunks[0].modules()][3]
    frozen.eval()  # one submodule deliberately in eval mode: it must stay so
    modes = [m.training for chunk in chunks for m in chunk.modules()]
    snapshot = RngStates.capture()
    without = _draws()
    snapshot.restore()
    for engine in ("static", "full-forward"):
        Generator(chunks, VALID, EOD, SEQ, engine=engine).generate(PROMPTS, SAMPLING, 5)
    return {"without": without, "with": _draws(),
            "modes_kept": modes == [m.training for chunk in chunks for m in chunk.modules()]}


def _error(call) -> Optional[str]:
    try:
        call()
    except (ConfigError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def refusals_task(rank: int) -> Dict[str, Optional[str]]:
    """Each bad request raises, naming the flag to change."""
    chunks = _model(1, 1)
    gen = Generator(chunks, VALID, EOD, SEQ)
    out = {
        "too_long": _error(lambda: gen.generate([[1] * 12], GenerationConfig(max_new_tokens=5), 0)),
        "top_p": _error(lambda: gen.generate(PROMPTS, GenerationConfig(top_p=0.0), 0)),
        "temperature": _error(lambda: gen.generate(PROMPTS, GenerationConfig(temperature=0.0), 0)),
        "empty_prompt": _error(lambda: gen.generate([[]], GREEDY, 0)),
        "bad_token": _error(lambda: gen.generate([[VALID]], GREEDY, 0)),
        "bad_eod": _error(lambda: Generator(chunks, VALID, VALID, SEQ)),
        "bad_vocab": _error(lambda: Generator(chunks, PADDED + 1, EOD, SEQ)),
        "fits": _error(lambda: gen.generate([[1] * 11], GenerationConfig(max_new_tokens=5), 0)),
    }
    sp_chunks = _model(2, 1, ["--sequence-parallel"])
    out["static_sp"] = _error(lambda: Generator(sp_chunks, VALID, EOD, SEQ, engine="static"))
    vpp = ["--num-layers-per-virtual-pipeline-stage", "1"]
    vpp_chunks = _model(1, 2, vpp, layers=4)
    out["static_vpp"] = _error(lambda: Generator(vpp_chunks, VALID, EOD, SEQ, engine="static"))
    out["auto_vpp_engine"] = Generator(vpp_chunks, VALID, EOD, SEQ).engine
    return out


VPP = ["--num-layers-per-virtual-pipeline-stage", "1"]


def fallback_task(rank: int, workdir: str) -> Dict[str, dict]:
    """Layouts megatron-core's static loop refuses (VPP, SP) decode with full forwards: a
    4-layer model saved at PP=2 (KV cache) must continue identically when loaded at PP=2 x
    VPP=2 and at TP=2 x PP=2 x VPP=2 with sequence parallelism."""
    from megakd.formats.checkpoints import load_model_weights, save_model_weights

    chunks = _model(1, 2, layers=4)
    out = {"reference": {"ranks": _ranks(), "greedy": _plain(
        Generator(chunks, VALID, EOD, SEQ, engine="static").generate(PROMPTS, GREEDY, 0))}}
    save_model_weights(chunks, f"{workdir}/fallback")
    layouts = (("pp2vpp2", 1, VPP), ("tp2pp2vpp2sp", 2, VPP + ["--sequence-parallel"]))
    for name, tp, extra in layouts:
        chunks = _model(tp, 2, extra, layers=4)
        load_model_weights(chunks, f"{workdir}/fallback")
        generator = Generator(chunks, VALID, EOD, SEQ)
        out[name] = {"ranks": _ranks(), "engine": generator.engine,
                     "greedy": _plain(generator.generate(PROMPTS, GREEDY, 0))}
    return out


def training_task(rank: int, tp: int, pp: int) -> Dict[str, object]:
    """Two training steps with and without generating (both engines, prompt + new tokens =
    --seq-length) between them: losses, grad norm and weights must be bitwise equal."""
    from megakd.training.loop import train_step
    from megakd.training.setup import setup

    runs = []
    for generate in (False, True):
        config = make_config(tp, pp)
        state = setup(config, init_layout(config), log=lambda *args, **kwargs: None)
        first = train_step(state)
        if generate:
            prompts = [[1] * 8, list(range(2, 10))]
            for engine in ("static", "full-forward"):
                Generator(state.student, state.vocab.valid, EOD, SEQ, engine=engine).generate(
                    prompts, GenerationConfig(max_new_tokens=SEQ - 8), 3)
        second = train_step(state)
        runs.append({"losses": [first.losses, second.losses], "grad_norm": second.grad_norm,
                     "weights": [p.detach().clone() for chunk in state.student
                                 for p in chunk.parameters()]})
    without, with_generation = runs
    return {
        "losses": (without["losses"], with_generation["losses"]),
        "grad_norms": (without["grad_norm"], with_generation["grad_norm"]),
        "weights_equal": all(torch.equal(a, b) for a, b in zip(without["weights"],
                                                                with_generation["weights"])),
    }
