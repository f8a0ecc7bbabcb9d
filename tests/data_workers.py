"""Corpus generation and multi-rank worker bodies for tests/test_data.py.

Everything is built in the test: a few hundred generated paragraphs, a SentencePiece tokenizer
trained on them (no downloads), JSONL pretraining and chat files.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Sequence

import torch

from tests.dist_harness import init_layout

WORDS = ("alpha beta gamma delta river stone cloud paper green fast slow bright quiet market "
         "garden teacher student model data token light heavy north south winter summer "
         "number letter window door table").split()
SEQ = 96


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _conversation(rng: random.Random, turns: int) -> List[dict]:
    messages = [{"role": "system", "content": _sentence(rng, 3)}] if rng.random() < 0.5 else []
    for _ in range(turns):
        messages.append({"role": "user", "content": _sentence(rng, rng.randint(2, 6)) + "?"})
        messages.append({"role": "assistant", "content": _sentence(rng, rng.randint(2, 9))})
    return messages


def make_corpus(workdir: str, seed: int = 0) -> Dict[str, str]:
    """Write the test corpus into ``workdir``; returns the paths by name."""
    import sentencepiece

    rng = random.Random(seed)
    paths = {name: os.path.join(workdir, file) for name, file in (
        ("text_a", "text_a.jsonl"), ("text_b", "text_b.jsonl"), ("chat", "chat.jsonl"),
        ("pairs", "pairs.jsonl"), ("spm_train", "spm_train.txt"))}
    with open(paths["text_a"], "w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(_sentence(rng, rng.randint(4, 12))
                                                 for _ in range(rng.randint(1, 5)))}) + "\n")
    with open(paths["text_b"], "w") as f:  # a second corpus: short documents
        for _ in range(80):
            f.write(json.dumps({"text": _sentence(rng, rng.randint(2, 6))}) + "\n")
    with open(paths["chat"], "w") as f:
        for _ in range(60):
            f.write(json.dumps({"messages": _conversation(rng, rng.randint(1, 2))}) + "\n")
    with open(paths["pairs"], "w") as f:
        for _ in range(30):
            f.write(json.dumps({"question": _sentence(rng, 4) + "?",
                                "answer": _sentence(rng, rng.randint(2, 8))}) + "\n")
    with open(paths["spm_train"], "w") as f:
        for _ in range(400):
            f.write(f"System: User: Assistant: {_sentence(rng, 12)} {_sentence(rng, 3)}?\n")
    sentencepiece.SentencePieceTrainer.train(
        input=paths["spm_train"], model_prefix=os.path.join(workdir, "spm"), vocab_size=150,
        model_type="bpe", unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2,
        num_threads=1)
    paths["tokenizer"] = os.path.join(workdir, "spm.model")
    return paths


def make_config(tp: int, pp: int, world_size: int, extra: Sequence[str]):
    from megakd.preflight import parse_pretrain_args

    argv = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--teacher-num-layers", "2", "--teacher-hidden-size", "64",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--seq-length", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "8", "--lr", "1e-2",
        "--lr-decay-style", "constant", "--weight-decay", "0.0", "--seed", "11",
        "--make-vocab-size-divisible-by", "16", "--kd-loss-weight", "0.5", "--device", "cpu",
        "--log-interval", "1", *extra,
    ]
    return parse_pretrain_args(argv, world_size=world_size)


def train_worker(rank: int, tp: int, pp: int, iters: int, extra: Sequence[str]) -> dict:
    """Train ``iters`` iterations; the loss curve (last stage) and the first microbatch's masks."""
    from megatron.core import parallel_state

    from megakd.data import iteration_microbatches
    from megakd.training import setup
    from megakd.training.loop import train_step

    config = make_config(tp, pp, int(os.environ["WORLD_SIZE"]), extra)
    state = setup(config, init_layout(config))
    first = iteration_microbatches(state.train_dataset, 0, 8, 2,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(),
                                   torch.device("cpu"))[0]
    curve = [train_step(state).losses for _ in range(iters)]
    return {"curve": curve, "loss_mask_sum": first.loss_mask.sum().item(),
            "has_attention_mask": first.attention_mask is not None,
            "valid_len": len(state.valid_dataset) if state.valid_dataset is not None else None}


def packing_worker(rank: int, chat_path: str, tokenizer_path: str) -> Dict[str, float]:
    """TP=1: logits of conversations packed into one sample equal their logits alone, for
    learned absolute positions and RoPE, with each local attention backend."""
    from megakd.configs import pad_vocab_size
    from megakd.data.batches import collate
    from megakd.data.chat_format import ChatKeys, read_conversations
    from megakd.data.chat_template import tokenize_conversation
    from megakd.data.packing import build_sample, num_positions
    from megakd.data.tokenizers import load_tokenizer
    from megakd.models import build_student

    tokenizer = load_tokenizer("SentencePieceTokenizer", tokenizer_path)
    conversations = read_conversations(chat_path, ChatKeys())
    documents = sorted((tokenize_conversation(tokenizer, messages) for messages in conversations),
                       key=lambda doc: len(doc[0]))
    packed, used = [], 0
    for doc in documents:  # the shortest ones, as many as fit into one sample of SEQ positions
        if used + num_positions(len(doc[0]), SEQ) > SEQ:
            break
        packed.append(doc)
        used += num_positions(len(doc[0]), SEQ)
    assert len(packed) >= 2, "test corpus: at least two conversations must share a sample"
    device = torch.device("cpu")
    packed_batch = collate([build_sample(packed, SEQ, with_document_ids=True)], 0, device)
    alone_batch = collate([build_sample([doc], SEQ, with_document_ids=False) for doc in packed],
                           0, device)
    diffs = {"documents": float(len(packed))}
    for position in ("learned_absolute", "rope"):
        for backend in ("sdpa", "unfused"):
            config = make_config(1, 1, int(os.environ["WORLD_SIZE"]),
                                 ["--tokenizer-type", "SentencePieceTokenizer",
                                  "--tokenizer-model", tokenizer_path, "--data-path", chat_path,
                                  "--dataset-format", "chat",
                                  "--position-embedding-type", position,
                                  "--attention-backend", backend])
            init_layout(config)
            padded = pad_vocab_size(tokenizer.vocab_size, 16, 1)
            model = build_student(config.student, config.parallel, padded, SEQ,
                                  attention_backend=backend)[0].eval()
            with torch.no_grad():
                together = model(packed_batch.tokens, packed_batch.position_ids,
                                 packed_batch.attention_mask)  # [1, s, V]
                alone = model(alone_batch.tokens, alone_batch.position_ids, None)  # [n, s, V]
            worst, start = 0.0, 0
            for i, (ids, _) in enumerate(packed):
                n = num_positions(len(ids), SEQ)
                worst = max(worst, (together[0, start:start + n] - alone[i, :n]).abs().max().item())
                start += n
            diffs[f"{position}/{backend}"] = worst
    return diffs
