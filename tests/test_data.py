"""Real data: indexed datasets from tools/preprocess_data.py, blends, chat JSONL with response
masks, sequence packing, malformed input, and training on both at TP=2 x PP=2.

The corpus and a SentencePiece tokenizer are generated in the test. World size 4 is launched
once (module fixture) and runs every multi-rank check.
"""

from __future__ import annotations

import json
import math
import os

import numpy
import pytest
import torch

from megakd.configs import ConfigError, DataConfig
from megakd.data import build_gpt_datasets, iteration_microbatches, kd_loss_mask
from megakd.data.chat_format import ChatFormatError, ChatKeys, read_conversations
from megakd.data.chat_template import tokenize_conversation
from megakd.data.tokenizers import load_tokenizer
from tests import data_workers
from megakd.preflight import parse_pretrain_args as parse_args
from tests.dist_harness import Task, run_tasks

SEQ = data_workers.SEQ


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Generated corpus, tokenizer and the two preprocessed indexed datasets."""
    import tools.preprocess_data as preprocess

    workdir = str(tmp_path_factory.mktemp("data"))
    paths = data_workers.make_corpus(workdir)
    for name, workers in (("text_a", "2"), ("text_b", "1")):
        status = preprocess.main([
            "--input", paths[name], "--output-prefix", os.path.join(workdir, name),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", paths["tokenizer"],
            "--append-eod", "--workers", workers])
        assert status == 0
        paths[f"{name}_prefix"] = os.path.join(workdir, f"{name}_text_document")
    paths["workdir"] = workdir
    return paths


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer("SentencePieceTokenizer", corpus["tokenizer"])


def _data_flags(corpus, *extra):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            corpus["tokenizer"], *extra]


@pytest.fixture(scope="module")
def world4(corpus):
    chat = _data_flags(corpus, "--data-path", corpus["chat"], "--dataset-format", "chat",
                       "--split", "90,10,0")
    indexed = _data_flags(corpus, "--data-path", "0.6", corpus["text_a_prefix"], "0.4",
                          corpus["text_b_prefix"], "--split", "95,5,0",
                          "--data-cache-path", os.path.join(corpus["workdir"], "cache"))
    train = data_workers.train_worker
    tasks = [
        Task("indexed", train, (2, 2, 8, indexed)),
        Task("chat", train, (2, 2, 8, chat)),
        Task("chat_packed_on_prompt", train, (2, 2, 4, chat + ["--pack-sequences",
                                                               "--kd-on-prompt"])),
        Task("packing", data_workers.packing_worker, (corpus["chat"], corpus["tokenizer"])),
    ]
    return run_tasks(4, tasks)


# ----------------------------------------------------------------------------------------------
# Indexed data


def test_indexed_documents_equal_direct_tokenization(corpus, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for name in ("text_a", "text_b"):
        dataset = IndexedDataset(corpus[f"{name}_prefix"])
        with open(corpus[name]) as f:
            texts = [json.loads(line)["text"] for line in f]
        assert len(dataset) == len(texts)
        assert dataset.index.dtype == numpy.uint16  # smallest dtype holding 150 tokens
        for i, text in enumerate(texts):
            assert dataset[i].tolist() == tokenizer.tokenize(text) + [tokenizer.eod]


def test_weighted_blend_of_two_prefixes(corpus, tokenizer):
    data = DataConfig(seq_length=SEQ, tokenizer_type="SentencePieceTokenizer",
                      tokenizer_model=corpus["tokenizer"], split="90,10,0",
                      data_path=["0.25", corpus["text_a_prefix"], "0.75", corpus["text_b_prefix"]])
    train, valid, test = build_gpt_datasets(data, tokenizer, [400, 20, 0], seed=3)
    assert test is None and len(train) >= 400 and len(valid) >= 20
    share_b = numpy.mean([int(train[i]["dataset_id"]) for i in range(400)])
    assert abs(share_b - 0.75) < 0.02, share_b
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    # Same seed, same order; another seed, another order.
    again, _, _ = build_gpt_datasets(data, tokenizer, [400, 20, 0], seed=3)
    other, _, _ = build_gpt_datasets(data, tokenizer, [400, 20, 0], seed=4)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(50))


def test_preprocess_malformed_line_names_file_and_line(corpus, tmp_path, capsys):
    import tools.preprocess_data as preprocess

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "alpha beta"}\n\n{"text": "gamma"\n')
    status = preprocess.main(["--input", str(bad), "--output-prefix", str(tmp_path / "bad"),
                              "--tokenizer-type", "SentencePieceTokenizer",
                              "--tokenizer-model", corpus["tokenizer"]])
    assert status == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad_text_document.bin").exists()  # partial output removed
    bad.write_text('{"text": "alpha beta"}\n{"body": "gamma"}\n')
    status = preprocess.main(["--input", str(bad), "--output-prefix", str(tmp_path / "bad"),
                              "--tokenizer-type", "SentencePieceTokenizer",
                              "--tokenizer-model", corpus["tokenizer"]])
    assert status == 2 and f"{bad}:2: missing key 'text'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Chat data


def _chat_config(corpus, **overrides) -> DataConfig:
    fields = dict(seq_length=SEQ, tokenizer_type="SentencePieceTokenizer",
                  tokenizer_model=corpus["tokenizer"], data_path=[corpus["chat"]],
                  dataset_format="chat", split="90,10,0")
    fields.update(overrides)
    return DataConfig(**fields)


def _expected_response_labels(tokenizer, messages):
    """The plain template's response tokens: each assistant turn's content, then EOD."""
    out = []
    for message in messages:
        if message["role"] == "assistant":
            out += tokenizer.tokenize(message["content"]) + [tokenizer.eod]
    return out


def test_chat_masks_cover_exactly_the_responses(corpus, tokenizer):
    conversations = read_conversations(corpus["chat"], ChatKeys())
    train, valid, _ = build_gpt_datasets(_chat_config(corpus), tokenizer, [60, 6, 0], seed=5)
    assert len(valid) == 6 and len(train) == 108  # 54 + 6 conversations; two epochs hold 60
    checked = 0
    for index in range(len(train)):
        (doc,) = train.samples[index]
        ids, _ = tokenize_conversation(tokenizer, conversations[doc])
        if len(ids) > SEQ + 1:
            continue  # truncated: checked separately below
        sample = train[index]
        n = len(ids) - 1
        labels, loss_mask, prompt_mask = sample["labels"], sample["loss_mask"], sample["prompt_mask"]
        assert labels[loss_mask.bool()].tolist() == _expected_response_labels(
            tokenizer, conversations[doc])
        assert torch.equal(loss_mask[:n] + prompt_mask[:n], torch.ones(n))  # every real label
        assert loss_mask[n:].sum() == 0 and prompt_mask[n:].sum() == 0  # padding
        assert sample["tokens"][:n].tolist() == ids[:n].tolist()
        checked += 1
    assert checked >= 40
    # --kd-on-prompt: the KD mask is every real position; without it, the CE loss mask.
    microbatch = iteration_microbatches(train, 0, 4, 4, 0, 1, torch.device("cpu"))[0]
    real = microbatch.loss_mask + microbatch.prompt_mask
    assert torch.equal(kd_loss_mask(microbatch, on_prompt=True), real)
    assert torch.equal(kd_loss_mask(microbatch, on_prompt=False), microbatch.loss_mask)
    assert microbatch.attention_mask is None


def test_chat_prompt_response_keys_and_truncation(corpus, tokenizer):
    config = _chat_config(corpus, data_path=[corpus["pairs"]], prompt_key="question",
                          response_key="answer", seq_length=8, split="1")
    train, valid, _ = build_gpt_datasets(config, tokenizer, [30, 0, 0], seed=5)
    assert valid is None
    pairs = [json.loads(line) for line in open(corpus["pairs"])]
    for index in range(len(train)):
        (doc,) = train.samples[index]
        sample = train[index]
        prompt = tokenizer.tokenize("User: " + pairs[doc]["question"]) + tokenizer.tokenize(
            "Assistant:")
        full = prompt + tokenizer.tokenize(pairs[doc]["answer"]) + [tokenizer.eod]
        assert sample["tokens"].tolist() == full[:8] and sample["labels"].tolist() == full[1:9]
        expected = [1.0 if i + 1 >= len(prompt) else 0.0 for i in range(8)]
        assert sample["loss_mask"].tolist() == expected


def test_chat_sample_order_is_deterministic(corpus, tokenizer):
    for pack in (False, True):
        config = _chat_config(corpus, pack_sequences=pack)
        first, _, _ = build_gpt_datasets(config, tokenizer, [100, 0, 0], seed=9)
        second, _, _ = build_gpt_datasets(config, tokenizer, [100, 0, 0], seed=9)
        other, _, _ = build_gpt_datasets(config, tokenizer, [100, 0, 0], seed=10)
        order = [tuple(s.tolist()) for s in first.samples]
        assert order == [tuple(s.tolist()) for s in second.samples]
        assert order != [tuple(s.tolist()) for s in other.samples]
        assert len(first) >= 100
    # Train and valid splits hold disjoint conversations.
    train, valid, _ = build_gpt_datasets(_chat_config(corpus), tokenizer, [60, 6, 0], seed=9)
    train_docs = {int(d) for s in train.samples for d in s}
    valid_docs = {int(d) for s in valid.samples for d in s}
    assert train_docs.isdisjoint(valid_docs) and len(train_docs | valid_docs) == 60


def test_packed_samples(corpus, tokenizer):
    conversations = read_conversations(corpus["chat"], ChatKeys())
    train, _, _ = build_gpt_datasets(_chat_config(corpus, pack_sequences=True), tokenizer,
                                     [20, 0, 0], seed=5)
    index = next(i for i, docs in enumerate(train.samples) if len(docs) >= 2)
    sample, docs = train[index], train.samples[index]
    assert numpy.mean([len(docs) for docs in train.samples]) >= 1.4  # packing does pack
    start = 0
    for d, doc in enumerate(docs):
        ids, is_response = tokenize_conversation(tokenizer, conversations[int(doc)])
        n = min(len(ids), SEQ + 1) - 1
        assert sample["position_ids"][start:start + n].tolist() == list(range(n))
        assert (sample["document_ids"][start:start + n] == d).all()
        assert sample["tokens"][start:start + n].tolist() == ids[:n].tolist()
        assert sample["loss_mask"][start:start + n].tolist() == is_response[1:n + 1].astype(
            float).tolist()
        start += n
    microbatch = iteration_microbatches(train, index, 2, 2, 0, 1, torch.device("cpu"))[0]
    mask = microbatch.attention_mask
    assert mask.shape == (2, 1, SEQ, SEQ) and mask.dtype == torch.bool
    n0 = int((sample["document_ids"] == 0).sum())
    assert not mask[0, 0, n0 - 1, :n0].any()  # last token of doc 0 sees all of doc 0
    assert mask[0, 0, n0, :n0].all() and not mask[0, 0, n0, n0]  # doc 1 starts fresh
    assert mask[0, 0, 0, 1:].all()  # causal


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, ', "invalid JSON"),
    ('{"conversation": []}', "missing key 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "message 1: empty assistant response"),
    ('{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "message 0 has role 'human'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_malformed_chat_line_fails_before_training(corpus, tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    good = open(corpus["chat"]).readline().strip()
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(ChatFormatError, match=f"{path}:3: {message}"):
        read_conversations(str(path), ChatKeys())
    argv = data_workers_argv(corpus, "--data-path", str(path), "--dataset-format", "chat")
    with pytest.raises(ConfigError, match=f"--data-path {path}:3: {message}"):
        parse_args(argv, world_size=1)


def test_empty_response_in_pair_format(corpus, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"q": "hi", "a": "yes"}\n{"q": "hi", "a": ""}\n')
    with pytest.raises(ChatFormatError, match=f"{path}:2: empty response"):
        read_conversations(str(path), ChatKeys(prompt="q", response="a"))


def data_workers_argv(corpus, *extra):
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--train-iters", "2", "--lr", "1e-3",
        *_data_flags(corpus), *extra,
    ]


@pytest.mark.parametrize("extra, flag", [
    ((), "no data source"),
    (("--mock-data", "--data-path", "x"), "--mock-data and --data-path"),
    (("--data-path", "/nonexistent/prefix"), "--data-path /nonexistent/prefix: no "),
    (("--data-path", "0.5", "a", "b"), "--data-path"),
    (("--mock-data", "--pack-sequences"), "--pack-sequences needs --dataset-format chat"),
    (("--mock-data", "--prompt-key", "q"), "--prompt-key and --response-key"),
    (("--data-path", "/nonexistent/chat.jsonl", "--dataset-format", "chat"),
     "--data-path /nonexistent/chat.jsonl: cannot open"),
])
def test_bad_data_flags(corpus, extra, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_args(data_workers_argv(corpus, *extra), world_size=1)


def test_bad_split_flag(corpus):
    with pytest.raises(ConfigError, match="--split"):
        parse_args(data_workers_argv(corpus, "--data-path", corpus["text_a_prefix"],
                                     "--split", "90,x"), world_size=1)


# ----------------------------------------------------------------------------------------------
# Multi-rank: training at TP=2 x PP=2, packing equivalence at TP=1


def _curve(world4, name, loss):
    records = world4[-1][name]["curve"]  # the last rank sits on the last pipeline stage
    return [r[loss] for r in records]


@pytest.mark.parametrize("name", ["indexed", "chat", "chat_packed_on_prompt"])
def test_training_losses_are_finite_and_fall(world4, name):
    lm = _curve(world4, name, "lm loss")
    kd = _curve(world4, name, "kd loss")
    print(f"{name}: lm loss {[round(v, 3) for v in lm]}, kd loss {[round(v, 3) for v in kd]}")
    assert all(math.isfinite(v) for v in lm + kd)
    assert lm[0] < math.log(150) + 1.0  # sane start: about log(vocab) for a random student
    assert min(lm[-3:]) < lm[0] - 0.3, lm


def test_training_batches_carry_masks(world4):
    last = world4[-1]
    assert not last["indexed"]["has_attention_mask"]
    assert not last["chat"]["has_attention_mask"]
    assert last["chat_packed_on_prompt"]["has_attention_mask"]
    assert 0 < last["chat"]["loss_mask_sum"] < 2 * SEQ


def test_packed_logits_equal_unpacked(world4):
    diffs = dict(world4[0]["packing"])
    print(f"packed vs unpacked max |logit difference|: {diffs}")
    assert diffs.pop("documents") >= 2
    assert set(diffs) == {"learned_absolute/sdpa", "learned_absolute/unfused", "rope/sdpa",
                          "rope/unfused"}
    for name, diff in diffs.items():
        assert diff < 1e-5, f"{name}: packed logits differ from unpacked by {diff}"
