"""Orbax checkpoints of flat ``{tensor name: array}`` dicts.

Orbax stores a flat dict with dotted keys (``model.layers.0.mlp.up_proj.weight``) as is, and
round-trips bfloat16. It refuses zero-size arrays, so those are kept out of the tree and
recorded (dtype and shape) in the checkpoint's custom metadata instead.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxmerge.errors import CheckpointError
from jaxmerge.io.safetensors_io import DTYPES, dtype_code

_EMPTY_KEY = "jaxmerge_empty_tensors"


def save_orbax(path, params: dict[str, np.ndarray]) -> None:
    """Saves a flat dict of arrays as an Orbax checkpoint at ``path`` (must not exist).

    Blocks until the (asynchronous) save has finished.

    Raises:
      ValueError: there is no non-empty array to save.
    """
    import orbax.checkpoint as ocp

    arrays = {name: np.asarray(value) for name, value in params.items()}
    tree = {name: value for name, value in arrays.items() if value.size}
    empty = {name: {"dtype": dtype_code(value.dtype), "shape": list(value.shape)}
             for name, value in arrays.items() if not value.size}
    if not tree:
        raise ValueError("an Orbax checkpoint needs at least one non-empty array")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(path).absolute(), tree,
                          custom_metadata={_EMPTY_KEY: empty})
        checkpointer.wait_until_finished()


def load_orbax(path) -> dict[str, np.ndarray]:
    """Loads a checkpoint written by :func:`save_orbax` as ``{tensor name: numpy array}``.

    Raises:
      CheckpointError: ``path`` does not exist.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"Orbax checkpoint {path} does not exist")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path)
        custom = checkpointer.metadata(path).custom_metadata or {}
    arrays = {name: np.asarray(value) for name, value in tree.items()}
    for name, spec in custom.get(_EMPTY_KEY, {}).items():
        arrays[name] = np.empty(tuple(spec["shape"]), DTYPES[spec["dtype"]])
    return arrays
