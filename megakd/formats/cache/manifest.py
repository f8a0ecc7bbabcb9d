"""The cache's ``manifest.json``: what the cache holds and which run it fits.

Written once by the precompute (rank 0) before any shard; a rerun into the same directory must
produce the same manifest, and a student run (``--teacher-cache``) is refused when a field does
not match it, with the field's name in the message. Fields (docs/teacher_cache.md):

* ``k``, ``dtype`` (bf16 | fp8), ``temperature``, ``seq_length``, ``vocab_size`` (the
  tokenizer's vocabulary, which sets the id width ``ceil(log2 vocab_size)``);
* ``num_samples`` (samples 0 .. num_samples-1 of the train split, in dataset order) and
  ``samples_per_shard``;
* ``tokenizer``: type, vocab size, SHA-256 of the token list (None for NullTokenizer);
* ``data``: the flags that determine the samples, the number of train samples the dataset was
  built for (the student rebuilds it with the same request, so the order is the same), and a
  SHA-256 over those flags and the token fingerprints of the first samples;
* ``teacher``: ``--teacher-load``, the checkpoint directory it resolved to and a SHA-256 of
  that checkpoint's tracker and metadata files (identity, not a hash of the weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import List

import torch

from megakd.configs import ConfigError, DataConfig, KDConfig, TrainingConfig
from megakd.formats.cache.records import RecordLayout, token_fingerprint
from megakd.formats.checkpoints import read_tracker, resolve_checkpoint_dir
from megakd.formats.fsutil import write_text_atomic
from megakd.formats.model_metadata import tokenizer_identity

FORMAT = "megakd-teacher-topk"
VERSION = 1
MANIFEST_FILENAME = "manifest.json"
INDEX_FILENAME = "index.json"
SHARD_DIRNAME = "shards"
DATA_FINGERPRINT_SAMPLES = 8  # first samples whose token fingerprints enter the data identity
# DataConfig fields that decide which tokens sample i holds (not vocab padding or cache paths).
_DATA_FIELDS = ("mock_data", "data_path", "split", "dataset_format", "messages_key", "prompt_key",
                "response_key", "pack_sequences", "seq_length")
_TEACHER_FILES = ("megakd_model.json", "metadata.json", ".metadata", "common.pt")


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` via ``path.tmp`` + fsync + rename: all or nothing."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _sha256_json(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheManifest:
    """The manifest's fields (see module docstring)."""

    k: int
    dtype: str
    temperature: float
    seq_length: int
    vocab_size: int
    num_samples: int
    samples_per_shard: int
    tokenizer: dict
    data: dict
    teacher: dict

    @property
    def layout(self) -> RecordLayout:
        return RecordLayout(self.seq_length, self.k, self.vocab_size, self.dtype)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.samples_per_shard)

    def shard_samples(self, shard: int) -> range:
        """Sample ids (train-dataset indices) held by ``shard``."""
        first = shard * self.samples_per_shard
        return range(first, min(first + self.samples_per_shard, self.num_samples))

    def to_dict(self) -> dict:
        layout = self.layout
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self),
                "record": layout.describe(), "num_shards": self.num_shards,
                "bytes_per_token": layout.bytes_per_token}

    @classmethod
    def from_dict(cls, payload: dict, source: str) -> "CacheManifest":
        if payload.get("format") != FORMAT or payload.get("version") != VERSION:
            raise ConfigError(f"{source}: not a {FORMAT} v{VERSION} manifest (format "
                              f"{payload.get('format')!r}, version {payload.get('version')!r})")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in payload]
        if missing:
            raise ConfigError(f"{source}: manifest lacks field(s) {', '.join(missing)}")
        return cls(**{name: payload[name] for name in names})

    @classmethod
    def read(cls, directory: str, flag: str = "--teacher-cache") -> "CacheManifest":
        path = os.path.join(directory, MANIFEST_FILENAME)
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {directory}: no {MANIFEST_FILENAME} (not a teacher cache; "
                              "write one with tools/precompute_teacher_topk.py)")
        try:
            with open(path) as handle:
                payload = json.load(handle)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{flag} {directory}: unreadable {path}: {error}") from error
        return cls.from_dict(payload, f"{flag} {path}")


# ----------------------------------------------------------------------------------------------
# Identities: tokenizer, data, teacher
# ----------------------------------------------------------------------------------------------


def tokenizer_record(data: DataConfig, tokenizer) -> dict:
    """Tokenizer type, vocabulary size and token-list SHA-256 (None for NullTokenizer)."""
    identity = tokenizer_identity(tokenizer)
    return {"type": data.tokenizer_type, "vocab_size": int(tokenizer.vocab_size),
            "sha256": None if identity is None else identity["sha256"]}


