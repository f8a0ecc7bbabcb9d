"""A grammar corpus with long-range structure, split into train and held-out documents.

Extends ``examples/toy_corpus.py``: each document is a short story about one named character
("This is a story about Mira, a baker."), whose sentences use the character's pronoun and
preferred verbs/objects, mention the story's setting again, and end by repeating the name
and trade ("That was the story of Mira the baker."). Predicting the last sentence, the
pronouns and the per-story preferences needs attention across the whole document, so a
deeper, wider model learns more of it than a small one and distillation has something to
transfer beyond the local grammar.

    python examples/cpu_study/corpus.py --output-dir runs/study/data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_corpus import OBJECTS, PLACES, SUBJECTS, sentence  # noqa: E402  (examples/toy_corpus.py)

NAMES = ["Mira", "Tomas", "Anouk", "Bram", "Lena", "Oskar", "Ines", "Pavel", "Rosa", "Yusuf",
         "Hana", "Kofi", "Greta", "Ivo", "Zara", "Emil", "Noor", "Felix", "Alma", "Jonas"]
PRONOUN = {name: ("she" if i % 2 == 0 else "he") for i, name in enumerate(NAMES)}
# A trade fixes the verbs a character uses; the story picks two of them and an object each.
TRADES: Dict[str, List[str]] = {
    "baker": ["bakes", "sells", "carries"], "painter": ["paints", "sells", "mends"],
    "sailor": ["sails", "mends", "tells"], "farmer": ["plants", "sells", "carries"],
    "writer": ["writes", "reads", "tells"], "mechanic": ["repairs", "assembles", "scans"],
}
EXTRA_OBJECTS = {"bakes": ["bread", "a honey cake", "rye rolls"]}
SETTINGS = ["in a small village", "by the sea", "in the old city", "on a quiet farm",
            "high in the mountains"]


def objects(verb: str) -> List[str]:
    return OBJECTS.get(verb, []) + EXTRA_OBJECTS.get(verb, [])


def story(rng: random.Random) -> str:
    """One document: introduction, sentences tied to it, unrelated grammar filler, closing."""
    name, trade = rng.choice(NAMES), rng.choice(sorted(TRADES))
    pronoun, setting = PRONOUN[name], rng.choice(SETTINGS)
    verbs = rng.sample(TRADES[trade], 2)
    favourite = {verb: rng.choice(objects(verb)) for verb in verbs}  # fixed for this story
    lines = [f"This is a story about {name}, a {trade} who lives {setting}."]
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        verb = rng.choice(verbs)
        if kind < 0.45:
            lines.append(f"{pronoun} {verb} {favourite[verb]} {rng.choice(PLACES)}.")
        elif kind < 0.7:
            lines.append(f"every day {name} {verb} {favourite[verb]}.")
        elif kind < 0.85:
            lines.append(f"life {setting} is good for {name}.")
        else:
            lines.append(sentence(rng))  # a background sentence from the toy grammar
    lines.append(f"that was the story of {name} the {trade}.")
    return " ".join(_tidy(line) for line in lines)


def _tidy(line: str) -> str:
    """Collapse spaces, attach the full stop, upper-case the first letter (names keep theirs)."""
    line = " ".join(line.split()).replace(" .", ".")
    return line[:1].upper() + line[1:]


def make_split(documents: int, heldout_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Documents for training and held-out evaluation (disjoint: drawn apart, then checked)."""
    rng = random.Random(seed)
    texts = [story(rng) for _ in range(documents)]
    n_heldout = int(documents * heldout_fraction)
    train, heldout = texts[n_heldout:], texts[:n_heldout]
    seen = set(train)
    heldout = [text for text in heldout if text not in seen]  # unseen documents only
    return train, heldout


def write_jsonl(path: str, texts: List[str]) -> None:
    with open(path, "w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--documents", type=int, default=12000)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import sentencepiece as spm

    os.makedirs(args.output_dir, exist_ok=True)
    train, heldout = make_split(args.documents, args.heldout_fraction, args.seed)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "heldout.jsonl"), heldout)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train), model_prefix=os.path.join(args.output_dir, "tok"),
        vocab_size=args.vocab_size, model_type="bpe", character_coverage=1.0, bos_id=-1,
        eos_id=1, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
    )
    print(f"wrote {len(train)} train and {len(heldout)} held-out documents and tok.model "
          f"({args.vocab_size} tokens) to {args.output_dir}")


if __name__ == "__main__":
    main()
