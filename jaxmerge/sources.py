"""Tensor sources for the executor: checkpoint directories and in-memory pytrees."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxmerge.errors import CheckpointError
from jaxmerge.io.safetensors_io import Checkpoint


class CheckpointSource:
    """A Hugging Face safetensors directory, read one tensor (or row slice) at a time."""

    def __init__(self, checkpoint: Checkpoint, label: str | None = None):
        self.checkpoint = checkpoint
        self.label = label or str(checkpoint.directory)
        self._entries = {name: (entry.dtype, tuple(entry.shape))
                         for name, entry in checkpoint.tensors.items()}

    @classmethod
    def open(cls, directory, label: str | None = None) -> CheckpointSource:
        return cls(Checkpoint.open(directory), label)

    @property
    def config(self) -> dict | None:
        return self.checkpoint.config

    @property
    def bytes_read(self) -> int:
        return self.checkpoint.bytes_read

    def entries(self):
        return self._entries

    def location(self, name: str) -> str:
        entry = self.checkpoint.tensors.get(name)
        return str(entry.path) if entry is not None else str(self.checkpoint.directory)

    def read(self, name, out, rows=None):
        self.checkpoint.read(name, out=out, rows=rows)

    def close(self):
        self.checkpoint.close()


def _key_name(entry) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def flatten_params(tree) -> tuple[dict[str, np.ndarray], object]:
    """Flattens a pytree of arrays to {dotted path: array} and its treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        flat[".".join(_key_name(entry) for entry in path)] = np.asarray(leaf)
    return flat, treedef


class ArraySource:
    """An in-memory model: {name: array}, e.g. a flattened Flax params pytree."""

    def __init__(self, arrays: Mapping[str, np.ndarray], label: str):
        self.arrays = {name: np.asarray(value) for name, value in arrays.items()}
        self.label = label
        self._entries = {name: (value.dtype, value.shape) for name, value in self.arrays.items()}

    def entries(self):
        return self._entries

    def location(self, name: str) -> str:
        return f"{self.label}[{name!r}]"

    def read(self, name, out, rows=None):
        if name not in self.arrays:
            raise CheckpointError(f"{self.label} has no tensor {name!r}")
        value = self.arrays[name]
        out[...] = value if rows is None else value[rows[0]:rows[1]]
