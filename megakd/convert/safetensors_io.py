"""Read HuggingFace safetensors lazily, write them in shards as tensors arrive.

:class:`SafetensorsReader` opens every ``*.safetensors`` file of a directory (one file, or the
shards listed by ``model.safetensors.index.json``) with ``safe_open`` and reads one tensor at a
time. :class:`ShardedSafetensorsWriter` buffers tensors until ``max_shard_bytes`` and then
writes a shard, so peak memory is one shard beyond what the caller holds.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from megakd.convert.errors import ConversionError

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"


class SafetensorsReader:
    """Tensor name -> file map of a HF model directory; :meth:`get` reads one tensor."""

    def __init__(self, directory: str) -> None:
        index_path = os.path.join(directory, INDEX_FILENAME)
        if os.path.isfile(index_path):
            with open(index_path) as handle:
                weight_map = json.load(handle)["weight_map"]
            self.files = {name: os.path.join(directory, f) for name, f in weight_map.items()}
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise ConversionError(f"--hf-dir {directory}: no *.safetensors files (PyTorch "
                                      ".bin checkpoints are not read: re-save with "
                                      "safe_serialization=True)")
            self.files = {}
            for name in files:
                for key in self._keys(os.path.join(directory, name)):
                    self.files[key] = os.path.join(directory, name)
        missing = sorted({f for f in self.files.values() if not os.path.isfile(f)})
        if missing:
            raise ConversionError(f"--hf-dir {directory}: {INDEX_FILENAME} names missing files "
                                  f"{missing}")

    @staticmethod
    def _keys(path: str) -> List[str]:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())

    def names(self) -> List[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)


class ShardedSafetensorsWriter:
    """Collects tensors and writes ``model-0000i-of-0000n.safetensors`` shards plus the index
    (or a single ``model.safetensors``) into ``directory``."""

    def __init__(self, directory: str, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[Dict[str, int]] = []  # per written shard: name -> bytes
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        save_file(self._pending, os.path.join(self.directory, f"shard-{index}.tmp"),
                  metadata={"format": "pt"})
        self._shards.append({name: 0 for name in self._pending})
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard and the index; returns the file names written."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(os.path.join(self.directory, "shard-0.tmp"),
                       os.path.join(self.directory, SINGLE_FILENAME))
            return [SINGLE_FILENAME]
        weight_map, names = {}, []
        for index, shard in enumerate(self._shards):
            filename = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{index}.tmp"),
                       os.path.join(self.directory, filename))
            weight_map.update({name: filename for name in shard})
            names.append(filename)
        with open(os.path.join(self.directory, INDEX_FILENAME), "w") as handle:
            json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map},
                      handle, indent=2, sort_keys=True)
        return names + [INDEX_FILENAME]
