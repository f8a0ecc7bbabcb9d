#!/usr/bin/env python
"""Generation throughput: megatron-core's static loop with a KV cache vs the full-forward loop.

Both paths of :class:`megakd.generation.Generator` run in one launch per layout, on the same
model and the same prompts (greedy, so both produce the same tokens), interleaved over
``--repeats`` repetitions (the order alternates; the best repetition counts):

* ``kv cache``      ``engine="static"``: ``GPTInferenceWrapper`` + ``StaticInferenceContext`` +
                    ``TextGenerationController`` (prefill once, then one token per step)
* ``full forward``  ``engine="full-forward"``: megatron-core's forward-only schedule over the
                    whole padded sequence at every step (no cache; the VPP/SP fallback and
                    the tests' reference)

Layouts ``--tp`` (default 1 and 2), each launched with ``TP`` gloo ranks (CPU) or GPUs; on CPU
every rank gets ``--threads`` torch threads (default 1, so TP=2 uses twice the cores).
Reported per layout and path: new tokens per second (all prompts of the batch), milliseconds
per step (one new token for every prompt; the prefill is counted in the first step), the KV
cache's speed-up, and whether both paths produced the same greedy tokens.

Usage: python tools/bench_generation.py [--tp 1 2] [--batch 4] [--prompt-len 64]
       [--new-tokens 64] [--layers 4] [--hidden 256] [--heads 8] [--vocab 8000]
       [--repeats 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megakd.configs import GenerationConfig, ModelArchConfig, ParallelConfig  # noqa: E402
from megakd.configs import pad_vocab_size  # noqa: E402
from megakd.runtime.launcher import free_local_port  # noqa: E402
from megakd.runtime.machine import cpu_model  # noqa: E402

ENGINES = {"kv cache": "static", "full forward": "full-forward"}


def _build(args: argparse.Namespace, tp: int, device: torch.device) -> List[torch.nn.Module]:
    from megakd.models import build_gpt_chunks

    arch = ModelArchConfig(num_layers=args.layers, hidden_size=args.hidden,
                           num_attention_heads=args.heads, swiglu=True,
                           normalization="RMSNorm", position_embedding_type="rope",
                           add_bias_linear=False, untie_embeddings_and_output_weights=True)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, world_size=tp)
    padded = pad_vocab_size(args.vocab, 128, tp)
    return build_gpt_chunks(arch, parallel, padded, args.prompt_len + args.new_tokens,
                            device=device)


def _timed(generator, prompts, config, cuda: bool) -> tuple:
    """(seconds, new tokens, decode steps, the tokens) of one ``generate`` call, between
    barriers."""
    torch.distributed.barrier()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = generator.generate(prompts, config, seed=0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.distributed.barrier()
    return (seconds, sum(len(r.tokens) for r in results), max(len(r.tokens) for r in results),
            [r.tokens for r in results])


def _worker(rank: int, tp: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    warnings.filterwarnings("ignore")
    from megakd.generation import Generator
    from megakd.runtime import destroy, initialize

    info = initialize(tensor_model_parallel_size=tp, device=args.device, seed=1234)
    if info.device.type == "cpu":
        torch.set_num_threads(args.threads)
    chunks = _build(args, tp, info.device)
    prompts = torch.randint(0, args.vocab - 1, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(0)).tolist()
    config = GenerationConfig(greedy=True, max_new_tokens=args.new_tokens)
    generators = {name: Generator(chunks, args.vocab, args.vocab - 1,
                                  args.prompt_len + args.new_tokens, engine=engine)
                  for name, engine in ENGINES.items()}
    warm_up = GenerationConfig(greedy=True, max_new_tokens=2)
    for generator in generators.values():
        generator.generate(prompts, warm_up, seed=0)
    best: Dict[str, tuple] = {}
    for repeat in range(args.repeats):
        order = list(generators) if repeat % 2 == 0 else list(reversed(generators))
        for name in order:
            measured = _timed(generators[name], prompts, config, info.device.type == "cuda")
            if name not in best or measured[0] < best[name][0]:
                best[name] = measured
    if rank == 0:
        same = best["kv cache"][3] == best["full forward"][3]
        queue.put({"same_tokens": same, **{name: m[:3] for name, m in best.items()}})
    destroy()


def _run_layout(args: argparse.Namespace, tp: int) -> Dict[str, tuple]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(tp, free_local_port(), args, queue), nprocs=tp,
                       join=True, start_method="spawn")
    return queue.get()


def _table(measured: Dict[int, Dict[str, tuple]]) -> str:
    lines = ["| layout | path | new tokens/s | ms per step (prefill included) "
             "| KV-cache speed-up |", "|---|---|---:|---:|---:|"]
    for tp, measured_paths in measured.items():
        paths = {name: m for name, m in measured_paths.items() if name in ENGINES}
        rate = {name: tokens / seconds for name, (seconds, tokens, _) in paths.items()}
        for name, (seconds, tokens, steps) in paths.items():
            speedup = rate["kv cache"] / rate["full forward"] if name == "kv cache" else None
            lines.append(f"| TP={tp} | {name} | {rate[name]:.1f} | {1000 * seconds / steps:.1f} "
                         f"| {f'{speedup:.2f}x' if speedup else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    measured = {tp: _run_layout(args, tp) for tp in args.tp}
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} thread(s) per rank"
               if args.device == "cpu" else torch.cuda.get_device_name())
    print(f"# generation throughput: {machine}; torch {torch.__version__}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab "
          f"{args.vocab}; batch {args.batch}, prompt {args.prompt_len}, greedy, "
          f"{args.new_tokens} new tokens; best of {args.repeats}\n")
    print(_table(measured))
    same = all(paths["same_tokens"] for paths in measured.values())
    print(f"\ngreedy tokens identical on both paths: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
