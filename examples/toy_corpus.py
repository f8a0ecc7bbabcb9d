"""Make a small structured corpus and a SentencePiece tokenizer for the CPU walk-through.

The text comes from a probabilistic grammar (subjects, verbs and objects that agree, with
per-subject preferences and sentence templates), so a bigger model learns more of it than a
small one and distillation has something to transfer. Writes, under ``--output-dir``:

* ``corpus.jsonl``  one ``{"text": ...}`` document per line (pretraining data)
* ``chat.jsonl``    one ``{"messages": [...]}`` question/answer conversation per line
* ``tok.model``     a SentencePiece BPE tokenizer trained on the corpus

    python examples/toy_corpus.py --output-dir runs/toy --documents 4000
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import List

SUBJECTS = {
    "the cat": ["chases", "watches", "ignores"], "a dog": ["fetches", "chases", "guards"],
    "the farmer": ["plants", "sells", "carries"], "my sister": ["paints", "reads", "writes"],
    "the robot": ["assembles", "repairs", "scans"], "an old sailor": ["mends", "sails", "tells"],
}
OBJECTS = {
    "chases": ["the mouse", "a ball", "the pigeons"], "watches": ["the birds", "the rain"],
    "ignores": ["the dog", "its dinner"], "fetches": ["the stick", "a ball", "the paper"],
    "guards": ["the gate", "the sheep"], "plants": ["corn", "potatoes", "apple trees"],
    "sells": ["eggs", "fresh milk", "corn"], "carries": ["hay", "a heavy sack"],
    "paints": ["a portrait", "the fence", "flowers"], "reads": ["a novel", "the news"],
    "writes": ["a letter", "a poem", "the report"], "assembles": ["an engine", "the parts"],
    "repairs": ["the engine", "a broken clock"], "scans": ["the barcode", "the room"],
    "mends": ["the net", "a torn sail"], "sails": ["the boat", "across the bay"],
    "tells": ["a long story", "old jokes"],
}
PLACES = ["in the morning", "at night", "near the river", "in the garden", "every day", ""]
TEMPLATES = ["{s} {v} {o} {p}.", "every day {s} {v} {o}.", "{s} {v} {o} and then rests.",
             "when it rains , {s} {v} {o}.", "{s} never {v2} {o}."]


def base_form(verb: str) -> str:
    """``chases`` -> ``chase``, ``carries`` -> ``carry``, ``fetches`` -> ``fetch``."""
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("ches", "shes", "sses")):
        return verb[:-2]
    return verb[:-1]


def sentence(rng: random.Random) -> str:
    subject = rng.choice(sorted(SUBJECTS))
    verb = rng.choices(SUBJECTS[subject], weights=[5, 3, 1][:len(SUBJECTS[subject])])[0]
    obj = rng.choice(OBJECTS[verb])
    template = rng.choice(TEMPLATES)
    text = template.format(s=subject, v=verb, o=obj, p=rng.choice(PLACES), v2=base_form(verb))
    return " ".join(text.split()).replace(" .", ".")


def document(rng: random.Random) -> str:
    return " ".join(sentence(rng).capitalize() for _ in range(rng.randint(3, 9)))


def conversation(rng: random.Random) -> dict:
    subject = rng.choice(sorted(SUBJECTS))
    verb = SUBJECTS[subject][0]
    answer = f"{subject.capitalize()} usually {verb} {rng.choice(OBJECTS[verb])}. " + document(rng)
    return {"messages": [{"role": "user", "content": f"What does {subject} do?"},
                         {"role": "assistant", "content": answer}]}


def write_jsonl(path: str, rows: List[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import sentencepiece as spm

    rng = random.Random(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    corpus = [{"text": document(rng)} for _ in range(args.documents)]
    write_jsonl(os.path.join(args.output_dir, "corpus.jsonl"), corpus)
    write_jsonl(os.path.join(args.output_dir, "chat.jsonl"),
                [conversation(rng) for _ in range(args.conversations)])
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(row["text"] for row in corpus),
        model_prefix=os.path.join(args.output_dir, "tok"), vocab_size=args.vocab_size,
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    print(f"wrote {args.documents} documents, {args.conversations} conversations and "
          f"tok.model ({args.vocab_size} tokens) to {args.output_dir}")


if __name__ == "__main__":
    main()