def data_record(data: DataConfig, seed: int, train_dataset, train_samples_requested: int
                ) -> dict:
    """The data identity: sample-deciding flags, the seed, the train-sample request, and a
    SHA-256 over the flags and the first samples' token fingerprints."""
    flags = {name: getattr(data, name) for name in _DATA_FIELDS}
    flags["seed"] = seed
    first = [token_fingerprint(_tokens(train_dataset[i])).hex()
             for i in range(min(DATA_FINGERPRINT_SAMPLES, len(train_dataset)))]
    return {"flags": flags, "train_samples_requested": int(train_samples_requested),
            "first_samples": first, "sha256": _sha256_json({"flags": flags, "first": first})}


def _tokens(sample: dict) -> torch.Tensor:
    return torch.as_tensor(sample["tokens"])


def teacher_record(teacher_load: str) -> dict:
    """``--teacher-load``, the checkpoint directory it resolves to, and a SHA-256 of the
    tracker and the checkpoint's metadata files."""
    directory = resolve_checkpoint_dir(teacher_load, "--teacher-load")
    digest = hashlib.sha256(f"tracker={read_tracker(teacher_load)}\n".encode())
    for name in _TEACHER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            digest.update(f"{name}\n".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return {"load": os.path.abspath(teacher_load), "checkpoint": os.path.basename(directory),
            "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Checks of a student run against the manifest
# ----------------------------------------------------------------------------------------------


def _mismatch(directory: str, field: str, stored, flag: str, wanted) -> str:
    return (f"--teacher-cache {directory}: manifest field '{field}' is {stored!r} but the run has "
            f"{flag} {wanted!r}")


def manifest_mismatches(manifest: CacheManifest, directory: str, kd: KDConfig, data: DataConfig,
                        training: TrainingConfig) -> List[str]:
    """Fields of ``manifest`` that do not fit the run's flags, each naming the field and flag
    (tokenizer contents and data identity are compared by :func:`check_run_identity`)."""
    checks = [("k", manifest.k, "--kd-topk", kd.topk),
              ("dtype", manifest.dtype, "--kd-topk-dtype", kd.topk_dtype),
              ("temperature", manifest.temperature, "--kd-temperature", kd.temperature),
              ("seq_length", manifest.seq_length, "--seq-length", data.seq_length)]
    errors = [_mismatch(directory, field, stored, flag, wanted)
              for field, stored, flag, wanted in checks if stored != wanted]
    if data.tokenizer_type != manifest.tokenizer.get("type"):
        errors.append(_mismatch(directory, "tokenizer.type", manifest.tokenizer.get("type"),
                                "--tokenizer-type", data.tokenizer_type))
    elif data.tokenizer_type == "NullTokenizer" and data.vocab_size is not None and \
            manifest.vocab_size != data.vocab_size + 1:
        errors.append(_mismatch(directory, "vocab_size", manifest.vocab_size,
                                "--vocab-size (+ EOD)", data.vocab_size + 1))
    needed = training.train_samples
    if manifest.num_samples < needed:
        errors.append(f"--teacher-cache {directory}: manifest field 'num_samples' is "
                      f"{manifest.num_samples}, fewer than the run's --train-iters x "
                      f"--global-batch-size = {needed}")
    return errors


def check_run_identity(manifest: CacheManifest, directory: str, tokenizer: dict,
                       data: dict) -> None:
    """Refuse a cache written for another tokenizer or other data (ConfigError naming the
    field). ``tokenizer``/``data`` are this run's :func:`tokenizer_record`/:func:`data_record`."""
    for field in ("vocab_size", "sha256"):
        if manifest.tokenizer.get(field) != tokenizer.get(field):
            raise ConfigError(_mismatch(directory, f"tokenizer.{field}",
                                        manifest.tokenizer.get(field), "tokenizer", tokenizer.get(field)))
    if manifest.vocab_size != tokenizer["vocab_size"]:
        raise ConfigError(_mismatch(directory, "vocab_size", manifest.vocab_size, "tokenizer",
                                    tokenizer["vocab_size"]))
    stored_flags, run_flags = manifest.data.get("flags", {}), data["flags"]
    for name in sorted(set(stored_flags) | set(run_flags)):
        if stored_flags.get(name) != run_flags.get(name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(_mismatch(directory, f"data.flags.{name}", stored_flags.get(name),
                                        flag, run_flags.get(name)))
    if manifest.data.get("sha256") != data["sha256"]:
        raise ConfigError(f"--teacher-cache {directory}: manifest field 'data.sha256' does not "
                          "match this run's data (same flags, but the first samples' tokens "
                          "differ: was the dataset rebuilt or changed?)")


def check_same_manifest(existing: CacheManifest, new: CacheManifest, directory: str) -> None:
    """A rerun of the precompute must describe the same cache as the manifest already there."""
    old, fresh = dataclasses.asdict(existing), dataclasses.asdict(new)
    for name in fresh:
        if old[name] != fresh[name]:
            raise ConfigError(f"--teacher-cache {directory} holds a cache for another run: "
                              f"manifest field '{name}' is {old[name]!r}, this run has "
                              f"{fresh[name]!r} (use a new directory)")
